"""The torch custom op sparsec::block_sparse_linear against a dense masked linear."""
from __future__ import annotations

import pytest
import torch

from sparsec.lowering.block_format import pack, random_keep
from sparsec.lowering.torch_op import block_sparse_linear, op


def _sparse_weight(n: int, k: int, block: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.from_numpy(random_keep(n, k, block, density, seed=seed))
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return torch.randn(n, k, generator=g) * mask


def _packed(weight: torch.Tensor, block: tuple[int, int], int8: bool = False):
    p = pack(weight, block=block, int8=int8)
    scales = None if p.scales is None else torch.from_numpy(p.scales)
    return torch.from_numpy(p.values), torch.from_numpy(p.block_cols), torch.from_numpy(p.row_nnz), scales


@pytest.mark.parametrize("rows", [1, 7, 128])
@pytest.mark.parametrize("block", [(16, 16), (32, 32)])
@pytest.mark.parametrize("shape", [(96, 64), (70, 45)])  # divisible and not
def test_matches_dense_masked_linear(rows, block, shape):
    n, k = shape
    weight = _sparse_weight(n, k, block, 0.3, seed=rows)
    bias = torch.randn(n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2))
    values, cols, nnz, _ = _packed(weight, block)
    got = block_sparse_linear(x, values, cols, nnz, bias, None, n, k)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_leading_dimensions_and_no_bias():
    weight = _sparse_weight(40, 33, (16, 16), 0.5, seed=3)
    x = torch.randn(2, 5, 33)
    values, cols, nnz, _ = _packed(weight, (16, 16))
    got = op()(x, values, cols, nnz, None, None, 40, 33)
    assert got.shape == (2, 5, 40)
    torch.testing.assert_close(got, x @ weight.t(), atol=1e-5, rtol=1e-5)


def test_int8_blocks_dequantize_per_block():
    weight = _sparse_weight(64, 64, (32, 32), 0.5, seed=4)
    x = torch.randn(3, 64)
    values, cols, nnz, scales = _packed(weight, (32, 32), int8=True)
    assert values.dtype == torch.int8 and scales is not None
    got = op()(x, values, cols, nnz, None, scales, 64, 64)
    want = x @ weight.t()
    # per-block symmetric int8: error bounded by half a step of the largest block scale
    assert (got - want).abs().max() <= 0.5 * float(scales.max()) * x.abs().sum(dim=1).max()
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))


def test_fake_impl_exports_with_dynamic_batch():
    weight = _sparse_weight(24, 20, (16, 16), 0.5, seed=5)
    values, cols, nnz, _ = _packed(weight, (16, 16))

    class M(torch.nn.Module):
        def forward(self, x):
            return op()(x, values, cols, nnz, None, None, 24, 20)

    batch = torch.export.Dim("batch")
    program = torch.export.export(M(), (torch.randn(3, 20),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 20)
    torch.testing.assert_close(program.module()(x), x @ weight.t(), atol=1e-5, rtol=1e-5)


def test_a_nan_input_reaches_exactly_the_outputs_of_the_kept_blocks_that_read_it():
    """Padding slots (rows keeping fewer blocks than the longest) name column block 0 with zero
    blocks: the op must skip them as the kernel does, or a NaN there would spread to every padded row."""
    import numpy as np

    from sparsec import runtime
    from sparsec.lowering import onnx_op

    n, k, block = 64, 96, (16, 16)
    keep = random_keep(n, k, block, 0.4, seed=3)
    keep[0] = False
    keep[1, 0] = True                       # block row 1 reads column block 0; row 0 reads nothing
    weight = torch.randn(n, k)
    packed = pack(weight, keep, block)
    assert (packed.row_nnz < packed.values.shape[1]).any() and (packed.block_cols[packed.row_nnz == 0] == 0).all()
    x = torch.randn(5, k)
    x[2, 3] = float("nan")                  # column 3: column block 0
    got = block_sparse_linear(x, torch.from_numpy(packed.values), torch.from_numpy(packed.block_cols),
                              torch.from_numpy(packed.row_nnz), None, None, n, k)
    reads = torch.from_numpy(np.repeat(keep[:, 0], block[0])[:n])      # output rows whose blocks read column 3
    assert torch.equal(torch.isnan(got[2]), reads) and not torch.isnan(got[[0, 1, 3, 4]]).any()
    if runtime.kernel_available():
        session = runtime.session(onnx_op.single_layer_model(packed).SerializeToString())
        kernel = session.run(None, {"x": x.numpy()})[0]
        assert np.array_equal(np.isnan(kernel), torch.isnan(got).numpy())
