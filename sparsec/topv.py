"""Top_v: keep the fraction v of weights with the highest importance (movement pruning Eq 1).

Selection is exact: for `density` d over N weights, exactly round(d * N) weights are kept when
every block has the same size. With partial edge blocks (a dimension not divisible by the block)
the number of kept blocks is the one whose weight count is nearest to round(d * N), so the density
is exact to within one block. Ties are broken by (tensor order, position), deterministically.
`local` scope selects per tensor (at least one block each); `global` selects across a group.

The k-th largest value over many tensors is found without concatenating them: a strided sample
brackets it, what lies above the bracket is counted, and the exact value is selected inside the
bracket. That is a few linear passes instead of a selection over every element, which keeps
mask recomputation at every step cheap on large models. The passes run in numpy on the tensors'
memory: on the CPU torch's boolean comparisons and masked selection are several times slower.
A NaN importance is never kept.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sparsec.errors import TrainingError

_BRACKET_MIN = 1 << 20   # below this many values a plain kthvalue is fast enough
_SAMPLE = 1 << 18


def top_v(importances: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor] | None, density: float,
          min_blocks: int = 0) -> list[torch.Tensor]:
    """Boolean keep-masks over block grids, selected jointly over all tensors given.

    importances: block-grid scores (higher is kept). sizes: matching grids of element counts
    per block, or None when every block has the same number of elements. Call once per tensor
    for local scope.
    """
    imps = [imp.detach().float() for imp in importances]
    n_blocks = sum(imp.numel() for imp in imps)
    if sizes is None or _uniform(sizes):
        k = round(density * n_blocks)
        return topk_masks(imps, min(n_blocks, max(k, min_blocks)))
    return _nearest_prefix(imps, sizes, density, min_blocks)


def _uniform(sizes: Sequence[torch.Tensor]) -> bool:
    first = sizes[0].reshape(-1)[0]
    return all(bool((s == first).all()) for s in sizes)


def topk_masks(values: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks of the k largest entries across `values` (ties broken by tensor order, then position).
    A NaN is never kept; when fewer than k entries are numbers, that is an error (the density asked
    cannot be reached)."""
    n = sum(v.numel() for v in values)
    if k >= n and not any(bool(torch.isnan(v).any()) for v in values):
        return [torch.ones_like(v, dtype=torch.bool) for v in values]
    if k <= 0:
        return [torch.zeros_like(v, dtype=torch.bool) for v in values]
    arrays = [_host(v) for v in values]
    threshold, above = kth_largest(arrays, k)
    keeps = [_greater(v, a, threshold) for v, a in zip(values, arrays)]
    missing = k - above
    for a, keep in zip(arrays, keeps):
        if missing <= 0:
            break
        tied = np.flatnonzero(a == threshold)[:missing]
        keep.view(-1)[torch.from_numpy(tied).to(keep.device)] = True
        missing -= tied.size
    if missing > 0:
        nans = sum(int(torch.isnan(v).sum()) for v in values)
        raise TrainingError(f"Top_v cannot keep {k} of {n} blocks: {nans} importance value(s) are NaN "
                            f"(a NaN gradient reached the scores or weights?)")
    return keeps


def _host(v: torch.Tensor) -> np.ndarray:
    """The values as a flat float32 numpy array (no copy for a contiguous float32 CPU tensor)."""
    return v.detach().reshape(-1).to("cpu", torch.float32).numpy()


def _greater(v: torch.Tensor, host: np.ndarray, threshold: np.floating) -> torch.Tensor:
    """v > threshold as a bool tensor on v's device (numpy's comparison on the CPU: torch's is
    several times slower there)."""
    if v.device.type == "cpu":
        return torch.from_numpy(np.greater(host, threshold)).reshape(v.shape)
    return v > float(threshold)


def kth_largest(arrays: Sequence[np.ndarray], k: int) -> tuple[np.floating, int]:
    """The k-th largest number across flat float32 `arrays` (1 <= k <= their size), and how many
    entries are strictly larger. NaNs are never counted; an error when fewer than k numbers exist."""
    n = sum(a.size for a in arrays)
    if n >= _BRACKET_MIN:
        found = _bracketed(arrays, k, n)
        if found is not None:
            return found
    flat = np.concatenate(arrays)
    flat = flat[~np.isnan(flat)]
    if flat.size < k:
        return np.float32(np.nan), 0      # topk_masks reports the NaNs
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    return threshold, int(np.count_nonzero(flat > threshold))


def _bracketed(arrays: Sequence[np.ndarray], k: int, n: int) -> tuple[np.floating, int] | None:
    """kth_largest through a bracket, or None when the sample's bracket missed the answer (then
    the caller selects over everything)."""
    stride = max(1, n // _SAMPLE)
    sample = np.sort(np.concatenate([a[::stride] for a in arrays]))
    m = sample.size
    q = 1.0 - k / n
    margin = 4.0 / m ** 0.5
    lo = sample[max(0, int((q - margin) * (m - 1)))]
    hi = sample[min(m - 1, int((q + margin) * (m - 1)) + 1)]
    if np.isnan(lo) or np.isnan(hi):
        return None
    above = sum(int(np.count_nonzero(a > hi)) for a in arrays)
    need = k - above
    if need < 1:
        return None
    if lo == hi:  # a tie spans the bracket (common early in training): hi is the answer
        return (hi, above) if sum(int(np.count_nonzero(a == hi)) for a in arrays) >= need else None
    inside = np.concatenate([a[(a >= lo) & (a <= hi)] for a in arrays])
    if need > inside.size:
        return None
    threshold = np.partition(inside, inside.size - need)[inside.size - need]
    return threshold, above + int(np.count_nonzero(inside > threshold))


def _nearest_prefix(imps: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor], density: float,
                    min_blocks: int) -> list[torch.Tensor]:
    """Blocks of unequal size: the best-first prefix whose weight count is nearest the target."""
    flat = torch.cat([imp.reshape(-1) for imp in imps])
    size = torch.cat([s.reshape(-1) for s in sizes]).to(flat.device)
    target = round(density * int(size.sum()))
    order = torch.sort(flat, descending=True, stable=True).indices
    counts = torch.cat([size.new_zeros(1), torch.cumsum(size[order], 0)])
    best = int(torch.argmin((counts - target).abs()))
    best = max(best, min(min_blocks, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:best]] = True
    out, start = [], 0
    for imp in imps:
        out.append(keep[start:start + imp.numel()].reshape(imp.shape))
        start += imp.numel()
    return out


def per_row_count(cols: int, density: float) -> int:
    """Blocks each block row keeps under `balanced` selection: round(density * cols), at least 1."""
    return min(cols, max(1, round(density * cols)))


def top_v_rows(importance: torch.Tensor, density: float) -> torch.Tensor:
    """Balanced Top_v: the per_row_count highest blocks of every row of a block grid [R, C], so every
    block row keeps the same number of blocks (ties broken by position, deterministically). The
    density is per_row_count / C: exactly `density` when density * C is an integer."""
    imp = importance.detach().float()
    k = per_row_count(imp.shape[1], density)
    order = torch.sort(imp, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(imp, dtype=torch.bool).scatter_(1, order, True)
