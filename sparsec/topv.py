"""Top_v: keep the fraction v of weights with the highest importance (movement pruning Eq 1).

Selection is exact: for `density` d over N weights, exactly round(d * N) weights are kept when
every block has the same size; with partial edge blocks (a dimension not divisible by the block)
the number of kept blocks is the one whose weight count is nearest to round(d * N), so the density
is exact to within one block. Ties are broken by position, deterministically.
`local` scope selects per tensor (at least one block each); `global` selects across a group.
"""
from __future__ import annotations

from typing import Sequence

import torch

# Above this many candidates, find the threshold by bracketing a sample instead of a full
# kthvalue: a few linear passes instead of a selection over every element (10x faster at 10M).
_BRACKET_MIN = 1 << 20
_SAMPLE = 1 << 16


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of the 1-D tensor x (ties broken by position)."""
    n = x.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    x = x.float()
    threshold = _kth_largest(x, k)
    mask = x > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        tied = torch.nonzero(x == threshold).flatten()[:missing]
        mask[tied] = True
    return mask


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    n = x.numel()
    if n >= _BRACKET_MIN:
        found = _bracketed_kth_largest(x, k)
        if found is not None:
            return found
    return torch.kthvalue(x, n - k + 1).values


def _bracketed_kth_largest(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """Exact k-th largest via a strided sample: bracket it between two sample quantiles, count
    what lies above the bracket, and select inside the (small) bracket. None if the bracket missed."""
    n = x.numel()
    sample = x[:: max(1, n // _SAMPLE)]
    q = 1.0 - k / n
    margin = 4.0 / (sample.numel() ** 0.5)
    lo = torch.quantile(sample, max(0.0, q - margin))
    hi = torch.quantile(sample, min(1.0, q + margin))
    above = int(torch.count_nonzero(x > hi))
    inside = x[(x >= lo) & (x <= hi)]
    need = k - above
    if need < 1 or need > inside.numel():
        return None
    return torch.kthvalue(inside, inside.numel() - need + 1).values


def top_v(importances: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor], density: float,
          min_blocks: int = 0) -> list[torch.Tensor]:
    """Keep-masks over block grids, jointly over all tensors given (call once per tensor for local).

    importances: block-grid scores; sizes: matching grids of element counts per block.
    """
    flat = torch.cat([imp.detach().reshape(-1).float() for imp in importances])
    size = torch.cat([s.reshape(-1) for s in sizes]).to(flat.device)
    total = int(size.sum())
    target = round(density * total)
    if bool((size == size[0]).all()):
        count = round(target / int(size[0]))
        keep = topk_mask(flat, max(count, min_blocks))
    else:
        keep = _nearest_prefix(flat, size, target, min_blocks)
    out, start = [], 0
    for imp in importances:
        out.append(keep[start:start + imp.numel()].reshape(imp.shape))
        start += imp.numel()
    return out


def _nearest_prefix(flat: torch.Tensor, size: torch.Tensor, target: int, min_blocks: int) -> torch.Tensor:
    """Blocks of unequal size: the best-first prefix whose weight count is nearest the target."""
    order = torch.sort(flat, descending=True, stable=True).indices
    counts = torch.cat([torch.zeros(1, dtype=torch.int64, device=flat.device),
                        torch.cumsum(size[order], 0)])
    best = int(torch.argmin((counts - target).abs()))
    best = max(best, min(min_blocks, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:best]] = True
    return keep
