"""Diagonal curvature of the loss for the loss-modelling saliencies (Laurent et al. 2020).

Three estimates of diag G, G the curvature of the training loss L = mean over examples, chosen
per [[prune]] group with `curvature`:

* `ggn` (the paper, Eq 8 and Appendix A): the diagonal generalized Gauss-Newton matrix
  G = mean_i J_i^T (d^2 l / du^2) J_i. For a softmax cross-entropy on logits u the Hessian in u is
  diag(p) - p p^T = sum_j p_j (e_j - p)(e_j - p)^T, so per row of logits
      G_kk = sum_j p_j (d log p_j / d theta_k)^2,
  the expectation over the model's own predicted classes (not the true labels). Exact: one
  backward pass per class and row (batched with `is_grads_batched` where autograd allows).
* `ggn_mc`: the same expectation with one label per row drawn from p (Monte Carlo): with g the
  gradient of the item's mean cross-entropy against the drawn labels over its N rows, N g^2 is an
  unbiased estimate of the item's GGN diagonal (the cross terms between rows have mean zero, since
  E_y[e_y - p] = 0), whatever the number of rows per item. One backward pass per item.
* `empirical_fisher`: the squared gradient of the true labels, mean_i (dl_i/dtheta)^2, which
  approximates G only near a minimum; an item of c examples counts c * (its mean gradient)^2.

The functions here take the logits `[N, C]` and targets `[N]` of one item (rows whose target is
-100 are ignored) and return the item's diagonal, one tensor per weight.
"""
from __future__ import annotations

from typing import Sequence

import torch

CURVATURES = ("ggn", "ggn_mc", "empirical_fisher")
IGNORE_INDEX = -100


def _valid(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = target.reshape(-1) != IGNORE_INDEX
    return logits.reshape(-1, logits.shape[-1])[keep], target.reshape(-1)[keep]


def _squares_into(out: list[torch.Tensor], grads: Sequence[torch.Tensor | None], scale: float,
                  batched: bool) -> None:
    for acc, g in zip(out, grads):
        if g is None:
            continue
        sq = g.float() * g.float()
        acc += (sq.sum(0) if batched else sq).to(acc.dtype) * scale


def ggn_diagonal(logits: torch.Tensor, target: torch.Tensor,
                 weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Exact diag of (1/N) sum_r J_r^T (diag p_r - p_r p_r^T) J_r over the N valid rows of `logits`
    (which must still carry its graph to `weights`): for each row the C directions
    sqrt(p_j) (e_j - p) of the logits' Hessian factor are pulled back and squared."""
    out = [torch.zeros_like(w) for w in weights]
    flat = logits.reshape(-1, logits.shape[-1])
    keep = torch.nonzero(target.reshape(-1) != IGNORE_INDEX).flatten()
    if keep.numel() == 0:
        return out
    classes = flat.shape[-1]
    probs = torch.softmax(flat.detach().float(), dim=-1)
    eye = torch.eye(classes, dtype=torch.float32, device=flat.device)
    scale = 1.0 / keep.numel()
    batched_ok = True
    for row in keep.tolist():
        p = probs[row]
        factors = p.sqrt()[:, None] * (eye - p[None, :])   # [C, C]: row j is sqrt(p_j)(e_j - p)
        if batched_ok:
            directions = torch.zeros((classes, *flat.shape), dtype=flat.dtype, device=flat.device)
            directions[:, row, :] = factors.to(flat.dtype)
            try:
                grads = torch.autograd.grad(flat, list(weights), directions, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
                _squares_into(out, grads, scale, batched=True)
                continue
            except RuntimeError:   # an op without a batching rule: one backward per class
                batched_ok = False
        for j in range(classes):
            direction = torch.zeros_like(flat)
            direction[row] = factors[j].to(flat.dtype)
            grads = torch.autograd.grad(flat, list(weights), direction, retain_graph=True,
                                        allow_unused=True)
            _squares_into(out, grads, scale, batched=False)
    return out


def ggn_mc_diagonal(logits: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor],
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Unbiased one-sample estimate N g^2 of the item's GGN diagonal, g the gradient of the mean
    cross-entropy of the N valid rows against labels drawn from the model's softmax."""
    out = [torch.zeros_like(w) for w in weights]
    rows, _ = _valid(logits, target)
    if rows.shape[0] == 0:
        return out
    probs = torch.softmax(rows.detach().float(), dim=-1)
    drawn = torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(rows.device)
    loss = torch.nn.functional.cross_entropy(rows.float(), drawn)
    grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
    _squares_into(out, grads, float(rows.shape[0]), batched=False)
    return out
