"""When does the block-sparse form of a linear pay off? A small cost model.

A dense linear [N, K] costs N*K multiply-adds per input row. The block-sparse form stores
R*S blocks of BR x BC (padded blocked-ELL: every block row is padded to the longest one), so it
does `stored` = R*S*BR*BC / (N*K) of the dense work, at an efficiency that grows with the block:
small blocks waste the vector registers and re-read the input. Estimated speedup:

    speedup = 1 / (stored / efficiency(BR, BC))

efficiency(BR, BC) = 0.9 * sqrt(BR*BC / 1024), capped at 1: calibrated on this project's measured
facts (docs/kernel.md, ../shared/DESIGN.md) for the native kernel against dense onnxruntime on
[128, 768] x [3072, 768]^T: 32x32 blocks at density 0.1 ran about 9x (efficiency 0.9), 16x16 about
4.7x (0.47). 1x1 "blocks" come out near 0.03, so unstructured sparsity never lowers: the dense
MatMul is faster. A layer is lowered when the estimate reaches `min_speedup`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CALIBRATED_EFFICIENCY_32X32 = 0.9
DEFAULT_MIN_SPEEDUP = 1.5


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
        """Fraction of the dense weight's entries the padded layout stores (and computes)."""
        n, k = self.shape
        return self.grid[0] * self.max_per_row * self.block[0] * self.block[1] / (n * k)


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


def efficiency(block: tuple[int, int]) -> float:
    """Useful work per stored weight of the block-sparse kernel relative to a dense MatMul."""
    return min(1.0, CALIBRATED_EFFICIENCY_32X32 * math.sqrt(block[0] * block[1] / 1024))


def estimated_speedup(stats: BlockStats) -> float:
    if stats.stored == 0:
        return math.inf
    return efficiency(stats.block) / stats.stored
