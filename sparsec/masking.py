"""Mask selection: from block-grid importances to masks, and what happens to pruned weights.

Separate from the Program (which decides *when* masks are recomputed) and from the methods (which
decide *what* is important): Top_v within a `scope`, all-kept grids, writing grids into the mask
buffers, zeroing pruned weights. Movement pruning paper Eq 1 (Top_v), local or global (section 6).
"""
from __future__ import annotations

from typing import Sequence

import torch

from sparsec import blocks
from sparsec.site import SiteState
from sparsec.topv import top_v, top_v_rows


def keep_top(importances: Sequence[torch.Tensor], states: Sequence[SiteState], density: float,
             scope: str) -> list[torch.Tensor]:
    """Keep-grids of the blocks with the highest importance: `density` of every site separately
    (`local`, at least one block each) or of the group as a whole (`global`). Partial edge blocks
    count by their real size, so the density is exact to within one block (sparsec.topv).
    Sites of a `balanced` group keep the same number of blocks in every block row (top_v_rows; the
    spec allows it with local scope only)."""
    if any(st.site.balanced for st in states):
        return [top_v_rows(imp, density) for imp in importances]
    even = all(st.site.padding == (0, 0) and st.site.block == states[0].site.block for st in states)
    sizes = None if even else [blocks.block_sizes(st.site.shape, st.site.block) for st in states]
    if scope == "global":
        return top_v(importances, sizes, density)
    return [top_v([imp], None if sizes is None else [sizes[i]], density, min_blocks=1)[0]
            for i, imp in enumerate(importances)]


def all_kept(states: Sequence[SiteState]) -> list[torch.Tensor]:
    return [torch.ones(blocks.grid_shape(st.site.shape, st.site.block), dtype=torch.bool,
                       device=st.mask.device) for st in states]


def kept_grid(state: SiteState) -> torch.Tensor:
    """The block grid of a site's current mask (True where the block is kept)."""
    return blocks.block_reduce(state.mask, state.site.block, "max") > 0


@torch.no_grad()
def write(states: Sequence[SiteState], grids: Sequence[torch.Tensor]) -> None:
    """Expand each block grid to its weight's shape into the site's mask buffer."""
    for st, grid in zip(states, grids):
        full = blocks.expand(grid, st.site.shape, st.site.block)
        # torch converts uint8 to float several times faster than bool (same bytes, 0 or 1)
        st.mask.copy_(full.view(torch.uint8) if full.dtype == torch.bool else full)


@torch.no_grad()
def zero_pruned(states: Sequence[SiteState]) -> None:
    """theta <- theta_hat * M (PINS Eq 2), for methods trained with dense gradients."""
    for st in states:
        st.weight.mul_(st.mask)
