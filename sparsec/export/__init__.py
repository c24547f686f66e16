"""ONNX export of a Program, lowered to sparse ops and verified against PyTorch.

    module --lower stage (bake_masks, choose_sparse_layers, lower_block_sparse)--> lowered GraphModule
           --torch.onnx (onnx_export.to_onnx: opset 23, the targets' custom translations)--> onnx_ir.Model
           --ONNX passes (sparsec.passes.build_onnx_pipeline)--> model with model-local functions
           --write to a temporary name, onnx.checker, onnxruntime vs PyTorch (check.check_file)--> rename

The file is renamed into place only when every check passed; anything that goes wrong is an
`ExportError` (a user error: one line, exit code 2) that names the file.

    options.py      ExportOptions and the spec's [export] table
    onnx_export.py  the torch.onnx call
    check.py        onnx.checker and onnxruntime against PyTorch
    stock_check.py  target stock: the whole file timed against the dense one, fewer layers until
                    it is faster
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
import torch.fx as fx

from sparsec.export.check import Check, check_file
from sparsec.export.onnx_export import example_input_records, static_input_dims, to_onnx
from sparsec.export.options import ExportError, ExportOptions
from sparsec.paths import file_mode
from sparsec.pipeline import Instruments, run_pipeline

__all__ = ["ExportError", "ExportOptions", "ExportResult", "Check", "write_onnx", "export_module",
           "export_pair", "Pair"]


@dataclass
class ExportResult:
    """What export wrote and how it was checked. Path-like: `open(result)` works."""

    path: Path
    sparse_nodes: int
    checks: list[Check] = field(default_factory=list)
    error_vs_dense: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    stock_check: dict[str, Any] | None = None  # target stock: the whole-file timing (stock_check)

    def __fspath__(self) -> str:
        return str(self.path)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def write_onnx(module: torch.nn.Module, path: str | os.PathLike, args: tuple, kwargs: dict,
               options: ExportOptions, reference: torch.nn.Module | None = None,
               instruments: Instruments | None = None, shown: Path | None = None) -> ExportResult:
    """Export `module` (eval mode; lowered or not) to `path` through the ONNX passes, checked;
    raises ExportError naming `shown` (default: `path`; where the file will end up). `instruments`
    print, time and snapshot the ONNX passes."""
    from sparsec.lowering import attention_op, targets
    from sparsec.passes import build_onnx_pipeline

    start = time.perf_counter()
    path = Path(path)
    shown = shown or path
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    inst = instruments or Instruments()
    try:
        with inst.timed("torch.onnx export"):
            model = to_onnx(module, args, kwargs, options.dynamic)
        inst.record("exported", "onnx", lambda: _text(model, "torch.onnx export"))
        passes = build_onnx_pipeline(static=static_input_dims(module),
                                     inputs=example_input_records(args, kwargs),
                                     attention=options.attention_lowering, target=options.target)
        model = run_pipeline(model, passes, inst)
        sparse = sum(len(target.onnx_nodes(model)) for target in targets.all_targets())
        attention = len(attention_op.attention_nodes(model))
        with inst.timed("write and check ONNX"):
            ir.save(model, str(tmp))
            checks, error_vs_dense, notes = check_file(tmp, shown, module, args, kwargs, options,
                                                       reference, sparse + attention)
        if attention:
            from sparsec.passes.lower_attention import MEASURED

            found = sorted({n.metadata_props.get(MEASURED, "") for n in attention_op.attention_nodes(model)} - {""})
            packed = sum(attention_op.PACKED in n.attributes for n in attention_op.attention_nodes(model))
            compute = options.attention_lowering["compute"]
            if compute == "bf16" and not _bf16_attention_here():
                compute = "bf16, computed in fp32 on this CPU: no AMX-BF16 or AVX512-BF16"
            notes.append(f"{attention} Attention node(s) run sparsec's attention kernel "
                         f"({compute}{'; ' + '; '.join(found) if found else ''}; "
                         f"stock onnxruntime runs its own Attention in fp32)"
                         + (f"; {packed} of them read Q, K and V from one fused projection node" if packed else ""))
        if options.int8 and sparse and options.target == "sparsec":
            notes += _int8_speed_notes()
        os.chmod(tmp, file_mode())  # temporary files are private; the file is an ordinary one
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{shown}: ONNX export failed: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportResult(path=path, sparse_nodes=sparse, checks=checks, error_vs_dense=error_vs_dense,
                        seconds=time.perf_counter() - start, notes=notes)


# INT8 without VNNI, measured (docs/BENCHMARKS.md, "AMD Zen 3: AVX2 only"): the kernel's AVX2 path
# widens to int16 to stay exact, and runs slower than fp32 blocks.
INT8_WITHOUT_VNNI = ("INT8 compute runs the kernel's {isa} path on this CPU (no AVX-512 VNNI): exact, but slower "
                     "than fp32 blocks (BERT-base, 32x32 blocks at density 0.1, AMD Zen 3: 45.9 vs 30.0 ms); "
                     "here int8 buys a smaller file, not speed")


def _kernel_isa(**kind: bool) -> str | None:
    """The instruction set this machine's kernel takes for `kind` (library_isa's int8 or
    bf16_attention), None where no kernel is built."""
    from sparsec import runtime
    from sparsec.runtime.build import library_isa

    library = runtime.kernel_path()
    return None if library is None else library_isa(library, **kind)


def _int8_speed_notes() -> list[str]:
    """A note when this machine's kernel computes INT8 without VNNI (or AMX)."""
    isa = _kernel_isa(int8=True)
    return [] if isa in (None, "avx512", "amx") else [INT8_WITHOUT_VNNI.format(isa=isa)]


def _bf16_attention_here() -> bool:
    """Whether this machine's kernel rounds bf16 attention to bf16 (AMX or AVX512-BF16; elsewhere it
    computes in fp32). True where no kernel is built: then nothing is claimed about this CPU."""
    return _kernel_isa(bf16_attention=True) in (None, "amx", "avx512_bf16")


def _text(model: ir.Model, title: str) -> str:
    from sparsec.lowering.onnx_graph import format_model

    return format_model(model, title)


@dataclass
class Pair:
    """The lowered file and the dense one, as written by export_pair."""

    model: ExportResult
    dense: ExportResult
    lowered: fx.GraphModule          # what model.onnx was exported from (its GraphInfo.lowering)


def export_pair(module: fx.GraphModule, path: Path, dense_path: Path, args: tuple, kwargs: dict,
                options: ExportOptions, instruments: Instruments | None = None,
                shown: Path | None = None, dense_shown: Path | None = None) -> Pair:
    """Lower a rewritten (masked) module as `options` say and write it to `path`, and its dense form
    to `dense_path`, both checked. For `options.target == "stock"` the lowered file is then timed
    against the dense one and lowered again with fewer sparse layers until it is faster
    (stock_check; the outcome is `model.stock_check`)."""
    from sparsec.export import stock_check
    from sparsec.lowering import calibrate, stage

    inst = instruments or Instruments()
    dense = stage.dense_copy(module)
    lowered = stage.lowered_copy(module, **options.lowering(), instruments=instruments)
    model = write_onnx(lowered, path, args, kwargs, options, reference=dense, instruments=instruments,
                       shown=shown)
    with inst.timed("dense export"):
        dense_model = write_onnx(dense, dense_path, args, kwargs, options.dense(), shown=dense_shown)
    if options.target == "stock" and options.lower and model.sparse_nodes:
        why_not = ("[export] measure = false" if not options.measure else calibrate.measuring_disabled())
        if why_not:
            model.stock_check = {"threads": options.threads, "attempts": [],
                                 "outcome": f"not checked: estimated, not measured ({why_not}); "
                                            "the file may be slower than the dense one"}
        else:
            with inst.timed("stock check"):
                lowered, model, check = stock_check.not_slower(
                    module, lowered, model, path, dense_path, args, kwargs, options, dense, shown or path)
            model.stock_check = check.to_dict()
    return Pair(model, dense_model, lowered)


def export_module(module: fx.GraphModule, path: str | os.PathLike, args: tuple, kwargs: dict,
                  options: ExportOptions) -> ExportResult:
    """`prog.export_onnx`: lower a rewritten (masked) module as `options` say and write it (for
    target stock through export_pair, whose dense file is a temporary one)."""
    from sparsec.lowering import stage

    dense = stage.dense_copy(module)
    if not options.lower:
        return write_onnx(dense, path, args, kwargs, options)
    if options.target == "stock":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            pair = export_pair(module, Path(tmp) / path.name, Path(tmp) / "dense.onnx", args, kwargs,
                               options, shown=path)
            os.replace(pair.model.path, path)
        pair.model.path = path
        return pair.model
    lowered = stage.lowered_copy(module, **options.lowering())
    return write_onnx(lowered, path, args, kwargs, options, reference=dense)
