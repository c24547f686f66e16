"""Which dimensions of a model's inputs are dynamic: the batch, and the others the model really allows.

torch.export's `Dim.AUTO` on every dimension keeps symbolic whatever no guard pins, so a CNN's
channels or an MLP's features could come out dynamic and the ONNX file then claims sizes the model
cannot take. Instead:

- the first dimension of every tensor input (the batch) is dynamic; an example of batch 1 is
  repeated to batch 2 for capture, since torch.export fixes a dimension whose example size is 1;
- any other dimension is dynamic only when the model really runs at another size: the dimensions
  of the example inputs are grouped by their size (a sequence length shared by input_ids and
  attention_mask is one group, an image's height and width another), and each group is tried
  eagerly one smaller (one larger from 1) before capture;
- the example inputs are run as given first, so an example the model cannot take is reported as
  such, naming the model's own error.

The result, `DynamicDims`, is kept on the IR (`GraphInfo.dynamic`) and reused when the lowered
program is exported to ONNX, so the file declares exactly the dimensions the program accepts.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from sparsec.errors import CaptureError


@dataclass(frozen=True)
class DynamicDims:
    """Per tensor of the flattened (args, kwargs), in pytree order: its dynamic dimensions."""

    dims: tuple[tuple[int, ...], ...]

    def describe(self, args: tuple, kwargs: dict) -> str:
        tensors = _tensor_leaves(args, kwargs)
        parts = [f"{'x'.join(str(n) if d not in dims else '*' for d, n in enumerate(t.shape))}"
                 for t, dims in zip(tensors, self.dims)]
        return ", ".join(parts)


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]


def resized(args: tuple, kwargs: dict, changes: dict[tuple[int, int], int]) -> tuple[tuple, dict]:
    """The inputs with tensor `i`'s dimension `d` set to `changes[(i, d)]`: cut, or grown by
    repeating the first entries (token ids stay valid ids)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_index = -1
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensor_index += 1
            for (i, dim), size in changes.items():
                if i == tensor_index:
                    leaf = _resize(leaf, dim, size)
        out.append(leaf)
    new_args, new_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(new_args), dict(new_kwargs)


def _resize(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    n = tensor.shape[dim]
    if size <= n:
        return tensor.narrow(dim, 0, size)
    return torch.cat([tensor, tensor.narrow(dim, 0, size - n)], dim=dim)


def other_size(n: int) -> int:
    """The size a dimension of size n is tried at: one smaller, or one larger from 1."""
    return n - 1 if n >= 2 else n + 1


def batched_for_capture(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs with a batch of 1 repeated to 2 (torch.export would fix it to 1)."""
    tensors = _tensor_leaves(args, kwargs)
    changes = {(i, 0): 2 for i, t in enumerate(tensors) if t.dim() >= 1 and t.shape[0] == 1}
    return resized(args, kwargs, changes) if changes else (args, kwargs)


@torch.no_grad()
def plan(model: torch.nn.Module, args: tuple, kwargs: dict, probe: bool = True) -> DynamicDims:
    """Which dimensions are dynamic (see the module docstring); with `probe` False only the batch.
    Runs the model in eval mode; its mode is restored. Raises CaptureError when the model does not
    run on the example inputs."""
    tensors = _tensor_leaves(args, kwargs)
    was_training = model.training
    model.eval()
    try:
        try:
            model(*args, **kwargs)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CaptureError(f"the model does not run on its example inputs ({_shapes(tensors)}): "
                               f"{type(exc).__name__}: {first} (fix example_inputs() / "
                               f"example_kwargs())") from exc
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, t in enumerate(tensors):
            for dim in range(1, t.dim() if probe else 1):
                groups.setdefault(int(t.shape[dim]), []).append((i, dim))
        dynamic: list[set[int]] = [{0} if t.dim() >= 1 else set() for t in tensors]
        for size, members in groups.items():
            if _runs(model, args, kwargs, {member: other_size(size) for member in members}):
                for i, dim in members:
                    dynamic[i].add(dim)
    finally:
        model.train(was_training)
    return DynamicDims(tuple(tuple(sorted(d)) for d in dynamic))


def _runs(model: torch.nn.Module, args: tuple, kwargs: dict, changes: dict[tuple[int, int], int]) -> bool:
    new_args, new_kwargs = resized(args, kwargs, changes)
    try:
        model(*new_args, **new_kwargs)
    except Exception:  # the model's own refusal: this group of dimensions stays static
        return False
    return True


def _shapes(tensors: list[torch.Tensor]) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in tensors) or "no tensors"


def export_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: DynamicDims | None) -> Any:
    """torch.export's `dynamic_shapes` for `model.forward` on (args, kwargs): Dim.AUTO on the
    dynamic dimensions, every other dimension static (None for a static capture)."""
    if dynamic is None:
        return None
    dims_of = {id(t): dims for t, dims in zip(_tensor_leaves(args, kwargs), dynamic.dims)}
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs)

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in dims_of.get(id(x), ())} or None
        return None

    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            shapes[name] = pytree.tree_map(spec, value)
    return shapes
