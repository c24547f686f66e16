"""Replication 2 of issue 11: loss modelling (Laurent et al. 2020), the ordering of Table 1.

    apt-get install dataset-fashion-mnist        # Debian: /usr/share/datasets/fashion-mnist
    .venv/bin/python bench/replicate/loss_modelling.py [--seeds 0 1] [--epochs 20] [--finetune 3] [--pi 1 20] ...

An MLP 784-300-100-10 (tanh, Glorot init, Appendix B.1) is trained with SGD (lr 0.01, momentum 0.9,
l2 5e-4, batches of 100: Appendix B.2) on Fashion-MNIST (the paper uses MNIST; 10000 training
examples held out for validation), then pruned to 98.85% sparsity (density 0.0115, global over the
three weight matrices) by sparsec's `magnitude` (MP, one shot), `lm`, `qm` and `obd` with pi = 1
and pi large (`[schedule] kind = "exponential"`, `at_once = true`: all iterations in one step with
a fresh estimate of g and the Gauss-Newton diagonal on 1000 training examples each, no training in
between: Algorithm 1). Delta-L = |L(pruned) - L(dense)| is the training loss change of the whole
prune on a fixed 10000-example subset of the training set, before any fine-tuning (Table 1). Then
the pruned network is fine-tuned with the same hyper-parameters and its test accuracy measured.

Scaled down for 2 loaded CPU cores (said in docs/RESULTS.md): `--epochs` of training (the paper:
400 with early stopping) and `--finetune` epochs of fine-tuning (the paper: as many as training),
pi at most `--pi` (the paper: 140), no lambda sweep (lambda = 0; Table 1 reports the best lambda).

Writes bench/replicate/results/loss_modelling.json ({"runs": [...], "machine": ...}: one run per
method, pi and seed with method, density, seed, metric (test accuracy after fine-tuning), loss
(training loss after pruning, before fine-tuning), delta_loss, steps, seconds, plus pi, loss_dense,
metric_pruned (test accuracy right after pruning), metric_dense) and loss_modelling.png.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import machine, save_figure  # noqa: E402

import sparsec  # noqa: E402
from sparsec.paths import write_text_atomically  # noqa: E402
from sparsec import estimation  # noqa: E402
from sparsec.training.losses import objective as objective_of  # noqa: E402

DATA = Path(os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DENSITY = 0.0115            # 98.85% of the parameters pruned (Appendix B.2)
PAPER_TABLE1 = {"magnitude": (2.02, 0.10), "obd": (1.83, 0.11), "lm": (1.17, 0.03), "qm": (1.05, 0.04)}


# ----------------------------------------------------------------------------------------- data
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = (DATA / name for name in FILES[split])
    if not images.exists() or not labels.exists():
        sys.exit(f"Fashion-MNIST not found in {DATA}: install it with\n"
                 f"    sudo apt-get install dataset-fashion-mnist\n"
                 f"(Debian/Ubuntu), or point FASHION_MNIST at a folder holding {', '.join(FILES[split])}")
    x = torch.from_numpy(_idx(images).reshape(-1, 784).astype(np.float32) / 255.0)
    return (x - 0.2860) / 0.3530, torch.from_numpy(_idx(labels).astype(np.int64))


# ---------------------------------------------------------------------------------------- model
def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.Tanh(), torch.nn.Linear(300, 100),
                                torch.nn.Tanh(), torch.nn.Linear(100, 10))
    for layer in model[::2]:
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> int:
    """SGD epochs over (x, y) in shuffled batches of 100; returns the number of steps."""
    opt = sgd([p for p in model.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(100):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    return steps


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = torch.cat([model(part) for part in x.split(2000)])
    return float(torch.nn.functional.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


# ---------------------------------------------------------------------------------------- prune
def spec_for(method: str, pi: int) -> dict:
    group = {"targets": ["*"], "method": method, "density": DENSITY, "scope": "global"}
    if method == "magnitude" or pi == 1:
        schedule = {"kind": "one_shot", "warmup": 1}
    else:
        schedule = {"kind": "exponential", "iterations": pi, "warmup": 1, "at_once": True}
    if method != "magnitude":
        group.update(fisher_examples=1000, fisher_chunk=1, curvature="ggn")
    return {"prune": [group], "schedule": schedule}


def prune(dense: torch.nn.Module, method: str, pi: int, x: torch.Tensor, y: torch.Tensor,
          seed: int) -> tuple[sparsec.Program, list[dict]]:
    """A pruned copy of `dense` (Algorithm 1 without the fine-tuning) and its iterations."""
    prog = sparsec.compile(copy.deepcopy(dense), spec_for(method, pi), (x[:2],))
    objective = objective_of(None)
    gen = torch.Generator().manual_seed(10_000 + seed)

    def examples():   # random mini-batches of the training set: 1000 fresh examples per estimate
        while True:
            idx = torch.randint(0, len(x), (100,), generator=gen)
            yield (x[idx], y[idx])

    iteration = estimation.before_pruning(prog, examples(), objective) if prog.estimate_due() else None
    prog.step()
    records = []
    if iteration is not None:
        iteration.finish(1, prog)
        records = iteration.records
    assert abs(prog.density() - DENSITY) < 1e-3, prog.density()
    return prog, records


# ------------------------------------------------------------------------------------------ run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds to run (several processes may each run one: see --combine)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="only merge these JSON files of earlier runs into --out (and its plot)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs before pruning")
    parser.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after pruning")
    parser.add_argument("--pi", type=int, nargs="+", default=[1, 20], help="pruning iterations")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "lm", "qm"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is far faster than 2 on a shared, loaded CPU)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loss_modelling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        write(args.out, {**parts[0], "runs": [r for part in parts for r in part["runs"]],
                         "settings": parts[0]["settings"] | {"seeds": sorted({r["seed"] for part in parts
                                                                              for r in part["runs"]})}})
        return

    x_all, y_all = load("train")
    x_test, y_test = load("test")
    runs = []
    for seed in args.seeds:
        split = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
        train_idx = split[10_000:]               # 10000 held out for validation (Appendix B.1)
        x, y = x_all[train_idx], y_all[train_idx]
        probe = torch.randperm(len(x), generator=torch.Generator().manual_seed(99 + seed))[:10_000]
        x_probe, y_probe = x[probe], y[probe]      # Delta-L on a fixed part of the training set
        start = time.perf_counter()
        dense = mlp(seed)
        train_steps = train(dense, x, y, args.epochs, seed)
        train_seconds = time.perf_counter() - start
        loss_dense, _ = loss_and_accuracy(dense, x_probe, y_probe)
        _, acc_dense = loss_and_accuracy(dense, x_test, y_test)
        print(f"seed {seed}: dense training loss {loss_dense:.4f}, test accuracy {acc_dense:.4f} "
              f"({train_steps} steps, {train_seconds:.0f} s)", flush=True)
        for method in args.methods:
            for pi in ([1] if method == "magnitude" else args.pi):
                start = time.perf_counter()
                prog, records = prune(dense, method, pi, x, y, seed)
                prune_seconds = time.perf_counter() - start
                loss_pruned, _ = loss_and_accuracy(prog, x_probe, y_probe)
                _, acc_pruned = loss_and_accuracy(prog, x_test, y_test)
                steps = train(prog, x, y, args.finetune, seed + 1)   # masks fixed: no prog.step()
                _, acc_tuned = loss_and_accuracy(prog, x_test, y_test)
                run = {"method": method, "density": DENSITY, "seed": seed, "metric": acc_tuned,
                       "loss": loss_pruned, "delta_loss": abs(loss_pruned - loss_dense),
                       "steps": train_steps + steps, "seconds": round(time.perf_counter() - start + train_seconds, 1),
                       "pi": pi, "loss_dense": loss_dense, "metric_dense": acc_dense,
                       "metric_pruned": acc_pruned, "prune_seconds": round(prune_seconds, 1),
                       "iterations_delta_loss": [r["delta_loss"] for r in records]}
                runs.append(run)
                print(f"  {method:9s} pi={pi:<4d} Delta-L {run['delta_loss']:.4f}  accuracy pruned "
                      f"{acc_pruned:.4f}, fine-tuned {acc_tuned:.4f}  ({prune_seconds:.0f} s to prune)", flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "combine"}
    write(args.out, {"runs": runs, "machine": machine() + " (shared, loaded)", "settings": settings,
                     "paper_table1_mlp_mnist": PAPER_TABLE1})


def write(out: Path, result: dict) -> None:
    """The JSON (atomically) and its plot."""
    write_text_atomically(out, json.dumps(result, indent=1))
    plot(result["runs"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["method"], r["pi"]) for r in runs},
                  key=lambda k: (["magnitude", "obd", "lm", "qm"].index(k[0]) if k[0] in PAPER_TABLE1 else 9, k[1]))
    labels = [f"{'MP' if m == 'magnitude' else m.upper()}" + ("" if m == "magnitude" else f"\npi={p}") for m, p in keys]
    means = [np.mean([r["delta_loss"] for r in runs if (r["method"], r["pi"]) == k]) for k in keys]
    spread = [np.std([r["delta_loss"] for r in runs if (r["method"], r["pi"]) == k]) for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    ax.bar(range(len(keys)), means, yerr=spread, color="#4a7ab5", capsize=3)
    ax.set_xticks(range(len(keys)), labels, fontsize=8)
    ax.set_ylabel("Delta-L (before fine-tuning)")
    ax.set_title("MLP 784-300-100-10, Fashion-MNIST, 98.85% pruned", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
