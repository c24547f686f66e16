"""find_sites: every linear / conv / addmm (GPT-2 Conv1D) / matmul-with-parameter weight is a
candidate site named after its parameter; embeddings and tied weights are left out with reasons."""
from __future__ import annotations

import pytest
import torch

from sparsec.capture import capture
from sparsec.errors import PassError
from sparsec.ir import graph_info
from sparsec.passes import FindSites
from sparsec.pipeline import run_pipeline
from tests.helpers import (
    cnn,
    cnn_input,
    ids_input,
    matmul_tied,
    mlp,
    mlp_input,
    rewrite,
    zoo_inputs,
    zoo_model,
)


def _info(model, args, kwargs=None):
    gm = rewrite(model, args, kwargs=kwargs, until="find_sites")
    return gm, graph_info(gm)


def test_linear_sites_of_mlp():
    model = mlp()
    gm, info = _info(model, (mlp_input(),))
    assert {n: (s.op, s.shape) for n, s in info.candidates.items()} == {
        "fc1.weight": ("linear", (16, 8)),
        "fc2.weight": ("linear", (16, 16)),
        "fc3.weight": ("linear", (4, 16)),
    }
    assert info.left_out == {}  # biases are 1-D: never sites, never reported
    assert "sites_found" in info.facts
    assert set(info.candidates) <= {n for n, _ in model.named_parameters()}


def test_conv_sites():
    _, info = _info(cnn(), (cnn_input(),))
    assert {n: s.op for n, s in info.candidates.items()} == {
        "conv1.weight": "conv", "conv2.weight": "conv", "fc.weight": "linear"}
    assert info.candidates["conv1.weight"].shape == (4, 3, 3, 3)


def test_gpt2_conv1d_addmm_sites_and_tied_embedding_left_out():
    model = zoo_model("gpt2")
    args, kwargs = zoo_inputs("gpt2")
    _, info = _info(model, args, kwargs)
    assert {s.op for s in info.candidates.values()} == {"addmm"}
    assert info.candidates["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D [in, out]
    assert len(info.candidates) == 4
    # lm_head.weight is wte.weight: it carries its named_parameters() name and is left out as tied
    assert "lm_head.weight" not in info.left_out
    assert "tied or shared weight" in info.left_out["transformer.wte.weight"]
    assert "embedding" in info.left_out["transformer.wte.weight"]
    assert "not the weight of a linear/conv/matmul (used by embedding" in info.left_out["transformer.wpe.weight"]


def test_matmul_with_parameter_is_a_site_and_tied_weight_is_not():
    _, info = _info(matmul_tied(), (ids_input(),))
    assert {n: s.op for n, s in info.candidates.items()} == {"proj": "matmul", "fc.weight": "linear"}
    assert info.left_out == {
        "embed.weight": "also used by embedding.default (tied or shared weight): masking it would "
                        "change that use too"}


def test_plain_embedding_left_out_with_reason():
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 2))
    _, info = _info(model, (ids_input(seq=3) % 20,))
    assert list(info.candidates) == ["1.weight"]
    assert info.left_out["0.weight"] == "not the weight of a linear/conv/matmul (used by embedding.default)"


def test_symbolic_trace_duplicate_get_attrs_are_merged():
    from tests.helpers import spec_dict

    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(x))

    model = TwoUses()
    gm = rewrite(model, (mlp_input(),), spec_dict(capture={"method": "symbolic_trace"}),
                 until="find_sites")
    weights = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc.weight"]
    assert len(weights) == 1 and len(weights[0].users) == 2
    assert list(graph_info(gm).candidates) == ["fc.weight"]
    x = mlp_input()
    assert torch.equal(gm(x), model(x))


def test_graph_is_unchanged_numerically():
    model = mlp().eval()
    gm, _ = _info(model, (mlp_input(),))
    gm.eval()
    assert torch.equal(gm(mlp_input(5)), model(mlp_input(5)))


def test_requires_mode_aware():
    gm = capture(mlp(), (mlp_input(),))
    with pytest.raises(PassError, match=r"^pass find_sites: requires mode_aware, which no earlier pass"):
        run_pipeline(gm, [FindSites()])


def test_site_source_is_the_models_line_not_torchs():
    import inspect

    from tests import helpers

    _, info = _info(mlp(), (mlp_input(),))
    lines, start = inspect.getsourcelines(helpers.MLP.forward)
    fc1_line = start + next(i for i, text in enumerate(lines) if "self.fc1(x)" in text)
    assert info.candidates["fc1.weight"].source == f"{helpers.__file__}:{fc1_line}"
