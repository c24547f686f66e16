"""Memory and time overhead of PINS self-regularization (PINS section 6 reports about 27% memory
and 30% time for BERT-base on GPU).

    .venv/bin/python bench/self_regularization.py [--repeats 10] [--layers 4] [--hidden 256]

A small BERT classifier (default 4 layers, hidden 256, 4 heads, intermediate 1024), batch 16,
sequence 64, pruned with `pins` (global, density 0.2, every encoder linear) and AdamW. One step
= forward, loss (+ lambda * KL(checkpoint || model) with self-regularization), backward,
optimizer.step(), prog.step(), zero_grad. Time: interleaved steps, medians. Memory: each variant
runs alone in a fresh process; reported is its peak resident memory minus the resident memory
once the model and data exist (so Python and torch themselves are not counted).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median  # noqa: E402

import sparsec  # noqa: E402
from sparsec.training.distill import SelfRegularizer  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                        intermediate_size=4 * args.hidden, num_labels=2, vocab_size=8000)
    model = BertForSequenceClassification(config).train()
    ids = torch.randint(0, config.vocab_size, (16, 64))
    labels = torch.randint(0, 2, (16,))
    spec = {"prune": [{"targets": ["bert.encoder.layer.*"], "method": "pins", "density": 0.2,
                       "scope": "global"}],
            "schedule": {"kind": "cubic", "total": 100, "warmup": 1, "cooldown": 10}}
    prog = sparsec.compile(model, spec, (ids,))
    prog.train()
    opt = torch.optim.AdamW(prog.parameters(), lr=3e-5)
    prog.attach_optimizer(opt)
    return prog, opt, ids, labels


def make_step(prog, opt, ids, labels, self_reg):
    def step() -> None:
        out = prog(ids)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + prog.regularization()
        if self_reg is not None:
            loss = loss + self_reg.loss(out, ids)
        loss.backward()
        opt.step()
        prog.step()
        opt.zero_grad()
    return step


def measure_memory(args) -> None:
    """One variant in this process: print its training memory (MB) as JSON."""
    prog, opt, ids, labels = build(args)
    base = _rss_mb()
    self_reg = SelfRegularizer(prog) if args.mode == "self_reg" else None
    step = make_step(prog, opt, ids, labels, self_reg)
    for _ in range(args.repeats):
        step()
    print(json.dumps({"mode": args.mode, "train_mb": _peak_mb() - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mode", choices=("plain", "self_reg"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.mode:
        measure_memory(args)
        return
    memory = {}
    for mode in ("plain", "self_reg"):
        cmd = [sys.executable, __file__, "--mode", mode, "--repeats", "4", "--layers", str(args.layers),
               "--hidden", str(args.hidden)]
        memory[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                                  .stdout.strip().splitlines()[-1])["train_mb"]
    prog, opt, ids, labels = build(args)
    plain = make_step(prog, opt, ids, labels, None)
    self_reg = make_step(prog, opt, ids, labels, SelfRegularizer(prog))
    times = interleaved({"plain": plain, "self_reg": self_reg}, repeats=args.repeats)
    t_plain, t_self = median(times["plain"]), median(times["self_reg"])
    print(f"machine: {machine()}")
    print(f"BERT {args.layers} layers, hidden {args.hidden}, batch 16, seq 64, pins global 0.2, AdamW; "
          f"{args.repeats} interleaved steps, medians")
    print(f"step without self-regularization  {t_plain * 1000:8.1f} ms   memory {memory['plain']:8.1f} MB")
    print(f"step with self-regularization     {t_self * 1000:8.1f} ms   memory {memory['self_reg']:8.1f} MB")
    print(f"overhead                          {100 * (t_self / t_plain - 1):7.1f} %   "
          f"memory {100 * (memory['self_reg'] / memory['plain'] - 1):7.1f} %   (PINS: ~30% time, ~27% memory)")


if __name__ == "__main__":
    main()
