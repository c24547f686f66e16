"""The ONNX stage as passes: the runner checks requires / in-place promises, the ONNX verifier runs
after every pass and names what is wrong, and FX and ONNX passes do not mix."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.errors import PassError
from sparsec.lowering import onnx_graph
from sparsec.passes import AttachFunctions, FindSites, FuseEpilogues, PinInputDims
from sparsec.pipeline import Pass, PassResult, run_pipeline


def _model(nodes) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    onnx_graph.facts(model).add("exported")
    return model


@dataclass(frozen=True)
class _Swap(Pass):
    """Moves the graph's last node to the front (breaks the topological order)."""

    name = "swap"
    kind = "onnx"
    stage = "lower"

    def run(self, model: ir.Model) -> PassResult:
        nodes = list(model.graph)
        model.graph.remove(nodes[-1])
        model.graph.insert_before(nodes[0], nodes[-1])
        return PassResult(model, modified=True)


def test_verifier_names_a_node_out_of_order():
    model = _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["z"])])
    with pytest.raises(PassError, match=r"after pass swap: .*reads 'y' before it is computed"):
        run_pipeline(model, [_Swap()])


def test_verifier_rejects_an_unknown_custom_domain():
    model = _model([helper.make_node("Thing", ["x"], ["z"], domain="elsewhere")])
    with pytest.raises(PassError, match="domain 'elsewhere'"):
        run_pipeline(model, [PinInputDims()])


def test_a_pass_needs_the_facts_it_requires():
    model = _model([helper.make_node("Relu", ["x"], ["z"])])
    onnx_graph.facts(model).clear()
    with pytest.raises(PassError, match="pass attach_functions: requires exported"):
        run_pipeline(model, [AttachFunctions()])


def test_epilogues_cannot_be_fused_once_functions_are_attached():
    model = _model([helper.make_node("Relu", ["x"], ["z"])])
    with pytest.raises(PassError, match="fuse_epilogues: runs before attach_functions"):
        run_pipeline(model, [AttachFunctions(), FuseEpilogues()])


def test_fx_and_onnx_passes_do_not_mix():
    with pytest.raises(PassError, match="mixes fx and onnx passes"):
        run_pipeline(_model([helper.make_node("Relu", ["x"], ["z"])]), [FindSites(), PinInputDims()])


def test_onnx_text_names_the_pass_and_the_facts():
    model = _model([helper.make_node("Relu", ["x"], ["z"])])
    text = onnx_graph.format_model(run_pipeline(model, [PinInputDims()]), "pin_input_dims")
    assert text.startswith("# sparsec ONNX IR after pin_input_dims\n# facts: exported, inputs_pinned")
    assert "z = Relu (x)" in text
