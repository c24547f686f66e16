"""Training-step overhead of movement pruning vs the dense model.

    .venv/bin/python bench/train_overhead.py [--repeats 10] [--every 1]

MiniLM-size BERT (6 layers, hidden 384, 12 heads, intermediate 1536; the all-MiniLM-L6-v2
shape) with a classification head, batch 16, sequence 128. Dense: the eager model. Sparse: the
sparsec Program with movement pruning (global, density 0.1, every encoder linear, block 1x1),
masks recomputed every `--every` steps. One step = forward, loss, backward, AdamW step (same
optimizer settings for both), `prog.step()`, zero_grad. Runs are interleaved, medians reported.
Target (DESIGN.md): sparse / dense <= 1.10.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median  # noqa: E402

import sparsec  # noqa: E402


def adamw(groups) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, lr=3e-5, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=3e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--settle", type=int, default=10, help="sparse steps before timing")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, num_labels=2)
    dense = BertForSequenceClassification(config).train()
    ids = torch.randint(0, config.vocab_size, (16, 128))
    labels = torch.randint(0, 2, (16,))
    spec = {"prune": [{"targets": ["bert.encoder.layer.*"], "method": "movement", "density": 0.1,
                       "scope": "global"}],
            "schedule": {"kind": "constant", "every": args.every}}
    prog = sparsec.compile(copy.deepcopy(dense), spec, (ids,))
    prog.train()
    opt_dense = adamw(dense.parameters())
    opt_sparse = adamw([{"params": prog.model_parameters()},
                        {"params": prog.score_parameters(), "lr": 1e-2, "weight_decay": 0.0}])

    def dense_step() -> None:
        loss = torch.nn.functional.cross_entropy(dense(ids).logits, labels)
        loss.backward()
        opt_dense.step()
        opt_dense.zero_grad()

    def sparse_step() -> None:
        loss = torch.nn.functional.cross_entropy(prog(ids).logits, labels) + prog.regularization()
        loss.backward()
        opt_sparse.step()
        prog.step()
        opt_sparse.zero_grad()

    for _ in range(args.settle):  # scores move away from their constant start
        sparse_step()
    times = interleaved({"dense": dense_step, "movement": sparse_step}, repeats=args.repeats)
    t_dense, t_sparse = median(times["dense"]), median(times["movement"])
    print(f"machine: {machine()}")
    print(f"MiniLM-size BERT, batch 16, seq 128, {args.repeats} interleaved steps, medians; "
          f"masks every {args.every} step(s); density {prog.density():.4f}")
    print(f"dense step            {t_dense * 1000:8.1f} ms")
    print(f"movement step         {t_sparse * 1000:8.1f} ms")
    print(f"ratio                 {t_sparse / t_dense:8.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
