"""Replication 1 of issue 11: movement pruning (Sanh, Wolf & Rush 2020), the shape of Table 2 and
the picture of Figure 6, on all-MiniLM-L6-v2 fine-pruned on the Pang & Lee polarity sentences.

    .venv/bin/python bench/replicate/movement_pruning.py [--steps 120] [--batch 16] [--seq-len 32] \
        [--seeds 0 1] [--priority 9] [--with-pins]

Model, data and the fine-pruning of one run: bench/replicate/_polarity.py (the example
examples/minilm_sentiment/model.py: pre-trained MiniLM, head fitted on frozen embeddings; 3,000
training, 200 validation and 800 test sentences). Every encoder linear (36 matrices) is pruned by
sparsec's `magnitude` (MaP), `movement` (MvP), `soft_movement` (soft MvP) and `l0` (L0
regularization, hard concrete), each from its shipped spec (specs/<method>.toml: frozen embeddings,
AdamW, weights lr 3e-5 and scores 1e-2 with linear warm-up and decay, cubic sparsity schedule with
10% warm-up and 20% cool-down) with only the budget scaled; at 10% remaining MaP and MvP are local
(as the shipped specs), at 3% global (the shipped specs' advice for density <= 0.03, and Figure 6's
set-up); soft MvP and L0 are global by nature. MvP with distillation (specs/movement_distill.toml:
alpha 0.9, T 2) uses as teacher a dense MiniLM fine-tuned on the same data with the same recipe
(Table 3: a separately fine-tuned model), which is also the dense row.

Scaled down for one thread of a shared 2-core CPU (all settings chosen before any result was
seen, said in docs/RESULTS.md): `--steps` optimizer steps of `--batch` sentences (default 120 x
16, 0.64 epoch; the paper: 6 to 10 epochs of SQuAD / MNLI / QQP), sentences cut at `--seq-len`
tokens (32: about 30% of them are longer), 2 seeds for the runs that decide the ordering
(MaP / MvP / soft MvP at 10% and 3%, and, last, MvP + distillation) and 1 for the others. Runs
are done in priority order (the deciding ones first, `--priority` stops after a level) and cached one by one in
bench/replicate/results/.cache-polarity/ (shared with pins_vs_movement.py); an interrupted run
resumes where it stopped.

Writes bench/replicate/results/movement_pruning.json ({"runs": [...], "machine": ...}: method,
density, seed, metric = test accuracy, loss = test cross-entropy, delta_loss = null, steps,
seconds, plus scope, distill, per-layer and per-site densities), movement_pruning.png (accuracy
against remaining weights) and movement_pruning_fig6.png (per-layer remaining weights, global MvP
against global MaP at 3%).
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

OUT = HERE / "results" / "movement_pruning.json"
NAMES = {"magnitude": "MaP", "movement": "MvP", "soft_movement": "soft MvP", "l0": "L0",
         "movement+distill": "MvP + distil", "dense": "dense"}
# Table 2 of the paper (MvP + distillation: Table 3), BERT-base, remaining weights -> method -> (SQuAD F1, MNLI acc m, QQP acc).
PAPER_TABLE2 = {
    "1.0": {"dense": (88.1, 84.5, 91.4)},
    "0.1": {"magnitude": (78.5, 77.8, 78.8), "l0": (80.1, 77.9, 87.6), "movement": (81.7, 79.3, 89.1),
            "soft_movement": (81.5, 80.7, 90.2), "movement+distill": (84.3, 80.1, 89.7)},
    "0.03": {"magnitude": (54.5, 68.9, 72.1), "l0": (73.6, 75.2, 86.5), "movement": (76.3, 76.1, 85.6),
             "soft_movement": (79.9, 79.0, 89.2), "movement+distill": (78.0, 76.5, 86.1)},
}


def scope_for(method: str, density: float) -> str:
    if method in ("soft_movement", "l0"):
        return "global"
    return "global" if density <= 0.03 else "local"


def plan(seeds: list[int]) -> list[tuple[int, str, str, float, int]]:
    """(priority, kind, method, density, seed), the deciding runs first."""
    first, second = seeds[0], seeds[1:]
    runs = [(1, "plain", m, d, first) for d in (0.1, 0.03) for m in ("magnitude", "movement", "soft_movement")]
    runs += [(3, "plain", m, d, s) for s in second for d in (0.1, 0.03)
             for m in ("magnitude", "movement", "soft_movement")]
    runs += [(5, "distill", "movement", d, first) for d in (0.1, 0.03)]
    runs += [(6, "plain", "l0", d, first) for d in (0.1, 0.03)]
    runs += [(7, "plain", m, 0.5, first) for m in ("magnitude", "movement")]
    runs += [(8, "plain", m, 0.5, first) for m in ("soft_movement", "l0")]
    runs += [(9, "distill", "movement", d, s) for s in second for d in (0.03, 0.1)]
    return runs


def run_one(task: pol.Task, kind: str, method: str, density: float, seed: int, args,
            teacher: Path | None = None) -> dict:
    scope = scope_for(method, density)
    if kind == "distill":
        spec = pol.scaled_spec("movement_distill", density=density, scope=scope, seed=seed,
                               steps=args.steps, batch=args.batch)
        return pol.fine_prune_run(task, f"movement-distill-{density}-{scope}-s{seed}", spec,
                                  teacher=teacher, method="movement", cache=args.cache)
    spec = pol.scaled_spec(method, density=density, scope=scope, seed=seed, steps=args.steps, batch=args.batch)
    return pol.fine_prune_run(task, f"{method}-{density}-{scope}-s{seed}", spec, cache=args.cache)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pol.common_arguments(parser, OUT)
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plots of --out's runs")
    parser.add_argument("--with-pins", action="store_true",
                        help="also run replication 3 (pins_vs_movement.py, same settings) in this process, "
                             "both plans interleaved by priority level")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())["runs"]))
        return
    if args.plot_only:
        written = json.loads(args.out.read_text())
        runs = written["runs"]
        plot(runs, args.out.with_suffix(".png"), written["settings"].get("test_majority_class"))
        plot_fig6(runs, args.out.with_name(args.out.stem + "_fig6.png"))
        return
    torch.set_num_threads(args.threads)
    task = pol.Task(args.seq_len)
    if not args.with_pins:
        collect(task, args)
        return
    import pins_vs_movement as pv

    pv_args = pv.parse(["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                        "--cache", str(args.cache), "--out", str(args.out.with_name("pins_vs_movement.json")),
                        "--seeds", *map(str, args.seeds)])
    last = args.priority
    for level in range(1, last + 1):   # every level's runs of both plans before the next level's
        args.priority = pv_args.priority = level
        collect(task, args)
        pv.collect(task, pv_args)


def collect(task: pol.Task, args) -> dict:
    runs = [pol.dense_pretrained(task, args.cache)]
    teacher = None
    for priority, kind, method, density, seed in plan(args.seeds):
        if priority > args.priority:
            break
        if kind == "distill" and teacher is None:
            teacher, dense_run = pol.dense_teacher(task, seed=seed, steps=args.steps, batch=args.batch,
                                                   cache=args.cache)
            runs.append(dense_run)
        run = run_one(task, kind, method, density, seed, args, teacher)
        runs.append(run)
        write(args, task, runs)     # after every run: a partial result is never lost
    return write(args, task, runs)


def write(args, task: pol.Task, runs: list[dict]) -> dict:
    settings = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "seeds": args.seeds,
                "priority": args.priority, "truncated_fraction": task.truncated(),
                "train_sentences": len(task.train), "val_sentences": len(task.val),
                "test_sentences": len(task.test), "test_majority_class": pol.majority(task.test)}
    slim = [{k: v for k, v in r.items() if k != "spec"} for r in runs]
    result = {"runs": slim, "machine": pol.machine_info(), "settings": settings,
              "paper_table2_bert_base_squad_f1_mnli_qqp": PAPER_TABLE2}
    pol.write_json(args.out, result)
    plot(slim, args.out.with_suffix(".png"), settings["test_majority_class"])
    plot_fig6(slim, args.out.with_name(args.out.stem + "_fig6.png"))
    return result


def summary(values: list[float]) -> str:
    """Mean ± half the min-max range, in percent, and the number of seeds."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f} (1)"
    return f"{np.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f} ({len(values)}: " + \
        " / ".join(f"{v:.1f}" for v in values) + ")"


def table(runs: list[dict]) -> str:
    header = ("| remaining | method | test accuracy % ours (mean ± half range, seeds) | reached density | "
              "paper BERT-base SQuAD F1 / MNLI acc / QQP acc |")
    lines = [header, "|---|---|---|---|---|"]
    for density in sorted({r["density"] for r in runs}, reverse=True):
        groups = [(m, [r for r in runs if key(r) == m and r["density"] == density]) for m in NAMES if m != "dense"]
        groups += [("dense", [r]) for r in runs if key(r) == "dense" and r["density"] == density]
        for method, mine in groups:
            if not mine:
                continue
            paper = PAPER_TABLE2.get(str(density), {}).get(method)
            if method == "dense" and not any("fine-tuned" in r["label"] for r in mine):
                paper = None    # the paper's dense row is a fine-tuned BERT
            reached = " / ".join(f"{r.get('density_reached', 1.0):.3f}" for r in mine)
            label = " / ".join(sorted({r["label"] for r in mine})) if method == "dense" else NAMES[method]
            scope = "" if method == "dense" else f" ({mine[0].get('scope')})"
            lines.append(f"| {100 * density:g}% | {label}{scope} | {summary([r['metric'] for r in mine])} | "
                         f"{reached} | {' / '.join(map(str, paper)) if paper else '-'} |")
    return "\n".join(lines)


def key(run: dict) -> str:
    if run["method"] == "dense":
        return "dense"
    return "movement+distill" if run.get("distill") else run["method"]


def plot(runs: list[dict], path: Path, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=80)
    colors = {"magnitude": "#888888", "movement": "#d62728", "soft_movement": "#1f77b4", "l0": "#2ca02c",
              "movement+distill": "#9467bd"}
    for method, color in colors.items():
        mine = [r for r in runs if key(r) == method]
        densities = sorted({r["density"] for r in mine})
        if not densities:
            continue
        means = [np.mean([r["metric"] for r in mine if r["density"] == d]) for d in densities]
        lows = [min(r["metric"] for r in mine if r["density"] == d) for d in densities]
        highs = [max(r["metric"] for r in mine if r["density"] == d) for d in densities]
        ax.errorbar([100 * d for d in densities], [100 * m for m in means],
                    yerr=[[100 * (m - lo) for m, lo in zip(means, lows)], [100 * (h - m) for m, h in zip(means, highs)]],
                    marker="o", ms=4, capsize=3, color=color,
                    label=NAMES[method] + (" (empty masks: see RESULTS.md)" if method == "l0" and any(
                        r.get("density_reached", 1.0) == 0.0 for r in mine) else ""))
    styles = iter(["--", ":"])
    for r in runs:
        if r["method"] == "dense":
            ax.axhline(100 * r["metric"], color="black", lw=0.8, ls=next(styles, "-."), label=f"dense, {r['label']}")
    if chance is not None:
        ax.axhline(100 * chance, color="#bbbbbb", lw=0.8, label="majority class")
    ax.set_xscale("log")
    ax.set_xticks([3, 10, 50, 100], ["3", "10", "50", "100"])
    ax.set_xlabel("remaining weights in the encoder (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 fine-pruned on polarity (min-max over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_fig6(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = {m: [r for r in runs if key(r) == m and r.get("scope") == "global" and r["density"] == 0.03]
              for m in ("magnitude", "movement", "soft_movement")}
    if not (picked["magnitude"] and picked["movement"]):
        return
    fig, ax = plt.subplots(figsize=(5.0, 3.0), dpi=80)
    for (method, mine), offset, color in zip(picked.items(), (-0.27, 0.0, 0.27), ("#888888", "#d62728", "#1f77b4")):
        if not mine:
            continue
        layers = sorted(int(k) for k in mine[0]["per_layer_density"])
        values = [100 * np.mean([r["per_layer_density"][str(layer)] for r in mine]) for layer in layers]
        ax.bar([layer + 1 + offset for layer in layers], values, width=0.27, color=color,
               label=f"global {NAMES[method]} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("remaining weights (%)")
    ax.set_title("Figure 6 picture: global selection, 3% remaining overall", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
