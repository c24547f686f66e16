"""Padded blocked-ELL packing (sparsec.lowering.block_format): layout, round trips, INT8, reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsec.lowering.block_format import dequantized_values, pack, random_keep, reference, unpack


def block_sparse_weight(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0):
    """A dense weight whose pruned blocks are zero, and its keep grid."""
    rng = np.random.default_rng(seed)
    keep = random_keep(n, k, block, density, seed=seed)
    mask = np.kron(keep, np.ones(block, dtype=bool))[:n, :k]
    return (rng.standard_normal((n, k)).astype(np.float32) * mask), keep


@pytest.mark.parametrize("n,k,block", [(64, 64, (16, 16)), (100, 70, (16, 16)), (96, 96, (32, 32)),
                                       (50, 45, (8, 32)), (33, 17, (32, 8))])
def test_round_trip_and_layout(n, k, block):
    w, keep = block_sparse_weight(n, k, block, 0.4)
    p = pack(w, block=block)
    br, bc = block
    rows, _ = -(-n // br), -(-k // bc)
    assert p.values.shape[0] == rows and p.values.shape[2:] == block
    assert p.values.dtype == np.float32 and p.block_cols.dtype == np.int64 and p.row_nnz.dtype == np.int64
    assert p.values.shape[1] == max(1, keep.sum(1).max())
    np.testing.assert_array_equal(p.row_nnz, keep.sum(1))
    np.testing.assert_array_equal(unpack(p), w)
    for r in range(rows):
        used = int(p.row_nnz[r])
        np.testing.assert_array_equal(p.block_cols[r, :used], np.flatnonzero(keep[r]))  # ascending
        assert (p.block_cols[r, used:] == 0).all() and (p.values[r, used:] == 0).all()  # padding slots
        for s in range(used):
            c = p.block_cols[r, s]
            tile = np.zeros(block, np.float32)
            src = w[r * br:(r + 1) * br, c * bc:(c + 1) * bc]
            tile[:src.shape[0], :src.shape[1]] = src
            np.testing.assert_array_equal(p.values[r, s], tile)


def test_keep_blocks_drops_nonzero_blocks_and_keeps_explicit_zero_blocks():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[:32, :32] = 0.0
    keep = np.array([[True, False], [False, True]])
    p = pack(torch.from_numpy(w), torch.from_numpy(keep), block=(32, 32))
    assert p.kept_blocks == 2 and p.density == 0.5
    expected = w.copy()
    expected[:32, 32:] = 0.0
    expected[32:, :32] = 0.0
    np.testing.assert_array_equal(unpack(p), expected)


def test_empty_and_dense_rows():
    w = np.ones((96, 64), np.float32)
    w[:32] = 0.0  # block row 0 empty, the others fully dense
    p = pack(w, block=(32, 32))
    np.testing.assert_array_equal(p.row_nnz, [0, 2, 2])
    np.testing.assert_array_equal(unpack(p), w)
    all_empty = pack(np.zeros((40, 40), np.float32), block=(16, 16))
    assert all_empty.values.shape == (3, 1, 16, 16) and all_empty.kept_blocks == 0


def test_int8_error_is_bounded_by_the_quantization_step():
    w, _ = block_sparse_weight(100, 70, (16, 16), 0.5, seed=3)
    fp = pack(w, block=(16, 16))
    q = pack(w, block=(16, 16), int8=True)
    assert q.values.dtype == np.int8 and q.scales is not None and q.scales.shape == q.values.shape[:2]
    assert np.abs(q.values.astype(np.int32)).max() <= 127
    step = q.scales[:, :, None, None]
    assert (np.abs(dequantized_values(q) - fp.values) <= step / 2 + 1e-7).all()
    assert q.nbytes < fp.nbytes / 3


def test_reference_matches_torch_linear():
    w, _ = block_sparse_weight(100, 70, (16, 16), 0.3, seed=4)
    bias = np.random.default_rng(5).standard_normal(100).astype(np.float32)
    x = np.random.default_rng(6).standard_normal((2, 5, 70)).astype(np.float32)
    p = pack(w, block=(16, 16))
    expected = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias))
    np.testing.assert_allclose(reference(x, p, bias), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_random_keep_density_and_balance():
    keep = random_keep(3072, 768, (32, 32), 0.1, seed=0, balanced=True)
    assert keep.shape == (96, 24) and keep.sum() == round(0.1 * 96 * 24)
    assert keep.sum(1).max() - keep.sum(1).min() <= 1
    assert random_keep(3072, 768, (32, 32), 0.1, seed=0).sum() == keep.sum()


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        pack(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="block grid"):
        pack(np.zeros((64, 64), np.float32), np.ones((3, 3), bool), block=(32, 32))
