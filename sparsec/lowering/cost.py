"""When does the block-sparse form of a linear pay off? A small cost model of sparsec's kernel.

A dense linear [N, K] costs N*K multiply-adds per input row. The kernel walks only the kept blocks
of each block row (`row_nnz`; padding slots are skipped, and the file stores only kept blocks), so
it does `work` = kept_blocks*BR*BC / (N*K) of the dense work, at an efficiency relative to dense
onnxruntime that depends on the block:

    efficiency(BR, BC) = 0.93 * min(1, BR / 16) * BC / (BC + 4)
    speedup            = efficiency / work

min(1, BR/16): a block row fills the 16 float lanes of a zmm register only when BR >= 16.
BC / (BC + 4): the per-block cost (index load, pointer setup) against BC steps of work.
The constant is calibrated on the measured single-layer runs (docs/kernel.md: [128, 768] x
[3072, 768]^T at density 0.1, back to back): 32x32 blocks 8.3x (efficiency 0.83), 16x16 7.2x
(0.72; the model says 0.74).

Blocks one output high (BR = 1: unstructured masks, [1, 8] and [1, 16] row vectors) take the
kernel's row path on AVX-512 instead (lanes over the rows of X, a CSR product with X^T): every kept
weight costs about the same whatever the pattern, so

    efficiency(1, BC) = ROW_EFFICIENCY

measured on the same layer at density 0.1, one thread: [1, 1] 2.9x, [1, 8] 3.1x, [1, 16] 2.6x
(0.26-0.31; [1, 1] 3.7x after later changes, AMD Zen 4); AVX2 has its own row path (8 lanes,
[1, 1] 2.3 ms against 1.4-1.8 on AVX-512). On a CPU with neither it is the scalar loop; the
measurement at export (below) sees that and keeps such layers dense.

Row vectors whose width is a multiple of 4 take the column path on AVX-512 instead
(block_sparse_columns.cc: X^T's vectors of a column of inputs stay in registers while the outputs
that keep a vector there are done), measured the same way on AMD Zen 4 (`bench/peers.py --model
linear --block B --threads 1`): [1, 16] 7.3x (0.73), [1, 4] 6.3x (0.63):

    efficiency(1, BC) = COLUMN_EFFICIENCY[BC % 8 == 0]    (BC a multiple of 4)

On AVX2 they take a column path too (columns of 8 or 4 inputs; AMD Zen 3, 2 threads: [1, 16] layers
0.65-0.71x the AVX2 row path's time, [1, 4] 0.79x), which the measurement at export sees.

INT8 compute has a row path too (AVX-512 VNNI): each output row's weights as 4-byte windows, one
vpdpbusd per window and 16 rows of X, so a window of 4 kept weights costs what one fp32 weight
does. Its efficiency depends on how full the windows are (`row_efficiency_int8`), measured on the
same layer, one thread, against dense onnxruntime at 3.6 ms: [1, 16] 0.63 ms and [1, 8] 0.62 ms
(0.57-0.58), [1, 4] 0.84 ms (0.43), [1, 1] 1.62 ms (0.22: unstructured weights rarely share a
window, and fp32's row path was faster there, 1.36 ms). Windows at multiples of 4 columns later made
these 0.73-0.94x the time ([1, 1] 1.11 ms, now below fp32's); the estimates keep the older, lower
figures, and the measurement at export has the last word. On AVX2 the windows cost about what fp32
weights do ([1, 16] 1.94 ms against 1.69 ms), on older CPUs they run a scalar loop; the
measurement at export sees either.

On VNNI, INT8 row vectors whose width is a multiple of 4 take the column path instead
(block_sparse_int8_columns.cc), whose gain grows with the windows a column holds (W / 4 for columns
of W = 16, 12, 8 or 4 inputs, the widest dividing BC). Measured on AMD Zen 4, one thread, against
dense onnxruntime (`bench/peers.py --model linear --block B --threads 1 --engines kernel`): [1, 16]
17.6x (12.6x in a noisier run), [1, 12] 11.5x, [1, 8] 12.3x, [1, 4] 7.2x; the estimates take about
85% of those:

    efficiency_int8(1, BC) = COLUMN_EFFICIENCY_INT8[W]    (BC a multiple of 4)

Narrow blocks 16 or 32 outputs high ([16, 1], [32, 1], [16, 4], ...: BC < 16) read X from a packed
panel where the inputs of one column for 16 rows are one cache line, so the per-block cost is small:

    efficiency(16 or 32, BC < 16) = NARROW_EFFICIENCY

([16, 1] at density 0.1, one thread, loaded machine: 5.2x, efficiency 0.52; 16x16 in the same run
0.92 ms vs 0.88 ms for [16, 1]).

On stock onnxruntime (`[export] target = "stock"`) the function body computes every padded slot (S
per block row: `stored`, not `work`) through a Gather, a batched MatMul and transposes, whose fixed
cost dominates small layers. For W = M*N*K multiply-adds (M rows of X):

    stock speedup = (W + DENSE_OVERHEAD_MACS) / (W * stored / STOCK_EFFICIENCY + STOCK_OVERHEAD_MACS)

calibrated on 2 threads of an AMD EPYC (Zen 4, onnxruntime 1.32, 32x32 and 16x16 blocks at density
0.1): [128, 768] x [768, 768]^T balanced 3.9x measured (the model says 4.2x), [5, 96] x [64, 96]^T
0.4x (0.3x), [128, 768] x [3072, 768]^T with unbalanced rows (stored 0.58) 1.03x (0.7x).

Convolutions (sparsec/runtime/kernel/block_sparse_conv.cc) run on the image itself, the lanes over
output pixels; a 1x1 convolution with stride 1 reads X in place, any other pays a copy of the
padded input and (with padding) stores through a tile buffer:

    conv speedup = CONV_EFFICIENCY[pointwise] / work

measured against onnxruntime's Conv on ResNet-50 shapes at batch 1, 10% of 32x32 blocks, 2 threads
(docs/BENCHMARKS.md): 3x3 64->64 on 56x56 3.1-3.5x (efficiency 0.35-0.39), 1x1 256->64 5.6x (0.70).
On stock onnxruntime the function body rebuilds the dense weight once at load and runs the same Conv:
speedup 1.

These constants are a fallback: at export sparsec measures each layer shape on the target runtime
(sparsec.lowering.calibrate) and decides on the measurement. A layer is lowered when it reaches
`min_speedup`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PEAK_EFFICIENCY = 0.93   # calibrated: see the module docstring
ROW_EFFICIENCY = 0.3     # the row path (BR = 1), likewise
COLUMN_EFFICIENCY = {True: 0.73, False: 0.63}  # the column path ([1, 4 j]) by BC % 8 == 0, likewise
COLUMN_EFFICIENCY_INT8 = {16: 1.5, 12: 1.0, 8: 1.0, 4: 0.65}  # INT8's column path by column width
NARROW_EFFICIENCY = 0.5  # BR 16 or 32 with BC < 16 (packed panel), likewise
DEFAULT_MIN_SPEEDUP = 1.5
STOCK_EFFICIENCY = 0.4         # the function body's multiply-adds per dense one (calibrated above)
STOCK_OVERHEAD_MACS = 2.5e6    # its fixed cost per call (Gather, Transposes), in dense multiply-adds
DENSE_OVERHEAD_MACS = 0.7e6    # a dense MatMul's fixed cost per call, likewise
CONV_EFFICIENCY = {True: 0.6, False: 0.35}   # 1x1 stride 1 unpadded (in place) / any other conv


@dataclass(frozen=True)
class BlockStats:
    """The block structure of one weight matrix [N, K] tiled by (BR, BC)."""

    shape: tuple[int, int]        # N, K
    block: tuple[int, int]        # BR, BC
    grid: tuple[int, int]         # R, C
    kept_blocks: int              # blocks holding a nonzero
    max_per_row: int              # S, the padded row length

    @property
    def block_density(self) -> float:
        return self.kept_blocks / (self.grid[0] * self.grid[1])

    @property
    def stored(self) -> float:
        """Fraction of the dense weight's entries the padded layout holds (S slots per block row):
        what the stock-onnxruntime function body computes."""
        n, k = self.shape
        return self.grid[0] * self.max_per_row * self.block[0] * self.block[1] / (n * k)

    @property
    def work(self) -> float:
        """Fraction of the dense multiply-adds the kernel does: the kept blocks only."""
        n, k = self.shape
        return self.kept_blocks * self.block[0] * self.block[1] / (n * k)


def block_stats(weight: torch.Tensor, block: tuple[int, int]) -> BlockStats:
    """Block statistics of a 2-D weight [N, K] (zeros are pruned entries)."""
    n, k = weight.shape
    br, bc = block
    r, c = -(-n // br), -(-k // bc)
    padded = torch.zeros(r * br, c * bc, dtype=torch.bool)
    padded[:n, :k] = weight != 0
    kept = padded.reshape(r, br, c, bc).any(dim=3).any(dim=1)
    per_row = kept.sum(dim=1)
    return BlockStats(shape=(n, k), block=block, grid=(r, c), kept_blocks=int(kept.sum()),
                      max_per_row=int(per_row.max()) if r else 0)


def row_efficiency_int8(bc: int) -> float:
    """INT8 compute for blocks one output high by block width: the column path for row vectors
    [1, 4 j] (its columns of 16, 12, 8 or 4 inputs, the widest dividing BC), else the row path's
    4-byte windows."""
    for width in (16, 12, 8, 4):
        if bc % width == 0:
            return COLUMN_EFFICIENCY_INT8[width]
    return 0.45 if bc >= 4 else 0.22


def efficiency(block: tuple[int, int], int8: bool = False) -> float:
    """Useful work per kept weight of the kernel relative to a dense MatMul (see the docstring)."""
    br, bc = block
    if br == 1:
        if int8:
            return row_efficiency_int8(bc)
        return COLUMN_EFFICIENCY[bc % 8 == 0] if bc % 4 == 0 else ROW_EFFICIENCY
    if br in (16, 32) and bc in (1, 2, 4, 8) and not int8:
        return NARROW_EFFICIENCY
    return PEAK_EFFICIENCY * min(1.0, br / 16) * bc / (bc + 4)


def estimated_speedup(stats: BlockStats, int8: bool = False) -> float:
    if stats.work == 0:
        return math.inf
    return efficiency(stats.block, int8) / stats.work


def estimated_speedup_stock(stats: BlockStats, rows: int) -> float:
    """The function body on stock onnxruntime against a dense MatMul, `rows` rows of X."""
    n, k = stats.shape
    macs = rows * n * k
    return (macs + DENSE_OVERHEAD_MACS) / (macs * stats.stored / STOCK_EFFICIENCY + STOCK_OVERHEAD_MACS)


def pointwise(geometry: tuple[int, ...] | list[int]) -> bool:
    """A 1x1 convolution with stride 1 and no padding: the kernel reads X in place."""
    kh, kw, sh, sw, pt, pl, pb, pr = geometry[:8]
    return (kh, kw, sh, sw, pt, pl, pb, pr) == (1, 1, 1, 1, 0, 0, 0, 0)


def estimated_speedup_conv(stats: BlockStats, is_pointwise: bool) -> float:
    """sparsec's convolution kernel against onnxruntime's Conv (see the docstring). Blocks less than
    6 outputs high fill fewer of the kernel's register tiles."""
    if stats.work == 0:
        return math.inf
    return CONV_EFFICIENCY[is_pointwise] * min(1.0, stats.block[0] / 6) / stats.work
