"""The functions that mask nodes call in the rewritten graph.

They are plain Python functions so that the printed IR reads as runnable Python, e.g.
`masked = sparsec_ops_apply_mask(weight, weight_mask)`.
"""
from __future__ import annotations

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
    """

    @staticmethod
    def forward(ctx, weight, mask, scores, block):  # type: ignore[override]
        ctx.save_for_backward(weight, mask)
        ctx.block = tuple(block)
        ctx.scores_shape = scores.shape
        return weight * mask

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[2]:
            grad_scores = blocks.block_reduce(grad * weight, ctx.block, "sum").reshape(ctx.scores_shape)
        return grad_weight, None, grad_scores, None


def straight_through_mask(weight: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                          block: tuple[int, int]) -> torch.Tensor:
    """W_eff = W * M with the straight-through gradient to the scores (movement pruning Eq 2)."""
    return _StraightThrough.apply(weight, mask, scores, block)


# Every function a mask node may call; the verifier and the passes recognise mask nodes by these.
MASK_OPS = (apply_mask, straight_through_mask)
