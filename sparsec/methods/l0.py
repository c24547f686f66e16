"""L0 regularization with hard-concrete masks."""
from __future__ import annotations

import math

import torch

from sparsec import blocks, ops
from sparsec.methods.base import MaskContext, Method, SiteState, register
from sparsec.schema import Field
from sparsec.site import Site


@register
class L0(Method):
    """L0 regularization (Louizos et al. 2017) as in movement pruning (Sanh et al. 2020, section 4):
    scores S = log alpha of a hard-concrete gate per block. In training the mask node (a
    `HardConcreteMask` module, `fc1.weight_gate`) samples M = min(1, ReLU((r - l) sigmoid((log u -
    log(1 - u) + S)/b) + l)) in every forward, and autograd gives the score gradient of Eq 3. In
    eval the deterministic mask min(1, ReLU((r - l) sigmoid(S) + l)) is applied; the Program keeps it
    in the mask buffer (recomputed at `prog.step()`), so `prog.masks()`, `prog.density()` and
    `finalize()` use it. The expected L0 norm is penalized:

        lambda * sum sigmoid(S - b log(-l / r))

    (the paper prints log S; S is already log alpha, see shared/papers/README.md), one term per
    score (block). The density is an outcome of `lambda`, not a target: the group's `density` and
    the schedule are not used, and `scope` must be "global" (no ranking between sites).
    """

    name = "l0"
    summary = ("hard-concrete gates sampled in every training forward, deterministic in eval, "
               "penalty lambda * sum sigmoid(S - b log(-l/r)); density is an outcome (movement pruning section 4, Eq 3)")
    paper = "Louizos et al. 2017; Sanh et al. 2020, section 4, Eq 3"
    learns_scores = True
    scopes = ("global",)
    options = {
        "beta": Field("float", "Temperature b of the hard-concrete distribution (Louizos et al. "
                      "2017 use 2/3).", default=2.0 / 3.0, gt=0),
        "l": Field("float", "Lower end l < 0 of the stretched interval (Louizos et al.: -0.1).",
                   default=-0.1, lt=0),
        "r": Field("float", "Upper end r > 1 of the stretched interval (Louizos et al.: 1.1).",
                   default=1.1, gt=1),
        "lambda": Field("float", "lambda_l0 of the expected-L0 penalty; controls the sparsity "
                        "reached (larger prunes more).", default=0.01, ge=0),
        "score_init": Field("float", "Initial log alpha of every gate. 3 makes the deterministic "
                            "mask 1 everywhere (sigmoid(3) > (1 - l)/(r - l)), so training starts "
                            "dense.", default=3.0),
    }

    def init_scores(self, weight: torch.Tensor, site: Site) -> torch.Tensor:
        grid = blocks.grid_shape(site.shape, site.block)
        return torch.full(grid, float(self.opts["score_init"]), dtype=weight.dtype, device=weight.device)

    def mask_module(self, site: Site) -> torch.nn.Module:
        return ops.HardConcreteMask(self.opts["beta"], self.opts["l"], self.opts["r"], site.block)

    def mask_op_args(self, state_nodes, site):
        return (state_nodes["weight"], state_nodes["mask"], state_nodes["scores"])

    @staticmethod
    def penalty(scores: list[torch.Tensor], lam: float, beta: float, l: float, r: float) -> torch.Tensor:
        """lambda * E[L0] = lambda * sum sigmoid(S - b log(-l / r)) (movement pruning section 4,
        corrected as in shared/papers/README.md)."""
        shift = beta * math.log(-l / r)
        return lam * sum(torch.sigmoid(s - shift).sum() for s in scores)  # type: ignore[return-value]

    @torch.no_grad()
    def select(self, states: list[SiteState], density: float, scope: str,
               context: MaskContext) -> list[torch.Tensor]:
        return [ops.hard_concrete_eval(st.scores.detach(), self.opts["l"], self.opts["r"])  # type: ignore[union-attr]
                for st in states]

    def regularization(self, states: list[SiteState]) -> torch.Tensor:
        return self.penalty([st.scores for st in states], float(self.opts["lambda"]),  # type: ignore[misc]
                            self.opts["beta"], self.opts["l"], self.opts["r"])
