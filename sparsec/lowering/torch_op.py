"""The torch side of a lowered layer: the custom op `sparsec::block_sparse_linear`.

The op takes a linear's weight in the padded blocked-ELL layout of sparsec.lowering.block_format
(`values` [R, S, BR, BC], `block_cols` [R, S], `row_nnz` [R], optional `bias` [N] and per-block
`scales` [R, S] for INT8 values) and computes Y[..., N] = X[..., K] @ W^T + bias, so a lowered
GraphModule still runs in PyTorch and can be compared with the dense program. Its ONNX form is one
`sparsec::BlockSparseLinear` node (sparsec.lowering.translate).

The reference implementation gathers the input's column blocks named by `block_cols` and contracts
them with the blocks in one einsum; padding slots (past `row_nnz`) read nothing, as in the kernel,
so a NaN or Inf input reaches exactly the outputs of the kept blocks that read it.

`int8_compute` (int8 values, `scales` [n] per output row) computes what the kernel's INT8 path
computes (sparsec/runtime/kernel/block_sparse.h): each input row quantized to uint8 with a zero
point, the integer sums exactly (float64 holds them), then the two scales and the bias in float32.
"""
from __future__ import annotations

import torch

OP_NAME = "sparsec::block_sparse_linear"


@torch.library.custom_op(OP_NAME, mutates_args=())
def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor,
                        row_nnz: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None,
                        n: int, k: int, int8_compute: bool = False) -> torch.Tensor:
    """Y = X @ W^T + bias with W [n, k] given as padded blocked-ELL blocks."""
    lead = x.shape[:-1]
    if int8_compute:
        if scales is None or values.dtype != torch.int8:
            raise ValueError("int8_compute needs int8 values and per-row scales")
        q, x_scale = quantize_rows(x.reshape(-1, k).to(torch.float32))
        acc = gathered_product(q, values.to(torch.float64), block_cols, n, k, row_nnz)  # exact integers
        y = acc.to(torch.float32) * (x_scale[:, None] * scales[None, :])
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, n).to(x.dtype).contiguous()
    blocks_ = dequantize(values, scales)
    y = gathered_product(x.reshape(-1, k).to(blocks_.dtype), blocks_, block_cols, n, k, row_nnz)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n).to(x.dtype).contiguous()


def gathered_product(rows: torch.Tensor, blocks_: torch.Tensor, block_cols: torch.Tensor, n: int, k: int,
                     row_nnz: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, k] @ W^T [k, n] with W's blocks `blocks_` [R, S, BR, BC] at `block_cols`. With
    `row_nnz`, padding slots read nothing (as in the kernel, which skips them): their zero blocks
    would otherwise turn a NaN or Inf of the column block they name into NaN outputs."""
    r, s, br, bc = blocks_.shape
    cols = -(-k // bc)
    if cols * bc != k:
        rows = torch.nn.functional.pad(rows, (0, cols * bc - k))
    gathered = rows.reshape(rows.shape[0], cols, bc)[:, block_cols.reshape(-1)]
    gathered = gathered.reshape(rows.shape[0], r, s, bc)
    if row_nnz is not None:
        used = torch.arange(s, device=row_nnz.device)[None, :] < row_nnz[:, None]          # [R, S]
        if not bool(used.all()):
            gathered = torch.where(used[None, :, :, None], gathered, torch.zeros((), dtype=gathered.dtype))
    return torch.einsum("mrsj,rsij->mri", gathered, blocks_).reshape(rows.shape[0], r * br)[:, :n]


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [M, K] float32 -> (xq - zero point as float64 [M, K], scale float32 [M]): per row,
    DynamicQuantizeLinear's uint8 formula (round half to even), as the kernel computes it."""
    zero = torch.zeros((), dtype=torch.float32)
    lo = torch.minimum(rows.amin(dim=1), zero) if rows.shape[1] else zero.expand(rows.shape[0])
    hi = torch.maximum(rows.amax(dim=1), zero) if rows.shape[1] else zero.expand(rows.shape[0])
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], 0, 255)
    return (q - zp[:, None]).to(torch.float64), scale


@block_sparse_linear.register_fake
def _(x, values, block_cols, row_nnz, bias, scales, n, k, int8_compute=False):
    return x.new_empty((*x.shape[:-1], n))


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """fp32 blocks: `values` as is; INT8 blocks: values * scale of their block."""
    if scales is None:
        return values
    if scales.dim() == 1:  # one per output row
        r, _, br, _ = values.shape
        padded = torch.ones(r * br, dtype=torch.float32)
        padded[:scales.shape[0]] = scales
        return values.to(torch.float32) * padded.reshape(r, 1, br, 1)
    return values.to(torch.float32) * scales[:, :, None, None]


def op() -> torch._ops.OpOverload:
    """The registered overload, as it appears in an FX graph (`call_function` target)."""
    return torch.ops.sparsec.block_sparse_linear.default
