"""The functions that mask nodes call in the rewritten graph.

They are plain Python functions so that the printed IR reads as runnable Python, e.g.
`masked = sparsec_ops_apply_mask(weight, weight_mask)`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from sparsec import blocks


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W_eff = W * M. Autograd gives dL/dW = dL/dW_eff * M (magnitude pruning, Zhu & Gupta)."""
    return weight * mask


class _StraightThrough(torch.autograd.Function):
    """Movement pruning (Sanh et al. 2020) Eq 2 with the straight-through estimator.

    forward:  W_eff = W * M, M = Top_v(S) computed at `Program.step()` and passed in.
    backward: dL/dW = dL/dW_eff * M
              dL/dS = dL/dW_eff * W   (for every weight, masked ones included; summed per block
                                       when one score covers a block)
    Accumulated over training this gives S = -alpha_S * sum_t (dL/dW)_t * W_t (Eq 4).

    Both gradients are linear in G = dL/dW_eff. Under data parallelism (inside
    `deferred_score_gradients()`) the backward leaves G itself in W.grad and nothing for S, so that
    DDP all-reduces G once instead of two tensors of the weight's size; `finish_deferred` then
    applies both formulas to the all-reduced G.
    """

    @staticmethod
    def forward(ctx, weight, mask, scores, block):  # type: ignore[override]
        ctx.save_for_backward(weight, mask)
        ctx.block = tuple(block)
        ctx.scores_shape = scores.shape
        ctx.defer = _DEFER.get() and weight.requires_grad and scores.requires_grad
        return weight * mask

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.defer:
            return grad, None, None, None
        weight, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[2]:
            grad_scores = score_gradient(grad, weight, ctx.block).reshape(ctx.scores_shape)
        return grad_weight, None, grad_scores, None


_DEFER: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsec_defer_score_gradients", default=False)


@contextlib.contextmanager
def deferred_score_gradients() -> Iterator[None]:
    """Forward passes inside leave the straight-through gradient G = dL/dW_eff unmasked in W.grad
    and none in S.grad (for sites whose weight and scores both train); `finish_deferred` must
    follow the backward pass."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def score_gradient(grad: torch.Tensor, weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """dL/dS = dL/dW_eff * W, summed over each block (movement pruning Eq 2), as a block grid."""
    return blocks.block_reduce(grad * weight, block, "sum")


@torch.no_grad()
def finish_deferred(weight: torch.nn.Parameter, mask: torch.Tensor, scores: torch.nn.Parameter,
                    block: tuple[int, int]) -> None:
    """After a backward pass in `deferred_score_gradients()` (and its all-reduce): W.grad holds G;
    add dL/dS = G * W (per block) to S.grad and leave dL/dW = G * M in W.grad, the gradients the
    plain backward gives."""
    grad = weight.grad
    if grad is None:
        return
    extra = score_gradient(grad, weight, block).reshape(scores.shape)
    scores.grad = extra if scores.grad is None else scores.grad.add_(extra)
    grad.mul_(mask)


def straight_through_mask(weight: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                          block: tuple[int, int]) -> torch.Tensor:
    """W_eff = W * M with the straight-through gradient to the scores (movement pruning Eq 2)."""
    return _StraightThrough.apply(weight, mask, scores, block)


class MaskModule(torch.nn.Module):
    """Base of the modules a mask node may call (`call_module`) when the mask depends on the
    train/eval mode. `forward(weight, mask, *state)` returns W_eff; in eval mode it must return
    `weight * mask` so that baking the mask buffer gives the same outputs."""


class HardConcreteMask(MaskModule):
    """L0 regularization's hard-concrete gate (Louizos et al. 2017, as in movement pruning
    section 4): in training a mask is sampled in every forward, per block,

        u ~ U(0, 1),  S_bar = sigmoid((log u - log(1 - u) + S) / b),
        Z = (r - l) S_bar + l,  M = min(1, ReLU(Z)),   W_eff = W * M,

    and autograd gives the score gradient of movement pruning Eq 3:
        dL/dS = dL/dW_eff * W * (r - l)/b * S_bar (1 - S_bar) * 1{0 <= Z <= 1}.
    In eval mode it applies the mask buffer, which the Program keeps at the deterministic test-time
    mask min(1, ReLU((r - l) sigmoid(S) + l)) (recomputed at `prog.step()`).
    The noise comes from torch's global RNG, so a seeded run is reproducible.
    """

    def __init__(self, beta: float, l: float, r: float, block: tuple[int, int]):
        super().__init__()
        self.beta, self.l, self.r = float(beta), float(l), float(r)
        self.block = tuple(block)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, l={self.l}, r={self.r}, block={self.block}"

    def forward(self, weight: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight * mask
        u = torch.rand(scores.shape, dtype=scores.dtype, device=scores.device).clamp(1e-6, 1 - 1e-6)
        gate = hard_concrete_sample(scores, u, self.beta, self.l, self.r)
        return weight * blocks.expand(gate, tuple(weight.shape), self.block)


def hard_concrete_sample(scores: torch.Tensor, u: torch.Tensor, beta: float, l: float,
                         r: float) -> torch.Tensor:
    """M = min(1, ReLU((r - l) sigmoid((log u - log(1 - u) + S) / b) + l)) (movement pruning,
    section 4; Louizos et al. 2017 Eq 9-10 with S = log alpha)."""
    s_bar = torch.sigmoid((torch.log(u) - torch.log1p(-u) + scores) / beta)
    return torch.clamp((r - l) * s_bar + l, 0.0, 1.0)


def hard_concrete_eval(scores: torch.Tensor, l: float, r: float) -> torch.Tensor:
    """The test-time L0 mask min(1, ReLU((r - l) sigmoid(S) + l)) (movement pruning, section 4)."""
    return torch.clamp((r - l) * torch.sigmoid(scores) + l, 0.0, 1.0)



class _DenseGradient(torch.autograd.Function):
    """W_eff = W * M with the dense gradient dL/dW = dL/dW_eff (PINS Eq 1-2).

    PINS and PLATON update every weight with the gradient of the loss at the current (masked)
    weights, pruned ones included, then zero the pruned ones: theta <- (theta - eta g) * M. The
    method zeroes them in `Method.after_step` (sparsec.masking.zero_pruned); this op supplies g.
    """

    @staticmethod
    def forward(ctx, weight, mask):  # type: ignore[override]
        return weight * mask

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def apply_mask_dense_grad(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W_eff = W * M whose backward passes the gradient to every weight (PINS Eq 1-2)."""
    return _DenseGradient.apply(weight, mask)

# Every function a mask node may call; the verifier and the passes recognise mask nodes by these
# (or by a call_module node whose module is a MaskModule).
MASK_OPS = (apply_mask, straight_through_mask, apply_mask_dense_grad)
