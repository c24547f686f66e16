"""bake_masks: W <- W * M, the mask ops, masks and scores removed; sites stay recorded and the
outputs are those of the masked program."""
from __future__ import annotations

import copy

import pytest
import torch

from sparsec.errors import PassError
from sparsec.ir import (
    ROLE_MASK,
    ROLE_MASKED_WEIGHT,
    ROLE_SCORES,
    ROLE_SITE_OP,
    ROLE_WEIGHT,
    get_attr_value,
    graph_info,
    nodes_with_role,
)
from sparsec.passes import BakeMasks
from sparsec.pipeline import run_pipeline
from tests.helpers import cnn, cnn_input, mlp, mlp_input, rewrite, spec_dict


def _masked_program(method="movement"):
    model = cnn().eval()
    gm = rewrite(model, (cnn_input(),), spec_dict(["*"], method=method, block=(2, 2)),
                 until="attach_schedule").eval()
    gen = torch.Generator().manual_seed(0)
    for name in graph_info(gm).sites:
        mask = get_attr_value(gm, name + "_mask")
        mask.copy_((torch.rand(mask.shape, generator=gen) > 0.5).float())
    return gm


@pytest.mark.parametrize("method", ["movement", "magnitude"])
def test_bake_structure_and_numerics(method):
    gm = _masked_program(method)
    x = cnn_input(2, 6)
    expected = gm(x)
    masks = {n: get_attr_value(gm, n + "_mask").clone() for n in graph_info(gm).sites}
    baked = run_pipeline(copy.deepcopy(gm), [BakeMasks()])
    for role in (ROLE_MASK, ROLE_SCORES, ROLE_MASKED_WEIGHT):
        assert next(nodes_with_role(baked, role), None) is None
    names = {n for n, _ in baked.named_parameters()} | {n for n, _ in baked.named_buffers()}
    assert not any(n.endswith(("_mask", "_scores")) for n in names)
    assert "sparsec_ops" not in baked.code
    for name, mask in masks.items():
        weight = get_attr_value(baked, name)
        assert bool((weight[mask == 0] == 0).all())
    assert {"masks_baked"} <= graph_info(baked).facts
    assert "masks_inserted" not in graph_info(baked).facts
    assert len(list(nodes_with_role(baked, ROLE_WEIGHT))) == 3
    assert len(list(nodes_with_role(baked, ROLE_SITE_OP))) == 3
    torch.testing.assert_close(baked(x), expected, rtol=0, atol=1e-6)


def test_bake_leaves_the_original_untouched_when_run_on_a_copy():
    gm = _masked_program()
    before = get_attr_value(gm, "conv1.weight").clone()
    run_pipeline(copy.deepcopy(gm), [BakeMasks()])
    assert torch.equal(get_attr_value(gm, "conv1.weight"), before)
    assert next(nodes_with_role(gm, ROLE_MASK), None) is not None


def test_requires_masks():
    gm = rewrite(mlp(), (mlp_input(),), spec_dict(["fc*"]), until="select_sites")
    with pytest.raises(PassError, match=r"^pass bake_masks: requires masks_inserted"):
        run_pipeline(gm, [BakeMasks()])
