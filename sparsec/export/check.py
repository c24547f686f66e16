"""Checking a written ONNX file against the PyTorch program it came from.

onnx.checker, then onnxruntime's outputs against the program's, on stock onnxruntime (function
bodies inlined) and, where sparsec's native kernel is available, with the kernel registered:

- on the example inputs, and again on inputs of another size along every dimension the file
  declares dynamic (batch + 1, every other dynamic dimension - 1, or + 1 from 1; `other_inputs`),
  so a file that answers with a wrong shape or wrong values at another batch, sequence length or
  image size is refused;
- fp32 must match within `tolerance` relative to the output scale (max(1, max |y|)), INT8 compute
  within `int8_tolerance` (both sides quantize each layer's input per row, and where their fp32
  inputs differ in the last bit a rounding tie can land one step apart); a value that is not finite
  (NaN, inf) must be the same value in both, and output shapes must be equal.

With a dense `reference` (the finalized program) the lowered program is also compared with it: an
fp32 lowering must match it, an INT8 one records its error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from sparsec.export.onnx_export import outputs
from sparsec.export.options import ExportError, ExportOptions
from sparsec.shapes import other_size, resized

STOCK = "onnxruntime"
KERNEL = "onnxruntime + sparsec kernel"


@dataclass
class Check:
    runtime: str
    error: float                   # max abs error relative to the output scale
    inputs: dict[str, list[int]] = field(default_factory=dict)  # the input shapes it ran on


def feeds(session: Any, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    values = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    return {name: value.detach().cpu().numpy() for name, value in zip(names, values)}


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Max abs error over all outputs, each relative to its scale max(1, max |finite want|); inf
    when the numbers of outputs or their shapes differ, or a non-finite value (NaN, +-inf) is not
    the same non-finite value in both."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            return math.inf
        if not w.size:
            continue
        if w.dtype.kind not in "fc" and g.dtype.kind not in "fc":
            worst = max(worst, 0.0 if np.array_equal(g, w) else math.inf)
            continue
        finite = np.isfinite(w)
        if not np.array_equal(np.isfinite(g), finite):
            return math.inf
        if not finite.all() and not np.array_equal(g[~finite], w[~finite], equal_nan=True):
            return math.inf
        if not finite.any():
            continue
        scale = max(1.0, float(np.abs(w[finite]).max()))
        worst = max(worst, float(np.abs(g[finite].astype(np.float64) - w[finite]).max()) / scale)
    return worst


def _sessions(path: Path, use_kernel: bool) -> tuple[list[tuple[str, Any]], list[str]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors reach the user as one line of ours, not as ORT's log
    stock = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    sessions, notes = [(STOCK, stock)], []
    if not use_kernel:
        return sessions, notes
    from sparsec import runtime

    if runtime.kernel_available():
        kernel_options = ort.SessionOptions()
        kernel_options.log_severity_level = 4
        sessions.append((KERNEL, runtime.session(str(path), options=kernel_options)))
    else:
        notes.append("native kernel not available: checked on stock onnxruntime only")
    return sessions, notes


def other_inputs(session: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example inputs at another size along every dimension the file declares dynamic: the
    first dimension (batch) one larger, every other one as sparsec.shapes.other_size says; the
    dimensions that share a symbol change together. None when the file declares none dynamic."""
    sizes: dict[str, int] = {}
    changes: dict[tuple[int, int], int] = {}
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    for index, (tensor, declared) in enumerate(zip(tensors, session.get_inputs())):
        for dim, symbol in enumerate(declared.shape):
            if isinstance(symbol, int) or dim >= tensor.dim():
                continue
            n = int(tensor.shape[dim])
            size = sizes.setdefault(str(symbol), n + 1 if dim == 0 else other_size(n))
            changes[(index, dim)] = size
    return resized(args, kwargs, changes) if changes else None


def _shapes(session: Any, args: tuple, kwargs: dict) -> dict[str, list[int]]:
    return {name: list(value.shape) for name, value in feeds(session, args, kwargs).items()}


def check_file(path: Path, shown: Path, module: torch.nn.Module, args: tuple, kwargs: dict,
               options: ExportOptions, reference: torch.nn.Module | None,
               kernel_nodes: int) -> tuple[list[Check], float | None, list[str]]:
    """Check the file at `path` (named `shown` in messages) against `module`; returns the checks,
    the lowered program's error against `reference` and notes. Raises ExportError on a mismatch.
    `kernel_nodes`: how many nodes run on sparsec's kernel (sparse layers, attention): with none,
    the file is checked on stock onnxruntime only."""
    import onnx

    onnx.checker.check_model(str(path))
    if not options.verify:
        return [], None, []
    error_vs_dense = None
    if reference is not None:
        with torch.no_grad():
            error_vs_dense = relative_error(outputs(module(*args, **kwargs)),
                                            outputs(reference.eval()(*args, **kwargs)))
        if not options.int8 and error_vs_dense > options.tolerance:
            raise ExportError(f"{shown}: the lowered PyTorch program differs from the dense one by "
                              f"{error_vs_dense:.3g} (relative to the output scale; allowed "
                              f"{options.tolerance})")
    sessions, notes = _sessions(path, options.kernel and kernel_nodes > 0)
    cases = [(args, kwargs)]
    other = other_inputs(sessions[0][1], args, kwargs)
    if other is not None:
        cases.append(other)
    checks = []
    for case_args, case_kwargs in cases:
        want = _pytorch_outputs(module, case_args, case_kwargs, shown, sessions[0][1])
        for runtime, session in sessions:
            shapes = _shapes(session, case_args, case_kwargs)
            try:
                got = session.run(None, feeds(session, case_args, case_kwargs))
            except Exception as exc:  # onnxruntime's own exception types
                raise ExportError(f"{shown}: {runtime} fails on inputs {_describe(shapes)}: "
                                  f"{_first_line(exc)}") from exc
            error = relative_error(got, want)
            checks.append(Check(runtime, error, shapes))
            if error > options.file_tolerance:
                raise ExportError(f"{shown}: {runtime} output differs from PyTorch by {error:.3g} on "
                                  f"inputs {_describe(shapes)} (relative to the output scale; allowed "
                                  f"{options.file_tolerance}; NaN, inf or a shape that differs count as "
                                  f"infinitely far)")
    return checks, error_vs_dense, notes


def _pytorch_outputs(module: torch.nn.Module, args: tuple, kwargs: dict, shown: Path,
                     session: Any) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            return outputs(module(*args, **kwargs))
    except Exception as exc:
        raise ExportError(f"{shown}: the file declares dynamic dimensions, but the PyTorch program "
                          f"does not run on inputs {_describe(_shapes(session, args, kwargs))}: "
                          f"{_first_line(exc)}") from exc


def _describe(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
