"""choose_sparse_layers: which sites lower, through which target, and why (cost model, policy,
unstructured masks, sites no target handles)."""
from __future__ import annotations

from sparsec.ir import graph_info
from sparsec.lowering.torch_op import op
from tests.helpers import cnn, cnn_input
from tests.helpers import lowering_program as _prog


def test_layers_too_dense_stay_dense_and_say_why():
    gm = _prog(0.9).lower()
    plans = graph_info(gm).lowering
    assert not any(p.lower for p in plans.values())
    assert all(p.reason.startswith("too dense to gain") for p in plans.values())
    assert not any(n.target == op() for n in gm.graph.nodes)


def test_unstructured_masks_never_pay_off():
    plans = graph_info(_prog(0.1, block=(1, 1)).lower()).lowering
    assert not any(p.lower for p in plans.values())


def test_convolutions_stay_dense():
    prog = _prog(0.1, block=(1, 1), model=cnn(), args=(cnn_input(),))
    plans = graph_info(prog.lower(policy="always")).lowering
    assert plans["conv1.weight"].lower is False
    assert plans["conv1.weight"].reason.startswith("no lowering target for conv sites")
