"""How a Program is lowered and exported: `ExportOptions` (the options of `prog.export_onnx`) and
the spec's [export] table, which registers itself here. The [export] keys' defaults are written
once, in EXPORT_FIELDS; ExportOptions takes them from there."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from sparsec.errors import UserError
from sparsec.lowering import cost
from sparsec.schema import Field, default
from sparsec.spec.registry import register_table

EXPORT_FIELDS = {
    "int8": Field("bool", "INT8 compute: the kept blocks as int8 with one float32 scale per output "
                  "row (about 4x smaller than fp32 blocks), each layer's input quantized per row to "
                  "uint8 at run time and the products summed in int32 (kernel and function body "
                  "alike); the accuracy cost against fp32 is reported, and onnxruntime is checked "
                  "against the INT8 PyTorch program within `int8_tolerance`.", default=False),
    "int8_tolerance": Field("float", "With `int8` (or bf16 attention): largest allowed max abs "
                            "error of onnxruntime vs the INT8 PyTorch program, relative to the "
                            "output scale (a rounding tie can move one quantized input by one "
                            "step).", default=1e-2, gt=0),
    "attention": Field("str", "How the file's Attention nodes run (scaled_dot_product_attention on "
                       "[batch, seq, heads * head] projections): `onnx` onnxruntime's own Attention; "
                       "`kernel` sparsec's attention kernel in fp32; `bf16` sparsec's kernel with "
                       "its two products in bf16 on AMX tiles (Intel Sapphire Rapids and later, "
                       "about 2x faster) or with AVX512-BF16 (AMD Zen 4 and 5, 1.4x; fp32 "
                       "elsewhere), checked within `int8_tolerance`; `auto` on "
                       "the `sparsec` target bf16 with `int8`, else fp32, each node only where it "
                       "measures faster on this machine (with `measure`; unmeasured, fp32 for heads "
                       "of at most 64), on `stock` onnx. Either kernel form "
                       "keeps onnxruntime's Attention as its function body (stock onnxruntime runs "
                       "it in fp32).", default="auto", choices=("auto", "onnx", "kernel", "bf16")),
    "policy": Field("str", "Which sites become sparse ops: `cost` those the cost model expects to be "
                    "at least `min_speedup` faster, `always` every site a lowering target accepts, "
                    "`never` none (a dense file).", default="cost", choices=("cost", "always", "never")),
    "min_speedup": Field("float", "Speedup on the `target` runtime a site needs to be lowered "
                         "(policy `cost`): measured on this machine, or estimated when `measure` is "
                         "false.", default=cost.DEFAULT_MIN_SPEEDUP, gt=0),
    "target": Field("str", "The runtime model.onnx is for, which decides what pays off: `sparsec` "
                    "(onnxruntime with sparsec's native kernel registered, `sparsec.runtime.session`) "
                    "or `stock` (plain onnxruntime, which runs each sparse node's ONNX function body). "
                    "With `stock` the whole file is also timed against the dense one and layers are "
                    "kept dense until it is faster (the report says what was done).",
                    default="sparsec", choices=("sparsec", "stock")),
    "measure": Field("bool", "Time each layer shape dense vs sparse on the `target` runtime on this "
                     "machine at export (a second or two per distinct shape, cached under "
                     "`$SPARSEC_CACHE_DIR/cost`) and decide on the measurement. `false` (or the "
                     "environment variable `SPARSEC_MEASURE=0`) uses the constant cost model; the "
                     "report then says \"estimated, not measured\".", default=True),
    "threads": Field("int", "Intra-op threads of the export-time measurements (per layer, whole "
                     "file, `bench`); 0 uses onnxruntime's default. Set it to the deployment's.",
                     default=0, ge=0),
    "tolerance": Field("float", "Largest allowed max abs error of onnxruntime vs PyTorch, relative "
                       "to the output scale.", default=1e-4, gt=0),
    "bench": Field("bool", "Time model.onnx against model.dense.onnx in onnxruntime at the end of "
                   "`sparsec compile` and put the speedup in the report.", default=True),
    "bench_repeats": Field("int", "Interleaved timing rounds of that measurement (medians).",
                           default=30, ge=1),
    "bench_batch": Field("int", "First dimension of the inputs for that measurement; 0 uses the "
                         "example inputs' own.", default=0, ge=0),
}

register_table("export", EXPORT_FIELDS, fill_when_absent=True,
               doc="The lower stage of `sparsec compile`: model.onnx with sparse custom-domain nodes "
                   "(`sparsec::BlockSparseLinear`) and model.dense.onnx, both verified against "
                   "PyTorch. Optional: without it, the defaults below apply.")


class ExportError(UserError):
    """The ONNX file could not be produced or does not match the PyTorch program."""


@dataclass(frozen=True)
class ExportOptions:
    """How `prog.export_onnx` lowers and checks (the [export] table's keys plus API-only ones)."""

    lower: bool = True             # False: a dense file (masks baked, zeros stored)
    int8: bool = default(EXPORT_FIELDS, "int8")
    policy: str = default(EXPORT_FIELDS, "policy")
    min_speedup: float = default(EXPORT_FIELDS, "min_speedup")
    block: tuple[int, int] | None = None   # pack with this block instead of each site's
    target: str = default(EXPORT_FIELDS, "target")
    measure: bool = default(EXPORT_FIELDS, "measure")
    threads: int = default(EXPORT_FIELDS, "threads")
    dynamic: bool = True           # dynamic batch / sequence where the model allows
    verify: bool = True
    tolerance: float = default(EXPORT_FIELDS, "tolerance")
    int8_tolerance: float = default(EXPORT_FIELDS, "int8_tolerance")
    attention: str = default(EXPORT_FIELDS, "attention")
    kernel: bool = True            # also verify with sparsec's kernel when it is available

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> "ExportOptions":
        """From `prog.export_onnx(**options)`; unknown names are a user error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ExportError(f"export_onnx: unknown option {', '.join(unknown)} "
                              f"(allowed: {', '.join(sorted(known))})")
        values = dict(options)
        if values.get("target", "sparsec") not in EXPORT_FIELDS["target"].choices:
            raise ExportError(f"export_onnx: target {values['target']!r} is not one of "
                              f"{', '.join(EXPORT_FIELDS['target'].choices)}")
        if values.get("attention", "auto") not in EXPORT_FIELDS["attention"].choices:
            raise ExportError(f"export_onnx: attention {values['attention']!r} is not one of "
                              f"{', '.join(EXPORT_FIELDS['attention'].choices)}")
        if values.get("block") is not None:
            values["block"] = tuple(int(b) for b in values["block"])
        return cls(**values)

    @classmethod
    def from_spec(cls, table: Mapping[str, Any], dynamic: bool) -> "ExportOptions":
        """From the spec's resolved [export] table (every key present) and [capture] dynamic."""
        return cls(int8=table["int8"], policy=table["policy"], min_speedup=table["min_speedup"],
                   target=table["target"], measure=table["measure"], threads=table["threads"],
                   tolerance=table["tolerance"], int8_tolerance=table["int8_tolerance"],
                   attention=table["attention"], dynamic=dynamic)

    def dense(self) -> "ExportOptions":
        """The options of the dense comparison file: nothing lowered, the same checks."""
        return ExportOptions(lower=False, dynamic=self.dynamic, verify=self.verify,
                             tolerance=self.tolerance, kernel=False)

    @property
    def attention_lowering(self) -> dict[str, Any]:
        """The lower_attention pass's arguments: `compute` ("fp32" | "bf16", or "" where the file
        keeps ONNX Attention; the dense file always does), `max_head` (0: any head size), `measure`
        and `threads` (auto: each node's shape timed on this machine)."""
        from sparsec.lowering import calibrate

        if not self.lower or self.attention == "onnx" or (self.attention == "auto" and self.target != "sparsec"):
            return {"compute": ""}
        if self.attention == "auto":
            # unmeasured, this project's measurements decide: in BERT-base 0.29 ms a node in fp32
            # against onnxruntime's 0.44, bf16 0.21; heads of 128 at onnxruntime's speed in fp32
            measure = self.measure and not calibrate.measuring_disabled()
            compute, max_head = ("bf16", 0) if self.int8 else ("fp32", 64)
            return {"compute": compute, "max_head": max_head, "measure": measure, "threads": self.threads}
        return {"compute": "fp32" if self.attention == "kernel" else "bf16"}

    @property
    def file_tolerance(self) -> float:
        """The allowed error of onnxruntime vs the (lowered) PyTorch program for this file."""
        reduced = self.int8 or self.attention_lowering["compute"] == "bf16"
        return self.int8_tolerance if reduced and self.lower else self.tolerance

    def lowering(self) -> dict[str, Any]:
        """Keyword arguments of sparsec.lowering.stage.lowered_copy."""
        return {"int8": self.int8, "policy": self.policy if self.lower else "never",
                "min_speedup": self.min_speedup, "block": self.block, "target": self.target,
                "measure": self.measure, "threads": self.threads}
