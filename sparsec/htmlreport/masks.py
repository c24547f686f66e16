"""A picture of one site's mask: the fraction of weights kept in each block, downsampled so that
a large weight fits in a few hundred pixels.

A mask is shaped like its weight ([N, K] for a linear, [O, I, kh, kw] for a convolution, seen as
[O, I*kh*kw]). Each cell of the picture is one block of the site's block shape (one weight for an
unstructured mask) while the grid fits in `max_cells` per side; beyond that, each cell averages
`factor x factor` blocks (the last row/column of cells may cover fewer).
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 192


@dataclass
class MaskPicture:
    grid: np.ndarray            # kept fraction per cell, in [0, 1]
    block: tuple[int, int]      # weights per block (rows, columns)
    factor: int                 # blocks per cell side (1: one cell per block)
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def caption(self) -> str:
        rows, cols = self.grid.shape
        unit = "weight" if self.block == (1, 1) else f"{self.block[0]}x{self.block[1]} block"
        scale = f"1 cell = 1 {unit}" if self.factor == 1 else f"1 cell = {self.factor}x{self.factor} {unit}s (averaged)"
        return f"{rows}x{cols} cells, {scale}; {self.kept:,} of {self.total:,} weights kept ({self.density:.1%})"


def as_matrix(mask: np.ndarray) -> np.ndarray:
    """The mask as a 2-D 0/1 float32 array (sums of float32 ones are exact far beyond any
    block): rows are outputs, columns everything else."""
    mask = np.asarray(mask)
    if mask.ndim == 0:
        return (mask.reshape(1, 1) != 0).astype(np.float32)
    if mask.ndim == 1:
        return (mask.reshape(1, -1) != 0).astype(np.float32)
    return (mask.reshape(mask.shape[0], -1) != 0).astype(np.float32)


def _pool(matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean over `rows x cols` tiles; the tiles of the last row and column may be smaller (the
    mean is over the entries they have)."""
    starts_r, starts_c = np.arange(0, matrix.shape[0], rows), np.arange(0, matrix.shape[1], cols)
    sums = np.add.reduceat(np.add.reduceat(matrix, starts_r, axis=0), starts_c, axis=1)
    sizes_r = np.minimum(rows, matrix.shape[0] - starts_r)
    sizes_c = np.minimum(cols, matrix.shape[1] - starts_c)
    return sums / np.outer(sizes_r, sizes_c)


def picture(mask: np.ndarray, block: tuple[int, int] | list[int] = (1, 1), max_cells: int = MAX_CELLS) -> MaskPicture:
    """The kept fraction per block (per cell of `factor x factor` blocks when the grid would be
    larger than `max_cells` on a side)."""
    matrix = as_matrix(mask)
    br, bc = (max(1, int(block[0])), max(1, int(block[1]))) if len(block) == 2 else (1, 1)
    blocks = (math.ceil(matrix.shape[0] / br), math.ceil(matrix.shape[1] / bc))
    factor = max(1, math.ceil(max(blocks) / max_cells))
    rows, cols = br * factor, bc * factor
    grid = matrix if rows == cols == 1 else _pool(matrix, rows, cols)
    kept = int(np.count_nonzero(matrix))
    return MaskPicture(grid=grid, block=(br, bc), factor=factor, kept=kept, total=matrix.size)


def png(pic: MaskPicture) -> bytes:
    """The grid as a PNG (kept = dark, pruned = white), one pixel per cell; the page scales it up
    without smoothing."""
    import matplotlib.image

    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, 1.0 - pic.grid, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    return buffer.getvalue()


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"
