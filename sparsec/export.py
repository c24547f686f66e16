"""ONNX export of a Program, lowered to block-sparse ops and verified against PyTorch.

    module --lower (bake_masks, choose_sparse_layers, lower_block_sparse)--> lowered GraphModule
           --torch.onnx (dynamo, opset 23, custom translation)--> ONNX with sparsec::BlockSparseLinear
           nodes --onnx_fusions (attention on 3-D projections; GELU / residual / LayerNorm epilogues)
           --> + the model-local FunctionProtos --> onnx.checker --> onnxruntime vs PyTorch --> rename

The file is written to a temporary name and renamed into place only when every check passed:
onnx.checker, then onnxruntime's outputs against the lowered PyTorch program's on the example
inputs, on stock onnxruntime (the function body is inlined) and, where sparsec's native kernel is
available, with the kernel registered. fp32 must match within `tolerance` relative to the output
scale (max(1, max |y|)). With a dense `reference` (the finalized program), the lowered program is
also compared with it: an fp32 lowering must match it, an INT8 one records its error.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from sparsec.capture import _dynamic_shapes
from sparsec.errors import UserError

METADATA_INPUTS = "sparsec.example_inputs"
# Opset 23 has `Attention`: scaled_dot_product_attention exports as one node (onnxruntime's fused
# CPU kernel) instead of MatMul/Softmax/MatMul with a NaN guard.
ONNX_OPSET = 23
STOCK = "onnxruntime"
KERNEL = "onnxruntime + sparsec kernel"


class ExportError(UserError):
    """The ONNX file could not be produced or does not match the PyTorch program."""


@dataclass(frozen=True)
class ExportOptions:
    """How `prog.export_onnx` lowers and checks (also the spec's [export] table)."""

    lower: bool = True             # False: a dense file (masks baked, zeros stored)
    int8: bool = False             # int8 blocks with one float32 scale per block
    policy: str = "cost"           # cost | always | never: which sites become block-sparse
    min_speedup: float = 1.5       # the cost model's estimate a site needs to be lowered
    block: tuple[int, int] | None = None   # pack with this block instead of each site's
    dynamic: bool = True           # dynamic batch / sequence where the model allows
    verify: bool = True
    tolerance: float = 1e-4
    kernel: bool = True            # also verify with sparsec's kernel when it is available

    @classmethod
    def of(cls, options: dict[str, Any]) -> "ExportOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ExportError(f"export_onnx: unknown option {', '.join(unknown)} "
                              f"(allowed: {', '.join(sorted(known))})")
        values = dict(options)
        if values.get("block") is not None:
            values["block"] = tuple(int(b) for b in values["block"])
        return cls(**values)


@dataclass
class Check:
    runtime: str
    error: float                   # max abs error relative to the output scale


@dataclass
class ExportResult:
    """What export wrote and how it was checked. Path-like: `open(result)` works."""

    path: Path
    sparse_nodes: int
    checks: list[Check] = field(default_factory=list)
    error_vs_dense: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.path)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def lowering_pipeline(options: ExportOptions) -> list:
    from sparsec.passes import build_lowering_pipeline

    return build_lowering_pipeline(int8=options.int8, policy=options.policy if options.lower else "never",
                                   min_speedup=options.min_speedup, block=options.block)


def lower(module: fx.GraphModule, options: ExportOptions, instruments=None) -> fx.GraphModule:
    """A lowered copy of a rewritten (masked) GraphModule; `module` is left as it is."""
    import copy

    from sparsec.pipeline import run_pipeline

    lowered = copy.deepcopy(module)
    lowered = run_pipeline(lowered, lowering_pipeline(options), instruments)
    return lowered.eval()


def export_onnx(module: torch.nn.Module, path: str | os.PathLike, args: tuple, kwargs: dict,
                options: ExportOptions | None = None, reference: torch.nn.Module | None = None
                ) -> ExportResult:
    """Export `module` (eval mode; lowered or not) to `path`, verified. Raises ExportError."""
    import onnx

    from sparsec.lowering.translate import sparse_nodes

    options = options or ExportOptions()
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model = _to_onnx(module, args, kwargs, options.dynamic)
        _record_inputs(model, args, kwargs)
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        result = ExportResult(path=path, sparse_nodes=len(sparse_nodes(model)))
        if options.verify:
            _verify(module, tmp, args, kwargs, options, reference, result)
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: ONNX export failed: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    result.seconds = time.perf_counter() - start
    return result


def _to_onnx(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool):
    from sparsec.lowering.onnx_fusions import attention_head_layout, drop_softmax_nan_guards, fuse_epilogues
    from sparsec.lowering.translate import attach_functions, custom_translation_table

    shapes = _dynamic_shapes(module, args, kwargs) if dynamic else None
    # torch.onnx logs a warning per torchvision op it cannot register; torchvision is not used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True,
                                    opset_version=ONNX_OPSET, dynamic_shapes=shapes, verbose=False, optimize=True,
                                    custom_translation_table=custom_translation_table())
    model = program.model_proto
    _pin_static_input_dims(module, model)
    drop_softmax_nan_guards(model)
    attention_head_layout(model)
    fuse_epilogues(model)
    attach_functions(model)
    compact_padding(model)
    return model


def _pin_static_input_dims(module: torch.nn.Module, model) -> None:
    """Write the input dimensions that capture fixed as numbers into the ONNX inputs. torch.export
    specializes a dimension whose example size is 1 (or that the model needs fixed), and the captured
    graph then uses it as a constant (a view to [1, -1, heads, head]); exporting that graph again
    names the dimension symbolically, so another size would fail deep inside onnxruntime (or compute
    something else) instead of at the input. The captured placeholders' example values say which."""
    if not isinstance(module, fx.GraphModule):
        return
    examples = {node.name: node.meta.get("val") for node in module.graph.nodes if node.op == "placeholder"}
    for value in model.graph.input:
        fake = examples.get(value.name)
        if not isinstance(fake, torch.Tensor) or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != fake.dim():
            continue
        for dim, size in zip(dims, fake.shape):
            if isinstance(size, int):
                dim.Clear()
                dim.dim_value = size


def stored_values(model, node) -> tuple[tuple[int, ...], int, int, int] | None:
    """How a sparse node's `values` are stored: (padded dims [R, S, BR, BC], ONNX data type, bytes,
    blocks stored), whether as one initializer or compacted (kept blocks + slot index, Gathered).
    None when the values are not constants of the file."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    name = node.input[1]
    if name in inits:
        init = inits[name]
        dims = tuple(init.dims)
        return dims, init.data_type, numpy_helper.to_array(init).nbytes, dims[0] * dims[1]
    producer = next((n for n in model.graph.node if name in n.output and n.op_type == "Gather"), None)
    if producer is None or not all(i in inits for i in producer.input):
        return None
    kept, slots = (inits[i] for i in producer.input)
    dims = (*slots.dims, *kept.dims[1:])
    nbytes = numpy_helper.to_array(kept).nbytes + numpy_helper.to_array(slots).nbytes
    return dims, kept.data_type, nbytes, int(kept.dims[0]) - 1


def compact_padding(model) -> int:
    """Store each sparse node's `values` without its padding slots (see onnx_op.compact_values):
    rows that keep fewer blocks than the widest row would otherwise store zero blocks in the file.
    Returns how many nodes were compacted."""
    from onnx import numpy_helper

    from sparsec.lowering.onnx_op import compact_values
    from sparsec.lowering.translate import sparse_nodes

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    added = []
    for node in sparse_nodes(model):
        values_name, row_nnz_name = node.input[1], node.input[3]
        if values_name not in inits or row_nnz_name not in inits:
            continue
        values = numpy_helper.to_array(inits[values_name])
        row_nnz = numpy_helper.to_array(inits[row_nnz_name])
        if bool((row_nnz == values.shape[1]).all()):
            continue  # balanced rows: no padding to drop
        nodes, new_inits = compact_values(values, row_nnz, values_name)
        graph.initializer.remove(inits.pop(values_name))
        graph.initializer.extend(new_inits)
        added.extend(nodes)
    for node in reversed(added):  # the Gathers read only initializers: they go first
        graph.node.insert(0, node)
    return len(added)


def _record_inputs(model, args: tuple, kwargs: dict) -> None:
    """Example input shapes and dtypes in the file's metadata, for `sparsec bench`."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in model.graph.input]
    record = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
              for name, t in zip(names, leaves)}
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_INPUTS, json.dumps(record)


def outputs(value: Any) -> list[np.ndarray]:
    """Every tensor of a model output as numpy, in pytree order (ModelOutput included)."""
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        value = value.to_tuple()
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def feeds(session, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    values = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    return {name: value.detach().cpu().numpy() for name, value in zip(names, values)}


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Max abs error over all outputs, each relative to its scale max(1, max |want|)."""
    worst = 0.0
    for g, w in zip(got, want):
        if not w.size:
            continue
        scale = max(1.0, float(np.abs(w).max()))
        worst = max(worst, float(np.abs(g.astype(np.float64) - w).max()) / scale)
    return worst


def _sessions(path: Path, use_kernel: bool) -> tuple[list[tuple[str, Any]], list[str]]:
    import onnxruntime as ort

    stock = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sessions, notes = [(STOCK, stock)], []
    if not use_kernel:
        return sessions, notes
    try:
        from sparsec import runtime
    except ImportError:
        return sessions, ["sparsec.runtime is not installed: checked on stock onnxruntime only"]
    if runtime.kernel_available():
        sessions.append((KERNEL, runtime.session(str(path))))
    else:
        notes.append("native kernel not available: checked on stock onnxruntime only")
    return sessions, notes


def _verify(module: torch.nn.Module, path: Path, args: tuple, kwargs: dict, options: ExportOptions,
            reference: torch.nn.Module | None, result: ExportResult) -> None:
    with torch.no_grad():
        want = outputs(module(*args, **kwargs))
        dense = outputs(reference.eval()(*args, **kwargs)) if reference is not None else None
    if dense is not None:
        result.error_vs_dense = relative_error(want, dense)
        if not options.int8 and result.error_vs_dense > options.tolerance:
            raise ExportError(f"{result.path}: the lowered PyTorch program differs from the dense "
                              f"one by {result.error_vs_dense:.3g} (relative to the output scale; "
                              f"allowed {options.tolerance})")
    sessions, result.notes = _sessions(path, options.kernel and result.sparse_nodes > 0)
    for runtime, session in sessions:
        got = session.run(None, feeds(session, args, kwargs))
        if len(got) != len(want):
            raise ExportError(f"{result.path}: onnxruntime returns {len(got)} outputs, PyTorch "
                              f"{len(want)}")
        error = relative_error(got, want)
        result.checks.append(Check(runtime, error))
        if error > options.tolerance:
            raise ExportError(f"{result.path}: {runtime} output differs from PyTorch by {error:.3g} "
                              f"(relative to the output scale; allowed {options.tolerance})")


# --------------------------------------------------------------------------- the compile stage
MODEL_FILE = "model.onnx"
DENSE_FILE = "model.dense.onnx"


def options_from_spec(table: dict[str, Any] | None, dynamic: bool = True) -> ExportOptions:
    table = dict(table or {})
    return ExportOptions(int8=table.get("int8", False), policy=table.get("policy", "cost"),
                         min_speedup=table.get("min_speedup", 1.5),
                         tolerance=table.get("tolerance", 1e-4), dynamic=dynamic)


def export_stage(module: fx.GraphModule, args: tuple, kwargs: dict, options: ExportOptions,
                 folder: Path, instruments=None, bench_repeats: int = 0,
                 bench_batch: int | None = None) -> dict[str, Any]:
    """The `lower` stage of `sparsec compile`: folder/model.onnx (lowered) and
    folder/model.dense.onnx (masks baked), both verified; returns the report's lowering section."""
    from sparsec.passes.choose_sparse_layers import lowering_plans

    lowered = lower(module, options, instruments)
    dense = lower(module, ExportOptions(lower=False))
    sparse_result = export_onnx(lowered, folder / MODEL_FILE, args, kwargs, options, reference=dense)
    dense_options = ExportOptions(lower=False, dynamic=options.dynamic, tolerance=options.tolerance,
                                  verify=options.verify)
    dense_result = export_onnx(dense, folder / DENSE_FILE, args, kwargs, dense_options)
    section: dict[str, Any] = {
        "int8": options.int8,
        "policy": options.policy,
        "layers": [plan.to_dict() for plan in lowering_plans(lowered).values()],
        "model": {**sparse_result.to_dict(), "path": MODEL_FILE,
                  "bytes": (folder / MODEL_FILE).stat().st_size},
        "dense": {**dense_result.to_dict(), "path": DENSE_FILE,
                  "bytes": (folder / DENSE_FILE).stat().st_size},
        "bench": None,
    }
    if bench_repeats:
        from sparsec.bench import bench

        section["bench"] = bench(folder / MODEL_FILE, folder / DENSE_FILE, repeats=bench_repeats,
                                 batch=bench_batch).to_dict()
    return section


def format_lowering(section: dict[str, Any]) -> list[str]:
    """The report's lowering part: per-site decision, the files, their checks and speed."""
    from sparsec.bench import format_table

    rows = [(layer["site"], "block-sparse" if layer["lowered"] else "dense", layer["reason"])
            for layer in section["layers"]]
    lines = [f"lowering ({'int8' if section['int8'] else 'fp32'} blocks, policy {section['policy']}):"]
    lines += format_table(("site", "lowered to", "why"), rows, set()) if rows else ["  no sites"]
    model, dense = section["model"], section["dense"]
    lines.append("")
    for label, entry in (("model.onnx", model), ("model.dense.onnx", dense)):
        checks = ", ".join(f"{c['runtime']} {c['error']:.1e}" for c in entry["checks"]) or "not verified"
        lines.append(f"{label:17s} {entry['bytes'] / 1e6:8.3f} MB, {entry['sparse_nodes']} sparse "
                     f"nodes; max error vs PyTorch: {checks}")
    if model.get("error_vs_dense") is not None:
        lines.append(f"{'':17s} lowered vs dense PyTorch program: max error {model['error_vs_dense']:.1e}"
                     f" (relative to the output scale)")
    lines.append(f"{'':17s} file {dense['bytes'] / model['bytes']:.2f}x smaller than the dense export")
    lines += [f"note: {n}" for n in model.get("notes", [])]
    bench = section.get("bench")
    if bench:
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in bench.get("inputs", {}).items())
        lines.append(f"onnxruntime latency ({bench['repeats']} interleaved runs, medians; inputs "
                     f"{shapes}):")
        for name, ms in bench["medians_ms"].items():
            speedup = bench["speedup"].get(name)
            lines.append(f"  {name:38s} {ms:9.3f} ms" + (f"  {speedup:.2f}x" if speedup else ""))
        lines += [f"  note: {n}" for n in bench.get("notes", [])]
    return lines
