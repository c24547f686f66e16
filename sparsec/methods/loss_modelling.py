"""Loss-modelling saliencies LM, QM and OBD (Laurent et al. 2020, Eq 3, 5, 6), with the diagonal
curvature G of sparsec.curvature (Eq 8: the generalized Gauss-Newton by default)."""
from __future__ import annotations

from typing import ClassVar

import torch

from sparsec import blocks, masking, ops
from sparsec.errors import TrainingError
from sparsec.methods.base import MaskContext, Method, SiteState, register
from sparsec.schema import Field
from sparsec.site import Site

OPTIONS = {
    "curvature": Field("str", "The diagonal curvature G of QM and OBD (sparsec.curvature): `ggn`, "
                       "the generalized Gauss-Newton diagonal of the paper (Eq 8, Appendix A), for a "
                       "softmax cross-entropy sum_j p_j (d log p_j / d theta)^2 over the model's own "
                       "predicted distribution, exact (C backward passes per example, C classes); "
                       "`ggn_mc`, the same with one label per example drawn from p (an unbiased "
                       "Monte Carlo estimate, one backward pass per chunk: for many classes); "
                       "`empirical_fisher`, the squared gradients of the true labels (only near a "
                       "minimum close to G; needed when model.py defines its own `loss`). LM reads "
                       "only the gradient g.", default="ggn",
                       choices=("ggn", "ggn_mc", "empirical_fisher")),
    "fisher_examples": Field("int", "Examples of `train_data()` over which the gradient g and the "
                             "diagonal curvature G (`curvature`) are estimated before each pruning "
                             "iteration (`prog.estimate_fisher`); the paper uses 1000 (Appendix B.2).",
                             default=1000, ge=1),
    "fisher_chunk": Field("int", "Examples per forward pass of the estimate. `ggn` stays exact for "
                          "any chunk; `ggn_mc` stays unbiased; `empirical_fisher` is the exact "
                          "per-example mean_i (dl_i/dtheta)^2 only at 1 (the paper) and uses c * "
                          "(chunk-mean gradient)^2 for c > 1 (c times faster).",
                          default=1, ge=1),
    "step_penalty": Field("float", "lambda of the step-size penalty lambda/2 * theta^2 added to the "
                          "saliency (section 3.2, 'Constraining the step size'); 0 leaves the "
                          "criterion unchanged, a large value turns it into magnitude pruning.",
                          default=0.0, ge=0),
}


class _LossModel(Method):
    """Shared by lm, qm and obd: the saliency of pruning a block (theta -> 0, dtheta = -theta) from
    the estimate `prog.estimate_fisher` takes before each pruning iteration; pruned blocks never
    come back and each iteration prunes the kept blocks of smallest saliency (Algorithm 1, lines
    6-8), down to the schedule's density (`linear` / `exponential` / `one_shot`).

    A block's saliency models the loss change of removing the whole block: the signed per-weight
    terms are summed over the block before the absolute value (for 1x1 blocks this is the paper's
    per-weight saliency). The step-size penalty adds lambda/2 * sum theta^2 over the block.
    """

    options = OPTIONS
    state = ("saliency",)
    needs_gradients = True
    absolute: ClassVar[bool] = True
    needs_curvature: ClassVar[bool] = True   # False: the estimate skips G (sparsec.estimation)

    def init_state(self, weight: torch.Tensor, site: Site) -> dict[str, torch.Tensor]:
        grid = blocks.grid_shape(site.shape, site.block)
        return {"saliency": torch.zeros(grid, dtype=weight.dtype, device=weight.device)}

    def mask_op(self):
        return ops.apply_mask

    @staticmethod
    def term(grad: torch.Tensor, fisher: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The signed per-weight loss change of pruning (before the absolute value)."""
        raise NotImplementedError

    def saliency(self, grad: torch.Tensor, fisher: torch.Tensor, theta: torch.Tensor,
                 block: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """Block-grid saliency: |sum_block term| + lambda/2 sum_block theta^2 (section 3.2)."""
        value = blocks.block_reduce(self.term(grad, fisher, theta), block, "sum")
        if self.absolute:
            value = value.abs()
        penalty = float(self.opts["step_penalty"])
        if penalty:
            value = value + penalty / 2 * blocks.block_reduce(theta * theta, block, "sum")
        return value

    @torch.no_grad()
    def accept_estimate(self, state: SiteState, grad: torch.Tensor, fisher: torch.Tensor) -> None:
        theta = state.weight.detach() * state.mask
        state.buffers["saliency"].copy_(self.saliency(grad, fisher, theta, state.site.block))

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        return state.buffers["saliency"].clone()

    def estimate_options(self) -> dict[str, int]:
        return {"fisher_examples": int(self.opts["fisher_examples"]),
                "fisher_chunk": int(self.opts["fisher_chunk"])}

    @torch.no_grad()
    def select(self, states: list[SiteState], density: float, scope: str,
               context: MaskContext) -> list[torch.Tensor] | None:
        """Algorithm 1 only prunes, at its iterations: nothing changes unless the schedule lowers
        the density; then the kept blocks of smallest saliency go (pruned ones never come back)."""
        if not context.prunes(density):
            return None
        if context.estimated_at < context.step - 1:
            sites = [st.site.name for st in states]
            raise TrainingError(
                f"method {self.name!r} (sites {', '.join(sites[:3])}{', ...' if len(sites) > 3 else ''}) "
                f"prunes at step {context.step} but has no fresh estimate: call "
                f"prog.estimate_fisher(examples, loss_fn) after optimizer.step() and before "
                f"prog.step() whenever prog.estimate_due()")
        importances = [self.importance(st).masked_fill(~masking.kept_grid(st), float("-inf"))
                       for st in states]
        return masking.keep_top(importances, states, density, scope)


@register
class LinearModel(_LossModel):
    __doc__ = ("LM saliency (Laurent et al. 2020, Eq 6): s_k = |dL/dtheta_k * theta_k|, the linear "
               "model of the loss change of pruning.\n\n" + (_LossModel.__doc__ or ""))
    name = "lm"
    summary = "prune the smallest |g theta| of a linear loss model, estimated on data (loss modelling Eq 6)"
    paper = "Laurent et al. 2020, Eq 6, Algorithm 1"
    needs_curvature = False

    @staticmethod
    def term(grad, fisher, theta):
        return grad * theta


@register
class QuadraticModel(_LossModel):
    __doc__ = ("QM saliency (Laurent et al. 2020, Eq 5): s_k = |-dL/dtheta_k theta_k + 1/2 G_kk "
               "theta_k^2|, the quadratic model with the gradient term kept.\n\n"
               + (_LossModel.__doc__ or ""))
    name = "qm"
    summary = "prune the smallest |-g theta + 1/2 G_kk theta^2| of a quadratic loss model (loss modelling Eq 5)"
    paper = "Laurent et al. 2020, Eq 5, Appendix A, Algorithm 1"

    @staticmethod
    def term(grad, fisher, theta):
        return -grad * theta + 0.5 * fisher * theta * theta


@register
class OptimalBrainDamage(_LossModel):
    __doc__ = ("OBD saliency (LeCun et al. 1990, as Laurent et al. 2020 Eq 3): s_k = 1/2 G_kk "
               "theta_k^2, the quadratic model at convergence (gradient term dropped).\n\n"
               + (_LossModel.__doc__ or ""))
    name = "obd"
    summary = "prune the smallest 1/2 G_kk theta^2 (optimal brain damage, loss modelling Eq 3)"
    paper = "LeCun et al. 1990; Laurent et al. 2020, Eq 3, Algorithm 1"
    absolute = False

    @staticmethod
    def term(grad, fisher, theta):
        return 0.5 * fisher * theta * theta
