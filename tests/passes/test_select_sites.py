"""select_sites: [[prune]] globs and excludes pick sites; a site in two groups and a group that
selects nothing are user errors whose messages say what to do."""
from __future__ import annotations

import pytest
import torch

from sparsec.errors import PassError
from sparsec.ir import ROLE_SITE_OP, ROLE_WEIGHT, graph_info
from tests.helpers import cnn, cnn_input, mlp, mlp_input, rewrite, roles_of, spec_dict


def _select(spec, model=None, args=None):
    model = model or mlp()
    gm = rewrite(model, args or (mlp_input(),), spec, until="select_sites")
    return gm, graph_info(gm)


def _two_groups(first: dict, second: dict) -> dict:
    spec = spec_dict(**first)
    spec["prune"].append(spec_dict(**second)["prune"][0])
    return spec


def test_glob_selects_and_fills_the_site():
    gm, info = _select(spec_dict(["fc1.*", "fc3.*"], method="magnitude", density=0.25,
                                 scope="local", block=(4, 4)))
    assert list(info.sites) == ["fc1.weight", "fc3.weight"]
    site = info.sites["fc3.weight"]
    assert (site.group, site.method, site.density, site.scope, site.block, site.padding) == \
        (0, "magnitude", 0.25, "local", (4, 4), (0, 0))
    assert info.left_out["fc2.weight"] == "not matched by any [[prune]] targets"
    roles = roles_of(gm)
    assert roles["fc1_weight"] == ROLE_WEIGHT and roles["linear"] == ROLE_SITE_OP
    assert "fc2_weight" not in roles
    assert "sites_selected" in info.facts


def test_padding_recorded_for_non_divisible_block():
    _, info = _select(spec_dict(["*"], block=(3, 5)))
    assert info.sites["fc1.weight"].padding == (2, 2)   # [16, 8]: 16 % 3 = 1 -> 2 rows, 8 % 5 = 3 -> 2
    assert info.sites["fc3.weight"].padding == (2, 4)   # [4, 16]


def test_exclude_with_reason():
    _, info = _select(spec_dict(["fc*"], exclude=["fc2.*"]))
    assert list(info.sites) == ["fc1.weight", "fc3.weight"]
    assert info.left_out["fc2.weight"] == "excluded by prune[0].exclude 'fc2.*'"


def test_two_groups_each_with_their_own_settings():
    spec = _two_groups({"targets": ["conv*"], "method": "magnitude", "density": 0.5},
                       {"targets": ["fc.*"], "method": "movement", "density": 0.2, "scope": "local"})
    _, info = _select(spec, cnn(), (cnn_input(),))
    assert {n: (s.group, s.method, s.density) for n, s in info.sites.items()} == {
        "conv1.weight": (0, "magnitude", 0.5),
        "conv2.weight": (0, "magnitude", 0.5),
        "fc.weight": (1, "movement", 0.2),
    }


def test_conv_site_matrix_padding():
    _, info = _select(spec_dict(["conv1.*"], block=(4, 4)), cnn(), (cnn_input(),))
    assert info.sites["conv1.weight"].padding == (0, 1)  # [4, 27] view


def test_graph_is_unchanged_numerically():
    model = mlp().eval()
    gm, _ = _select(spec_dict(["fc*"]), model)
    gm.eval()
    assert torch.equal(gm(mlp_input(4)), model(mlp_input(4)))


def test_site_in_two_groups_names_both():
    spec = _two_groups({"targets": ["fc*"]}, {"targets": ["fc2.*"], "method": "magnitude"})
    with pytest.raises(PassError) as caught:
        _select(spec)
    message = str(caught.value)
    assert "'fc2.weight' is selected by prune[0] and prune[1]" in message
    assert "exclude" in message


def test_group_matching_nothing_suggests_site_names():
    with pytest.raises(PassError) as caught:
        _select(spec_dict(["encoder.fc*"]))
    message = str(caught.value)
    assert message.startswith("prune[0].targets ['encoder.fc*'] selected no site")
    assert "'fc1.weight'" in message or "'fc2.weight'" in message
    assert "--dry-run" in message


def test_group_matching_only_excluded_sites_is_an_error():
    with pytest.raises(PassError, match=r"prune\[0\]\.targets \['fc1\.\*'\] selected no site"):
        _select(spec_dict(["fc1.*"], exclude=["*weight"]))


def test_a_weight_named_exactly_that_cannot_be_pruned_is_an_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.Linear(16, 4))
    spec = spec_dict(["0.weight", "1.weight"], method="magnitude", density=0.5)
    with pytest.raises(PassError, match=r"prune\[0\].targets names '0.weight', which cannot be pruned: it is not "
                                        r"the weight of a linear/conv/matmul \(used by embedding"):
        _select(spec, model, (torch.tensor([[1, 2]]),))
    _, info = _select(spec_dict(["*.weight"], method="magnitude", density=0.5), model, (torch.tensor([[1, 2]]),))
    assert list(info.sites) == ["1.weight"] and "0.weight" in info.left_out   # a glob: left out, said so
