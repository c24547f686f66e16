"""Replication 3 of issue 11: PINS (Ren & Zhu 2023) against movement pruning at 80% and 90% sparsity
(the claim of its Table 1: PINS >= soft MvP and MvP; and of Table 6: self-regularization helps), on
all-MiniLM-L6-v2 fine-pruned on the Pang & Lee polarity sentences.

    .venv/bin/python bench/replicate/pins_vs_movement.py [--steps 120] [--batch 16] [--seq-len 32] \
        [--seeds 0 1] [--priority 9]

Model, data and the fine-pruning of one run: bench/replicate/_polarity.py (shared with
movement_pruning.py, whose cache it shares: MvP and soft MvP at density 0.1 are the same runs).
`pins` comes from specs/pins.toml (importance -g * dtheta_hat - g * theta, PLATON smoothing
beta1 0.85 / beta2 0.95, global Top_v, cubic schedule with 10% warm-up and 20% cool-down, AdamW lr
3e-5 constant, nothing frozen) without its [self_regularization] table, and with it (lambda 1,
T 1; the checkpoint is refreshed when accuracy on the 200 validation sentences improves, evaluated
every `--eval-every` steps: the shipped 500 of 20000 steps would be every 3 steps here). MvP
(local, as specs/movement.toml at these densities) and soft MvP (global) from their shipped specs.

Scaled down for one thread of a shared 2-core CPU (chosen before any result was seen; see
docs/RESULTS.md): `--steps` x `--batch` (120 x 16 sentences: 0.64 epoch; PINS fine-prunes GLUE for
several epochs), batch 16 for every method (PINS searched {16, 32}; the shipped pins spec says 32),
sentences cut at `--seq-len` tokens, 2 seeds for PINS and MvP at 90% sparsity (the deciding pair)
and, last, for PINS with self-regularization, 1 for the others.

Writes bench/replicate/results/pins_vs_movement.json ({"runs": [...], "machine": ...}: method,
density, seed, metric = test accuracy, loss = test cross-entropy, delta_loss = null, steps,
seconds, plus self_regularization, checkpoint_refreshes) and pins_vs_movement.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import _polarity as pol
from _common import save_figure
from movement_pruning import scope_for

OUT = HERE / "results" / "pins_vs_movement.json"
# PINS Table 1, BERT-base, GLUE dev, average over the 8 tasks and SST-2 accuracy.
PAPER_TABLE1 = {"0.2": {"soft_movement": {"avg": 79.5, "sst2": 89.0}, "pins": {"avg": 83.5, "sst2": 91.9}},
                "0.1": {"soft_movement": {"avg": 72.1, "sst2": 87.4}, "pins": {"avg": 81.3, "sst2": 91.0}},
                "0.0": {"fine-tune": {"avg": 83.4, "sst2": 92.4}}}
# PINS Table 6 (80% sparsity, RTE / CoLA / MRPC): empirical risk vs with self-regularization.
PAPER_TABLE6 = {"empirical risk": (70.9, 55.4, 90.6), "self-regularization": (72.7, 57.1, 90.9)}
LABELS = {"pins": "PINS", "pins+sr": "PINS + self-reg.", "movement": "MvP", "soft_movement": "soft MvP"}


def plan(seeds: list[int]) -> list[tuple[int, str, float, int]]:
    """(priority, variant, density, seed), the deciding runs (PINS vs MvP at 90%) first; the MvP
    and soft MvP runs at 0.1 are shared with movement_pruning.py (its priority 1 and 3)."""
    first, second = seeds[0], seeds[1:]
    runs = [(1, "movement", 0.1, first), (2, "pins", 0.1, first), (2, "soft_movement", 0.1, first)]
    runs += [(3, "movement", 0.1, s) for s in second]
    runs += [(4, "pins", 0.1, s) for s in second]
    runs += [(4, "pins+sr", 0.1, first), (4, "pins", 0.2, first), (4, "movement", 0.2, first),
             (4, "soft_movement", 0.2, first)]
    runs += [(5, "soft_movement", 0.1, s) for s in second]
    runs += [(6, "pins+sr", 0.1, s) for s in second]
    return runs


def run_one(task: pol.Task, variant: str, density: float, seed: int, args) -> dict:
    if variant.startswith("pins"):
        sr = variant == "pins+sr"
        spec = pol.scaled_spec("pins", density=density, scope="global", seed=seed, steps=args.steps,
                               batch=args.batch, eval_every=args.eval_every if sr else 0)
        if not sr:
            spec.pop("self_regularization")
        return pol.fine_prune_run(task, f"{variant}-{density}-s{seed}", spec, cache=args.cache)
    scope = scope_for(variant, density)
    spec = pol.scaled_spec(variant, density=density, scope=scope, seed=seed, steps=args.steps, batch=args.batch)
    return pol.fine_prune_run(task, f"{variant}-{density}-{scope}-s{seed}", spec, cache=args.cache)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pol.common_arguments(parser, OUT)
    parser.add_argument("--eval-every", type=int, default=10,
                        help="self-regularization: evaluate (and maybe refresh the checkpoint) every n steps")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot of --out's runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())["runs"]))
        return
    if args.plot_only:
        written = json.loads(args.out.read_text())
        plot(written["runs"], args.out.with_suffix(".png"), written["settings"].get("test_majority_class"))
        return
    torch.set_num_threads(args.threads)
    collect(pol.Task(args.seq_len), args)


def collect(task: pol.Task, args) -> dict:
    runs = [pol.dense_pretrained(task, args.cache)]
    for priority, variant, density, seed in sorted(plan(args.seeds), key=lambda r: r[0]):
        if priority > args.priority:
            continue
        runs.append(run_one(task, variant, density, seed, args))
        write(args, task, runs)
    return write(args, task, runs)


def table(runs: list[dict]) -> str:
    from movement_pruning import summary

    header = ("| sparsity | method | test accuracy % ours (mean ± half range, seeds) | self-reg. refreshes | "
              "paper BERT-base GLUE avg. / SST-2 |")
    lines = [header, "|---|---|---|---|---|"]
    for density in sorted({r["density"] for r in runs}, reverse=True):
        for variant in ("dense", "movement", "soft_movement", "pins", "pins+sr"):
            mine = [r for r in runs if variant_of(r) == variant and r["density"] == density]
            if not mine:
                continue
            paper = PAPER_TABLE1.get(str(density), {}).get(variant)
            refresh = " / ".join(str(r["checkpoint_refreshes"]) for r in mine) if variant == "pins+sr" else "-"
            name = mine[0]["label"] if variant == "dense" else LABELS[variant]
            cite = f"{paper['avg']} / {paper['sst2']}" if paper else "-"
            lines.append(f"| {100 * (1 - density):g}% | {name} | {summary([r['metric'] for r in mine])} | "
                         f"{refresh} | {cite} |")
    return "\n".join(lines)


def variant_of(run: dict) -> str:
    return "pins+sr" if run.get("self_regularization") else run["method"]


def write(args, task: pol.Task, runs: list[dict]) -> dict:
    settings = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "seeds": args.seeds,
                "eval_every_self_regularization": args.eval_every, "priority": args.priority,
                "truncated_fraction": task.truncated(), "train_sentences": len(task.train),
                "val_sentences": len(task.val), "test_sentences": len(task.test),
                "test_majority_class": pol.majority(task.test)}
    slim = [{k: v for k, v in r.items() if k not in ("spec", "site_density")} for r in runs]
    result = {"runs": slim, "machine": pol.machine_info(), "settings": settings,
              "paper_table1_bert_base_glue": PAPER_TABLE1, "paper_table6_rte_cola_mrpc": PAPER_TABLE6}
    pol.write_json(args.out, result)
    plot(slim, args.out.with_suffix(".png"), settings["test_majority_class"])
    return result


def plot(runs: list[dict], path: Path, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=80)
    variants = ["movement", "soft_movement", "pins", "pins+sr"]
    colors = ["#d62728", "#1f77b4", "#ff7f0e", "#8c564b"]
    for i, density in enumerate((0.2, 0.1)):
        for j, (variant, color) in enumerate(zip(variants, colors)):
            values = [100 * r["metric"] for r in runs if variant_of(r) == variant and r["density"] == density]
            if not values:
                continue
            x = i * (len(variants) + 1) + j
            ax.bar(x, np.mean(values), color=color, label=LABELS[variant] if i == 1 or density == 0.2 and j < 3 else None)
            ax.plot([x] * len(values), values, "k.", ms=4)
    for r in runs:
        if r["method"] == "dense":
            ax.axhline(100 * r["metric"], color="black", lw=0.8, ls="--", label="dense (pre-trained, head only)")
    if chance is not None:
        ax.axhline(100 * chance, color="#bbbbbb", lw=0.8, label="majority class")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right", ncol=2)
    ax.set_xticks([1.5, 6.5], ["80% sparsity", "90% sparsity"])
    ax.set_ylabel("test accuracy (%) (dots: seeds)")
    low = min([100 * r["metric"] for r in runs] + [50])
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_title("MiniLM-L6 on polarity: PINS vs movement pruning", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
