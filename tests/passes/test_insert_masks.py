"""insert_masks: one mask buffer per site (all ones), scores only for score-learning methods,
a mask op between each weight and its use; all-ones masks leave the outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from sparsec import ops
from sparsec.errors import PassError
from sparsec.ir import (
    ROLE_MASK,
    ROLE_MASKED_WEIGHT,
    ROLE_SCORES,
    get_attr_value,
    graph_info,
    node_info,
    nodes_with_role,
)
from sparsec.passes import InsertMasks
from sparsec.pipeline import run_pipeline
from tests.helpers import cnn, cnn_input, make_spec, mlp, mlp_input, rewrite, spec_dict


def _by_site(gm, role):
    return {node_info(n).site: n for n in nodes_with_role(gm, role)}


def test_movement_structure():
    gm = rewrite(mlp(), (mlp_input(),), spec_dict(["fc1.*", "fc2.*"], block=(4, 4)), until="insert_masks")
    masks, scores = _by_site(gm, ROLE_MASK), _by_site(gm, ROLE_SCORES)
    masked = _by_site(gm, ROLE_MASKED_WEIGHT)
    assert sorted(masks) == sorted(scores) == sorted(masked) == ["fc1.weight", "fc2.weight"]
    assert len(list(nodes_with_role(gm, ROLE_MASK))) == 2
    mask = get_attr_value(gm, "fc1.weight_mask")
    assert masks["fc1.weight"].target == "fc1.weight_mask"
    assert mask.shape == (16, 8) and bool((mask == 1).all()) and not mask.requires_grad
    assert "fc1.weight_mask" in dict(gm.named_buffers())
    score = get_attr_value(gm, "fc1.weight_scores")
    assert isinstance(score, torch.nn.Parameter) and score.shape == (4, 2)
    assert masked["fc1.weight"].target is ops.straight_through_mask
    assert masked["fc1.weight"].args[3] == (4, 4)
    # the weight's only user is its mask op; the linear reads the masked weight
    weight_node = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc1.weight")
    assert list(weight_node.users) == [masked["fc1.weight"]]
    assert "fc3.weight_mask" not in dict(gm.named_buffers())
    assert "masks_inserted" in graph_info(gm).facts


def test_magnitude_has_masks_but_no_scores():
    gm = rewrite(cnn(), (cnn_input(),), spec_dict(["*"], method="magnitude"), until="insert_masks")
    assert sorted(_by_site(gm, ROLE_MASK)) == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert _by_site(gm, ROLE_SCORES) == {}
    assert not any(name.endswith("_scores") for name, _ in gm.named_parameters())
    assert all(n.target is ops.apply_mask for n in nodes_with_role(gm, ROLE_MASKED_WEIGHT))
    assert get_attr_value(gm, "conv1.weight_mask").shape == (4, 3, 3, 3)


@pytest.mark.parametrize("method", ["movement", "magnitude"])
def test_all_ones_masks_give_identical_outputs(method):
    model = cnn().eval()
    gm = rewrite(model, (cnn_input(),), spec_dict(["*"], method=method, block=(2, 2)),
                 until="insert_masks").eval()
    x = cnn_input(3, 7)
    assert torch.equal(gm(x), model(x))


def test_masks_and_scores_get_the_right_gradients():
    model = mlp()
    gm = rewrite(model, (mlp_input(),), spec_dict(["fc1.*"]), until="insert_masks")
    mask = get_attr_value(gm, "fc1.weight_mask")
    mask[:, 0].zero_()  # input feature 0 pruned
    gm(mlp_input()).sum().backward()
    assert torch.equal(model.fc1.weight.grad[:, 0], torch.zeros(16))   # dL/dW = g * M
    scores = get_attr_value(gm, "fc1.weight_scores")
    assert scores.grad is not None and scores.grad[:, 0].abs().sum() > 0  # straight through


def test_running_twice_is_caught_by_the_verifier():
    gm = rewrite(mlp(), (mlp_input(),), spec_dict(["fc1.*"]), until="insert_masks")
    with pytest.raises(PassError) as caught:
        run_pipeline(gm, [InsertMasks(groups=make_spec(spec_dict(["fc1.*"])).groups)])
    assert str(caught.value) == ("verifier failed after pass insert_masks: site 'fc1.weight': "
                                 "expected one mask node, found 2")


def test_requires_selected_sites():
    gm = rewrite(mlp(), (mlp_input(),), spec_dict(["fc1.*"]), until="find_sites")
    with pytest.raises(PassError, match=r"^pass insert_masks: requires sites_selected"):
        run_pipeline(gm, [InsertMasks(groups=make_spec(spec_dict(["fc1.*"])).groups)])
