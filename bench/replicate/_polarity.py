"""Shared machinery of replications 1 (movement pruning, Table 2) and 3 (PINS vs movement) of issue 11:
all-MiniLM-L6-v2 fine-pruned on the Pang & Lee sentence polarity corpus by sparsec.

The model and corpus come from examples/minilm_sentiment/model.py (imported, not copied): the
pre-trained encoder with a linear head fitted on its frozen mean-pooled embeddings, and the 4,000
sentences shuffled once (seed 0). Its split is kept: the first 800 sentences are the test set; of
its 3,200 training sentences the first 200 are held out as a validation set (what `eval_data()`
returns to the fine-pruning loop: PINS self-regularization picks its checkpoint on it, never on the
test set) and the other 3,000 are the training set.

`fine_prune_run` compiles a copy of the dense model with a spec dict, fine-prunes it with
sparsec's own loop (`sparsec.training.loop.fine_prune`: freezing, learning-rate schedule,
distillation, self-regularization are the spec's), evaluates test accuracy and loss, and returns a
run dict (the issue's keys method, density, seed, metric, loss, delta_loss, steps, seconds, plus
per-site densities). Every finished run is cached as its own JSON in the cache folder, under a
name that holds a hash of the spec, so a killed experiment resumes where it stopped and the two
replications share a run exactly when its spec is identical.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXAMPLE = ROOT / "examples" / "minilm_sentiment" / "model.py"
SPECS = ROOT / "specs"
CACHE = HERE / "results" / ".cache-polarity"
N_VAL = 200


# ------------------------------------------------------------------------------------------ data
class Pairs(torch.utils.data.Dataset):
    """((input_ids, attention_mask), label) items: the data convention of sparsec's loop."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.ids[i], self.mask[i]), self.labels[i]


class Task:
    """The model (dense, head fitted), its train / validation / test sets, and the model file
    sparsec's loop reads them from. `example` may replace model.py's module (tests: a tiny model
    and synthetic data with the same functions)."""

    def __init__(self, seq_len: int, example: types.ModuleType | None = None, n_val: int = N_VAL):
        from sparsec.modelfile import import_file

        self.seq_len = seq_len
        self.module = example if example is not None else import_file(EXAMPLE)
        self.module.MAX_LEN = seq_len     # read by its tokenisation and example_inputs()
        train, test = self.module._split(train=True), self.module._split(train=False)
        cols = ("input_ids", "attention_mask", "labels")
        self.val = Pairs(*(train[k][:n_val] for k in cols))
        self.train = Pairs(*(train[k][n_val:] for k in cols))
        self.test = Pairs(*(test[k] for k in cols))
        start = time.perf_counter()
        self.dense = self.module.build_model()
        self.build_seconds = time.perf_counter() - start
        self.example_inputs = tuple(self.module.example_inputs())

    def modelfile(self, model: torch.nn.Module):
        from sparsec.modelfile import ModelFile

        namespace = types.SimpleNamespace(train_data=lambda: self.train, eval_data=lambda: self.val,
                                          build_model=lambda: copy.deepcopy(self.dense))
        return ModelFile(EXAMPLE, namespace, model, self.example_inputs, {})

    def truncated(self) -> float:
        """Fraction of the sentences longer than seq_len tokens (cut by the tokeniser)."""
        return float((self.module._encoded()["attention_mask"][:, -1] == 1).float().mean())


@torch.no_grad()
def test_metrics(model: torch.nn.Module, data: Pairs, batch: int = 100) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on `data` in eval mode."""
    was = model.training
    model.eval()
    logits = torch.cat([model(data.ids[i:i + batch], data.mask[i:i + batch])
                        for i in range(0, len(data), batch)])
    model.train(was)
    loss = float(torch.nn.functional.cross_entropy(logits, data.labels))
    return float((logits.argmax(-1) == data.labels).float().mean()), loss


def majority(data: Pairs) -> float:
    """Accuracy of always answering the more frequent label (what a collapsed classifier scores)."""
    share = float(data.labels.float().mean())
    return max(share, 1.0 - share)


# ------------------------------------------------------------------------------------------ spec
def shipped_spec(name: str) -> dict:
    with open(SPECS / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


def scaled_spec(base: str, *, density: float, scope: str | None, seed: int, steps: int, batch: int,
                eval_every: int = 0, **extra_tables: Any) -> dict:
    """A shipped spec (specs/<base>.toml) with its density, scope and seed set and its budget
    scaled: `steps` optimizer steps of `batch` sentences; the cubic schedule's warm-up and
    cool-down and the learning-rate warm-up keep the shipped proportions (10% and 20% of the
    steps). Extra tables (distill, self_regularization) are added as given."""
    spec = shipped_spec(base)
    group = spec["prune"][0]
    group["density"] = density
    if scope is not None:
        group["scope"] = scope
    sched, train = spec["schedule"], spec["train"]
    ratio = steps / train["steps"]
    sched["total"] = steps
    sched["warmup"] = max(1, round(sched["warmup"] * ratio))
    sched["cooldown"] = round(sched["cooldown"] * ratio)
    train.update(steps=steps, batch_size=batch, seed=seed, eval_every=eval_every,
                 log_every=max(1, steps // 10))
    if "warmup_steps" in train:
        train["warmup_steps"] = max(1, round(train["warmup_steps"] * ratio))
    for table, value in extra_tables.items():
        if value is None:
            spec.pop(table, None)
        else:
            spec[table] = value
    return spec


def spec_key(spec: dict, seq_len: int) -> str:
    text = json.dumps({"spec": spec, "seq_len": seq_len}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------- run
def layer_of(site: str) -> int | None:
    found = re.search(r"layer\.(\d+)\.", site)
    return int(found.group(1)) if found else None


def site_densities(prog) -> dict[str, float]:
    return prog.site_densities()   # kept (non-zero) fraction: L0 gates are not 0/1


def per_layer(sites: dict[str, float], sizes: dict[str, int]) -> dict[str, float]:
    """Remaining fraction of each encoder layer's pruned weights (Figure 6)."""
    kept: dict[int, float] = {}
    total: dict[int, int] = {}
    for name, density in sites.items():
        layer = layer_of(name)
        if layer is None:
            continue
        kept[layer] = kept.get(layer, 0.0) + density * sizes[name]
        total[layer] = total.get(layer, 0) + sizes[name]
    return {str(layer): kept[layer] / total[layer] for layer in sorted(total)}


def cached(name: str, compute: Callable[[], dict], cache: Path = CACHE) -> dict:
    """The run stored as cache/<name>.json, or compute it and store it (atomically)."""
    path = cache / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    run = compute()
    write_json(path, run)
    return run


def train(task: Task, spec: dict, teacher: Path | None = None) -> tuple[torch.nn.Module, Any, Any]:
    """(model, program, TrainResult): a copy of the dense model compiled with `spec` and fine-pruned
    by sparsec's own loop, distilling from `teacher` (a folder holding model.safetensors) if given."""
    import sparsec
    from sparsec.spec import load_spec
    from sparsec.training.loop import fine_prune
    from sparsec.training.teacher import load_teacher

    model = copy.deepcopy(task.dense)
    loaded = load_spec(spec)
    prog = sparsec.compile(model, loaded, task.example_inputs)
    modelfile = task.modelfile(model)
    if teacher is not None:
        prog.set_teacher(load_teacher(str(teacher), modelfile))
    return model, prog, fine_prune(prog, modelfile, loaded.train, progress=False)


def common_arguments(parser: Any, out: Path) -> None:
    """The options replications 1 and 3 share (their budget, seeds, cache and output)."""
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--priority", type=int, default=9, help="run the plan up to this priority level")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--table", action="store_true", help="only print the Markdown table of --out's runs")


def fine_prune_run(task: Task, label: str, spec: dict, *, teacher: Path | None = None,
                   cache: Path = CACHE, method: str | None = None) -> dict:
    """Fine-prune a copy of the dense model with `spec` (cached under `label` and the spec's hash);
    `teacher` is a folder holding model.safetensors (distillation from a fine-tuned model)."""
    name = f"{label}-{spec_key(spec | {'teacher': str(teacher.name) if teacher else None}, task.seq_len)}"

    def compute() -> dict:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: start", flush=True)
        start = time.perf_counter()
        _, prog, result = train(task, spec, teacher)
        accuracy, loss = test_metrics(prog, task.test)
        sites = site_densities(prog)
        sizes = {name: int(mask.numel()) for name, mask in prog.masks().items()}
        group = spec["prune"][0]
        run = {"method": method or group["method"], "density": group["density"],
               "seed": spec["train"]["seed"], "metric": accuracy, "loss": loss, "delta_loss": None,
               "steps": result.steps, "seconds": round(time.perf_counter() - start, 1),
               "label": label, "scope": group["scope"], "density_reached": prog.density(),
               "distill": "distill" in spec, "self_regularization": "self_regularization" in spec,
               "checkpoint_refreshes": result.checkpoint_refreshes,
               "metric_val": result.metric_pruned, "train_loss_last": sum(result.losses[-10:]) / 10,
               "per_layer_density": per_layer(sites, sizes), "site_density": sites,
               "seq_len": task.seq_len, "batch_size": spec["train"]["batch_size"], "spec": spec}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: test accuracy {accuracy:.4f} loss {loss:.4f} "
              f"density {run['density_reached']:.4f} ({run['seconds']:.0f} s)", flush=True)
        return run

    return cached(name, compute, cache)


def dense_teacher(task: Task, *, seed: int, steps: int, batch: int, cache: Path = CACHE) -> tuple[Path, dict]:
    """A dense MiniLM fine-tuned on the training set with the movement recipe (frozen embeddings,
    linear warm-up and decay, same steps and batch) and no pruning: the distillation teacher
    (movement pruning Table 3: a separately fine-tuned model) and the dense row of the tables.
    Written to cache/teacher-<hash>/model.safetensors."""
    spec = scaled_spec("magnitude", density=1.0, scope="local", seed=seed, steps=steps, batch=batch)
    # density 1: every mask stays 1, plain fine-tuning with the recipe of the pruned runs
    folder = cache / f"teacher-{spec_key(spec, task.seq_len)}"
    name = f"dense-{spec_key(spec, task.seq_len)}"

    def compute() -> dict:
        from safetensors.torch import save_file

        print(f"[{time.strftime('%H:%M:%S')}] {name}: dense fine-tuning (teacher)", flush=True)
        start = time.perf_counter()
        model, prog, result = train(task, spec)
        assert prog.density() == 1.0
        accuracy, loss = test_metrics(model, task.test)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
        return {"method": "dense", "density": 1.0, "seed": seed, "metric": accuracy, "loss": loss,
                "delta_loss": None, "steps": result.steps, "seconds": round(time.perf_counter() - start, 1),
                "label": "dense fine-tuned (teacher)", "scope": None, "density_reached": 1.0,
                "seq_len": task.seq_len, "batch_size": batch, "spec": spec}

    run = cached(name, compute, cache)
    if not (folder / "model.safetensors").exists():   # run cached but weights removed: redo
        (cache / f"{name}.json").unlink()
        run = cached(name, compute, cache)
    return folder, run


def dense_pretrained(task: Task, cache: Path = CACHE) -> dict:
    """The model before fine-pruning (pre-trained encoder, head fitted on frozen embeddings)."""
    def compute() -> dict:
        accuracy, loss = test_metrics(task.dense, task.test)
        return {"method": "dense", "density": 1.0, "seed": 0, "metric": accuracy, "loss": loss,
                "delta_loss": None, "steps": 0, "seconds": round(task.build_seconds, 1),
                "label": "pre-trained, head only", "seq_len": task.seq_len}
    return cached(f"pretrained-seq{task.seq_len}", compute, cache)


def write_json(out: Path, result: dict) -> None:
    from sparsec.paths import write_text_atomically

    write_text_atomically(out, json.dumps(result, indent=1))


def machine_info() -> str:
    sys.path.insert(0, str(HERE.parent))
    from _common import machine

    return machine() + " (shared, loaded; 1 torch thread)"
