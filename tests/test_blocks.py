"""Block geometry: matrix views, block grids, reduce / expand, and non-divisible shapes.

Rule for shapes a block does not divide: the grid rounds up (`ceil(rows / r) x ceil(cols / c)`),
the last block row / column is partial, and the padding recorded is the number of rows / columns
missing from it (`(-rows) % r`, `(-cols) % c`). A partial block has one score and one mask value
like any other; its size is the number of real weights in it. Top_v then keeps the best-first
prefix of blocks whose weight count is nearest the asked count, so density is exact within one
block (see tests/test_topv.py). Local scope keeps at least one block per tensor.
"""
from __future__ import annotations

import pytest
import torch

import sparsec
from sparsec import blocks
from tests.helpers import spec_dict


@pytest.mark.parametrize("shape, view", [
    ((16, 8), (16, 8)),            # linear [out, in]
    ((8, 16), (8, 16)),            # GPT-2 Conv1D [in, out], as stored
    ((4, 3, 3, 3), (4, 27)),       # conv [out, in, kh, kw] -> [out, in*kh*kw]
    ((6, 2, 5), (6, 10)),          # conv1d
    ((7,), (7, 1)),
])
def test_matrix_shape(shape, view):
    assert blocks.matrix_shape(shape) == view


@pytest.mark.parametrize("shape, block, grid, pad", [
    ((64, 32), (32, 32), (2, 1), (0, 0)),
    ((64, 32), (1, 1), (64, 32), (0, 0)),
    ((10, 7), (4, 4), (3, 2), (2, 1)),
    ((5, 5), (2, 2), (3, 3), (1, 1)),
    ((4, 3, 3, 3), (2, 9), (2, 3), (0, 0)),
    ((4, 3, 3, 3), (4, 8), (1, 4), (0, 5)),
    ((3, 3), (8, 8), (1, 1), (5, 5)),    # a block larger than the weight: one partial block
])
def test_grid_and_padding(shape, block, grid, pad):
    assert blocks.grid_shape(shape, block) == grid
    assert blocks.padding(shape, block) == pad


def test_block_sizes_with_partial_edges():
    sizes = blocks.block_sizes((10, 7), (4, 4))
    assert sizes.tolist() == [[16, 12], [16, 12], [8, 6]]
    assert int(sizes.sum()) == 70
    assert blocks.block_sizes((8, 8), (4, 4)).tolist() == [[16, 16], [16, 16]]


def test_reduce_sum_mean_max_by_hand():
    x = torch.arange(20.0).reshape(4, 5)  # 2x2 blocks: grid 2x3, last column partial
    assert blocks.block_reduce(x, (2, 2), "sum").tolist() == [
        [0 + 1 + 5 + 6, 2 + 3 + 7 + 8, 4 + 9],
        [10 + 11 + 15 + 16, 12 + 13 + 17 + 18, 14 + 19],
    ]
    mean = blocks.block_reduce(x, (2, 2), "mean")
    assert mean.tolist() == [[3.0, 5.0, 6.5], [13.0, 15.0, 16.5]]  # partial block: over its 2 weights
    neg = -x - 1  # all negative: padding must not win the max
    assert blocks.block_reduce(neg, (2, 2), "max").tolist() == [[-1.0, -3.0, -5.0], [-11.0, -13.0, -15.0]]
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        blocks.block_reduce(x, (2, 2), "median")


def test_reduce_unstructured_is_identity_on_matrix_view():
    x = torch.randn(4, 2, 3)
    assert torch.equal(blocks.block_reduce(x, (1, 1), "sum"), x.reshape(4, 6))
    assert torch.equal(blocks.block_reduce(x, (1, 1), "mean"), x.reshape(4, 6))


def test_expand_crops_partial_blocks():
    grid = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    full = blocks.expand(grid, (5, 3), (2, 2))
    assert full.tolist() == [
        [1, 1, 0],
        [1, 1, 0],
        [0, 0, 1],
        [0, 0, 1],
        [1, 1, 1],
    ]


def test_expand_conv_weight_shape():
    grid = torch.tensor([[1.0, 0.0, 1.0]])
    full = blocks.expand(grid, (2, 3, 2, 2), (2, 4))  # matrix view [2, 12]
    assert full.shape == (2, 3, 2, 2)
    assert full.reshape(2, 12).tolist() == [[1] * 4 + [0] * 4 + [1] * 4] * 2


def test_expand_then_reduce_round_trip():
    shape, block = (10, 7), (4, 4)
    grid = torch.randn(blocks.grid_shape(shape, block))
    full = blocks.expand(grid, shape, block)
    assert torch.equal(blocks.block_reduce(full, block, "max"), grid)
    torch.testing.assert_close(blocks.block_reduce(full, block, "mean"), grid)


# ------------------------------------------------------------------------------- through Program
def _program(block, density, scope, d_in=10, hidden=7):
    from tests.helpers import MLP

    torch.manual_seed(0)
    model = MLP(d_in=d_in, hidden=hidden, d_out=3)
    spec = spec_dict(["fc*"], method="magnitude", density=density, scope=scope, block=block)
    return sparsec.compile(model, spec, (torch.randn(2, d_in),))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_non_divisible_sites_density_within_one_block(scope):
    prog = _program((4, 4), 0.3, scope)  # fc1 [7, 10], fc2 [7, 7], fc3 [3, 7]: none divisible
    for site in prog.sites:
        assert site.padding == blocks.padding(site.shape, (4, 4))
        assert site.padding != (0, 0)
    masks = prog.masks()
    if scope == "global":
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        assert abs(kept - round(0.3 * total)) <= 16
    else:
        for name, m in masks.items():
            assert abs(int(m.sum()) - round(0.3 * m.numel())) <= 16, name
    for site in prog.sites:  # every mask is constant over each block
        mask = masks[site.name]
        grid = blocks.block_reduce(mask, site.block, "max")
        assert torch.equal(blocks.expand(grid, site.shape, site.block), mask)


def test_local_scope_keeps_one_block_per_tensor_at_tiny_density():
    prog = _program((4, 4), 0.001, "local")
    for site in prog.sites:
        grid = blocks.block_reduce(prog.masks()[site.name], site.block, "max")
        assert int(grid.sum()) == 1, site.name
