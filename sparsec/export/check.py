"""Checking a written ONNX file against the PyTorch program it came from.

onnx.checker, then onnxruntime's outputs against the program's on the example inputs, on stock
onnxruntime (function bodies inlined) and, where sparsec's native kernel is available, with the
kernel registered. fp32 must match within `tolerance` relative to the output scale
(max(1, max |y|)). With a dense `reference` (the finalized program) the lowered program is also
compared with it: an fp32 lowering must match it, an INT8 one records its error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from sparsec.export.onnx_export import outputs
from sparsec.export.options import ExportError, ExportOptions

STOCK = "onnxruntime"
KERNEL = "onnxruntime + sparsec kernel"


@dataclass
class Check:
    runtime: str
    error: float                   # max abs error relative to the output scale


def feeds(session: Any, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
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
    from sparsec import runtime

    if runtime.kernel_available():
        sessions.append((KERNEL, runtime.session(str(path))))
    else:
        notes.append("native kernel not available: checked on stock onnxruntime only")
    return sessions, notes


def check_file(path: Path, shown: Path, module: torch.nn.Module, args: tuple, kwargs: dict,
               options: ExportOptions, reference: torch.nn.Module | None,
               sparse_nodes: int) -> tuple[list[Check], float | None, list[str]]:
    """Check the file at `path` (named `shown` in messages) against `module`; returns the checks,
    the lowered program's error against `reference` and notes. Raises ExportError on a mismatch."""
    import onnx

    onnx.checker.check_model(str(path))
    if not options.verify:
        return [], None, []
    with torch.no_grad():
        want = outputs(module(*args, **kwargs))
        dense = outputs(reference.eval()(*args, **kwargs)) if reference is not None else None
    error_vs_dense = None
    if dense is not None:
        error_vs_dense = relative_error(want, dense)
        if not options.int8 and error_vs_dense > options.tolerance:
            raise ExportError(f"{shown}: the lowered PyTorch program differs from the dense one by "
                              f"{error_vs_dense:.3g} (relative to the output scale; allowed "
                              f"{options.tolerance})")
    sessions, notes = _sessions(path, options.kernel and sparse_nodes > 0)
    checks = []
    for runtime, session in sessions:
        got = session.run(None, feeds(session, args, kwargs))
        if len(got) != len(want):
            raise ExportError(f"{shown}: onnxruntime returns {len(got)} outputs, PyTorch {len(want)}")
        error = relative_error(got, want)
        checks.append(Check(runtime, error))
        if error > options.tolerance:
            raise ExportError(f"{shown}: {runtime} output differs from PyTorch by {error:.3g} "
                              f"(relative to the output scale; allowed {options.tolerance})")
    return checks, error_vs_dense, notes
