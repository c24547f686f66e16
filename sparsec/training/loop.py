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

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsec import estimation
from sparsec.errors import TrainingError, UserError
from sparsec.modelfile import ModelFile
from sparsec.training import checkpoint, lr
from sparsec.training.backend import Backend, LocalBackend, backend_for
from sparsec.training.data import Stream, batch_size_of, batches
from sparsec.training.distill import SelfRegularizer
from sparsec.training.log import Progress, StepLog
from sparsec.training.losses import Objective, as_loss, as_metric, objective as objective_of
from sparsec.training.optim import frozen, make_optimizer


@dataclass
class TrainResult:
    """What a fine-pruning run did: per-step loss, density and learning rates, metric before and
    after; `final` is the checkpoint of its end (written into OUT as the training state)."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    lrs: list[list[float]] = field(default_factory=list)  # per step: weights' (and scores') rate
    metric_history: list[tuple[int, float]] = field(default_factory=list)  # (step, value)
    metric_dense: float | None = None
    metric_pruned: float | None = None
    seconds: float = 0.0
    # loss-modelling pruning iterations: step, density, loss_before, loss_after, delta_loss
    pruning_iterations: list[dict[str, float]] = field(default_factory=list)
    # loss-modelling prunes (all iterations at one step): Delta-L of the whole prune, before any
    # fine-tuning (loss modelling Table 1): step, iterations, density_before, density, losses, delta_loss
    prunes: list[dict[str, float]] = field(default_factory=list)
    checkpoint_refreshes: int = 0  # self-regularization: times the best checkpoint was replaced
    objective: str = ""            # which loss was minimised (Objective.description)
    resumed_from: int | None = None  # the checkpoint's step, for a resumed run
    notes: list[str] = field(default_factory=list)  # said to the user (and in the report)
    final: Any = field(default=None, repr=False)    # checkpoint.Payload of the end of training

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "final_loss": self.final_loss, "metric_dense": self.metric_dense,
                "metric_pruned": self.metric_pruned, "seconds": round(self.seconds, 3),
                "losses": self.losses, "densities": self.densities, "lrs": self.lrs,
                "metric_history": [list(item) for item in self.metric_history],
                "pruning_iterations": self.pruning_iterations, "prunes": self.prunes,
                "checkpoint_refreshes": self.checkpoint_refreshes, "objective": self.objective,
                "resumed_from": self.resumed_from}

    def history(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run so far (exact: no rounding)."""
        out = self.to_dict()
        out["seconds"] = self.seconds
        return out

    @classmethod
    def from_history(cls, data: dict[str, Any]) -> TrainResult:
        return cls(steps=data["steps"], losses=list(data["losses"]), densities=list(data["densities"]),
                   lrs=[list(r) for r in data.get("lrs", [])],
                   metric_history=[(int(s), float(v)) for s, v in data["metric_history"]],
                   metric_dense=data.get("metric_dense"), seconds=float(data.get("seconds", 0.0)),
                   pruning_iterations=list(data["pruning_iterations"]), prunes=list(data.get("prunes", [])),
                   checkpoint_refreshes=int(data["checkpoint_refreshes"]), objective=data["objective"])


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
                             what="eval_data()", rank=backend.rank, world=backend.world):
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
def fine_prune(prog: Any, modelfile: ModelFile, train: Any, progress: bool = True,
               dense_metric: float | None = None, backend: Backend | None = None,
               objective: Objective | None = None, workdir: Path | None = None,
               resume: checkpoint.Restored | None = None,
               fingerprint: dict[str, Any] | None = None) -> TrainResult:
    """Train `prog` (a sparsec Program) for `train.steps` optimizer steps on `train_data()`,
    pruning as the schedule says; evaluate `eval_data()` after training (and every `eval_every`
    steps). `backend` places and steps it (default: the spec's device and precision, one process);
    `objective` is the loss and metric (default: model.py's, or cross-entropy and accuracy of the
    logits). `workdir` receives train.jsonl and, every `checkpoint_every` steps, a checkpoint;
    `resume` continues from one (bit-exactly on the same number of processes). The returned
    result's `final` is the checkpoint of the end of training (for OUT)."""
    backend = backend or backend_for(train)
    objective = objective or objective_of(modelfile)
    fingerprint = fingerprint if fingerprint is not None else {}
    if resume is not None:
        _check_resumable(resume, fingerprint, backend)
    torch.manual_seed(train.seed)
    estimation.check(prog, objective)
    with frozen(prog, train.freeze):
        run = _Run(prog, modelfile, train, backend, objective, workdir, fingerprint)
        run.result.metric_dense = dense_metric
        if resume is not None:
            run.resume_from(resume)
        return run.loop(progress)


def _check_resumable(resume: checkpoint.Restored, fingerprint: dict[str, Any], backend: Backend) -> None:
    saved = resume.payload.meta.get("spec", {})
    differs = checkpoint.first_difference(saved, fingerprint)
    if differs:
        raise UserError(f"{resume.folder}: was written with another spec ({differs} differs); resume "
                        f"with the spec it was trained with, or start again without --resume")
    layout = resume.payload.meta.get("layout")
    if layout is not None and layout != backend.name:
        resume.notes.append(f"resumed with {backend.name} from a checkpoint written with {layout}: "
                            f"gradients are reduced in another order, so the run is not bit-identical "
                            f"to an uninterrupted one")
    if resume.payload.meta.get("world", 1) != backend.world:
        resume.notes.append(f"resumed on {backend.world} process(es) from a checkpoint of "
                            f"{resume.payload.meta.get('world')}: the data is sharded differently, so "
                            f"the run is not bit-identical to an uninterrupted one")


class _Run:
    """One fine-pruning run: the loop of `fine_prune` and the state it carries."""

    def __init__(self, prog: Any, modelfile: ModelFile, train: Any, backend: Backend,
                 objective: Objective, workdir: Path | None, fingerprint: dict[str, Any]):
        self.prog, self.modelfile, self.train = prog, modelfile, train
        self.backend, self.objective, self.workdir, self.fingerprint = backend, objective, workdir, fingerprint
        for param in prog.parameters():  # gradients left over from build_model() or earlier use
            param.grad = None
        rank, world = backend.rank, backend.world
        self.data = Stream(modelfile, "train_data", train.batch_size, train.seed, rank, world)
        self.estimate_data = Stream(modelfile, "train_data", train.batch_size, train.seed + 1, rank, world)
        self.model = backend.place(prog, probe=self.first_loss)
        self.optimizer = make_optimizer(prog, train)
        self.scheduler = lr.scheduler(self.optimizer, train)
        prog.attach_optimizer(self.optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        tables = prog.training_tables.self_regularization
        with backend.whole(prog, grads=False, needed=bool(tables)):
            self.self_reg = SelfRegularizer(prog, tables["lambda"], tables["temperature"]) if tables else None
        self.result = TrainResult(objective=objective.description)
        self.start = 1

    def first_loss(self) -> torch.Tensor:
        """The training loss of the next batch (left in the stream), for the backend's probe."""
        batch = self.backend.batch(self.data.peek())
        with self.backend.autocast():
            outputs = self.objective.forward(self.prog, batch, 1)
            return as_loss(self.objective.loss(outputs, batch), 1, self.objective.description) + \
                self.prog.regularization()

    def resume_from(self, restored: checkpoint.Restored) -> None:
        with self.backend.whole(self.prog, self.optimizer, grads=False):
            restored.restore(self.prog, self.optimizer, self.scheduler, self.backend, self.self_reg, rng=False)
        positions = restored.payload.meta["positions"]
        scale = restored.payload.meta.get("world", 1) / self.backend.world
        self.data.skip(int(positions["train"] * scale))
        self.estimate_data.skip(int(positions["estimate"] * scale))
        dense = self.result.metric_dense
        self.result = TrainResult.from_history(restored.payload.meta["history"])
        self.result.metric_dense = dense if dense is not None else self.result.metric_dense
        self.result.resumed_from = restored.step
        self.result.notes += restored.notes
        restored.restore_rng(self.backend.rank)  # last: skipping the data may draw from them
        self.start = restored.step + 1

    def loop(self, progress: bool) -> TrainResult:
        prog, train, backend, result = self.prog, self.train, self.backend, self.result
        log = StepLog(self.workdir, train.tensorboard, self.start - 1) \
            if self.workdir is not None and backend.is_main else None
        if log is not None and log.note:
            result.notes.append(log.note)
        bar = Progress(train.steps, progress and backend.is_main, train.log_every, self.start - 1)
        was_training = prog.training
        started = time.perf_counter() - result.seconds
        prog.train()
        try:
            for step in range(self.start, train.steps + 1):
                metric = self.step(step)
                if log is not None:
                    log.write({"step": step, "loss": result.losses[-1], "density": result.densities[-1],
                               "lr": result.lrs[-1], "metric": metric})
                bar.update(step, result.losses[-1], result.densities[-1], metric)
                result.steps = step
                if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
                    result.seconds = time.perf_counter() - started
                    payload = self.payload(step)
                    if backend.is_main and self.workdir is not None:
                        checkpoint.save(self.workdir, payload)
            result.metric_pruned = evaluate(backend.evaluator(self.model, prog), self.modelfile,
                                            train.batch_size, train.seed, backend, self.objective)
            if result.metric_pruned is not None:
                result.metric_history.append((result.steps, result.metric_pruned))
            result.seconds = time.perf_counter() - started
            result.final = self.payload(result.steps)
            backend.release(prog)
        finally:
            bar.close()
            if log is not None:
                log.close()
            prog.train(was_training)
        return result

    def step(self, step: int) -> float | None:
        """Optimizer step `step`: `accumulate` micro-batches, the optimizer and scheduler steps,
        a loss-modelling estimate when due, `prog.step()`. Returns the metric when evaluated."""
        prog, train, backend, objective, result = self.prog, self.train, self.backend, self.objective, self.result
        loss_sum = 0.0
        for micro in range(train.accumulate):
            batch = backend.batch(next(self.data))
            args, kwargs = objective.inputs(batch)
            last = micro == train.accumulate - 1
            with (contextlib.nullcontext() if last else backend.no_sync(self.model)):
                with backend.autocast():
                    outputs = objective.forward(self.model, batch, step)
                    loss = (prog.task_loss_weight * as_loss(objective.loss(outputs, batch), step,
                                                            objective.description)
                            + prog.distillation_loss(outputs, *args, **kwargs)
                            + prog.regularization())
                    if self.self_reg is not None:
                        loss = loss + self.self_reg.loss(outputs, *args, **kwargs)
                    loss = loss / train.accumulate
                backend.backward(loss)
            loss_sum += float(loss.detach())
        rates = [float(group["lr"]) for group in self.optimizer.param_groups]
        backend.step(self.optimizer, self.params, train.max_grad_norm)
        with backend.whole(prog, self.optimizer, needed=prog.estimate_due() or prog.step_reads_parameters()):
            iteration = estimation.before_pruning(prog, (backend.batch(b) for b in self.estimate_data),
                                                  objective)
            prog.step()
            if iteration is not None:   # Delta-L of each iteration and of the whole prune
                iteration.finish(step, prog)
                result.pruning_iterations += iteration.records
                result.prunes.append(iteration.whole)
        # after prog.step(): pins, sensitivity and dynsparse's decoupled group lasso read the update
        # just applied with the learning rate it was made with
        self.scheduler.step()
        if int(prog.step_count) % prog.schedule.every == 0:
            backend.after_mask_update(prog)
        self.optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_sum)
        result.densities.append(prog.density())
        result.lrs.append(rates)
        metric = None
        if train.eval_every and step % train.eval_every == 0 and step < train.steps:
            metric = evaluate(backend.evaluator(self.model, prog), self.modelfile, train.batch_size,
                              train.seed, backend, objective)
            if metric is not None:
                result.metric_history.append((step, metric))
            if self.self_reg is not None:
                with backend.whole(prog, grads=False):
                    if self.self_reg.update(prog, metric):
                        result.checkpoint_refreshes += 1
        return metric

    def payload(self, step: int) -> checkpoint.Payload:
        """The checkpoint after `step` (a collective under torchrun: it gathers every process's
        random generators)."""
        rng = self.backend.gather(checkpoint.rng_state())
        positions = {"train": self.data.position, "estimate": self.estimate_data.position}
        with self.backend.whole(self.prog, self.optimizer, grads=False):
            return checkpoint.capture(step, self.prog, self.optimizer, self.scheduler, self.backend,
                                      self.self_reg, positions, self.result.history(), self.fingerprint, rng)
