"""sparsec's passes, one per file. `build_pipeline(spec)` lists them in order for a spec."""
from __future__ import annotations

from sparsec.passes.attach_schedule import AttachSchedule
from sparsec.passes.bake_masks import BakeMasks
from sparsec.passes.find_sites import FindSites
from sparsec.passes.insert_masks import InsertMasks
from sparsec.passes.make_mode_aware import MakeModeAware
from sparsec.passes.select_sites import SelectSites

__all__ = ["AttachSchedule", "BakeMasks", "FindSites", "InsertMasks", "MakeModeAware",
           "SelectSites", "build_pipeline", "STAGES"]

# --stop-after stages, in order; each pass belongs to one.
STAGES = ("capture", "select", "rewrite", "train", "lower")


def build_pipeline(spec) -> list:
    """The rewrite pipeline for `spec`: one explicit ordered list."""
    return [
        MakeModeAware(),
        FindSites(),
        SelectSites(groups=spec.groups),
        InsertMasks(groups=spec.groups),
        AttachSchedule(schedule=spec.schedule, groups=spec.groups),
    ]
