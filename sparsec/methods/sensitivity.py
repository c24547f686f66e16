"""Sensitivity: |g * theta| (PINS Eq 5)."""
from __future__ import annotations

import torch

from sparsec.errors import TrainingError
from sparsec.methods import smoothing
from sparsec.methods.pins import applied_update
from sparsec.methods.base import SiteState, StepContext, register


@register
class Sensitivity(smoothing.SmoothedGradientCriterion):
    """Sensitivity (PINS, Ren & Zhu 2023, Eq 4-5): the first-order estimate of the change of the
    loss when a weight is zeroed, S_i = |L(theta_-i) - L(theta)| ~= |g_i theta_i|, the baseline PINS
    compares against (PLATON is this criterion with `smoothing = "platon"`).

    At every `prog.step()` it reads g = `weight.grad` (the step's gradient, so call `prog.step()`
    before `zero_grad()`) and theta^(t) = the weight at which g was computed, i.e. before the
    update `optimizer.step()` has just applied (Eq 5 is |g theta^(t)|), recovered exactly from the
    attached optimizer's state (`pins.applied_update`); a block's value is the sum over its weights.
    Training follows PINS Eq 1-2 as for `pins`: dense gradients to every weight, pruned weights
    zeroed at `step()`, so a pruned weight scores |g * 0| = 0 now and keeps only its smoothed
    history (PLATON's behaviour). Masks are ranked by Top_v over the (smoothed) value.
    """

    name = "sensitivity"
    summary = "keep the weights of largest |g * theta| read at every step (PINS Eq 5), optionally smoothed"
    paper = "Ren & Zhu 2023 (PINS), Eq 4-5; smoothing: Zhang et al. 2022 (PLATON), Eq 5-7"
    options = smoothing.options("none")

    @staticmethod
    def value(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """|g * theta| per weight (PINS Eq 5)."""
        return (grad * weight).abs()

    def value_of(self, state: SiteState, context: StepContext) -> torch.Tensor:
        grad = state.grad(self.name)
        optimizer = context.optimizer
        if optimizer is None:
            raise TrainingError("method 'sensitivity' reads the weight before the optimizer's update "
                                "(PINS Eq 5, |g theta^(t)|): call prog.attach_optimizer(optimizer) once, "
                                "or prog.step(optimizer=optimizer)")
        group = next((g for g in optimizer.param_groups if any(p is state.weight for p in g["params"])), None)
        if group is None:   # not trained (frozen): the weight did not move
            return self.value(grad, state.weight.detach())
        return self.value(grad, applied_update(optimizer, group, state.weight, grad)[1])
