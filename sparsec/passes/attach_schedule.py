"""attach_schedule: attach the training-time logic (density schedule per group, distillation) to the IR.

before: masks inserted, masks all ones.  after: GraphInfo.attached holds the schedule and, per
group, the plan the Program follows at every `step()`: which sites, which method, final density,
scope; and the spec's [distill] and [self_regularization] tables when given (the Program then
keeps a frozen dense teacher; the fine-pruning loop keeps the best checkpoint).
The graph itself is unchanged; the Program reads this plan from the IR alone.
requires: masks_inserted.  ensures: schedule_attached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from sparsec.ir import graph_info
from sparsec.pipeline import Pass, PassResult


TRAINING_TABLES = ("distill", "self_regularization")


@dataclass(frozen=True)
class GroupPlan:
    """What the Program does for one [[prune]] group at each step."""

    index: int
    method: str
    density: float
    scope: str
    sites: tuple[str, ...]


@dataclass(frozen=True)
class AttachSchedule(Pass):
    schedule: object = None
    groups: tuple = ()
    training: Any = None  # the spec's extra tables; those named in TRAINING_TABLES are attached
    name = "attach_schedule"
    stage = "rewrite"
    requires = ("masks_inserted",)
    ensures = ("schedule_attached",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        info = graph_info(gm)
        plans = []
        for group in self.groups:
            sites = tuple(n for n, s in info.sites.items() if s.group == group.index)
            plans.append(GroupPlan(group.index, group.method, group.density, group.scope, sites))
        info.attached["schedule"] = self.schedule
        info.attached["groups"] = tuple(plans)
        for table in TRAINING_TABLES:
            if self.training and self.training.get(table) is not None:
                info.attached[table] = dict(self.training[table])
        return PassResult(gm, modified=False)
