"""choose_sparse_layers: which sites lower, through which target, and why (cost model, policy,
unstructured masks, sites no target handles)."""
from __future__ import annotations

import pytest

from sparsec.ir import graph_info
from sparsec.lowering import cost
from sparsec.lowering.torch_op import op
from tests.helpers import cnn, cnn_input
from tests.helpers import lowering_program as _prog


def test_layers_too_dense_stay_dense_and_say_why():
    gm = _prog(0.9).lower()
    plans = graph_info(gm).lowering
    assert not any(p.lower for p in plans.values())
    assert all(p.reason.startswith("too dense to gain") for p in plans.values())
    assert not any(n.target == op() for n in gm.graph.nodes)


def test_unstructured_masks_pay_off_only_when_sparse_enough():
    """Unstructured masks take the kernel's row path: estimated ROW_EFFICIENCY / density."""
    plans = graph_info(_prog(0.1, block=(1, 1)).lower()).lowering
    assert plans and all(p.lower and p.speedup == pytest.approx(cost.ROW_EFFICIENCY / 0.1, rel=0.1)
                         for p in plans.values())
    plans = graph_info(_prog(0.5, block=(1, 1)).lower()).lowering
    assert not any(p.lower for p in plans.values())
    assert all(p.reason.startswith("too dense to gain") for p in plans.values())


def test_int8_row_vectors_are_estimated_on_the_column_path_or_the_windows():
    """INT8 compute runs [1, 4 j] row vectors on VNNI's column path, faster the more windows a column
    holds (measured 17.6x for [1, 16], 12.3x for [1, 8], 7.2x for [1, 4] at density 0.1, one
    thread), other widths as 4-byte windows on the row path: [1, 6] (whole windows, some half
    empty) twice fp32's row path, unstructured ones slower than fp32's."""
    e = lambda bc: cost.efficiency((1, bc), int8=True)  # noqa: E731
    assert e(16) == e(32) == e(48) == 1.5
    assert e(8) == e(24) == e(12) == 1.0 > e(4) == e(20) == 0.65 > e(6) >= cost.ROW_EFFICIENCY
    assert e(1) < cost.efficiency((1, 1)) == cost.ROW_EFFICIENCY
    plans = graph_info(_prog(0.1, block=(1, 16)).lower(int8=True)).lowering
    assert plans and all(p.lower and p.speedup == pytest.approx(1.5 / 0.1, rel=0.1) for p in plans.values())


def test_fp32_row_vectors_a_multiple_of_4_wide_are_estimated_on_the_column_path():
    """On AVX-512 [1, 4 j] vectors run on the column path (measured 7.3x for [1, 16], 6.3x for [1, 4] at
    density 0.1), other widths and unstructured masks on the row path; an [1, 16] layer at density 0.1
    is then estimated above the default min_speedup by a wide margin, as measured."""
    assert cost.efficiency((1, 16)) == cost.efficiency((1, 8)) == cost.efficiency((1, 24)) == 0.73
    assert cost.efficiency((1, 4)) == cost.efficiency((1, 12)) == 0.63
    assert cost.efficiency((1, 3)) == cost.efficiency((1, 1)) == cost.efficiency((1, 6)) == cost.ROW_EFFICIENCY
    plans = graph_info(_prog(0.1, block=(1, 16)).lower()).lowering
    assert plans and all(p.lower and p.speedup == pytest.approx(0.73 / 0.1, rel=0.1) for p in plans.values())


def test_layers_without_a_speed_estimate_are_lowered_only_on_request(monkeypatch):
    import dataclasses

    from sparsec.lowering import targets

    conv = targets.get("block_sparse_conv")   # a target that cannot say what its layers cost
    plan_of = conv.plan
    monkeypatch.setattr(conv, "plan", lambda *a, **k: dataclasses.replace(plan_of(*a, **k), speedup=None))
    prog = _prog(0.1, block=(4, 4), model=cnn(), args=(cnn_input(),))
    plan = graph_info(prog.lower()).lowering["conv1.weight"]
    assert plan.lower is False
    assert plan.reason.startswith("no speed estimate for conv layers: lowered only with policy = always")
    plan = graph_info(prog.lower(policy="always")).lowering["conv1.weight"]
    assert plan.lower and plan.reason.startswith("policy always; no speed estimate")
