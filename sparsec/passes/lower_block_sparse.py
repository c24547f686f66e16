"""lower_block_sparse: rewrite each chosen site into its lowering target's sparse op.

before: `linear = torch.ops.aten.linear.default(x, fc1_weight, fc1_bias)` (weight baked, mostly
        zero blocks), or `addmm(bias, x, W)` / `matmul(x, W)` with W stored [in, out].
after:  `linear = torch.ops.sparsec.block_sparse_linear.default(x, fc1_weight_values,
        fc1_weight_block_cols, fc1_weight_row_nnz, fc1_bias, None, 256, 64)`; the packed tensors
        (sparsec.lowering.block_format, padded blocked-ELL) are buffers named after the site
        (`fc1.weight_values`, ...) and the dense weight is gone. With `int8`, values are int8 with
        one float32 scale per output row (`fc1.weight_scales` [N]) and the call computes in INT8
        (its last argument, int8_compute=True).
What a site becomes is its target's business (sparsec.lowering.targets, `LoweringTarget.lower`);
sites that choose_sparse_layers kept dense are left as they are.
requires: layers_chosen.  ensures: lowered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from sparsec.ir import graph_info
from sparsec.lowering import targets
from sparsec.pipeline import Pass, PassResult
from sparsec.site_ops import site_node


@dataclass(frozen=True)
class LowerBlockSparse(Pass):
    name = "lower_block_sparse"
    stage = "lower"
    requires = ("layers_chosen",)
    ensures = ("lowered",)

    int8: bool = False          # INT8 compute: int8 blocks, a float32 scale per output row

    def run(self, gm: fx.GraphModule) -> PassResult:
        plans = [p for p in graph_info(gm).lowering.values() if p.lower]
        for plan in plans:
            node, why = site_node(gm, plan.site)
            if node is None:
                raise self.error(f"site {plan.site!r}: {why}")
            targets.get(plan.target).lower(gm, node, plan, int8=self.int8)
        if plans:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=bool(plans))
