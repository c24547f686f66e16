"""safe_views: views and `contiguous` that torch.onnx's second trace gets wrong become copies.

before: `contiguous_1 = aten.contiguous.default(transpose_3)`;  `view_4 = aten.view.default(x, [...])`
after:  `contiguous_1 = aten.clone.default(transpose_3, memory_format=torch.contiguous_format)`;
        `view_4 = aten.reshape.default(x, [...])`
torch.onnx traces the lowered graph again with its own fake tensors. There `contiguous` of a
transpose can vanish (it decomposes to nothing when the trace believes the tensor is contiguous)
and a `view` of that transpose then fails ("Cannot view a tensor with shape ... and strides ...";
T5's attention output). clone(contiguous_format) and reshape compute the same values as contiguous
and view; a lowered copy is only run for inference and export, where no one writes through a view,
so the rewrite is exact.
requires: masks_baked.  ensures: views_safe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.pipeline import Pass, PassResult

aten = torch.ops.aten


@dataclass(frozen=True)
class SafeViews(Pass):
    name = "safe_views"
    stage = "lower"
    requires = ("masks_baked",)
    ensures = ("views_safe",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is aten.view.default:
                node.target = aten.reshape.default
                changed += 1
            elif node.target is aten.contiguous.default and len(node.args) == 1:
                node.target = aten.clone.default
                node.kwargs = {**node.kwargs, "memory_format": torch.contiguous_format}
                changed += 1
        return PassResult(gm, modified=changed > 0)
