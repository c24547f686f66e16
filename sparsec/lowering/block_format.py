"""Padded blocked-ELL: the storage of a block-sparse weight in sparsec's ONNX files.

A weight W [N, K] (out x in, like nn.Linear) is cut into BR x BC blocks: R = ceil(N / BR) block rows,
NBc = ceil(K / BC) block columns, edge blocks zero-padded. Block row r keeps row_nnz[r] blocks,
stored in slots s < row_nnz[r] (ascending block column) of

    values[r, s, i, j] = W[r*BR + i, c*BC + j]    with c = block_cols[r, s]

and S = max(row_nnz) slots per row (at least 1); slots s >= row_nnz[r] are padding with zero values
and block column 0. INT8 blocks keep `values` as int8 with symmetric scales, scale = max|w| / 127:
one per block (`scales` [R, S], storage only: the kernel dequantizes them when it loads) or one per
output row (`scales` [N], over the row's kept weights: INT8 compute, where activations are
quantized per row at run time and products summed in int32; `int8_reference` is that arithmetic).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBlocks:
    values: np.ndarray          # float32 [R, S, BR, BC], or int8 when `scales` is set
    block_cols: np.ndarray      # int64 [R, S]
    row_nnz: np.ndarray         # int64 [R]
    scales: np.ndarray | None   # float32 [R, S] (INT8 per block) or [N] (INT8 per output row)
    N: int
    K: int

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[2]), int(self.values.shape[3])

    @property
    def grid(self) -> tuple[int, int]:
        """Block rows and block columns of the full weight."""
        return int(self.values.shape[0]), -(-self.K // self.block[1])

    @property
    def int8(self) -> bool:
        return self.scales is not None

    @property
    def row_scales(self) -> bool:
        """INT8 with one scale per output row (the layout INT8 compute needs)."""
        return self.scales is not None and self.scales.ndim == 1

    @property
    def kept_blocks(self) -> int:
        return int(self.row_nnz.sum())

    @property
    def density(self) -> float:
        """Kept blocks over all blocks of the weight."""
        rows, cols = self.grid
        return self.kept_blocks / (rows * cols)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors (values, indices, counts, scales)."""
        arrays = [self.values, self.block_cols, self.row_nnz] + ([self.scales] if self.scales is not None else [])
        return sum(a.nbytes for a in arrays)


def _as_numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float32).numpy()
    return np.asarray(a)


def _tiles(weight: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[R, NBc, BR, BC] view of the zero-padded weight."""
    br, bc = block
    n, k = weight.shape
    rows, cols = -(-n // br), -(-k // bc)
    padded = np.zeros((rows * br, cols * bc), dtype=np.float32)
    padded[:n, :k] = weight
    return padded.reshape(rows, br, cols, bc).transpose(0, 2, 1, 3)


def pack(weight: torch.Tensor | np.ndarray, keep_blocks: torch.Tensor | np.ndarray | None = None,
         block: tuple[int, int] = (32, 32), int8: bool = False, per_row: bool = False) -> PackedBlocks:
    """Pack a dense weight [N, K]. `keep_blocks` (bool [R, NBc]) says which blocks to keep; blocks it
    drops are dropped even when nonzero. Without it, a block is kept when any element is nonzero.
    `int8`: int8 values with one scale per block, or per output row with `per_row`."""
    w = np.asarray(_as_numpy(weight), dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"pack expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    br, bc = int(block[0]), int(block[1])
    if br <= 0 or bc <= 0:
        raise ValueError(f"block must be positive, got {block}")
    tiles = _tiles(w, (br, bc))
    rows, cols = tiles.shape[:2]
    if keep_blocks is None:
        keep = np.any(tiles != 0, axis=(2, 3))
    else:
        keep = np.asarray(_as_numpy(keep_blocks)).astype(bool)
        if keep.shape != (rows, cols):
            raise ValueError(f"keep_blocks must be the block grid {(rows, cols)}, got {keep.shape}")

    row_nnz = keep.sum(axis=1).astype(np.int64)
    slots = max(1, int(row_nnz.max(initial=0)))
    # A stable sort of "not kept" puts each row's kept block columns first, in ascending order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :slots]
    used = np.arange(slots)[None, :] < row_nnz[:, None]
    block_cols = np.where(used, order, 0).astype(np.int64)
    values = tiles[np.arange(rows)[:, None], block_cols] * used[:, :, None, None]
    values = np.ascontiguousarray(values, dtype=np.float32)

    scales = None
    if int8 and per_row:
        row_max = np.abs(values).max(axis=(1, 3), initial=0.0).reshape(-1)[:w.shape[0]]   # [N]
        scales = (row_max / 127.0).astype(np.float32)
        padded = np.ones(rows * br, np.float32)
        padded[:w.shape[0]] = np.where(scales > 0, scales, 1.0)
        values = np.clip(np.rint(values / padded.reshape(rows, 1, br, 1)), -127, 127).astype(np.int8)
    elif int8:
        values, scales = quantize_blocks(values)
    return PackedBlocks(values, block_cols, row_nnz, scales, int(w.shape[0]), int(w.shape[1]))


def quantize_blocks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 blocks [R, S, BR, BC] -> (int8 blocks, float32 scales [R, S]): symmetric, one scale per
    block (its largest magnitude / 127; 1 for an all-zero block's divisor), rounding half to even."""
    scales = (np.abs(values).max(axis=(2, 3)) / 127.0).astype(np.float32)
    divisor = np.where(scales > 0, scales, 1.0)[:, :, None, None]
    return np.clip(np.rint(values / divisor), -127, 127).astype(np.int8), scales


def dequantized_values(packed: PackedBlocks) -> np.ndarray:
    """values as float32 (INT8 blocks times their scales)."""
    if packed.scales is None:
        return packed.values.astype(np.float32, copy=False)
    if packed.row_scales:
        rows, _, br, _ = packed.values.shape
        padded = np.zeros(rows * br, np.float32)
        padded[:packed.N] = packed.scales
        return packed.values.astype(np.float32) * padded.reshape(rows, 1, br, 1)
    return packed.values.astype(np.float32) * packed.scales[:, :, None, None]


def unpack(packed: PackedBlocks) -> np.ndarray:
    """The dense weight [N, K] (float32) that `packed` stores."""
    rows, cols = packed.grid
    br, bc = packed.block
    tiles = np.zeros((rows, cols, br, bc), dtype=np.float32)
    values = dequantized_values(packed)
    for r in range(rows):
        n = int(packed.row_nnz[r])
        tiles[r, packed.block_cols[r, :n]] = values[r, :n]
    dense = tiles.transpose(0, 2, 1, 3).reshape(rows * br, cols * bc)
    return np.ascontiguousarray(dense[:packed.N, :packed.K])


def reference(x: np.ndarray | torch.Tensor, packed: PackedBlocks, bias: np.ndarray | torch.Tensor | None = None
              ) -> np.ndarray:
    """numpy reference of BlockSparseLinear: x [..., K] -> [..., N] = x @ W^T + bias (float64 math)."""
    xs = np.asarray(_as_numpy(x), dtype=np.float64)
    y = xs @ unpack(packed).astype(np.float64).T
    if bias is not None:
        y = y + np.asarray(_as_numpy(bias), dtype=np.float64)
    return y.astype(np.float32)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INT8 compute's activation quantization of x [M, K] (float32), per row like ONNX's
    DynamicQuantizeLinear per tensor: (xq uint8 [M, K], scale float32 [M], zero point int64 [M])."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.minimum(x.min(axis=1, initial=0.0), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=1, initial=0.0), 0).astype(np.float32)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, 255)
    return q.astype(np.uint8), scale, zero.astype(np.int64)


def int8_reference(x: np.ndarray, packed: PackedBlocks, bias: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """INT8 compute of BlockSparseLinear (per-row weight scales): (acc int64 [M, N], the exact
    sums sum_k (xq - zero) * wq, and y float32 [M, N] = scale_x * scale_w * acc + bias)."""
    if not packed.row_scales:
        raise ValueError("int8_reference needs INT8 values with one scale per output row")
    q, sx, zero = quantize_rows(np.asarray(x, np.float32).reshape(-1, packed.K))
    wq = unpack(PackedBlocks(packed.values.astype(np.float32), packed.block_cols, packed.row_nnz, None,
                             packed.N, packed.K)).astype(np.int64)
    acc = (q.astype(np.int64) - zero[:, None]) @ wq.T
    y = acc.astype(np.float64) * (sx.astype(np.float64)[:, None] * packed.scales.astype(np.float64)[None, :])
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return acc, y.astype(np.float32)


def random_keep(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0,
                balanced: bool = False) -> np.ndarray:
    """A random bool block grid [R, NBc] keeping round(density * R * NBc) blocks. `balanced` spreads
    them so that row counts differ by at most one (the layout the ONNX function body runs fastest on)."""
    rows, cols = -(-n // block[0]), -(-k // block[1])
    total = int(round(density * rows * cols))
    rng = np.random.default_rng(seed)
    keep = np.zeros((rows, cols), dtype=bool)
    if not balanced:
        keep.flat[rng.choice(rows * cols, size=total, replace=False)] = True
        return keep
    counts = np.full(rows, total // rows)
    counts[rng.choice(rows, size=total % rows, replace=False)] += 1
    for r, c in enumerate(counts):
        keep[r, rng.choice(cols, size=int(c), replace=False)] = True
    return keep
