"""The torch side of a lowered layer: the custom op `sparsec::block_sparse_linear`.

The op takes a linear's weight in the padded blocked-ELL layout of sparsec.lowering.block_format
(`values` [R, S, BR, BC], `block_cols` [R, S], `row_nnz` [R], optional `bias` [N] and per-block
`scales` [R, S] for INT8 values) and computes Y[..., N] = X[..., K] @ W^T + bias, so a lowered
GraphModule still runs in PyTorch and can be compared with the dense program. Its ONNX form is one
`sparsec::BlockSparseLinear` node (sparsec.lowering.translate).

The reference implementation gathers the input's column blocks named by `block_cols` and contracts
them with the blocks in one einsum; padding entries hold zero blocks, so they add nothing and
`row_nnz` is not needed to get the right answer.
"""
from __future__ import annotations

import torch

OP_NAME = "sparsec::block_sparse_linear"


@torch.library.custom_op(OP_NAME, mutates_args=())
def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor,
                        row_nnz: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None,
                        n: int, k: int) -> torch.Tensor:
    """Y = X @ W^T + bias with W [n, k] given as padded blocked-ELL blocks."""
    blocks_ = dequantize(values, scales)
    r, s, br, bc = blocks_.shape
    lead = x.shape[:-1]
    rows = x.reshape(-1, k).to(blocks_.dtype)
    cols = -(-k // bc)
    if cols * bc != k:
        rows = torch.nn.functional.pad(rows, (0, cols * bc - k))
    gathered = rows.reshape(rows.shape[0], cols, bc)[:, block_cols.reshape(-1)]
    gathered = gathered.reshape(rows.shape[0], r, s, bc)
    y = torch.einsum("mrsj,rsij->mri", gathered, blocks_).reshape(rows.shape[0], r * br)[:, :n]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n).to(x.dtype).contiguous()


@block_sparse_linear.register_fake
def _(x, values, block_cols, row_nnz, bias, scales, n, k):
    return x.new_empty((*x.shape[:-1], n))


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """fp32 blocks: `values` as is; INT8 blocks: values * scale of their block."""
    if scales is None:
        return values
    return values.to(torch.float32) * scales[:, :, None, None]


def op() -> torch._ops.OpOverload:
    """The registered overload, as it appears in an FX graph (`call_function` target)."""
    return torch.ops.sparsec.block_sparse_linear.default
