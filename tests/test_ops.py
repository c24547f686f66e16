"""The mask ops' gradients, against hand computations on small tensors.

Movement pruning (Sanh et al. 2020) Eq 2 with the straight-through estimator: with
W_eff = W * M and g = dL/dW_eff,
    dL/dS = g * W      for every weight, masked ones included (summed over a block's weights)
    dL/dW = g * M
Magnitude pruning: W_eff = W * M, so dL/dW = g * M and nothing flows anywhere else.
"""
from __future__ import annotations

import contextlib

import pytest
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


@pytest.mark.parametrize("shape, block", [((2, 3), (1, 1)), ((2, 3), (1, 3)), ((5, 3), (2, 2)), ((4, 6), (2, 1))])
def test_deferred_gradients_once_finished_equal_the_plain_ones(shape, block):
    """Under data parallelism the backward leaves G = dL/dW_eff in W.grad (what DDP all-reduces)
    and `finish_deferred` applies Eq 2 after: the same gradients as the plain backward, bit for
    bit, a score gradient already there (a regularizer's) included, over two accumulated passes."""
    gen = torch.Generator().manual_seed(sum(shape) + block[0])
    weight = torch.randn(shape, generator=gen)
    mask = (torch.rand(shape, generator=gen) > 0.5).float()
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    grads = [torch.randn(shape, generator=gen) for _ in range(2)]
    regularizer = torch.randn(grid, generator=gen)

    def run(deferred: bool):
        w = weight.clone().requires_grad_(True)
        s = torch.zeros(grid).requires_grad_(True)
        for g in grads:
            with ops.deferred_score_gradients() if deferred else contextlib.nullcontext():
                out = ops.straight_through_mask(w, mask, s, block)
            (out * g).sum().backward()
            (s * regularizer).sum().backward()
        if deferred:
            assert torch.equal(w.grad, grads[0] + grads[1])   # G itself: nothing masked yet
            assert torch.equal(s.grad, 2 * regularizer)        # only what did not come through G
            ops.finish_deferred(w, mask, s, block)
        return w.grad, s.grad

    plain_w, plain_s = run(False)
    done_w, done_s = run(True)
    assert torch.equal(done_w, plain_w)
    torch.testing.assert_close(done_s, plain_s, rtol=1e-6, atol=1e-6)   # (g1 + g2) * W vs g1 * W + g2 * W


def test_a_frozen_weight_or_frozen_scores_keep_the_plain_gradient():
    for w_grad, s_grad in ((False, True), (True, False)):
        w = W.clone().requires_grad_(w_grad)
        s = torch.zeros(2, 3).requires_grad_(s_grad)
        with ops.deferred_score_gradients():
            out = ops.straight_through_mask(w, M, s, (1, 1))
        out.backward(G)
        if w_grad:
            assert torch.equal(w.grad, G * M)
        else:
            assert torch.equal(s.grad, G * W)
