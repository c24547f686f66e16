"""Block geometry of a weight.

A site's weight is viewed as a matrix: linear [out, in] as is, GPT-2 Conv1D [in, out] as stored,
convolution [out, in, k...] as [out, in * prod(k)]. `block = [r, c]` tiles that matrix; when a
dimension is not divisible the last block row / column is partial (padding is recorded on the
site). Every block has one score; a block's mask value covers all its weights.
"""
from __future__ import annotations

import math

import torch


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [rows, cols] matrix view of a weight of `shape` (dims after the first are flattened)."""
    rows = shape[0]
    return rows, math.prod(shape[1:]) if len(shape) > 1 else 1


def grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Number of block rows and block columns (partial blocks count)."""
    rows, cols = matrix_shape(shape)
    return -(-rows // block[0]), -(-cols // block[1])


def padding(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns missing from the last partial block row / column (0 when divisible)."""
    rows, cols = matrix_shape(shape)
    return (-rows) % block[0], (-cols) % block[1]


def block_sizes(shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Element count of each block (int64 grid); edge blocks are smaller when not divisible."""
    rows, cols = matrix_shape(shape)
    gr, gc = grid_shape(shape, block)
    row_sizes = torch.full((gr,), block[0], dtype=torch.int64)
    col_sizes = torch.full((gc,), block[1], dtype=torch.int64)
    row_sizes[-1] = rows - block[0] * (gr - 1)
    col_sizes[-1] = cols - block[1] * (gc - 1)
    return row_sizes[:, None] * col_sizes[None, :]


def block_reduce(x: torch.Tensor, block: tuple[int, int], how: str = "sum") -> torch.Tensor:
    """Reduce a weight-shaped tensor to its block grid by `sum`, `mean` (over real elements) or `max`."""
    rows, cols = matrix_shape(tuple(x.shape))
    m = x.reshape(rows, cols)
    if block == (1, 1):
        return m.clone() if how != "sum" else m
    pr, pc = padding(tuple(x.shape), block)
    if pr or pc:
        fill = float("-inf") if how == "max" else 0.0
        m = torch.nn.functional.pad(m, (0, pc, 0, pr), value=fill)
    gr, gc = m.shape[0] // block[0], m.shape[1] // block[1]
    tiles = m.reshape(gr, block[0], gc, block[1])
    if how == "max":
        return tiles.amax(dim=(1, 3))
    total = tiles.sum(dim=(1, 3))
    if how == "sum":
        return total
    if how == "mean":
        return total / block_sizes(tuple(x.shape), block).to(total.dtype)
    raise ValueError(f"unknown reduction {how!r}")


def expand(grid: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Expand a block grid to a tensor shaped like the weight (partial edge blocks cropped)."""
    rows, cols = matrix_shape(shape)
    if block == (1, 1):
        return grid.reshape(shape)
    full = grid.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols].reshape(shape)
