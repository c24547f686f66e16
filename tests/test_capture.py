"""Capture: the zoo of tiny transformers models plus plain MLP / CNN become GraphModules that
compute what the eager model computes, in eval and train mode, at other batch and sequence sizes,
that train, and that follow `train()` / `eval()` after make_mode_aware. Failures are CaptureErrors
naming the user's source line, without a traceback."""
from __future__ import annotations

import pytest
import torch

from sparsec.capture import capture
from sparsec.errors import CaptureError
from sparsec.ir import graph_info
from sparsec.passes import MakeModeAware
from sparsec.pipeline import run_pipeline
from tests.helpers import (ZOO, all_tensors, cnn, cnn_input, mlp, mlp_input, zoo_inputs,
                           zoo_model)


def captured(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, **options):
    """capture + make_mode_aware: the first stage of the pipeline."""
    gm = capture(model, args, kwargs or {}, **options)
    return run_pipeline(gm, [MakeModeAware()])


def assert_same_outputs(expected, actual) -> None:
    want, got = all_tensors(expected), all_tensors(actual)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request):
    """(name, eager model, captured module), captured once per model with batch 2, sequence 8."""
    name = request.param
    model = zoo_model(name)
    args, kwargs = zoo_inputs(name, batch=2, seq=8)
    return name, model, captured(model, args, kwargs)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_zoo_outputs_equal_eager(zoo, training):
    name, model, gm = zoo
    model.train(training)
    gm.train(training)
    args, kwargs = zoo_inputs(name, batch=2, seq=8)
    with torch.no_grad():
        assert_same_outputs(model(*args, **kwargs), gm(*args, **kwargs))
    assert graph_info(gm).capture == "torch.export"


def test_zoo_dynamic_batch_and_sequence(zoo):
    name, model, gm = zoo
    model.eval()
    gm.eval()
    args, kwargs = zoo_inputs(name, batch=3, seq=11)  # example was batch 2, sequence 8
    with torch.no_grad():
        assert_same_outputs(model(*args, **kwargs), gm(*args, **kwargs))


def test_zoo_captured_module_trains(zoo):
    name, model, gm = zoo
    gm.train()
    model.zero_grad()
    args, kwargs = zoo_inputs(name, batch=2, seq=8)
    outputs = [t for t in all_tensors(gm(*args, **kwargs)) if t.is_floating_point()]
    sum(t.square().mean() for t in outputs).backward()
    # the captured module shares its parameters with the model: they receive the gradients
    params = dict(model.named_parameters())
    linear_weights = [n for n, p in params.items() if p.dim() >= 2 and "embed" not in n
                      and "shared" not in n and "wte" not in n and "wpe" not in n]
    assert linear_weights
    for n in linear_weights:
        grad = params[n].grad
        assert grad is not None, n
    assert any(params[n].grad.abs().sum() > 0 for n in linear_weights)
    model.zero_grad()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_mlp_outputs_equal_eager(training):
    model = mlp()
    gm = captured(model, (mlp_input(),))
    model.train(training)
    gm.train(training)
    for batch in (3, 5):
        x = mlp_input(batch)
        assert_same_outputs(model(x), gm(x))


def test_cnn_outputs_equal_eager_dynamic_batch_and_size():
    model = cnn().eval()
    gm = captured(model, (cnn_input(),)).eval()
    for batch, size in ((2, 6), (4, 9)):
        x = cnn_input(batch, size)
        assert_same_outputs(model(x), gm(x))


def test_mlp_captured_module_trains():
    model = mlp()
    gm = captured(model, (mlp_input(),))
    gm(mlp_input()).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------ train() / eval()
def test_dropout_follows_train_and_eval():
    model = mlp(p=0.5)
    gm = captured(model, (mlp_input(),))
    x = mlp_input(16)
    gm.train()
    assert not torch.equal(gm(x), gm(x)), "dropout must be random in train mode"
    gm.eval()
    first = gm(x)
    assert torch.equal(first, gm(x))
    assert torch.equal(first, model.eval()(x)), "eval mode must match the eager model (no dropout)"


def test_dropout_in_eval_even_when_captured_from_eval_model():
    model = mlp(p=0.5).eval()  # capture switches to train mode for the capture and back
    gm = captured(model, (mlp_input(),))
    assert not model.training
    gm.train()
    x = mlp_input(16)
    assert not torch.equal(gm(x), gm(x))


def test_batch_norm_running_stats_update_in_train_only():
    model = cnn()
    gm = captured(model, (cnn_input(),))
    x = cnn_input(4, 6)
    mean0 = model.bn.running_mean.clone()
    count0 = int(model.bn.num_batches_tracked)

    gm.eval()
    gm(x)
    assert torch.equal(model.bn.running_mean, mean0), "eval must not update the running stats"
    assert int(model.bn.num_batches_tracked) == count0

    gm.train()
    gm(x)
    assert not torch.equal(model.bn.running_mean, mean0), "train must update the running stats"
    assert int(model.bn.num_batches_tracked) == count0 + 1


def test_batch_norm_eval_uses_running_stats():
    model = cnn()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    gm = captured(model, (cnn_input(),)).eval()
    model.eval()
    x = cnn_input(3, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)
    # train mode normalizes with batch statistics: different outputs for the same input
    gm.train()
    assert not torch.allclose(gm(x), model(x))


# ---------------------------------------------------------------------------- symbolic_trace
class ExportRefuses(torch.nn.Module):
    """Reads the input's data pointer (a cache key, say): fake tensors under torch.export have
    no storage, so export fails; symbolic_trace records it as a harmless call_method."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        _ = x.data_ptr()
        return self.fc(self.drop(x))


def test_symbolic_trace_fallback_when_export_fails():
    model = ExportRefuses()
    gm = captured(model, (mlp_input(),))
    assert graph_info(gm).capture == "torch.fx.symbolic_trace"
    assert "fc.weight" in {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    gm.eval()
    model.eval()
    x = mlp_input(5)
    assert torch.equal(gm(x), model(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x)), "dropout stays a mode-following leaf module"


def test_symbolic_trace_forced():
    model = mlp()
    gm = captured(model, (mlp_input(),), method="symbolic_trace")
    assert graph_info(gm).capture == "torch.fx.symbolic_trace"
    x = mlp_input(7)
    assert torch.equal(gm(x), model(x))


def test_symbolic_trace_forced_through_compile():
    import sparsec
    from tests.helpers import spec_dict

    model = mlp()
    prog = sparsec.compile(model, spec_dict(["fc*"], density=1.0,
                                            capture={"method": "symbolic_trace"}), (mlp_input(),))
    assert graph_info(prog.module).capture == "torch.fx.symbolic_trace"
    prog.eval()
    model.eval()
    assert torch.equal(prog(mlp_input(4)), model(mlp_input(4)))


# ------------------------------------------------------------------------------ decoder models
def test_decoder_captured_with_use_cache_off():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                       use_cache=True, bos_token_id=0, eos_token_id=0)).eval()
    args, kwargs = zoo_inputs("gpt2")
    gm = captured(model, args, kwargs).eval()
    assert model.config.use_cache is False
    out = gm(*args, **kwargs)
    assert getattr(out, "past_key_values", None) is None
    torch.testing.assert_close(out.logits, model(*args, **kwargs).logits, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ failures
class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: both tools reject it
            return self.fc(x)
        return -self.fc(x)


def test_capture_error_names_the_source_line():
    with pytest.raises(CaptureError) as caught:
        capture(DataDependent(), (mlp_input(),))
    message = str(caught.value)
    assert f"{__file__}:" in message
    assert "if x.sum() > 0:" in message
    assert "torch.export.export failed" in message and "torch.fx.symbolic_trace failed" in message
    assert "DataDependent" in message
    assert "Traceback" not in message and "\n" not in message


def test_capture_error_with_one_tool_names_only_that_tool():
    with pytest.raises(CaptureError) as caught:
        capture(DataDependent(), (mlp_input(),), method="symbolic_trace")
    message = str(caught.value)
    assert "torch.fx.symbolic_trace failed" in message
    assert "torch.export" not in message.split(";")[0]
    assert "if x.sum() > 0:" in message


def test_user_code_is_told_from_libraries_by_package_location(tmp_path):
    """A checkout in a folder named `sparsec` (or `torch`) is still the user's code."""
    import contextlib
    import json

    import transformers

    import sparsec
    from sparsec.paths import is_library_file

    for folder in ("sparsec", "torch"):
        model = tmp_path / folder / "tests" / "model.py"
        assert not is_library_file(str(model))
    assert is_library_file(torch.__file__) and is_library_file(sparsec.__file__)
    assert is_library_file(contextlib.__file__) and is_library_file(json.__file__)
    assert not is_library_file(transformers.__file__)  # a model's own source lines are worth showing
