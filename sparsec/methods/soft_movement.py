"""Soft movement pruning (SMvP)."""
from __future__ import annotations

import torch

from sparsec import masking
from sparsec.methods.base import MaskContext, SiteState, register
from sparsec.methods.movement import Movement
from sparsec.schema import Field

CONTROLS = ("threshold", "none")


@register
class SoftMovement(Movement):
    """Soft movement pruning (Sanh et al. 2020, section 4): learned scores S trained by the
    straight-through gradient of movement pruning (dL/dS = dL/dW_eff * W, Eq 2), a global threshold
    M = (S > tau) instead of a per-tensor Top_v, and the regularizer R(S) = lambda * sum sigmoid(S)
    returned by `prog.regularization()`, which pulls scores down so that the sparsity grows.

    `control` says what sets tau:
    - `threshold` (default): at every mask update tau is the score that keeps exactly the
      schedule's density of the group's weights (the paper schedules the sparsity with the cubic
      schedule for SMvP too, section 5); being one value for every site, it lets each layer end at
      its own density (Figure 6), and the asked density is reached;
    - `none`: tau is the fixed `threshold` and the density is an outcome of `lambda` (the paper
      tunes lambda_mvp to reach a sparsity); the report warns when it ends far from `density`.
    The threshold is global by nature: `scope` must be "global". The sum runs over scores (one per
    block).
    """

    name = "soft_movement"
    summary = ("learn scores by straight-through gradients, keep S > a global threshold set to the "
               "schedule's density (or fixed, `control = \"none\"`), regularize lambda * sum "
               "sigmoid(S) (movement pruning section 4)")
    paper = "Sanh et al. 2020, section 4 (soft movement), Eq 2"
    scopes = ("global",)
    options = {
        "control": Field("str", "What sets the threshold tau: `threshold` puts it where the group "
                         "keeps exactly the schedule's density at every mask update (the density "
                         "asked is reached; layers still end at different densities); `none` keeps "
                         "the fixed `threshold`, so the density is an outcome of `lambda`.",
                         default="threshold", choices=CONTROLS),
        "threshold": Field("float", "tau of M = (S > tau) with `control = \"none\"`, one value for "
                           "every site. The paper does not give it in the text; 0 is our default "
                           "(scores start above it at `score_init` and the regularizer pulls them "
                           "down).", default=0.0),
        "lambda": Field("float", "lambda_mvp of the regularizer lambda * sum sigmoid(S), which "
                        "pulls the scores down: with `control = \"none\"` it sets the sparsity "
                        "reached (larger prunes more).", default=0.01, ge=0),
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
        if self.opts["control"] == "threshold":
            if density >= 1.0:
                return masking.all_kept(states)
            return masking.keep_top([st.scores.detach() for st in states], states, density, "global")  # type: ignore[union-attr]
        return [self.threshold_mask(st.scores.detach(), float(self.opts["threshold"]))  # type: ignore[union-attr]
                for st in states]

    def regularization(self, states: list[SiteState]) -> torch.Tensor:
        return self.penalty([st.scores for st in states], float(self.opts["lambda"]))  # type: ignore[misc]
