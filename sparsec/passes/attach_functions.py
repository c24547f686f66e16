"""attach_functions: give every sparse node its model-local ONNX function (standard-op body).

before: `y = sparsec.BlockSparseLinear <N, K, activation> (x, values, block_cols, row_nnz, bias, "", "")`
after:  the same node without trailing absent inputs, naming its variant as its overload
        (`fp32_bias_gelu`), and the model's functions hold one body per variant used, so stock
        onnxruntime inlines it where sparsec's kernel is not registered.
Each lowering target attaches the functions of its own nodes (LoweringTarget.attach_functions).
requires: exported.  ensures: functions_attached.  Runs after every pass that changes sparse nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from sparsec.lowering import targets
from sparsec.pipeline import OnnxPass, PassResult


@dataclass(frozen=True)
class AttachFunctions(OnnxPass):
    name = "attach_functions"
    ensures = ("functions_attached",)

    def run(self, model: ir.Model) -> PassResult:
        attached = sum(target.attach_functions(model) for target in targets.all_targets())
        return PassResult(model, modified=attached > 0)
