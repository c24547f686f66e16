"""The machinery of replications 1 and 3 (bench/replicate/movement_pruning.py, pins_vs_movement.py,
_polarity.py) at a tiny scale: a 2-layer BERT of random weights and synthetic sentences stand in for
MiniLM and the polarity corpus (nothing is downloaded). A run goes through sparsec's fine-pruning
loop, is cached once, and both scripts write their JSON and plots."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "replicate"
sys.path.insert(0, str(BENCH))

import _polarity as pol
import movement_pruning as mp
import pins_vs_movement as pv

SEQ = 8


def _stand_in() -> types.ModuleType:
    """The functions of examples/minilm_sentiment/model.py that _polarity uses, on 80 synthetic
    sentences whose label is the parity of their first token."""
    from transformers import BertConfig, BertModel

    from sparsec.modelfile import import_file

    example = import_file(pol.EXAMPLE)      # only for its Classifier (importing it loads nothing)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (80, SEQ), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}
    module = types.ModuleType("stand_in")

    def split(train: bool) -> dict:
        part = slice(16, None) if train else slice(0, 16)
        return {k: v[part] for k, v in data.items()}

    def build_model() -> torch.nn.Module:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=SEQ)
        return example.Classifier(BertModel(config, add_pooling_layer=False), 16)

    module._split, module._encoded, module.build_model = split, lambda: data, build_model
    module.example_inputs = lambda: (ids[:2], torch.ones_like(ids[:2]))
    return module


@pytest.fixture(scope="module")
def task() -> pol.Task:
    return pol.Task(SEQ, example=_stand_in(), n_val=8)


def test_scaled_spec_keeps_the_shipped_recipe_and_proportions():
    spec = pol.scaled_spec("movement", density=0.03, scope="global", seed=3, steps=100, batch=8)
    assert spec["prune"][0] | {"density": 0.03, "scope": "global"} == spec["prune"][0]
    assert (spec["schedule"]["total"], spec["schedule"]["warmup"], spec["schedule"]["cooldown"]) == (100, 10, 20)
    assert spec["train"]["freeze"] == ["*embeddings*"] and spec["train"]["warmup_steps"] == 10
    assert spec["train"]["lr_schedule"] == "linear" and spec["train"]["seed"] == 3
    assert "self_regularization" not in pol.scaled_spec("pins", density=0.1, scope="global", seed=0, steps=10,
                                                        batch=8, self_regularization=None)


def test_runs_are_cached_shared_and_both_scripts_write(task, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    mp_args = types.SimpleNamespace(steps=3, batch=8, seq_len=SEQ, seeds=[0], priority=1, cache=cache,
                                    out=tmp_path / "movement_pruning.json")
    run = mp.run_one(task, "plain", "movement", 0.1, 0, mp_args)
    for key in ("method", "density", "seed", "metric", "loss", "delta_loss", "steps", "seconds"):
        assert key in run
    assert run["method"] == "movement" and run["steps"] == 3 and run["scope"] == "local"
    assert abs(run["density_reached"] - 0.1) < 0.01 and set(run["per_layer_density"]) == {"0", "1"}
    mp.write(mp_args, task, [pol.dense_pretrained(task, cache), run])
    assert (tmp_path / "movement_pruning.png").exists()

    def never(*args, **kwargs):
        raise AssertionError("a cached run was computed again")

    with monkeypatch.context() as patch:
        patch.setattr("sparsec.training.loop.fine_prune", never)
        again = mp.run_one(task, "plain", "movement", 0.1, 0, mp_args)    # read back, not rerun
        assert again == run
        # replication 3's MvP at 90% is the same run (the same spec)
        pv_args = pv.parse(["--steps", "3", "--batch", "8", "--seq-len", str(SEQ), "--seeds", "0", "--priority",
                            "1", "--cache", str(cache), "--out", str(tmp_path / "pins_vs_movement.json")])
        written = pv.collect(task, pv_args)
    assert [r["method"] for r in written["runs"]] == ["dense", "movement"]
    assert (tmp_path / "pins_vs_movement.png").exists()


def test_distillation_from_a_fine_tuned_teacher(task, tmp_path):
    folder, dense = pol.dense_teacher(task, seed=0, steps=2, batch=8, cache=tmp_path)
    assert (folder / "model.safetensors").exists() and dense["method"] == "dense"
    spec = pol.scaled_spec("movement_distill", density=0.5, scope="local", seed=0, steps=2, batch=8)
    run = pol.fine_prune_run(task, "distill", spec, teacher=folder, cache=tmp_path)
    assert run["distill"] and run["steps"] == 2
