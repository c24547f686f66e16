"""PINS: principled importance S = -g * dtheta_hat - g * theta (Ren & Zhu 2023, Eq 11)."""
from __future__ import annotations

import math

import torch

from sparsec.errors import TrainingError
from sparsec.methods import smoothing
from sparsec.methods.base import SiteState, StepContext, register


@register
class Pins(smoothing.SmoothedGradientCriterion):
    """PINS importance (Ren & Zhu 2023, Eq 9-12). Keeping weight i changes the loss by
    g_i dtheta_hat_i (it takes the optimizer's update), pruning it by g_i (-theta_i) (Eq 9); the
    value of keeping it is the difference

        S_i = -g_i dtheta_hat_i - g_i theta_i                              (Eq 11)

    and the best pruning decision under the density constraint keeps the Top_r values (Eq 12), with
    r from the cubic schedule (Eq 14, `schedule.kind = "cubic"`). A block's value is the sum over
    its weights (the knapsack value of the block).

    At every `prog.step()` (after `optimizer.step()`, before `zero_grad()`) g is `weight.grad` and
    dtheta_hat is the update the optimizer has just applied, derived exactly from its state
    (`applied_update`): SGD -lr (g + wd theta) or -lr * momentum buffer; Adam / AdamW
    -lr m_hat / (sqrt(v_hat) + eps) (plus AdamW's decoupled decay -lr wd theta), with theta the
    weight before the update, recovered from the weight after it. Attach the optimizer with
    `prog.attach_optimizer(opt)` or `prog.step(optimizer=opt)`.

    Training follows PINS Eq 1-2: every weight, pruned ones included, takes the optimizer's update
    computed from the gradient at the masked weights (the mask op passes dense gradients), then
    `step()` zeroes the pruned ones, theta <- theta_hat * M. A pruned weight (theta = 0) so scores
    S = -g * dtheta_hat (= eta g^2 for SGD) and comes back when that beats a kept weight's value.

    The score is smoothed across steps as PINS does following PLATON (`smoothing`, see
    sparsec.methods.smoothing).
    """

    name = "pins"
    summary = ("keep the Top_r of S = -g * dtheta_hat - g * theta, dtheta_hat the optimizer's update, "
               "smoothed as PLATON (PINS Eq 11-12)")
    paper = "Ren & Zhu 2023 (PINS), Eq 9-12, 14; smoothing: Zhang et al. 2022 (PLATON), Eq 5-7"
    options = smoothing.options("platon")

    @staticmethod
    def value(grad: torch.Tensor, update: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """S = -g * dtheta_hat - g * theta per weight (PINS Eq 11)."""
        return -grad * update - grad * weight

    @torch.no_grad()
    def observe(self, states: list[SiteState], context: StepContext) -> None:
        if context.optimizer is None:
            raise TrainingError("method 'pins' needs the optimizer's update (PINS Eq 11): call "
                                "prog.attach_optimizer(optimizer) once, or prog.step(optimizer=optimizer)")
        self._group_of = {id(p): g for g in context.optimizer.param_groups for p in g["params"]}
        super().observe(states, context)

    def value_of(self, state: SiteState, context: StepContext) -> torch.Tensor:
        optimizer = context.optimizer
        assert optimizer is not None
        group = self._group_of.get(id(state.weight))
        if group is None:
            raise TrainingError(f"method 'pins': the weight of site {state.site.name!r} is not in "
                                f"the attached optimizer's parameters")
        grad = state.grad(self.name)
        update, before = applied_update(optimizer, group, state.weight, grad)
        return self.value(grad, update, before)


def applied_update(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor,
                   grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dtheta, theta_before) of the update `optimizer.step()` has just applied to `param` (of
    param group `group`), from the optimizer's state (PINS' dtheta_hat, Eq 9 and 11).

    SGD:   d = g + wd theta (+ momentum: buf = mu buf + (1 - dampening) d; d = buf, or d + mu buf
           with nesterov); theta_after = theta - lr d.
    Adam:  theta_after = theta - lr m_hat / (sqrt(v_hat) + eps), g including wd theta.
    AdamW: theta_after = theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps).
    Other optimizers: plain gradient descent, dtheta = -lr g (PINS Eq 9).
    """
    lr = float(group["lr"])
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if group.get("maximize", False):
        raise TrainingError("method 'pins' does not support optimizers with maximize=True")
    after = param.detach()
    state = optimizer.state.get(param, {})
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and "exp_avg" in state:
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        denom = second.sqrt() / math.sqrt(1.0 - beta2 ** step) + group["eps"]
        adam = (lr / (1.0 - beta1 ** step)) * state["exp_avg"] / denom
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        before = (after + adam) / (1.0 - lr * wd) if decoupled else after + adam
        return after - before, before
    if isinstance(optimizer, torch.optim.SGD):
        mu = float(group.get("momentum", 0.0))
        buf = state.get("momentum_buffer")
        if mu == 0.0 or buf is None:
            before = (after + lr * grad) / (1.0 - lr * wd)
        elif group.get("nesterov", False):
            before = (after + lr * (grad + mu * buf)) / (1.0 - lr * wd)
        else:
            before = after + lr * buf
        return after - before, before
    return -lr * grad, after
