"""lower_block_sparse: rewrite each chosen linear into the block-sparse custom op.

before: `linear = torch.ops.aten.linear.default(x, fc1_weight, fc1_bias)` (weight baked, mostly
        zero blocks), or `addmm(bias, x, W)` / `matmul(x, W)` with W stored [in, out].
after:  `linear = torch.ops.sparsec.block_sparse_linear.default(x, fc1_weight_values,
        fc1_weight_block_cols, fc1_weight_row_nnz, fc1_bias, None, 256, 64)`; the packed tensors
        (sparsec.lowering.block_format, padded blocked-ELL) are buffers named after the site
        (`fc1.weight_values`, ...) and the dense weight is gone. With `int8`, values are int8 with
        one float32 scale per block (`fc1.weight_scales`).
Sites that choose_sparse_layers kept dense are left as they are.
requires: layers_chosen.  ensures: lowered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.ir import (ROLE_SITE_OP, ROLE_WEIGHT, del_attr, get_attr_value, graph_info,
                        set_attr_tensor, set_node_info)
from sparsec.lowering.torch_op import op as block_sparse_op
from sparsec.passes.choose_sparse_layers import LayerPlan, lowering_plans, site_node
from sparsec.pipeline import Pass, PassResult

# buffer suffix per packed tensor, in the op's argument order
PACKED = ("values", "block_cols", "row_nnz")


def packed_name(site: str, part: str) -> str:
    """`fc1.weight` -> `fc1.weight_values` (a buffer on the same submodule as the weight)."""
    return f"{site}_{part}"


@dataclass(frozen=True)
class LowerBlockSparse(Pass):
    name = "lower_block_sparse"
    stage = "lower"
    requires = ("layers_chosen",)
    ensures = ("lowered",)

    int8: bool = False          # int8 blocks with a float32 scale per block

    def run(self, gm: fx.GraphModule) -> PassResult:
        plans = [p for p in lowering_plans(gm).values() if p.lower]
        for plan in plans:
            self.lower(gm, plan)
        graph_info(gm).attached["lowered_int8"] = self.int8
        if plans:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=bool(plans))

    def lower(self, gm: fx.GraphModule, plan: LayerPlan) -> None:
        from sparsec.lowering import block_format

        node, why = site_node(gm, plan.site)
        if node is None:
            raise self.error(f"site {plan.site!r}: {why}")
        weight = get_attr_value(gm, plan.site).detach()
        matrix = weight.t().contiguous() if plan.transposed else weight
        assert plan.block is not None
        packed = block_format.pack(matrix, block=plan.block, int8=self.int8)
        x, bias = _operands(node, plan.op)
        tensors = {part: torch.from_numpy(getattr(packed, part)) for part in PACKED}
        if packed.scales is not None:
            tensors["scales"] = torch.from_numpy(packed.scales)
        with gm.graph.inserting_before(node):
            getters = {}
            for part, value in tensors.items():
                target = packed_name(plan.site, part)
                set_attr_tensor(gm, target, value.contiguous(), parameter=False)
                getters[part] = gm.graph.get_attr(target)
                set_node_info(getters[part], ROLE_WEIGHT, plan.site, part)
            call = gm.graph.call_function(block_sparse_op(), (
                x, getters["values"], getters["block_cols"], getters["row_nnz"], bias,
                getters.get("scales"), int(matrix.shape[0]), int(matrix.shape[1])))
        call.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        set_node_info(call, ROLE_SITE_OP, plan.site, "block_sparse_linear")
        node.replace_all_uses_with(call)
        weight_nodes = [n for n in node.all_input_nodes if n.op == "get_attr" and n.target == plan.site]
        gm.graph.erase_node(node)
        for wnode in weight_nodes:
            gm.graph.erase_node(wnode)
        del_attr(gm, plan.site)


def _operands(node: fx.Node, op: str) -> tuple[fx.Node, fx.Node | None]:
    """(input, bias) of a linear(x, W, b), addmm(b, x, W) or matmul(x, W) node."""
    if op == "linear":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], bias  # type: ignore[return-value]
    if op == "addmm":
        return node.args[1], node.args[0]  # type: ignore[return-value]
    return node.args[0], None  # type: ignore[return-value]


def lowered_sites(gm: fx.GraphModule) -> list[str]:
    return [name for name, plan in lowering_plans(gm).items() if plan.lower]

