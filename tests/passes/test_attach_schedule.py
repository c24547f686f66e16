"""attach_schedule: the schedule and one plan per [[prune]] group are attached to the IR; the
graph itself does not change."""
from __future__ import annotations

import pytest
import torch

from sparsec.errors import PassError
from sparsec.ir import GroupPlan, format_ir, graph_info
from sparsec.passes import AttachSchedule
from sparsec.pipeline import run_pipeline
from tests.helpers import make_spec, mlp, mlp_input, rewrite, spec_dict

CUBIC = {"kind": "cubic", "total": 100, "warmup": 10, "cooldown": 10}


def _spec():
    spec = spec_dict(["fc1.*", "fc2.*"], density=0.1, schedule=CUBIC)
    spec["prune"].append({"targets": ["fc3.*"], "method": "magnitude", "density": 0.5,
                          "scope": "local", "block": [2, 2]})
    return spec


def test_plans_and_schedule_attached():
    gm = rewrite(mlp(), (mlp_input(),), _spec(), until="attach_schedule")
    info = graph_info(gm)
    assert info.groups == (
        GroupPlan(0, "movement", 0.1, "global", ("fc1.weight", "fc2.weight")),
        GroupPlan(1, "magnitude", 0.5, "local", ("fc3.weight",)),
    )
    schedule = info.schedule
    assert (schedule.kind, schedule.total, schedule.warmup, schedule.cooldown) == ("cubic", 100, 10, 10)
    assert schedule == make_spec(_spec()).schedule
    assert "schedule_attached" in info.facts


def test_graph_and_outputs_unchanged():
    model = mlp().eval()
    before = rewrite(model, (mlp_input(),), _spec(), until="insert_masks")
    after = rewrite(model, (mlp_input(),), _spec(), until="attach_schedule")
    assert before.code == after.code
    after.eval()
    assert torch.equal(after(mlp_input(3)), model(mlp_input(3)))
    assert format_ir(before).splitlines()[3:] == format_ir(after).splitlines()[3:]


def test_requires_masks():
    gm = rewrite(mlp(), (mlp_input(),), _spec(), until="select_sites")
    spec = make_spec(_spec())
    with pytest.raises(PassError, match=r"^pass attach_schedule: requires masks_inserted, which no "
                                        r"earlier pass established \(pipeline order is wrong\)$"):
        run_pipeline(gm, [AttachSchedule(schedule=spec.schedule, groups=spec.groups)])
