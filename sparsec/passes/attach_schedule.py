"""attach_schedule: attach the training-time logic (density schedule per group, distillation) to the IR.

before: masks inserted, masks all ones.  after: GraphInfo.schedule holds the [schedule], and
GraphInfo.groups per group the plan the Program follows at every `step()`: which sites, which
method, final density, scope; GraphInfo.training holds the spec's [distill] and
[self_regularization] tables when given (the Program then keeps a frozen dense teacher; the
fine-pruning loop keeps the best checkpoint).
The graph itself is unchanged; the Program reads this plan from the IR alone.
requires: masks_inserted.  ensures: schedule_attached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from sparsec.ir import GroupPlan, TrainingTables, graph_info
from sparsec.pipeline import Pass, PassResult


@dataclass(frozen=True)
class AttachSchedule(Pass):
    schedule: Any = None        # the spec's ScheduleSpec
    groups: tuple = ()          # the spec's PruneGroups
    training: Any = None        # the spec's extra tables: [distill] and [self_regularization] are attached
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
        info.schedule = self.schedule
        info.groups = tuple(plans)
        tables = dict(self.training or {})
        info.training = TrainingTables(
            distill=dict(tables["distill"]) if tables.get("distill") is not None else None,
            self_regularization=(dict(tables["self_regularization"])
                                 if tables.get("self_regularization") is not None else None))
        return PassResult(gm, modified=False)
