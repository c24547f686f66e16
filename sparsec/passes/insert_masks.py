"""insert_masks: give every selected site a mask (and scores, for methods that learn them).

before: `linear = aten.linear(x, fc1_weight, fc1_bias)`
after:  `fc1_weight_mask = self.fc1.weight_mask`                  (buffer, shaped like the weight)
        `fc1_weight_scores = self.fc1.weight_scores`              (parameter, one per block; movement)
        `masked = sparsec_ops_straight_through_mask(fc1_weight, fc1_weight_mask, fc1_weight_scores, (1, 1))`
        `linear = aten.linear(x, masked, fc1_bias)`
Methods may add per-site state buffers (`fc1.weight_ema`, see `Method.init_state`), and a method
whose mask is drawn in every training forward (L0) gets a call_module mask node instead:
        `masked = self.fc1.weight_gate(fc1_weight, fc1_weight_mask, fc1_weight_scores)`
Masks start all ones; the Program computes them at step 0 and at every due `step()`.
requires: sites_selected.  ensures: masks_inserted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec import methods
from sparsec.ir import (ROLE_MASK, ROLE_MASKED_WEIGHT, ROLE_SCORES, gate_name, get_attr_value,
                        graph_info, mask_name, scores_name, set_attr_tensor, set_node_info, state_name)
from sparsec.pipeline import Pass, PassResult

@dataclass(frozen=True)
class InsertMasks(Pass):
    groups: tuple = ()
    name = "insert_masks"
    stage = "rewrite"
    requires = ("sites_selected",)
    ensures = ("masks_inserted",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        info = graph_info(gm)
        instances = {g.index: methods.get(g.method)(g.options) for g in self.groups}
        info.methods = instances
        weight_nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
        for name, site in info.sites.items():
            method = instances[site.group]
            weight_node = weight_nodes[name]
            weight = get_attr_value(gm, name)
            set_attr_tensor(gm, mask_name(name), torch.ones_like(weight, requires_grad=False),
                            parameter=False)
            state_nodes = {"weight": weight_node}
            with gm.graph.inserting_after(weight_node):
                mask_node = gm.graph.get_attr(mask_name(name))
            set_node_info(mask_node, ROLE_MASK, name)
            state_nodes["mask"] = mask_node
            last = mask_node
            scores = method.init_scores(weight.detach(), site)
            if scores is not None:
                set_attr_tensor(gm, scores_name(name), torch.nn.Parameter(scores), parameter=True)
                with gm.graph.inserting_after(mask_node):
                    scores_node = gm.graph.get_attr(scores_name(name))
                set_node_info(scores_node, ROLE_SCORES, name)
                state_nodes["scores"] = scores_node
                last = scores_node
            for key, value in method.init_state(weight.detach(), site).items():
                set_attr_tensor(gm, state_name(name, key), value, parameter=False)
            args = method.mask_op_args(state_nodes, site)
            module = method.mask_module(site)
            with gm.graph.inserting_after(last):
                if module is None:
                    masked = gm.graph.call_function(method.mask_op(), args,
                                                    name=f"{weight_node.name}_masked")  # unique via the namespace
                else:
                    gm.add_submodule(gate_name(name), module)
                    masked = gm.graph.call_module(gate_name(name), args)
            set_node_info(masked, ROLE_MASKED_WEIGHT, name, detail=f"method={site.method}")
            weight_node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
        return PassResult(gm, modified=bool(info.sites))
