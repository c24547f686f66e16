"""The fine-pruning loop: it learns, it reaches the asked density, and it honours the data
convention (Dataset or iterable; (inputs, target) with tensor / tuple / dict inputs; dict batches
with `labels`)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsec
from sparsec.errors import ModelFileError, TrainingError
from sparsec.modelfile import ModelFile
from sparsec.spec import TrainSpec
from sparsec.training.data import split_batch
from sparsec.training.loop import evaluate, fine_prune

N = 96


def blobs(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.eye(3, 8) * 3
    return centers[y] + 0.3 * torch.randn(n, 8, generator=g), y


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwoInputs(MLP):
    """forward(a, b): the batch's inputs are a tuple of two tensors."""

    def forward(self, a, b):
        return super().forward(a + b)


class HFStyle(MLP):
    """forward(pixels=...) -> {"logits": ...}, like a Hugging Face model output."""

    def forward(self, pixels):
        return {"logits": super().forward(pixels)}


def spec(density: float = 0.25, steps: int = 40, method: str = "movement") -> dict:
    return {"prune": [{"targets": ["*"], "method": method, "density": density, "scope": "global"}],
            "schedule": {"kind": "cubic", "total": steps, "warmup": steps // 10, "cooldown": steps // 4},
            "train": {"steps": steps}}


def model_file(model: nn.Module, example: tuple, example_kwargs: dict | None = None, **functions) -> ModelFile:
    module = types.ModuleType("fake_model_py")
    for name, fn in functions.items():
        setattr(module, name, fn)
    return ModelFile(Path("fake/model.py"), module, model, example, example_kwargs or {})


def train_spec(**overrides) -> TrainSpec:
    values = dict(steps=40, batch_size=16, lr=1e-2, score_lr=5e-2, seed=0)
    values.update(overrides)
    return TrainSpec(**values)


def run(model: nn.Module, mf: ModelFile, density: float = 0.25, **overrides):
    torch.manual_seed(0)
    settings = train_spec(**overrides)
    prog = sparsec.compile(model, spec(density, settings.steps), mf.example_inputs, mf.example_kwargs)
    return prog, fine_prune(prog, mf, settings, progress=False)


def make_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


# ----------------------------------------------------------------------------------- learning
def test_loss_goes_down_and_density_reaches_the_asked_value():
    x, y = blobs()
    model = make_mlp()
    mf = model_file(model, (x[:4],), train_data=lambda: TensorDataset(x, y),
                    eval_data=lambda: TensorDataset(*blobs(48, 1)))
    dense = evaluate(model, mf, 32, 0)
    prog, result = run(model, mf, density=0.25, steps=60)
    assert result.steps == 60 and len(result.losses) == 60 and len(result.densities) == 60
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first
    assert prog.density() == pytest.approx(0.25, abs=0.01)
    assert result.densities[0] > 0.9 and result.densities[-1] == pytest.approx(0.25, abs=0.01)
    assert result.metric_pruned is not None and result.metric_pruned > 0.9
    assert dense is not None and dense < 0.6  # the untrained dense model guesses
    assert result.metric_history[-1] == (60, result.metric_pruned)


def test_magnitude_pruning_trains_too():
    x, y = blobs()
    model = make_mlp()
    mf = model_file(model, (x[:4],), train_data=lambda: TensorDataset(x, y))
    settings = train_spec(steps=30, optimizer="sgd", lr=0.1, momentum=0.9, max_grad_norm=1.0)
    prog = sparsec.compile(model, spec(0.5, 30, method="magnitude"), (x[:4],))
    result = fine_prune(prog, mf, settings, progress=False)
    assert prog.density() == pytest.approx(0.5, abs=0.01)
    assert result.metric_pruned is None  # no eval_data()
    assert result.losses[-1] < result.losses[0]


def test_restores_train_or_eval_mode():
    x, y = blobs()
    model = make_mlp()
    mf = model_file(model, (x[:4],), train_data=lambda: TensorDataset(x, y),
                    eval_data=lambda: TensorDataset(x, y))
    prog = sparsec.compile(model, spec(0.5, 10), (x[:4],))
    prog.eval()
    fine_prune(prog, mf, train_spec(steps=10, eval_every=5), progress=False)
    assert not prog.training
    prog.train()
    evaluate(prog, mf, 32, 0)
    assert prog.training


def test_optimizer_groups_separate_scores():
    from sparsec.training.loop import make_optimizer

    model = make_mlp()
    prog = sparsec.compile(model, spec(0.5, 10), (torch.randn(2, 8),))
    optimizer = make_optimizer(prog, train_spec(lr=1e-3, score_lr=1e-1, weight_decay=0.01))
    model_group, score_group = optimizer.param_groups
    assert (model_group["lr"], model_group["weight_decay"]) == (1e-3, 0.01)
    assert (score_group["lr"], score_group["weight_decay"]) == (1e-1, 0.0)
    assert {id(p) for p in score_group["params"]} == {id(p) for p in prog.score_parameters()}
    # torch's fused Adam (one kernel over every tensor; the default loop is ~3x slower on the CPU)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    sgd = make_optimizer(prog, train_spec(optimizer="sgd", lr=1e-3, score_lr=1e-1))
    assert isinstance(sgd, torch.optim.SGD) and not sgd.defaults.get("fused")


# ----------------------------------------------------------------------------- data convention
def _list_of_batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("kind", ["dataset", "list", "generator"])
def test_dataset_list_and_generator_sources(kind):
    x, y = blobs()

    def train_data():
        if kind == "dataset":
            return TensorDataset(x, y)
        if kind == "list":
            return _list_of_batches(x, y)
        return (batch for batch in _list_of_batches(x, y))  # one-shot: asked for again each epoch

    model = make_mlp()
    mf = model_file(model, (x[:4],), train_data=train_data, eval_data=lambda: _list_of_batches(x, y))
    prog, result = run(model, mf, density=0.5, steps=20)  # 20 steps > 6 batches: several epochs
    assert result.steps == 20
    assert prog.density() == pytest.approx(0.5, abs=0.01)
    assert result.metric_pruned is not None


def test_tuple_inputs_are_positional_arguments():
    x, y = blobs()
    torch.manual_seed(0)
    model = TwoInputs()
    batches = [((x[i:i + 16], torch.zeros_like(x[i:i + 16])), y[i:i + 16]) for i in range(0, N, 16)]
    mf = model_file(model, (x[:4], x[:4]), train_data=lambda: batches, eval_data=lambda: batches)
    prog, result = run(model, mf, density=0.5, steps=12)
    assert result.steps == 12 and result.metric_pruned is not None


def test_dict_batches_with_labels_and_dict_inputs():
    x, y = blobs()
    torch.manual_seed(0)
    model = HFStyle()
    hf_batches = [{"pixels": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, N, 16)]
    pair_batches = [({"pixels": x[i:i + 16]}, y[i:i + 16]) for i in range(0, N, 16)]
    mf = model_file(model, (), {"pixels": x[:4]}, train_data=lambda: hf_batches,
                    eval_data=lambda: pair_batches)
    prog, result = run(model, mf, density=0.5, steps=24)
    assert result.losses[-1] < result.losses[0]
    assert result.metric_pruned is not None and result.metric_pruned > 0.5


def test_user_loss_and_metric_are_used():
    x, y = blobs()
    calls = {"loss": 0, "metric": 0}

    def loss(outputs, batch):
        calls["loss"] += 1
        return nn.functional.cross_entropy(outputs, batch[1])

    def metric(outputs, batch):
        calls["metric"] += 1
        return 0.5

    model = make_mlp()
    mf = model_file(model, (x[:4],), train_data=lambda: TensorDataset(x, y),
                    eval_data=lambda: TensorDataset(x, y), loss=loss, metric=metric)
    _, result = run(model, mf, density=0.5, steps=8)
    assert calls["loss"] == 8 and calls["metric"] > 0
    assert result.metric_pruned == 0.5


def test_split_batch_conventions():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert split_batch((x, y)).args == (x,)
    assert split_batch([x, y]).args == (x,)
    assert split_batch(((x, x), y)).args == (x, x)
    both = split_batch(({"a": x}, y))
    assert both.kwargs == {"a": x} and both.target is y
    hf = split_batch({"a": x, "labels": y})
    assert hf.args == () and set(hf.kwargs) == {"a"} and hf.target is y


@pytest.mark.parametrize("batch, message", [
    ({"a": torch.zeros(2)}, "'labels'"),
    ((torch.zeros(2),), "(inputs, target)"),
    (torch.zeros(2, 3), "(inputs, target)"),
])
def test_batches_outside_the_convention_are_user_errors(batch, message):
    with pytest.raises(TrainingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_batch(batch)


def test_model_errors_on_a_batch_name_the_step_and_the_batch():
    x, y = blobs()
    model = make_mlp()
    wrong = [(x[:16, :5], y[:16])]  # 5 features, the model takes 8
    mf = model_file(model, (x[:4],), train_data=lambda: wrong)
    with pytest.raises(TrainingError, match=r"training step 1 .*tensor\[16, 5\]"):
        run(model, mf, steps=4)


def test_train_data_of_the_wrong_type_is_a_model_file_error():
    model = make_mlp()
    mf = model_file(model, (torch.zeros(2, 8),), train_data=lambda: 42)
    with pytest.raises(ModelFileError, match="Dataset or an iterable"):
        run(model, mf, steps=4)


def test_empty_train_data_is_an_error_not_a_hang():
    model = make_mlp()
    mf = model_file(model, (torch.zeros(2, 8),), train_data=lambda: [])
    with pytest.raises(TrainingError, match="no batches"):
        run(model, mf, steps=4)


def test_default_loss_finds_logits_in_model_outputs():
    from sparsec.training.losses import default_loss, default_metric, logits_of

    logits, y = torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1])
    for outputs in (logits, types.SimpleNamespace(logits=logits), {"logits": logits}, (logits, None)):
        assert logits_of(outputs) is logits
        assert float(default_loss(outputs, (None, y))) < 0.01
        assert default_metric(outputs, (None, y)) == 1.0
    ignored = torch.tensor([0, -100])  # -100 is skipped, as in Hugging Face
    assert default_metric(logits, (None, ignored)) == 1.0
    with pytest.raises(TrainingError, match="define loss"):
        logits_of("text")


def test_a_batch_with_keys_the_graph_was_not_captured_with_says_which(tmp_path):
    """BERT captured with input_ids and attention_mask, trained on batches that add token_type_ids."""
    from sparsec.cli import main

    model = tmp_path / "model.py"
    model.write_text(
        "import torch\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "def build_model():\n"
        "    return BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,\n"
        "        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16))\n"
        "def example_inputs():\n"
        "    ids = torch.ones(2, 6, dtype=torch.long)\n"
        "    return {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}\n"
        "def train_data():\n"
        "    ids = torch.ones(4, 6, dtype=torch.long)\n"
        "    return [{'input_ids': ids, 'attention_mask': torch.ones_like(ids),\n"
        "             'token_type_ids': torch.zeros_like(ids), 'labels': torch.zeros(4, dtype=torch.long)}]\n")
    spec = tmp_path / "spec.toml"
    spec.write_text('[[prune]]\ntargets = ["*encoder.layer.*"]\nmethod = "magnitude"\ndensity = 0.5\n'
                    '[train]\nsteps = 2\n')
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["compile", str(model), "--spec", str(spec), "-o", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    line = err.getvalue().strip()
    assert "captured with the keyword inputs attention_mask, input_ids" in line
    assert "also gives token_type_ids: add them to example_inputs()" in line
