"""Top_v (movement pruning Eq 1): exact counts, local vs global scope, deterministic ties, and the
bracketed selection used above 1M candidates, checked against torch.topk and a stable sort.

Counting rule: with blocks all of one size s over N weights, round(d * n_blocks) blocks are kept
(exactly round(d * N) weights when unstructured); with unequal (partial edge) blocks, the kept set
is the best-first prefix whose weight count is nearest to round(d * N), so the density is exact
to within one block. Ties go to the earlier tensor, then the earlier position.
"""
from __future__ import annotations

import pytest
import torch

from sparsec import blocks
from sparsec.topv import top_v


def ones_like_sizes(*imps: torch.Tensor) -> list[torch.Tensor]:
    return [torch.ones(imp.shape, dtype=torch.int64) for imp in imps]


def kept(masks) -> int:
    return sum(int(m.sum()) for m in masks)


def stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the k largest, ties by position (stable descending sort)."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.sort(x.reshape(-1), descending=True, stable=True).indices[:k]] = True
    return keep.reshape(x.shape)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.25, 0.5, 0.77, 0.999, 1.0])
@pytest.mark.parametrize("n", [7, 100, 1023])
def test_exact_count_unstructured(n, density):
    imp = torch.randn(n, generator=torch.Generator().manual_seed(n))
    (mask,) = top_v([imp], ones_like_sizes(imp), density)
    assert mask.dtype == torch.bool and mask.shape == imp.shape
    assert int(mask.sum()) == round(density * n)
    assert torch.equal(mask, stable_top(imp, round(density * n)))


def test_global_exact_count_across_tensors():
    gen = torch.Generator().manual_seed(0)
    imps = [torch.randn(10, 20, generator=gen), torch.randn(30, 7, generator=gen), torch.randn(3, 3, generator=gen)]
    total = sum(i.numel() for i in imps)
    masks = top_v(imps, ones_like_sizes(*imps), 0.3)
    assert kept(masks) == round(0.3 * total)
    flat = torch.cat([i.reshape(-1) for i in imps])
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), stable_top(flat, round(0.3 * total)))


def test_global_and_local_differ_when_one_tensor_has_all_large_scores():
    big = torch.arange(100.0, 116.0).reshape(4, 4)   # every score larger than any of `small`
    small = torch.arange(0.0, 16.0).reshape(4, 4)
    glob = top_v([big, small], ones_like_sizes(big, small), 0.5)
    assert int(glob[0].sum()) == 16 and int(glob[1].sum()) == 0
    local = [top_v([imp], ones_like_sizes(imp), 0.5, min_blocks=1)[0] for imp in (big, small)]
    assert int(local[0].sum()) == 8 and int(local[1].sum()) == 8
    assert torch.equal(local[1], small >= 8)


def test_local_keeps_at_least_one_block_per_tensor():
    imp = torch.randn(2, 2)
    (mask,) = top_v([imp], ones_like_sizes(imp), 0.01, min_blocks=1)
    assert int(mask.sum()) == 1 and bool(mask.reshape(-1)[imp.reshape(-1).argmax()])
    (mask,) = top_v([imp], ones_like_sizes(imp), 0.01)  # global: no minimum
    assert int(mask.sum()) == 0


def test_ties_broken_by_position_deterministically():
    imp = torch.zeros(10)
    (mask,) = top_v([imp], ones_like_sizes(imp), 0.3)
    assert mask.tolist() == [True] * 3 + [False] * 7
    imp = torch.tensor([1.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    (mask,) = top_v([imp], ones_like_sizes(imp), 0.5)
    assert mask.tolist() == [True, True, False, False, True, False]
    again = top_v([imp.clone()], ones_like_sizes(imp), 0.5)[0]
    assert torch.equal(mask, again)


def test_ties_across_tensors_go_to_the_earlier_tensor():
    a, b = torch.ones(4), torch.ones(4)
    ma, mb = top_v([a, b], ones_like_sizes(a, b), 0.25)
    assert ma.tolist() == [True, True, False, False] and not mb.any()


def test_equal_blocks_count():
    # an 8x8 weight in 2x4 blocks: a 4x2 grid of 8-element blocks
    shape, block = (8, 8), (2, 4)
    imp = torch.randn(blocks.grid_shape(shape, block))
    (mask,) = top_v([imp], [blocks.block_sizes(shape, block)], 0.25)
    assert int(mask.sum()) == 2
    assert int(blocks.expand(mask, shape, block).sum()) == 16  # exactly 25% of 64


def test_partial_blocks_nearest_prefix_within_one_block():
    # 5x5 weight, 2x2 blocks: block sizes [[4,4,2],[4,4,2],[2,2,1]], N = 25
    shape, block = (5, 5), (2, 2)
    sizes = blocks.block_sizes(shape, block)
    imp = torch.tensor([[9.0, 8.0, 7.0],
                        [6.0, 5.0, 4.0],
                        [3.0, 2.0, 1.0]])
    for density in (0.1, 0.3, 0.4, 0.5, 0.9):
        (mask,) = top_v([imp], [sizes], density)
        weights = int(blocks.expand(mask, shape, block).sum())
        target = round(density * 25)
        assert abs(weights - target) <= 4, (density, weights)
        # best-first prefix: the kept blocks are the highest scores
        n = int(mask.sum())
        assert torch.equal(mask, stable_top(imp, n))
        # nearest prefix: no other prefix length is closer
        counts = torch.cumsum(sizes.reshape(-1), 0).tolist()
        best = min([0] + counts, key=lambda c: abs(c - target))
        assert abs(weights - target) == abs(best - target)
    # d = 0.4, target 10: prefixes 4, 8, 10 (4+4+2) -> three blocks, exactly 10 weights
    (mask,) = top_v([imp], [sizes], 0.4)
    assert int(blocks.expand(mask, shape, block).sum()) == 10


def test_large_tensor_bracketed_path_equals_topk():
    n = (1 << 20) + 12345
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    for density in (0.1, 0.5, 0.97):
        k = round(density * n)
        (mask,) = top_v([x], None, density)
        assert int(mask.sum()) == k
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.topk(x, k).indices] = True
        assert torch.equal(mask, expected)


def test_large_global_across_tensors_equals_topk():
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(700, 1000, generator=gen) * 3, torch.randn(500, 800, generator=gen)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    k = round(0.1 * flat.numel())
    masks = top_v(parts, None, 0.1)
    assert kept(masks) == k
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.topk(flat, k).indices] = True
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), expected)


def test_large_tensor_with_many_ties_exact_and_by_position():
    n = 1 << 21
    x = (torch.arange(n) % 5).float()  # five values, each ~n/5 times; a strided sample misleads
    k = round(0.3 * n)
    (mask,) = top_v([x], None, 0.3)
    assert int(mask.sum()) == k
    assert torch.equal(mask, stable_top(x, k))


@pytest.mark.parametrize("n", [1000, (1 << 20) + 7])
def test_a_nan_importance_is_never_kept_and_the_count_stays_exact(n):
    """Small (one selection) and large (bracketed) paths alike: NaN ranks below every number."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    nans = torch.arange(0, n, 97)
    x[nans] = float("nan")
    k = round(0.3 * n)
    (mask,) = top_v([x], None, 0.3)
    assert int(mask.sum()) == k and not mask[nans].any()
    numbers = torch.nan_to_num(x, nan=float("-inf"))
    assert torch.equal(mask, stable_top(numbers, k))


def test_too_few_numbers_for_the_density_is_an_error_not_a_smaller_mask():
    from sparsec.errors import TrainingError

    x = torch.full((10,), float("nan"))
    x[:2] = 1.0
    with pytest.raises(TrainingError, match="cannot keep 5 of 10 blocks: 8 importance value"):
        top_v([x], None, 0.5)
    with pytest.raises(TrainingError, match="NaN"):
        top_v([torch.full((4,), float("nan"))], None, 1.0)
