"""Movement pruning (MvP)."""
from __future__ import annotations

import torch

from sparsec import blocks, ops
from sparsec.methods.base import Method, SiteState, register
from sparsec.schema import Field
from sparsec.site import Site


@register
class Movement(Method):
    """Movement pruning (Sanh et al. 2020): learned scores S, one per block, M = Top_v(S) (Eq 1),
    straight-through gradient dL/dS = dL/dW_eff * W for every weight (Eq 2), so S accumulates
    -alpha_S * sum_t dL/dW * W (Eq 4). Scores are parameters: train them with the optimizer
    (the paper uses a larger learning rate for scores, `[train] score_lr`).
    """

    name = "movement"
    summary = "learn scores S by straight-through gradients dL/dS = dL/dW_eff * W; keep Top_v(S) (Eq 2, 4)"
    paper = "Sanh et al. 2020, Eq 1, 2, 4"
    learns_scores = True
    options = {
        "score_init": Field("float", "initial value of every score (the paper's code starts "
                            "from a constant)", default=0.0),
    }

    def init_scores(self, weight: torch.Tensor, site: Site) -> torch.Tensor:
        grid = blocks.grid_shape(site.shape, site.block)
        return torch.full(grid, float(self.opts["score_init"]), dtype=weight.dtype, device=weight.device)

    def mask_op(self):
        return ops.straight_through_mask

    def mask_op_args(self, state_nodes, site):
        return (state_nodes["weight"], state_nodes["mask"], state_nodes["scores"], site.block)

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        assert state.scores is not None
        return state.scores.detach()
