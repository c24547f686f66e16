"""Magnitude pruning (MaP)."""
from __future__ import annotations

import torch

from sparsec import blocks, ops
from sparsec.methods.base import Method, SiteState, register


@register
class Magnitude(Method):
    """Magnitude pruning: S = |W|, M = Top_v(S) (movement pruning paper, section 3 and Eq 1;
    automated gradual pruning of Zhu & Gupta 2018 with the cubic schedule).

    With blocks, a block's importance is the mean |W| over its weights, so that partial edge
    blocks compete fairly with full ones. Masked weights get no gradient (dL/dW = dL/dW_eff * M).
    """

    name = "magnitude"
    summary = "keep the weights (or blocks) of largest |W| (MaP, movement pruning paper Eq 1)"
    paper = "Sanh et al. 2020, section 3, Eq 1; Zhu & Gupta 2018"

    def mask_op(self):
        return ops.apply_mask

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        return blocks.block_reduce(state.weight.detach().abs(), state.site.block, "mean")
