"""SparsecTrainer: a Hugging Face Trainer script fine-prunes a small BERT with movement pruning,
resumes from a Trainer checkpoint to the same state as an uninterrupted run, and writes a normal
`save_pretrained` folder with the zeros baked in that `from_pretrained` reloads."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from sparsec.integrations.hf import SparsecTrainer  # noqa: E402

STEPS = 20
SPEC = {"prune": [{"targets": ["*encoder.layer.*"], "method": "movement", "density": 0.25, "block": [8, 8],
                   "scope": "global"}],
        "schedule": {"kind": "cubic", "total": STEPS, "warmup": 2, "cooldown": 4}}


class Sentences(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(1, 60, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": int(ids[0] % 2)}


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=2))


def trainer(folder, model=None) -> SparsecTrainer:
    args = TrainingArguments(output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-3, save_strategy="steps", save_steps=10, logging_steps=5,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return SparsecTrainer(model or bert(), SPEC, args=args, train_dataset=Sentences(), score_learning_rate=5e-2)


def test_trainer_prunes_resumes_and_saves_a_normal_folder(tmp_path):
    first = trainer(tmp_path / "run")
    first.train()
    prog = first.program
    assert int(prog.step_count) == STEPS
    masks = prog.masks()
    assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * sum(m.numel() for m in masks.values()))
    assert first.objective.labels_to_model  # the model's own loss, labels passed through
    groups = first.optimizer.param_groups
    assert groups[-1]["params"] == prog.score_parameters() and groups[-1]["weight_decay"] == 0.0

    # resume from the step-10 checkpoint: the same end as the uninterrupted run
    second = trainer(tmp_path / "run")
    second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-10"))
    assert int(second.program.step_count) == STEPS
    resumed = second.program.state_dict()
    assert all(torch.equal(resumed[name], value) for name, value in prog.state_dict().items())

    # save_pretrained / from_pretrained: zeros baked in, same logits as the finalized program
    model = first.finalize_into()
    model.save_pretrained(tmp_path / "pruned")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    batch = {k: torch.stack([Sentences()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = prog.finalize()(**batch, labels=torch.zeros(4, dtype=torch.long)).logits
        torch.testing.assert_close(reloaded(**batch).logits, want, rtol=1e-5, atol=1e-6)
    weight = reloaded.bert.encoder.layer[0].attention.self.query.weight
    site = "bert.encoder.layer.0.attention.self.query.weight"
    assert bool((weight[masks[site] == 0] == 0).all()) and bool((weight[masks[site] == 1] != 0).all())


# ------------------------------------------------------------------ DDP through the Trainer's launch
SCRIPT = '''
import json, os, sys
import torch
sys.path.insert(0, {root!r})
from tests.test_hf_trainer import Sentences, bert
from transformers import TrainingArguments
from sparsec.integrations.hf import SparsecTrainer
from sparsec.training import distributed
from sparsec.training.distributed import mask_digests

spec = json.loads({spec!r})
args = TrainingArguments(output_dir={out!r}, max_steps={steps}, per_device_train_batch_size=8, learning_rate=1e-3,
                         save_strategy="steps", save_steps=10, report_to=[], use_cpu=True, seed=0,
                         disable_tqdm=True, ddp_backend="gloo")
trainer = SparsecTrainer(bert(), spec, args=args, train_dataset=Sentences(), score_learning_rate=5e-2)
trainer.train()
prog = trainer.program
rank = torch.distributed.get_rank()
result = {{"world": torch.distributed.get_world_size(), "steps": int(prog.step_count),
          "digests": mask_digests(prog), "kept": sum(int(m.sum()) for m in prog.masks().values()),
          "total": sum(m.numel() for m in prog.masks().values())}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)
distributed.shutdown()   # a gloo group left to the interpreter's exit can abort the process
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)   # and so, now and then, can torch's teardown of DDP's objects after it (2 of 14 runs under load)
'''

LM_SPEC = {"prune": [{"targets": ["*encoder.layer.*"], "method": "lm", "density": 0.25, "scope": "global",
                      "fisher_examples": 16, "fisher_chunk": 4}],
           "schedule": {"kind": "linear", "total": STEPS, "warmup": 2, "cooldown": 2, "iterations": 4}}


@pytest.mark.parametrize("spec", [SPEC, pytest.param(LM_SPEC, marks=pytest.mark.slow)], ids=["movement", "lm"])
def test_trainer_under_torchrun_keeps_identical_masks_on_two_processes(spec, tmp_path):
    """`torchrun --nproc_per_node 2 script.py` with a SparsecTrainer: DDP from the Trainer's launch,
    each process on its shard of the data; the masks (checked across processes at every update with
    SPARSEC_CHECK_RANKS=1) are identical and at the asked density, and only rank 0 saves."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=root, spec=json.dumps(spec), out=str(out), steps=STEPS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SPARSEC_CHECK_RANKS="1", OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [STEPS, STEPS]
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["kept"] == round(0.25 * ranks[0]["total"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-10",
                                                                                        "checkpoint-20"]


def test_the_trainers_fsdp_is_refused_with_the_alternative(tmp_path):
    from sparsec.errors import TrainingError
    from sparsec.integrations.hf import ProgramStep

    t = trainer(tmp_path / "run")
    t.is_fsdp_enabled = True   # what the Trainer sets when accelerate's FSDP plugin is on
    step = next(c for c in t.callback_handler.callbacks if isinstance(c, ProgramStep))
    with pytest.raises(TrainingError, match=r'parallel = "fsdp"'):
        step.on_train_begin(t.args, t.state, t.control)
