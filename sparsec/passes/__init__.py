"""sparsec's passes, one per file. `build_pipeline(spec)` lists them in order for a spec."""
from __future__ import annotations

from sparsec.passes.attach_schedule import AttachSchedule
from sparsec.passes.bake_masks import BakeMasks
from sparsec.passes.choose_sparse_layers import ChooseSparseLayers
from sparsec.passes.find_sites import FindSites
from sparsec.passes.insert_masks import InsertMasks
from sparsec.passes.lower_block_sparse import LowerBlockSparse
from sparsec.passes.make_mode_aware import MakeModeAware
from sparsec.passes.select_sites import SelectSites

__all__ = ["AttachSchedule", "BakeMasks", "ChooseSparseLayers", "FindSites", "InsertMasks",
           "LowerBlockSparse", "MakeModeAware", "SelectSites", "build_pipeline",
           "build_lowering_pipeline", "STAGES"]

# --stop-after stages, in order; each pass belongs to one.
STAGES = ("capture", "select", "rewrite", "train", "lower")


def build_pipeline(spec) -> list:
    """The rewrite pipeline for `spec`: one explicit ordered list."""
    return [
        MakeModeAware(),
        FindSites(),
        SelectSites(groups=spec.groups),
        InsertMasks(groups=spec.groups),
        AttachSchedule(schedule=spec.schedule, groups=spec.groups, training=spec.extras),
    ]


def build_lowering_pipeline(int8: bool = False, policy: str = "cost", min_speedup: float = 1.5,
                            block: tuple[int, int] | None = None) -> list:
    """The lower stage, run on a copy of a rewritten module (Program.lower, export_onnx)."""
    return [
        BakeMasks(),
        ChooseSparseLayers(policy=policy, min_speedup=min_speedup, block=block),
        LowerBlockSparse(int8=int8),
    ]
