"""sparsec's passes, one per file, and the pipelines they form: explicit ordered lists.

    build_pipeline(spec)        FX: capture -> select -> rewrite (the Program is built from it)
    build_lowering_pipeline()   FX: the lower stage, on a copy of the rewritten module
    build_onnx_pipeline()       ONNX: the rewrites of the exported model, before it is checked
"""
from __future__ import annotations

from typing import Any

from sparsec.lowering.cost import DEFAULT_MIN_SPEEDUP
from sparsec.passes.attach_functions import AttachFunctions
from sparsec.passes.attach_schedule import AttachSchedule
from sparsec.passes.attention_head_layout import AttentionHeadLayout
from sparsec.passes.bake_masks import BakeMasks
from sparsec.passes.choose_sparse_layers import ChooseSparseLayers
from sparsec.passes.compact_padding import CompactPadding
from sparsec.passes.drop_softmax_nan_guards import DropSoftmaxNanGuards
from sparsec.passes.find_sites import FindSites
from sparsec.passes.fuse_epilogues import FuseEpilogues
from sparsec.passes.fuse_qkv import FuseQkvProjections
from sparsec.passes.insert_masks import InsertMasks
from sparsec.passes.lower_attention import LowerAttention
from sparsec.passes.lower_block_sparse import LowerBlockSparse
from sparsec.passes.make_mode_aware import MakeModeAware
from sparsec.passes.pin_input_dims import PinInputDims
from sparsec.passes.record_example_inputs import RecordExampleInputs
from sparsec.passes.select_sites import SelectSites
from sparsec.passes.safe_views import SafeViews
from sparsec.pipeline import STAGES, Pass

__all__ = ["AttachFunctions", "AttachSchedule", "AttentionHeadLayout", "BakeMasks",
           "ChooseSparseLayers", "CompactPadding", "DropSoftmaxNanGuards", "FindSites",
           "FuseEpilogues", "FuseQkvProjections", "InsertMasks", "LowerAttention", "LowerBlockSparse", "MakeModeAware", "PinInputDims",
           "RecordExampleInputs", "SafeViews", "SelectSites", "build_pipeline", "build_lowering_pipeline",
           "build_onnx_pipeline", "STAGES"]


def build_pipeline(spec: Any, dry_run: bool = False) -> list[Pass]:
    """The rewrite pipeline for `spec`: capture's clean-up, site selection, masks, schedule. A dry
    run lists the sites even when a group selects none (that is when it is needed)."""
    return [
        MakeModeAware(),
        FindSites(),
        SelectSites(groups=spec.groups, require_sites=not dry_run),
        InsertMasks(groups=spec.groups),
        AttachSchedule(schedule=spec.schedule, groups=spec.groups, training=spec.extras),
    ]


def build_lowering_pipeline(int8: bool = False, policy: str = "cost", min_speedup: float | None = None,
                            block: tuple[int, int] | None = None, target: str = "sparsec",
                            measure: bool = True, threads: int = 0,
                            keep_dense: tuple[tuple[str, str], ...] = ()) -> list[Pass]:
    """The lower stage, run on a copy of a rewritten module (Program.lower, export); `target` is
    the runtime the layers are chosen for (see choose_sparse_layers)."""
    return [
        BakeMasks(),
        ChooseSparseLayers(policy=policy, block=block,
                           min_speedup=DEFAULT_MIN_SPEEDUP if min_speedup is None else min_speedup,
                           runtime=target, measure=measure, threads=threads, keep_dense=keep_dense,
                           int8=int8),
        LowerBlockSparse(int8=int8),
        SafeViews(),
    ]


def build_onnx_pipeline(static: tuple = (), inputs: tuple = (), attention: dict | None = None,
                        target: str = "sparsec") -> list[Pass]:
    """The ONNX passes over the exported model: `static` input dims (pin_input_dims), the example
    inputs' (shape, dtype) (record_example_inputs), which Attention nodes run on sparsec's
    kernel, how (lower_attention's `compute` and `max_head`; none by default), and the runtime the
    file is for (`target`: on "stock", fuse_qkv also fuses before ONNX's own Attention)."""
    return [
        PinInputDims(static=static),
        DropSoftmaxNanGuards(),
        AttentionHeadLayout(),
        LowerAttention(**(attention or {})),
        FuseEpilogues(),
        FuseQkvProjections(split=target == "stock"),
        AttachFunctions(),
        CompactPadding(),
        RecordExampleInputs(inputs=inputs),
    ]
