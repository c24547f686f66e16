"""torch.onnx's part of the export: a (lowered) GraphModule -> an `onnx_ir.Model`.

The dynamo exporter at sparsec's opset, with the lowering targets' custom translations (each sparse
op becomes one custom-domain node) and the capture's dynamic dimensions. What sparsec then does to
the exported graph is the ONNX passes' business (sparsec.passes.build_onnx_pipeline).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import onnx_ir as ir
import onnxscript.optimizer
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from sparsec.ir import graph_info
from sparsec.lowering import onnx_graph, targets
from sparsec.lowering.onnx_op import ONNX_OPSET
from sparsec.shapes import batched_for_capture, export_shapes


def to_onnx(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> ir.Model:
    """The exported model, with the fact `exported` established for the ONNX passes. `dynamic`:
    the dimensions capture found dynamic stay dynamic (sparsec.shapes); else every one is fixed."""
    dims = graph_info(module).dynamic if dynamic and isinstance(module, fx.GraphModule) else None
    if dims is not None:
        args, kwargs = batched_for_capture(args, kwargs)
    export_dynamic = export_shapes(module, args, kwargs, dims)
    with torch.no_grad():
        names = output_names(module(*args, **kwargs))
    # torch.onnx logs a warning per torchvision op it cannot register; torchvision is not used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True,
                                    opset_version=ONNX_OPSET, dynamic_shapes=export_dynamic, verbose=False,
                                    optimize=False, output_names=names,
                                    custom_translation_table=targets.onnx_translation())
    model = program.model
    # torch.onnx's own optimization minus onnxscript's opset-23 fusions: its RotaryEmbedding fusion
    # feeds cos/sin caches of batch 1 to a node that needs them at the input's batch, which
    # onnxruntime refuses for any other batch (Llama); constant folding and clean-up stay.
    onnxscript.optimizer.optimize_ir(model)
    onnx_graph.facts(model).add("exported")
    return model


def static_input_dims(module: torch.nn.Module) -> tuple[tuple[str, tuple[int | None, ...]], ...]:
    """Per captured input: its dims where capture fixed them (ints) or None where they are dynamic
    (for the pin_input_dims pass). Empty for modules that are not captured graphs."""
    if not isinstance(module, fx.GraphModule):
        return ()
    out = []
    for node in module.graph.nodes:
        fake = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(fake, torch.Tensor):
            out.append((node.name, tuple(size if isinstance(size, int) else None for size in fake.shape)))
    return tuple(out)


def example_input_records(args: tuple, kwargs: dict) -> tuple[tuple[tuple[int, ...], str], ...]:
    """(shape, dtype) of every tensor of the example inputs, in the order of the graph's inputs
    (for the record_example_inputs pass)."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return tuple((tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in leaves)


def output_names(value: Any) -> list[str]:
    """The names of a model output's tensors, in `outputs` order: a ModelOutput's or dict's keys
    (`logits`), positions for tuples (`output_0`), joined for nested ones (`past_key_values_0_1`),
    `output` for a lone tensor."""
    if hasattr(value, "to_tuple") and hasattr(value, "items"):  # transformers ModelOutput
        value = dict(value.items())
    names: list[str] = []
    for path, leaf in pytree.tree_flatten_with_path(value)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        name = "_".join(parts) or "output"
        if parts and isinstance(path[0], pytree.SequenceKey) and len(path) >= 1:
            name = "output_" + name
        while name in names:
            name += "_"
        names.append(name)
    return names


def outputs(value: Any) -> list[Any]:
    """Every tensor of a model output as numpy, in pytree order (ModelOutput included)."""
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        value = value.to_tuple()
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
