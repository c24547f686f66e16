"""Soft movement pruning (SMvP)."""
from __future__ import annotations

import torch

from sparsec.methods.base import MaskContext, SiteState, register
from sparsec.methods.movement import Movement
from sparsec.schema import Field


@register
class SoftMovement(Movement):
    """Soft movement pruning (Sanh et al. 2020, section 4): learned scores S trained by the
    straight-through gradient of movement pruning (dL/dS = dL/dW_eff * W, Eq 2), a fixed global
    threshold M = (S > tau) instead of Top_v, and the regularizer R(S) = lambda * sum sigmoid(S)
    returned by `prog.regularization()`, which pulls scores down so that the sparsity grows.

    The density is an outcome of `threshold` and `lambda`, not a target: the group's `density`
    and the schedule are not used (the report shows the density reached). The threshold is one
    value for every site, so the method is global by nature: `scope` must be "global".
    The sum runs over scores (one per block).
    """

    name = "soft_movement"
    summary = ("learn scores by straight-through gradients, keep S > threshold, regularize "
               "lambda * sum sigmoid(S); density is an outcome (movement pruning section 4)")
    paper = "Sanh et al. 2020, section 4 (soft movement), Eq 2"
    scopes = ("global",)
    options = {
        "threshold": Field("float", "tau of M = (S > tau), one value for every site. The paper "
                           "does not give it in the text; 0 is our default (scores start above "
                           "it at `score_init` and the regularizer pulls them down).", default=0.0),
        "lambda": Field("float", "lambda_mvp of the regularizer lambda * sum sigmoid(S), which "
                        "controls the sparsity reached: larger prunes more.", default=0.01, ge=0),
        "score_init": Field("float", "Initial value of every score; must be above `threshold` so "
                            "that training starts dense.", default=1.0),
    }

    @staticmethod
    def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """M = (S > tau) (movement pruning section 4)."""
        return scores > threshold

    @staticmethod
    def penalty(scores: list[torch.Tensor], lam: float) -> torch.Tensor:
        """R(S) = lambda * sum sigmoid(S) (movement pruning section 4)."""
        return lam * sum(torch.sigmoid(s).sum() for s in scores)  # type: ignore[return-value]

    @torch.no_grad()
    def select(self, states: list[SiteState], density: float, scope: str,
               context: MaskContext) -> list[torch.Tensor]:
        return [self.threshold_mask(st.scores.detach(), float(self.opts["threshold"]))  # type: ignore[union-attr]
                for st in states]

    def regularization(self, states: list[SiteState]) -> torch.Tensor:
        return self.penalty([st.scores for st in states], float(self.opts["lambda"]))  # type: ignore[misc]
