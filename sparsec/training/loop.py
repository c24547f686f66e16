"""The fine-pruning loop that `sparsec compile` runs when the spec has a [train] table.

The loop order is the Program's contract, the same on every backend (sparsec.training.backend):
forward, loss + regularization, backward, clip, `optimizer.step()`, `prog.step()`, `zero_grad()`.
Around it:

* the optimizer is attached to the program (`pins` reads its update at `prog.step()`);
* with `[distill]` the loss is `(1 - alpha) * loss + prog.distillation_loss(outputs, *inputs)`;
* with `[self_regularization]` the loss gains lambda * KL(best checkpoint || model) and the
  checkpoint is refreshed when the metric of an evaluation improves (PINS Algorithm 1);
* for loss-modelling methods (lm, qm, obd), before each pruning iteration the gradient and
  diagonal Fisher are estimated on `fisher_examples` examples of `train_data()`, and Delta-L of the
  iteration is measured on the same examples (sparsec.estimation), recorded in
  `TrainResult.pruning_iterations`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsec import estimation
from sparsec.errors import TrainingError
from sparsec.modelfile import ModelFile
from sparsec.training.backend import Backend, LocalBackend
from sparsec.training.data import batch_size_of, batches, cycle, split_batch
from sparsec.training.distill import SelfRegularizer
from sparsec.training.losses import Objective, as_loss, as_metric, objective as objective_of


@dataclass
class TrainResult:
    """What a fine-pruning run did: per-step loss and density, metric before and after."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    metric_history: list[tuple[int, float]] = field(default_factory=list)  # (step, value)
    metric_dense: float | None = None
    metric_pruned: float | None = None
    seconds: float = 0.0
    # loss-modelling pruning iterations: step, density, loss_before, loss_after, delta_loss
    pruning_iterations: list[dict[str, float]] = field(default_factory=list)
    checkpoint_refreshes: int = 0  # self-regularization: times the best checkpoint was replaced
    objective: str = ""            # which loss was minimised (Objective.description)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "final_loss": self.final_loss, "metric_dense": self.metric_dense,
                "metric_pruned": self.metric_pruned, "seconds": round(self.seconds, 3),
                "losses": self.losses, "densities": self.densities,
                "metric_history": [list(item) for item in self.metric_history],
                "pruning_iterations": self.pruning_iterations,
                "checkpoint_refreshes": self.checkpoint_refreshes, "objective": self.objective}


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, modelfile: ModelFile, batch_size: int, seed: int,
             backend: Backend | None = None, objective: Objective | None = None) -> float | None:
    """The objective's metric over one pass of `eval_data()` in eval mode, or None without
    eval_data()."""
    if not modelfile.has("eval_data"):
        return None
    backend = backend or LocalBackend()
    objective = objective or objective_of(modelfile)
    was_training = model.training
    model.eval()
    total = weight = 0.0
    try:
        for batch in batches(modelfile.call("eval_data"), batch_size, seed, shuffle=False,
                             what="eval_data()"):
            batch = backend.batch(batch)
            n = batch_size_of(batch)
            with backend.autocast():
                value = objective.metric(objective.forward(model, batch, None), batch)
                total += as_metric(value, f"{modelfile.path}: metric(outputs, batch)") * n
            weight += n
    finally:
        model.train(was_training)
    total, weight = backend.reduce_sum([total, weight])
    if weight == 0:
        raise TrainingError(f"{modelfile.path}: eval_data() gave no batches")
    return total / weight


# ------------------------------------------------------------------------------------- training
def make_optimizer(prog: Any, train: Any) -> torch.optim.Optimizer:
    """The spec's optimizer with two groups: the model at `lr`, the scores at `score_lr` without
    weight decay."""
    model_params = [p for p in prog.model_parameters() if p.requires_grad]
    score_params = [p for p in prog.score_parameters() if p.requires_grad]
    groups = [{"params": model_params, "lr": train.lr, "weight_decay": train.weight_decay}]
    if score_params:
        groups.append({"params": score_params, "lr": train.score_lr, "weight_decay": 0.0})
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    raise TrainingError(f"unknown optimizer {train.optimizer!r} (allowed: adamw, adam, sgd)")


class _Progress:
    """A tqdm bar on a terminal; otherwise a few log lines on stderr."""

    def __init__(self, total: int, enabled: bool, log_every: int):
        from tqdm import tqdm

        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, disable=not tty, desc="fine-pruning", unit="step",
                        dynamic_ncols=True, leave=False)
        self.log = enabled and not tty
        self.every = max(1, log_every, math.ceil(total / 10))
        self.total = total

    def update(self, step: int, loss: float, density: float, metric: float | None) -> None:
        shown = {"loss": f"{loss:.4f}", "density": f"{density:.3f}"}
        if metric is not None:
            shown["metric"] = f"{metric:.4f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if self.log and (step % self.every == 0 or step == self.total):
            text = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def fine_prune(prog: Any, modelfile: ModelFile, train: Any, progress: bool = True,
               dense_metric: float | None = None, backend: Backend | None = None,
               objective: Objective | None = None) -> TrainResult:
    """Train `prog` (a sparsec Program) for `train.steps` optimizer steps on `train_data()`,
    pruning as the schedule says; evaluate `eval_data()` after training (and every `eval_every`
    steps). `backend` places and steps it (default: one CPU process in float32); `objective` is
    the loss and metric (default: model.py's, or cross-entropy and accuracy of the logits)."""
    backend = backend or LocalBackend()
    objective = objective or objective_of(modelfile)
    torch.manual_seed(train.seed)
    result = TrainResult(metric_dense=dense_metric, objective=objective.description)
    model = backend.place(prog)
    optimizer = make_optimizer(prog, train)
    prog.attach_optimizer(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    data = cycle(modelfile, "train_data", train.batch_size, train.seed)
    estimate_data = cycle(modelfile, "train_data", train.batch_size, train.seed + 1)
    tables = prog.training_tables.self_regularization
    self_reg = SelfRegularizer(prog, tables["lambda"], tables["temperature"]) if tables else None
    bar = _Progress(train.steps, progress and backend.is_main, train.log_every)
    was_training = prog.training
    start = time.perf_counter()
    prog.train()
    try:
        metric = None
        for step in range(1, train.steps + 1):
            batch = backend.batch(next(data))
            parts = split_batch(batch)
            with backend.autocast():
                outputs = objective.forward(model, batch, step)
                loss = (prog.task_loss_weight * as_loss(objective.loss(outputs, batch), step, objective.description)
                        + prog.distillation_loss(outputs, *parts.args, **parts.kwargs)
                        + prog.regularization())
                if self_reg is not None:
                    loss = loss + self_reg.loss(outputs, *parts.args, **parts.kwargs)
            backend.backward(loss)
            backend.step(optimizer, params, train.max_grad_norm)
            iteration = estimation.before_pruning(prog, (backend.batch(b) for b in estimate_data), objective)
            prog.step()
            optimizer.zero_grad(set_to_none=True)
            if iteration is not None:
                result.pruning_iterations.append(iteration.finish(step, prog))
            result.losses.append(float(loss.detach()))
            result.densities.append(prog.density())
            if train.eval_every and step % train.eval_every == 0 and step < train.steps:
                metric = evaluate(prog, modelfile, train.batch_size, train.seed, backend, objective)
                if metric is not None:
                    result.metric_history.append((step, metric))
                if self_reg is not None and self_reg.update(prog, metric):
                    result.checkpoint_refreshes += 1
            bar.update(step, result.losses[-1], result.densities[-1], metric)
            result.steps = step
        result.metric_pruned = evaluate(prog, modelfile, train.batch_size, train.seed, backend, objective)
        if result.metric_pruned is not None:
            result.metric_history.append((result.steps, result.metric_pruned))
    finally:
        bar.close()
        prog.train(was_training)
        result.seconds = time.perf_counter() - start
    return result
