"""record_example_inputs: the example inputs' shapes and dtypes in the file's metadata.

before: a model without sparsec metadata.
after:  metadata_props["sparsec.example_inputs"] = {"input_ids": {"shape": [2, 8], "dtype": "int64"}, ...}
`sparsec bench` makes inputs of those shapes (random floats, zero token ids, all-ones masks).
requires: exported.  ensures: inputs_recorded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import onnx_ir as ir

from sparsec.lowering.onnx_graph import METADATA_INPUTS
from sparsec.pipeline import OnnxPass, PassResult


@dataclass(frozen=True)
class RecordExampleInputs(OnnxPass):
    inputs: tuple[tuple[tuple[int, ...], str], ...] = ()   # (shape, dtype) per graph input, in order
    name = "record_example_inputs"
    ensures = ("inputs_recorded",)

    def run(self, model: ir.Model) -> PassResult:
        names = [value.name for value in model.graph.inputs]
        record = {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in zip(names, self.inputs)}
        model.metadata_props[METADATA_INPUTS] = json.dumps(record)
        return PassResult(model, modified=True)
