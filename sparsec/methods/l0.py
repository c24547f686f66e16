"""L0 regularization with hard-concrete masks."""
from __future__ import annotations

import math

import torch

from sparsec import blocks, masking, ops
from sparsec.methods.base import MaskContext, Method, SiteState, register
from sparsec.schema import Field
from sparsec.site import Site


@register
class L0(Method):
    """L0 regularization (Louizos et al. 2017) as in movement pruning (Sanh et al. 2020, section 4):
    scores S = log alpha of a hard-concrete gate per block. In training the mask node (a
    `HardConcreteMask` module, `fc1.weight_gate`) samples M = min(1, ReLU((r - l) sigmoid((log u -
    log(1 - u) + S)/b) + l)) in every forward, and autograd gives the score gradient of Eq 3. In
    eval the deterministic mask is applied (with `control = "none"` the paper's min(1, ReLU((r - l)
    sigmoid(S) + l)); with `shift` the Top-t blocks, below); the Program keeps it in the mask buffer
    (recomputed at `prog.step()`), so `prog.masks()`, `prog.density()` and `finalize()` use it.
    The expected L0 norm is penalized:

        lambda * sum sigmoid(S - b log(-l / r))

    (the paper prints log S; S is already log alpha, see shared/papers/README.md), one term per
    score (block). `control` says what drives the sparsity:

    - `shift` (default): at every mask update all log alphas of the group move by one common
      value c, found by Newton's method, so that the expected density
      d(S) = sum_b |b| sigmoid(S_b + c - b log(-l/r)) / sum_b |b|  (|b| the block's weights,
      Louizos et al. 2017 Eq 12) equals the schedule's density t; the deterministic mask keeps
      exactly t of the weights, the blocks of largest log alpha, whole (gate 1; as CoFi's
      deterministic mask keeps the expected number of gates, Xia et al. 2022). Not the paper's
      min(1, ReLU((r - l) sigmoid(S) + l)): it closes every gate whose log alpha lies below
      logit(-l / (r - l)), and while the log alphas have not spread apart the shift puts all of
      them there (a 10% target ended at 0 weights kept on MiniLM after 120 steps). A common shift
      changes no ranking and no gradient; gates that fell too low come back when the target
      allows, so the density follows the schedule without the overshoot of an integral
      (Lagrangian) controller. `lambda` still adds its penalty;
    - `none`: the paper's penalty `lambda` * E[L0] alone; the density is an outcome of `lambda`
      (the report warns when it ends far from `density`).
    Gates are independent per block: no ranking between sites, `scope` must be "global".
    """

    name = "l0"
    summary = ("hard-concrete gates sampled in every training forward, deterministic in eval, "
               "penalty lambda * sum sigmoid(S - b log(-l/r)); the expected density held to the "
               "schedule's by shifting the log alphas (movement pruning section 4, Eq 3)")
    paper = "Louizos et al. 2017, Eq 12; Sanh et al. 2020, section 4, Eq 3; Xia et al. 2022 (CoFi)"
    learns_scores = True
    scopes = ("global",)
    options = {
        "beta": Field("float", "Temperature b of the hard-concrete distribution (Louizos et al. "
                      "2017 use 2/3).", default=2.0 / 3.0, gt=0),
        "l": Field("float", "Lower end l < 0 of the stretched interval (Louizos et al.: -0.1).",
                   default=-0.1, lt=0),
        "r": Field("float", "Upper end r > 1 of the stretched interval (Louizos et al.: 1.1).",
                   default=1.1, gt=1),
        "control": Field("str", "What drives the sparsity: `shift` moves the group's log alphas so "
                         "that the expected density is the schedule's at every mask update (the "
                         "density asked is reached); `none` leaves it to the penalty `lambda`, so "
                         "the density is an outcome.", default="shift", choices=("shift", "none")),
        "lambda": Field("float", "lambda_l0 of the expected-L0 penalty lambda * E[L0] (with "
                        "`control = \"none\"` it sets the sparsity: larger prunes more).",
                        default=0.01, ge=0),
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

    def expected_density(self, states: list[SiteState], shift: float = 0.0) -> torch.Tensor:
        """d(S + shift) = sum_b |b| P(gate_b != 0) / sum_b |b|, P(gate != 0) = sigmoid(S + shift -
        b log(-l/r)) (Louizos et al. 2017, Eq 12), each block weighted by its number of weights."""
        return self._density_and_slope(states, shift)[0]

    def _density_and_slope(self, states: list[SiteState], shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        offset = shift - self.opts["beta"] * math.log(-self.opts["l"] / self.opts["r"])
        kept = slope = torch.zeros((), dtype=torch.float64)
        total = 0
        for st in states:
            sizes = blocks.block_sizes(st.site.shape, st.site.block).to(st.scores.device)  # type: ignore[union-attr]
            p = torch.sigmoid(st.scores.detach().double() + offset)  # type: ignore[union-attr]
            kept = kept + (p * sizes).sum()
            slope = slope + (p * (1 - p) * sizes).sum()
            total += int(sizes.sum())
        return kept / total, slope / total

    def density_shift(self, states: list[SiteState], target: float) -> float:
        """The common shift c of the log alphas with expected density d(S + c) = target: Newton's
        method inside a bisection bracket (d increases with c)."""
        low, high, shift = -100.0, 100.0, 0.0
        for _ in range(100):
            density, slope = self._density_and_slope(states, shift)
            gap = float(density) - target
            if abs(gap) < 1e-7:
                break
            if gap > 0:
                high = shift
            else:
                low = shift
            step = shift - gap / float(slope) if float(slope) > 1e-12 else None
            shift = step if step is not None and low < step < high else (low + high) / 2
        return shift

    @torch.no_grad()
    def select(self, states: list[SiteState], density: float, scope: str,
               context: MaskContext) -> list[torch.Tensor]:
        control = self.opts["control"] == "shift" and density < 1.0
        if control:
            shift = self.density_shift(states, density)
            for st in states:
                st.scores.add_(shift)  # type: ignore[union-attr]
        if not control:   # the paper's test-time gate
            return [ops.hard_concrete_eval(st.scores.detach(), self.opts["l"], self.opts["r"])  # type: ignore[union-attr]
                    for st in states]
        # exactly the target's share of weights, the blocks of largest log alpha, whole
        keep = masking.keep_top([st.scores.detach() for st in states], states, density, "global")  # type: ignore[union-attr]
        return [k.to(st.scores.dtype) for k, st in zip(keep, states)]  # type: ignore[union-attr]

    def regularization(self, states: list[SiteState]) -> torch.Tensor:
        return self.penalty([st.scores for st in states], float(self.opts["lambda"]),  # type: ignore[misc]
                            self.opts["beta"], self.opts["l"], self.opts["r"])
