"""`balanced = true`: every block row keeps the same number of blocks (per-row Top_v), at the asked
density (exact when density x block columns is an integer), for the methods that select by Top_v;
the spec rejects it where it cannot hold."""
from __future__ import annotations

import re

import pytest
import torch

import sparsec
from sparsec import masking
from sparsec.errors import SpecError
from sparsec.spec import load_spec
from sparsec.topv import per_row_count, top_v_rows
from tests.helpers import Wide, spec_dict


def test_top_v_rows_keeps_the_best_blocks_of_every_row():
    imp = torch.tensor([[5.0, 1.0, 3.0, 2.0],
                        [0.0, 0.0, 9.0, 8.0],
                        [1.0, 1.0, 1.0, 1.0]])
    keep = top_v_rows(imp, 0.5)
    assert keep.tolist() == [[True, False, True, False],
                             [False, False, True, True],
                             [True, True, False, False]]   # ties: first positions, every time
    assert top_v_rows(imp, 0.5).equal(keep)


def test_per_row_count_rounds_and_keeps_one():
    assert per_row_count(24, 0.1) == 2       # 2.4 -> 2: density 2/24 = 0.0833
    assert per_row_count(24, 0.125) == 3     # exact
    assert per_row_count(10, 0.01) == 1      # at least one block per row
    assert per_row_count(4, 1.0) == 4
    imp = torch.rand(6, 24, generator=torch.Generator().manual_seed(0))
    assert top_v_rows(imp, 0.1).sum(dim=1).tolist() == [2] * 6


def _balanced_program(method: str, density: float, block=(16, 16), **options):
    torch.manual_seed(0)
    spec = spec_dict(["*"], method=method, density=density, scope="local", block=block,
                     balanced=True, **options)
    return sparsec.compile(Wide(), spec, (torch.randn(5, 96),))


def _rows(prog):
    return {st.site.name: masking.kept_grid(st).sum(dim=1).tolist() for st in prog.site_states()}


def test_magnitude_masks_are_balanced_at_the_exact_density():
    prog = _balanced_program("magnitude", 0.5)
    # fc1 [128, 96]: grid 8 x 6, 3 per row; fc2 [70, 128]: grid 5 x 8 (last row partial), 4 per row
    assert _rows(prog) == {"fc1.weight": [3] * 8, "fc2.weight": [4] * 5}
    assert prog.site_densities()["fc1.weight"] == pytest.approx(0.5, abs=0)
    assert prog.site_densities()["fc2.weight"] == pytest.approx(0.5, abs=0)


def test_balanced_differs_from_local_top_v():
    torch.manual_seed(0)
    plain = sparsec.compile(Wide(), spec_dict(["*"], method="magnitude", density=0.25, scope="local",
                                              block=(16, 16)), (torch.randn(5, 96),))
    balanced = _balanced_program("magnitude", 0.25)
    assert _rows(balanced)["fc2.weight"] == [2] * 5
    counts = [row for rows in _rows(plain).values() for row in rows]
    assert len(set(counts)) > 1   # unbalanced Top_v: rows differ, which the stock body pays for


def test_rounded_density_is_per_row_count_over_columns():
    prog = _balanced_program("magnitude", 0.4)   # fc1: 6 block columns, 0.4 * 6 = 2.4 -> 2
    assert _rows(prog)["fc1.weight"] == [2] * 8
    assert prog.site_densities()["fc1.weight"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("method", ["movement", "magnitude"])
def test_mask_updates_stay_balanced(method):
    prog = _balanced_program(method, 0.5)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for st in prog.site_states():
            target = st.scores if st.scores is not None else st.weight
            target.copy_(torch.randn(target.shape, generator=gen))
    prog.update_masks()
    assert _rows(prog) == {"fc1.weight": [3] * 8, "fc2.weight": [4] * 5}


def test_spec_default_and_round_trip():
    spec = load_spec(spec_dict(["*"], method="magnitude", density=0.5, scope="local"))
    assert spec.groups[0].balanced is False
    spec = load_spec(spec_dict(["*"], method="magnitude", density=0.5, scope="local", balanced=True))
    assert spec.groups[0].balanced is True and "balanced" not in spec.groups[0].options
    assert load_spec(spec.to_dict()) == spec


@pytest.mark.parametrize("group, message", [
    ({"method": "magnitude", "scope": "global"},
     "prune[0].balanced: true needs scope = 'local' (got 'global')"),
    ({"method": "dynsparse", "scope": "local"},
     "prune[0].balanced: true is not supported by method 'dynsparse', which does not select blocks by Top-v"),
    ({"method": "magnitude", "scope": "local", "balanced": "yes"}, "prune[0].balanced"),
])
def test_spec_rejects_balanced_where_it_cannot_hold(group, message):
    spec = spec_dict(["*"], density=0.5, balanced=True)
    spec["prune"][0].update(group)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(spec)
