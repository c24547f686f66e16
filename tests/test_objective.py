"""Which loss fine-pruning minimises (sparsec.training.losses.objective): model.py's, the model's own
(outputs.loss) when captured with labels, next-token cross-entropy for causal language models (a
GPT-2 LM head must not learn to copy the current token), else cross-entropy of the logits."""
from __future__ import annotations

import torch

import sparsec
from sparsec.modelfile import load
from sparsec.training.losses import causal_loss, default_loss, is_causal_lm, objective, own_loss
from tests.helpers import zoo_inputs, zoo_model


def test_a_causal_lm_is_trained_on_the_next_token_as_its_own_loss_says():
    model = zoo_model("gpt2")
    assert is_causal_lm(model) and not is_causal_lm(zoo_model("bert"))
    chosen = objective(None, model, {})
    assert chosen.loss is causal_loss and "next token" in chosen.description
    _, kwargs = zoo_inputs("gpt2", 3, 9)
    batch = {**kwargs, "labels": kwargs["input_ids"]}
    with torch.no_grad():
        outputs = model(**kwargs)
        reference = model(**kwargs, labels=kwargs["input_ids"]).loss   # transformers' own shift
        assert torch.allclose(causal_loss(outputs, batch), reference, atol=1e-6)
        assert not torch.allclose(default_loss(outputs, batch), reference, atol=1e-3)  # the old mistake


def test_a_model_captured_with_labels_trains_on_its_own_loss():
    model = zoo_model("gpt2")
    _, kwargs = zoo_inputs("gpt2", 2, 8)
    kwargs = {**kwargs, "labels": kwargs["input_ids"]}
    chosen = objective(None, model, kwargs)
    assert chosen.loss is own_loss and chosen.labels_to_model
    prog = sparsec.compile(model, {"prune": [{"targets": ["*c_fc*"], "method": "magnitude", "density": 1.0}]},
                           (), kwargs)
    batch = dict(kwargs)
    outputs = chosen.forward(prog, batch, 1)
    assert torch.allclose(chosen.loss(outputs, batch), model(**kwargs).loss, atol=1e-5)


def test_model_py_loss_comes_first_and_plain_models_get_cross_entropy(tmp_path):
    path = tmp_path / "model.py"
    path.write_text("import torch\n"
                    "def build_model():\n    return torch.nn.Linear(4, 3)\n"
                    "def example_inputs():\n    return torch.randn(2, 4)\n"
                    "def loss(outputs, batch):\n    return outputs.pow(2).mean()\n")
    mf = load(path)
    assert objective(mf, mf.model, {}).description == f"loss(outputs, batch) of {path}"
    assert objective(None, torch.nn.Linear(4, 3), {}).loss is default_loss
