"""Target `stock`: a sparse file must never be slower than the dense one on stock onnxruntime.

Per-layer measurements (choose_sparse_layers) miss what only the whole graph shows: the function
bodies' Gathers and Transposes between layers, fusions onnxruntime makes in the dense graph and not
in the sparse one. So after lowering for `[export] target = "stock"` the written file is timed
against the dense file (each alone in its own session, closed before the next: see
sparsec.lowering.calibrate.time_models; medians), and while it is not at least FILE_MARGIN faster:

    1. only the layers measured at least STRONG x min_speedup faster stay sparse (when that is a
       smaller, non-empty set), timed again;
    2. otherwise every layer stays dense: model.onnx is the dense graph.

Each attempt, its timing and the outcome go to the report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx

from sparsec.ir import LayerPlan, graph_info

FILE_MARGIN = 1.05   # the sparse file must be this much faster (noise margin)
STRONG = 2.0         # attempt 1 keeps layers at least STRONG x min_speedup faster
FILE_S = 0.5         # seconds of timed calls per file and round
FILE_ROUNDS = 4      # even: each file goes first as often as the other
FILE_MIN_CALLS = 5   # per file and round, however long a call takes


@dataclass
class Attempt:
    sparse_layers: int
    dense_ms: float
    sparse_ms: float
    calls: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("inf")


@dataclass
class StockCheck:
    """What the whole-file check measured and did."""

    threads: int
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "outcome": self.outcome,
                "attempts": [{**asdict(a), "speedup": a.speedup} for a in self.attempts]}


def time_files(sparse: Path, dense: Path, threads: int, batch: int | None = None) -> Attempt:
    """The two files timed alone on stock onnxruntime (the sparse one through its function bodies)."""
    from sparsec.bench import example_feeds, sparse_layers, stock_session
    from sparsec.lowering.calibrate import time_models

    probe = stock_session(sparse, threads or None)
    feeds = example_feeds(sparse, probe, batch)
    del probe
    dense_ms, sparse_ms, calls = time_models(str(dense), str(sparse), feeds, False, threads,
                                             seconds=FILE_S, rounds=FILE_ROUNDS,
                                             min_calls=FILE_MIN_CALLS)
    return Attempt(len(sparse_layers(sparse)), dense_ms, sparse_ms, calls)


def not_slower(module: fx.GraphModule, lowered: fx.GraphModule, model: Any, path: Path,
               dense_path: Path, args: tuple, kwargs: dict, options: Any, reference: fx.GraphModule,
               shown: Path) -> tuple[fx.GraphModule, Any, StockCheck]:
    """Time `path` (written from `lowered`) against `dense_path`; lower fewer layers and rewrite
    `path` until it is faster (see the module docstring). Returns the lowered module and the
    ExportResult of what `path` now holds, and the check."""
    check = StockCheck(options.threads)
    attempt = time_files(path, dense_path, options.threads)
    check.attempts.append(attempt)
    if attempt.speedup >= FILE_MARGIN:
        check.outcome = (f"measured {attempt.speedup:.2f}x faster than the dense file on stock "
                         f"onnxruntime: kept as lowered")
        return lowered, model, check
    plans = [p for p in graph_info(lowered).lowering.values() if p.lower]
    bar = STRONG * options.min_speedup
    strong = [p for p in plans if _speedup(p) >= bar]
    if strong and len(strong) < len(plans):
        why = (f"kept dense: with every chosen layer lowered the file ran {attempt.speedup:.2f}x of "
               f"dense on stock onnxruntime; only layers at least {bar:g}x faster stay sparse")
        lowered, model = _relower(module, plans, strong, why, path, args, kwargs, options,
                                  reference, shown)
        attempt = time_files(path, dense_path, options.threads)
        check.attempts.append(attempt)
        if attempt.speedup >= FILE_MARGIN:
            check.outcome = (f"lowered {len(strong)} of {len(plans)} chosen layers (those at least "
                             f"{bar:g}x faster): measured {attempt.speedup:.2f}x faster than dense")
            return lowered, model, check
    why = (f"kept dense: the lowered file was not faster than the dense one on stock onnxruntime "
           f"(measured {', '.join(f'{a.speedup:.2f}x' for a in check.attempts)})")
    lowered, model = _relower(module, plans, [], why, path, args, kwargs, options, reference, shown)
    check.outcome = ("shipped the dense graph: no lowering was measured faster than dense on stock "
                     f"onnxruntime ({', '.join(f'{a.speedup:.2f}x' for a in check.attempts)})")
    return lowered, model, check


def _speedup(plan: LayerPlan) -> float:
    if plan.measured is not None:
        return plan.measured.speedup
    return plan.speedup or 0.0


def _relower(module: fx.GraphModule, plans: list[LayerPlan], keep: list[LayerPlan], why: str,
             path: Path, args: tuple, kwargs: dict, options: Any, reference: fx.GraphModule,
             shown: Path) -> tuple[fx.GraphModule, Any]:
    """Lower again with every site of `plans` not in `keep` dense (saying `why`); rewrite `path`."""
    from sparsec.export import write_onnx
    from sparsec.lowering import stage

    kept = {p.site for p in keep}
    keep_dense = tuple((p.site, why) for p in plans if p.site not in kept)
    lowered = stage.lowered_copy(module, **{**options.lowering(), "keep_dense": keep_dense})
    model = write_onnx(lowered, path, args, kwargs, options, reference=reference, shown=shown)
    return lowered, model
