"""choose_sparse_layers and lower_block_sparse: decisions with reasons, rewrite, verifier."""
from __future__ import annotations

import pytest
import torch

import sparsec
from sparsec.errors import PassError
from sparsec.ir import graph_info
from sparsec.lowering.torch_op import op
from sparsec.verify import verify
from tests.helpers import cnn, cnn_input, spec_dict, zoo_inputs, zoo_model


class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(96, 128)
        self.fc2 = torch.nn.Linear(128, 70)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _prog(density: float, block=(16, 16), model=None, args=None, kwargs=None):
    torch.manual_seed(0)
    model = model or Wide()
    args = args if args is not None else (torch.randn(5, 96),)
    spec = spec_dict(["*"], method="magnitude", density=density, scope="local", block=block)
    prog = sparsec.compile(model, spec, args, kwargs)
    return prog.eval()


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
