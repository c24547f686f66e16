"""make_mode_aware: train/eval-baked ops -> ModeSwitch call_module nodes.

before: `dropout = aten.dropout(x, 0.1, True)` (mode fixed at capture, in train mode)
after:  `dropout = self.sparsec_mode.dropout(x, p=0.1)` whose `train` follows `module.train()`
requires: captured.  ensures: mode_aware.
Handles dropout (all variants), batch norm / instance norm with running statistics (and batch
norm's `num_batches_tracked += 1`, which adds 0 in eval), and the dropout probability of
scaled_dot_product_attention. Ops whose flag was already off at capture (e.g. a frozen batch norm)
keep their captured behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from sparsec.ir import ROLE_MODE, set_node_info
from sparsec.modes import ModeSwitch
from sparsec.pipeline import Pass, PassResult

aten = torch.ops.aten
F = torch.nn.functional

# op -> (argument that carries the mode, its eval-time value, short name)
_MODE_ARGS = {
    aten.dropout.default: ("train", False, "dropout"),
    aten.feature_dropout.default: ("train", False, "dropout"),
    aten.alpha_dropout.default: ("train", False, "dropout"),
    aten.feature_alpha_dropout.default: ("train", False, "dropout"),
    aten.batch_norm.default: ("training", False, "batch_norm"),
    aten.instance_norm.default: ("use_input_stats", False, "instance_norm"),
    aten.scaled_dot_product_attention.default: ("dropout_p", 0.0, "attention"),
    F.dropout: ("training", False, "dropout"),
    F.dropout1d: ("training", False, "dropout"),
    F.dropout2d: ("training", False, "dropout"),
    F.dropout3d: ("training", False, "dropout"),
    F.alpha_dropout: ("training", False, "dropout"),
    F.scaled_dot_product_attention: ("dropout_p", 0.0, "attention"),
}


@dataclass(frozen=True)
class MakeModeAware(Pass):
    name = "make_mode_aware"
    stage = "capture"
    requires = ("captured",)
    ensures = ("mode_aware",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        container: torch.nn.Module | None = None
        count = 0
        for node in list(gm.graph.nodes):
            entry = _MODE_ARGS.get(node.target) if node.op == "call_function" else None
            args: tuple = ()
            if _is_batch_counter(node):
                # batch norm's `num_batches_tracked += 1` is a separate op in exported graphs:
                # in eval it must add nothing (alpha=0), as eager batch norm does
                key, eval_value, short = "alpha", 0, "batch_count"
                args, kwargs, train_value = tuple(node.args), dict(node.kwargs), 1
            elif entry is None:
                continue
            else:
                key, eval_value, short = entry
                normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                                normalize_to_only_use_kwargs=True)
                if normalized is None:
                    raise self.error(f"cannot read the arguments of {node.target}", node)
                kwargs = dict(normalized.kwargs)
                train_value = kwargs.pop(key, eval_value)
                if train_value == eval_value or not _has_running_stats(node.target, kwargs):
                    continue  # behaves the same in both modes
            if container is None:
                container = torch.nn.Module()
                gm.add_module("sparsec_mode", container)
            module_name = f"{short}_{count}"
            count += 1
            container.add_module(module_name, ModeSwitch(node.target, key, train_value, eval_value))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(f"sparsec_mode.{module_name}", args, kwargs)
            new.meta.update(node.meta)
            set_node_info(new, ROLE_MODE, detail=f"{key}: train={train_value} eval={eval_value}")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        return PassResult(gm, modified=count > 0)


def _is_batch_counter(node: fx.Node) -> bool:
    """`aten.add_(<bn>.num_batches_tracked, 1)`: batch norm counting training batches."""
    if node.op != "call_function" or node.target is not aten.add_.Tensor or node.kwargs:
        return False
    counter = node.args[0]
    return (isinstance(counter, fx.Node) and counter.op == "get_attr"
            and str(counter.target).endswith("num_batches_tracked"))


def _has_running_stats(target, kwargs: dict) -> bool:
    """Batch norm without running statistics always normalizes with batch statistics."""
    if target is aten.batch_norm.default:
        return kwargs.get("running_mean") is not None
    if target is aten.instance_norm.default:
        return kwargs.get("running_mean") is not None
    return True
