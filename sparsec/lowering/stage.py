"""The lower stage on the PyTorch side: copies of a rewritten (masked) GraphModule with the masks
baked in, and with the sites that pay off rewritten into sparse ops. The module given is never
changed; the passes are the pipeline's (sparsec.passes.build_lowering_pipeline)."""
from __future__ import annotations

import copy

import torch.fx as fx

from sparsec.passes import build_lowering_pipeline
from sparsec.passes.bake_masks import BakeMasks
from sparsec.pipeline import Instruments, run_pipeline


def baked_copy(module: fx.GraphModule, instruments: Instruments | None = None) -> fx.GraphModule:
    """A copy with W <- W * M and no masks, scores or method state (the finalized model)."""
    return run_pipeline(copy.deepcopy(module), [BakeMasks()], instruments)


def dense_copy(module: fx.GraphModule) -> fx.GraphModule:
    """The lower stage with nothing lowered: the baked model, in eval mode, ready for export (the
    dense file, and the reference a lowered copy is checked against)."""
    return lowered_copy(module, policy="never")


def lowered_copy(module: fx.GraphModule, *, int8: bool = False, policy: str = "cost",
                 min_speedup: float | None = None, block: tuple[int, int] | None = None,
                 target: str = "sparsec", measure: bool = True, threads: int = 0,
                 keep_dense: tuple[tuple[str, str], ...] = (),
                 instruments: Instruments | None = None) -> fx.GraphModule:
    """A baked copy, in eval mode, whose chosen sites are rewritten by their lowering target
    (chosen for the `target` runtime, see sparsec.passes.choose_sparse_layers)."""
    passes = build_lowering_pipeline(int8=int8, policy=policy, min_speedup=min_speedup, block=block,
                                     target=target, measure=measure, threads=threads,
                                     keep_dense=keep_dense)
    return run_pipeline(copy.deepcopy(module), passes, instruments).eval()
