"""End to end: a small transformers BERT classifier (hidden 64, 2 layers, sequence 16) compiled with
movement pruning to density 0.1 (global) on a synthetic task, fine-pruned for 100 steps with the
cubic schedule: the loss goes down and the masks end at exactly the asked density (within one
block for block runs)."""
from __future__ import annotations

import pytest
import torch

import sparsec

VOCAB, SEQ, BATCH, STEPS = 64, 16, 16, 100


def bert_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def task_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1 when most tokens are in the lower half of the vocabulary (a bag-of-words rule)."""
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    ids[:, 0] = 0  # a [CLS]-like token
    low = (ids[:, 1:] < VOCAB // 2).sum(dim=1)
    return ids, (low > (SEQ - 1) // 2).long()


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from two threads, and a busy machine makes them wait on each
    other (run times from 5 s to 60 s); one thread keeps the test steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("block", [(1, 1), (16, 16)], ids=["unstructured", "blocks16"])
def test_bert_movement_pruning_to_ten_percent(block, one_thread):
    model = bert_classifier()
    ids, _ = task_batch(0)
    spec = {
        "prune": [{"targets": ["bert.encoder.layer.*"], "method": "movement", "density": 0.1,
                   "scope": "global", "block": list(block)}],
        "schedule": {"kind": "cubic", "total": 80, "warmup": 10, "cooldown": 20},
    }
    prog = sparsec.compile(model, spec, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert len(prog.sites) == 12  # 2 layers x (query, key, value, attention output, intermediate, output)
    assert all(s.name.startswith("bert.encoder.layer.") for s in prog.sites)
    opt = torch.optim.AdamW([{"params": prog.model_parameters(), "lr": 1e-3},
                             {"params": prog.score_parameters(), "lr": 1e-2}], weight_decay=0.0)
    prog.train()
    losses = []
    for step in range(STEPS):
        ids, labels = task_batch(step)
        logits = prog(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits, labels) + prog.regularization()
        loss.backward()
        opt.step()
        prog.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, losses
    masks = prog.masks()
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    if block == (1, 1):
        assert kept == round(0.1 * total)
    else:
        assert abs(kept - 0.1 * total) <= block[0] * block[1]
    assert prog.target_density() == 0.1
    # eval on fresh batches: the pruned classifier learned the rule better than chance
    prog.eval()
    with torch.no_grad():
        ids, labels = task_batch(10_000)
        accuracy = (prog(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax(-1) == labels)
    assert float(accuracy.float().mean()) >= 0.75
