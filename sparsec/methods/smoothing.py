"""Smoothing of a per-step importance across steps, shared by the gradient-based criteria.

PINS (Ren & Zhu 2023, section 4.1.3) smooths its importance "similar to PLATON" (Zhang et al.
2022, Eq 5-7), which keeps an exponential moving average of the importance and of its uncertainty:

    I_bar(t) = beta1 I_bar(t-1) + (1 - beta1) I(t)
    U(t)     = |I(t) - I_bar(t)|
    U_bar(t) = beta2 U_bar(t-1) + (1 - beta2) U(t)
    S(t)     = I_bar(t) * U_bar(t)

Both averages start at 0 without bias correction, as PLATON's code does. `smoothing = "ema"`
ranks by I_bar alone, `"none"` by the last I. The averages live on the block grid, in the site's
buffers `<site>_ema` and `<site>_unc` (so `prog.state_dict()` resumes them exactly).
"""
from __future__ import annotations

import torch

from sparsec import blocks, masking
from sparsec.methods.base import Method, SiteState, StepContext
from sparsec.schema import Field
from sparsec.site import Site

KINDS = ("none", "ema", "platon")
STATE = ("ema", "unc")


def options(default: str) -> dict[str, Field]:
    """The spec keys of a smoothed criterion; `default` is its `smoothing`."""
    return {
        "smoothing": Field("str", "How the per-step importance is smoothed across steps: `none` ranks "
                           "by the last step's value; `ema` by its exponential moving average "
                           "(`beta1`); `platon` by the moving average times the moving average of "
                           "its uncertainty |I - I_bar| (`beta2`), as PINS does following PLATON "
                           "(Zhang et al. 2022, Eq 5-7).", default=default, choices=KINDS),
        "beta1": Field("float", "Decay of the importance's moving average (PLATON's beta_1; 0.85 "
                       "in PLATON's BERT runs, which PINS follows).", default=0.85, ge=0, lt=1),
        "beta2": Field("float", "Decay of the uncertainty's moving average (PLATON's beta_2; 0.95 "
                       "in PLATON's BERT runs).", default=0.95, ge=0, lt=1),
    }


def init_state(weight: torch.Tensor, site: Site) -> dict[str, torch.Tensor]:
    grid = blocks.grid_shape(site.shape, site.block)
    return {key: torch.zeros(grid, dtype=weight.dtype, device=weight.device) for key in STATE}


@torch.no_grad()
def update(buffers: dict[str, torch.Tensor], value: torch.Tensor, kind: str, beta1: float,
           beta2: float) -> None:
    """Fold one step's block-grid importance `value` into the buffers (PLATON Eq 5-7)."""
    ema, unc = buffers["ema"], buffers["unc"]
    if kind == "none":
        ema.copy_(value)
        return
    ema.mul_(beta1).add_(value, alpha=1.0 - beta1)
    if kind == "platon":
        unc.mul_(beta2).add_((value - ema).abs_(), alpha=1.0 - beta2)


def score(buffers: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The smoothed importance S (higher is kept)."""
    if kind == "platon":
        return buffers["ema"] * buffers["unc"]
    return buffers["ema"].clone()


class SmoothedGradientCriterion(Method):
    """Shared by `pins` and `sensitivity`: a per-weight value read from the step's gradient at
    every `prog.step()`, summed per block, smoothed (`smoothing`), ranked by Top_v. Trained as PINS
    Eq 1-2: dense gradients to every weight (the mask op passes them), pruned weights zeroed at
    `step()` (`after_step`). Subclasses give `value_of(state, context)`, the per-weight value."""

    state = STATE
    needs_gradients = True

    def init_state(self, weight, site):
        return init_state(weight, site)

    def mask_op(self):
        from sparsec import ops

        return ops.apply_mask_dense_grad

    def value_of(self, state: SiteState, context: StepContext) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, states: list[SiteState], context: StepContext) -> None:
        for st in states:
            grid = blocks.block_reduce(self.value_of(st, context), st.site.block, "sum")
            update(st.buffers, grid, self.opts["smoothing"], self.opts["beta1"], self.opts["beta2"])

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        return score(state.buffers, self.opts["smoothing"])

    def after_step(self, states: list[SiteState], context: StepContext) -> None:
        masking.zero_pruned(states)  # PINS Eq 2: theta <- theta_hat * M
