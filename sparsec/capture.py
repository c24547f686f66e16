"""Capture: a PyTorch model -> sparsec IR (a torch.fx GraphModule).

`torch.export.export(strict=False)` first (it handles transformers-5 models, which
`symbolic_trace` cannot), `torch.fx.symbolic_trace` as the fallback for plain modules. The model
is captured in train mode so that dropout and batch norm appear with their train-time arguments;
the `make_mode_aware` pass then makes them follow the train/eval mode again.
"""
from __future__ import annotations

import inspect
import traceback
import warnings

import torch
import torch.fx as fx

from sparsec import shapes
from sparsec.errors import CaptureError
from sparsec.ir import graph_info
from sparsec.paths import is_library_file

# Modules whose behaviour depends on train/eval: symbolic_trace keeps them as call_module leaves.
_MODE_MODULES = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm,
                 torch.nn.modules.instancenorm._InstanceNorm)


def capture(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
            method: str = "auto", dynamic: bool = True) -> fx.GraphModule:
    """Capture `model` as a plain GraphModule whose parameters keep their `named_parameters()` names.

    The returned module shares parameters and buffers with `model`. The batch is always dynamic;
    with `dynamic`, so are the other dimensions the model really allows (sparsec.shapes). A model
    that does not run on its example inputs is a CaptureError naming the model's own error.
    """
    example_kwargs = dict(example_kwargs or {})
    _disable_kv_cache(model)
    dims = shapes.plan(model, example_inputs, example_kwargs, probe=dynamic)
    was_training = model.training
    model.train()
    errors: list[tuple[str, BaseException]] = []
    try:
        if method in ("auto", "export"):
            try:
                gm = _via_export(model, example_inputs, example_kwargs, dims)
                graph_info(gm).dynamic = dims
                return gm
            except Exception as exc:  # noqa: BLE001 - reported below with its source line
                errors.append(("torch.export.export", exc))
        if method in ("auto", "symbolic_trace"):
            try:
                gm = _via_symbolic_trace(model)
                graph_info(gm).dynamic = dims
                return gm
            except Exception as exc:  # noqa: BLE001
                errors.append(("torch.fx.symbolic_trace", exc))
    finally:
        model.train(was_training)
    raise CaptureError(_explain(model, errors))


def _disable_kv_cache(model: torch.nn.Module) -> None:
    """Decoder models must not return a KV cache: it is not part of the training graph."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


def _via_export(model: torch.nn.Module, args: tuple, kwargs: dict, dims: shapes.DynamicDims) -> fx.GraphModule:
    args, kwargs = shapes.batched_for_capture(args, kwargs)
    dynamic_shapes = shapes.export_shapes(model, args, kwargs, dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    stateful = program.module()
    # A plain GraphModule: the exported module refuses to switch train/eval mode; this one does not.
    gm = fx.GraphModule(stateful, stateful.graph)
    graph_info(gm).capture = "torch.export"
    graph_info(gm).facts.add("captured")
    return gm


class _Tracer(fx.Tracer):
    """Traces through linear/conv modules so their weights appear as get_attr nodes; keeps
    train/eval-dependent modules as leaves so they still follow the train/eval mode."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _MODE_MODULES)


def _via_symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    graph_info(gm).capture = "torch.fx.symbolic_trace"
    graph_info(gm).facts.add("captured")
    return gm


def _user_frame(exc: BaseException, model: torch.nn.Module) -> str:
    """The innermost frame outside torch, sparsec and the standard library: the model's source line
    that failed (by package location, so a checkout in a folder named `sparsec` is still user code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not is_library_file(f.filename)]
    if not user:
        return ""
    frame = user[-1]
    line = (frame.line or "").strip()
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {line}"


def _module_at(model: torch.nn.Module, location: str) -> str:
    """The qualified name of the submodule whose forward is at `location` (file:line), if any."""
    if not location:
        return ""
    filename = location.split(":", 1)[0]
    for name, mod in model.named_modules():
        try:
            if inspect.getsourcefile(type(mod)) == filename:
                return name or type(mod).__name__
        except TypeError:
            continue
    return ""


def _explain(model: torch.nn.Module, errors: list[tuple[str, BaseException]]) -> str:
    parts = []
    for tool, exc in errors:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = _user_frame(exc, model)
        module = _module_at(model, where)
        at = f" at {where}" if where else ""
        inside = f" (module {module!r})" if module else ""
        parts.append(f"{tool} failed{inside}{at}: {type(exc).__name__}: {first[:300]}")
    hint = ("try: pass the inputs the model really takes (example_inputs/example_kwargs), "
            "set use_cache=False on decoder models, avoid data-dependent Python control flow "
            "in forward (torch.cond / torch._check), or set [capture] method to the other tool")
    return f"cannot capture {type(model).__name__}: " + "; ".join(parts) + f"; {hint}"
