"""pin_input_dims: write the input dimensions that capture fixed as numbers into the ONNX inputs.

before: `float[s0,s1] input_ids` (torch.onnx names every dimension it was not told is static)
after:  `float[1,s1] input_ids` when capture specialized dimension 0 to the example's 1
torch.export specializes a dimension whose example size is 1 (or that the model needs fixed), and
the captured graph then uses it as a constant (a view to [1, -1, heads, head]); exporting that
graph again names the dimension symbolically, so another size would fail deep inside onnxruntime
(or compute something else) instead of at the input. The captured placeholders' example values say
which dimensions are fixed (`static`, one entry per input: its dims, None where dynamic).
requires: exported.  ensures: inputs_pinned.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from sparsec.pipeline import OnnxPass, PassResult


@dataclass(frozen=True)
class PinInputDims(OnnxPass):
    static: tuple[tuple[str, tuple[int | None, ...]], ...] = ()   # (input name, dims)
    name = "pin_input_dims"
    ensures = ("inputs_pinned",)

    def run(self, model: ir.Model) -> PassResult:
        wanted = dict(self.static)
        changed = False
        for value in model.graph.inputs:
            fixed = wanted.get(value.name or "")
            if fixed is None or value.shape is None or len(value.shape) != len(fixed):
                continue
            new = [size if size is not None else dim for size, dim in zip(fixed, value.shape)]
            if list(value.shape) != new:
                value.shape = ir.Shape(new)
                changed = True
        return PassResult(model, modified=changed)
