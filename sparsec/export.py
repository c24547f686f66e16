"""ONNX export of a finalized Program, verified against PyTorch.

This writes the masked weights as dense initializers (zeros included) through torch.onnx's
exporter; the block-sparse lowering (custom-domain ops with function bodies, native kernel) is
the `lower` stage of a later issue and will replace the dense form here. The file is written to a
temporary name, checked with onnx.checker, run in onnxruntime on the example inputs and compared
with the PyTorch program, and only then renamed into place.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from sparsec.capture import _dynamic_shapes
from sparsec.errors import UserError


class ExportError(UserError):
    """The ONNX file could not be produced or does not match the PyTorch program."""


def export_onnx(module: torch.nn.Module, path: str | os.PathLike, args: tuple, kwargs: dict,
                dynamic: bool = True, verify: bool = True, tolerance: float = 1e-4) -> Path:
    """Export `module` (eval mode) to `path`; returns the path. Raises ExportError on mismatch."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    shapes = _dynamic_shapes(module, args, kwargs) if dynamic else None
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), kwargs=kwargs or None, dynamo=True,
                              dynamic_shapes=shapes, verbose=False)
        onnx.checker.check_model(str(tmp))
        if verify:
            check_numerics(module, tmp, args, kwargs, tolerance)
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: ONNX export failed: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _tensors(value: Any) -> list[np.ndarray]:
    leaves = pytree.tree_leaves(value)
    if not leaves and hasattr(value, "to_tuple"):  # transformers ModelOutput
        leaves = pytree.tree_leaves(value.to_tuple())
    return [t.detach().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def check_numerics(module: torch.nn.Module, path: Path, args: tuple, kwargs: dict,
                   tolerance: float) -> float:
    """Max abs error of onnxruntime vs PyTorch, relative to the output scale; raises if too large."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds_values = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    feeds = {name: value.detach().cpu().numpy() for name, value in zip(names, feeds_values)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = _tensors(module(*args, **kwargs))
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(1.0, float(np.abs(w).max()) if w.size else 1.0)
        err = float(np.abs(g - w).max()) / scale if w.size else 0.0
        worst = max(worst, err)
        if err > tolerance:
            raise ExportError(f"{path}: onnxruntime output {i} differs from PyTorch by {err:.3g} "
                              f"(relative to the output scale; allowed {tolerance})")
    return worst
