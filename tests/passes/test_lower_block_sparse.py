"""lower_block_sparse: chosen sites become the target's op on packed buffers (GPT-2's Conv1D
transposed); the lowered program still runs; the verifier catches inconsistent packing."""
from __future__ import annotations

import pytest
import torch

from sparsec.errors import PassError
from sparsec.ir import graph_info
from sparsec.lowering.torch_op import op
from sparsec.verify import verify
from tests.helpers import lowering_program as _prog
from tests.helpers import zoo_inputs, zoo_model


def test_sparse_linears_are_lowered_and_still_run():
    prog = _prog(0.1, block=(32, 32))
    gm = prog.lower(min_speedup=1.0)
    plans = graph_info(gm).lowering
    assert all(p.lower for p in plans.values()), {n: p.reason for n, p in plans.items()}
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op()]
    assert len(calls) == 2
    assert not any(n.op == "call_function" and "linear.default" == getattr(n.target, "__name__", "")
                   for n in gm.graph.nodes)
    assert "fc1.weight" not in dict(gm.named_parameters())
    assert tuple(gm.fc1.weight_values.shape[2:]) == (32, 32)
    x = torch.randn(7, 96)
    torch.testing.assert_close(gm(x), prog(x), atol=1e-5, rtol=1e-5)
    assert "est." in plans["fc1.weight"].reason and "blocks of 32x32" in plans["fc1.weight"].reason


def test_gpt2_conv1d_addmm_is_packed_transposed():
    model = zoo_model("gpt2")
    args, kwargs = zoo_inputs("gpt2", 2, 6)
    prog = _prog(0.5, model=model, args=args, kwargs=kwargs)
    gm = prog.lower(policy="always")
    plans = graph_info(gm).lowering
    c_fc = plans["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.op == "addmm" and c_fc.transposed and c_fc.lower
    with torch.no_grad():
        got, want = gm(*args, **kwargs), prog(*args, **kwargs)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)


def test_verifier_rejects_inconsistent_packing():
    gm = _prog(0.1, block=(32, 32)).lower(policy="always")
    verify(gm)
    gm.fc1.weight_block_cols = gm.fc1.weight_block_cols[:, :0].contiguous()
    with pytest.raises(PassError, match="packed blocks are inconsistent"):
        verify(gm)


def test_verifier_rejects_a_lowered_site_without_its_op():
    gm = _prog(0.1, block=(32, 32)).lower(policy="always")
    call = next(n for n in gm.graph.nodes if n.target == op())
    call.meta.pop("sparsec")
    with pytest.raises(PassError, match="lowered but 0 block_sparse_linear calls"):
        verify(gm)
    assert "lowered" in graph_info(gm).facts
