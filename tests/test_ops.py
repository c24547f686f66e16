"""The mask ops' gradients, against hand computations on small tensors.

Movement pruning (Sanh et al. 2020) Eq 2 with the straight-through estimator: with
W_eff = W * M and g = dL/dW_eff,
    dL/dS = g * W      for every weight, masked ones included (summed over a block's weights)
    dL/dW = g * M
Magnitude pruning: W_eff = W * M, so dL/dW = g * M and nothing flows anywhere else.
"""
from __future__ import annotations

import torch

from sparsec import ops

W = torch.tensor([[1.0, -2.0, 3.0],
                  [4.0, 5.0, -6.0]])
M = torch.tensor([[1.0, 0.0, 1.0],
                  [0.0, 0.0, 1.0]])
G = torch.tensor([[0.5, 1.0, -1.0],
                  [2.0, -0.5, 0.25]])  # dL/dW_eff, chosen by the test


def _backward(weight, mask, scores, block):
    weight = weight.clone().requires_grad_(True)
    scores = scores.clone().requires_grad_(True)
    out = ops.straight_through_mask(weight, mask, scores, block)
    out.backward(G if out.shape == G.shape else GRAD_5x3)
    return out, weight.grad, scores.grad


def test_forward_is_weight_times_mask():
    out, _, _ = _backward(W, M, torch.zeros(2, 3), (1, 1))
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, -6.0]]))


def test_unstructured_gradients_by_hand():
    _, grad_w, grad_s = _backward(W, M, torch.zeros(2, 3), (1, 1))
    # dL/dW = g * M: zero where pruned
    assert torch.equal(grad_w, torch.tensor([[0.5, 0.0, -1.0],
                                             [0.0, 0.0, 0.25]]))
    # dL/dS = g * W: also for the pruned weights (straight-through)
    assert torch.equal(grad_s, torch.tensor([[0.5, -2.0, -3.0],
                                             [8.0, -2.5, -1.5]]))


def test_block_gradient_is_sum_over_each_block():
    # block [1, 3]: one score per row
    _, grad_w, grad_s = _backward(W, M, torch.zeros(2, 1), (1, 3))
    assert torch.equal(grad_s, torch.tensor([[0.5 - 2.0 - 3.0], [8.0 - 2.5 - 1.5]]))
    assert torch.equal(grad_w, G * M)
    # block [2, 1]: one score per column
    _, _, grad_s = _backward(W, M, torch.zeros(1, 3), (2, 1))
    assert torch.equal(grad_s, torch.tensor([[0.5 + 8.0, -2.0 - 2.5, -3.0 - 1.5]]))


W_5x3 = torch.arange(1.0, 16.0).reshape(5, 3)
GRAD_5x3 = torch.ones(5, 3)


def test_non_divisible_blocks_sum_over_partial_blocks():
    # 5x3 weight, 2x2 blocks: a 3x2 grid; the last row and column of blocks are partial
    mask = torch.ones(5, 3)
    _, _, grad_s = _backward(W_5x3, mask, torch.zeros(3, 2), (2, 2))
    w = W_5x3  # g = 1, so each block's gradient is the sum of its weights
    expected = torch.tensor([
        [w[0:2, 0:2].sum(), w[0:2, 2:3].sum()],
        [w[2:4, 0:2].sum(), w[2:4, 2:3].sum()],
        [w[4:5, 0:2].sum(), w[4:5, 2:3].sum()],
    ])
    assert torch.equal(grad_s, expected)
    assert grad_s[2, 1] == 15.0  # the 1x1 corner block holds only W[4, 2]


def test_straight_through_with_gradcheck_in_double():
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(4, 6) > 0.5).double()
    scores = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out = ops.straight_through_mask(weight, mask, scores, (2, 2))
    g = torch.randn(4, 6, dtype=torch.float64)
    grad_w, grad_s = torch.autograd.grad(out, (weight, scores), g)
    torch.testing.assert_close(grad_w, g * mask)
    by_hand = (g * weight).detach().reshape(2, 2, 3, 2).sum(dim=(1, 3))
    torch.testing.assert_close(grad_s, by_hand)


def test_magnitude_gradient_is_g_times_mask():
    weight = W.clone().requires_grad_(True)
    out = ops.apply_mask(weight, M)
    assert torch.equal(out, W * M)
    out.backward(G)
    assert torch.equal(weight.grad, G * M)


def test_mask_ops_are_registered_for_the_verifier():
    assert ops.apply_mask in ops.MASK_OPS and ops.straight_through_mask in ops.MASK_OPS


def test_dense_gradient_mask_passes_the_gradient_to_pruned_weights():
    """PINS Eq 1-2: W_eff = W * M forward, dL/dW = dL/dW_eff for every weight."""
    from sparsec.ops import apply_mask_dense_grad

    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]], requires_grad=True)
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[0.5, 0.25], [-1.0, 2.0]])
    out = apply_mask_dense_grad(w, m)
    torch.testing.assert_close(out, w.detach() * m)
    out.backward(g)
    torch.testing.assert_close(w.grad, g)
