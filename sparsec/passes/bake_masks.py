"""bake_masks: W <- W * M, then drop masks, scores and the methods' training state.

before: `masked = sparsec_ops_apply_mask(fc1_weight, fc1_weight_mask)`; `linear(x, masked, b)`
after:  `linear(x, fc1_weight, b)` with zeros baked into fc1.weight; no mask or score nodes or
        attributes remain, nor the methods' per-site state buffers (`fc1.weight_ema`, ...).
        Sites stay recorded (roles `weight`, `site_op`) for lowering.
requires: masks_inserted.  ensures: masks_baked.  Run it on a copy (Program.finalize does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.ir import (ROLE_MASK, ROLE_MASKED_WEIGHT, ROLE_SCORES, del_attr, get_attr_value,
                        graph_info, nodes_with_role, state_name)
from sparsec.pipeline import Pass, PassResult


@dataclass(frozen=True)
class BakeMasks(Pass):
    name = "bake_masks"
    stage = "lower"
    requires = ("masks_inserted",)
    ensures = ("masks_baked",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        info = graph_info(gm)
        masked_nodes = list(nodes_with_role(gm, ROLE_MASKED_WEIGHT))
        for node in masked_nodes:
            weight_node = node.args[0]
            mask_node = node.args[1]
            assert isinstance(weight_node, fx.Node) and isinstance(mask_node, fx.Node)
            weight = get_attr_value(gm, str(weight_node.target))
            mask = get_attr_value(gm, str(mask_node.target))
            with torch.no_grad():
                weight.mul_(mask)
            node.replace_all_uses_with(weight_node)
            gm.graph.erase_node(node)
            if node.op == "call_module":  # a mode-dependent mask (L0 gate): drop its module too
                gm.delete_submodule(str(node.target))
        for role in (ROLE_MASK, ROLE_SCORES):
            for node in list(nodes_with_role(gm, role)):
                target = str(node.target)
                gm.graph.erase_node(node)
                del_attr(gm, target)
        for site in info.sites.values():
            method = info.methods.get(site.group)  # type: ignore[arg-type]
            for key in method.state if method is not None else ():
                del_attr(gm, state_name(site.name, key))
        info.facts.discard("masks_inserted")
        info.facts.discard("schedule_attached")
        info.methods = {}
        return PassResult(gm, modified=bool(masked_nodes))
