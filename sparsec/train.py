"""The fine-pruning loop that `sparsec compile` runs when the spec has a [train] table.

Data convention (model.py's `train_data()` / `eval_data()`):

* a torch `Dataset` is wrapped in a `DataLoader` (`[train] batch_size`, shuffled for training with a
  generator seeded from `[train] seed`); anything else is taken as an iterable of batches;
* a batch is `(inputs, target)` where `inputs` is a tensor (one positional argument), a tuple or
  list (positional arguments) or a dict (keyword arguments); or a dict with a `labels` key, Hugging
  Face style, whose other keys are the model's keyword arguments.

`loss(outputs, batch)` and `metric(outputs, batch)` default to cross-entropy and accuracy of the
logits (the output tensor, else `outputs.logits`, else `outputs[0]`) against the target.

The loop order is the Program's contract: forward, loss + regularization, backward, clip,
`optimizer.step()`, `prog.step()`, `zero_grad()`. Around it:

* the optimizer is attached to the program (`pins` reads its update at `prog.step()`);
* with `[distill]` the loss is `(1 - alpha) * loss + prog.distillation_loss(outputs, *inputs)`;
* with `[self_regularization]` the loss gains lambda * KL(best checkpoint || model) and the
  checkpoint is refreshed when the metric of an evaluation improves (PINS Algorithm 1);
* for loss-modelling methods (lm, qm, obd), before each pruning iteration (`prog.estimate_due()`)
  the gradient and diagonal Fisher are estimated on `fisher_examples` examples of `train_data()`,
  and the Delta-L metric |L(theta + dtheta) - L(theta)| of the iteration is measured on the same
  examples (eval mode) and recorded in `TrainResult.pruning_iterations`.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sparsec.errors import ModelFileError, TrainingError, UserError
from sparsec.modelfile import ModelFile
from sparsec.program import Program

IGNORE_INDEX = -100  # label value that the default loss and metric skip (as Hugging Face does)


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

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "final_loss": self.final_loss, "metric_dense": self.metric_dense,
                "metric_pruned": self.metric_pruned, "seconds": round(self.seconds, 3),
                "losses": self.losses, "densities": self.densities,
                "metric_history": [list(item) for item in self.metric_history],
                "pruning_iterations": self.pruning_iterations,
                "checkpoint_refreshes": self.checkpoint_refreshes}


# ------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """One batch split into what the model takes and what the loss compares against."""

    args: tuple
    kwargs: dict
    target: Any


def split_batch(batch: Any) -> Batch:
    """Apply the data convention: `(inputs, target)` or a dict with `labels`."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TrainingError(f"a dict batch needs a 'labels' key (got keys {sorted(batch)}); "
                                f"or yield (inputs, target) pairs")
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return Batch((), kwargs, batch["labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        if isinstance(inputs, Mapping):
            return Batch((), dict(inputs), target)
        if isinstance(inputs, (tuple, list)):
            return Batch(tuple(inputs), {}, target)
        return Batch((inputs,), {}, target)
    raise TrainingError(f"a batch must be (inputs, target) or a dict with 'labels', got {_describe(batch)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__} of {len(value)} ({inner}{more})"
    if isinstance(value, Mapping):
        return "dict {" + ", ".join(f"{k}: {_describe(v)}" for k, v in list(value.items())[:6]) + "}"
    return type(value).__name__


def batches(data: Any, batch_size: int, seed: int, shuffle: bool, what: str) -> Iterable:
    """A re-iterable source of batches for `data` as model.py returned it."""
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size)
    if isinstance(data, Dataset):
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        return data
    raise ModelFileError(f"{what} must return a torch Dataset or an iterable of batches, "
                         f"got {type(data).__name__}")


def _cycle(modelfile: ModelFile, name: str, batch_size: int, seed: int) -> Iterator[Any]:
    """Batches of `name()` forever; one-shot iterators (generators) are asked for again."""
    source = batches(modelfile.call(name), batch_size, seed, shuffle=True, what=f"{name}()")
    while True:
        count = 0
        for batch in source:
            count += 1
            yield batch
        if count == 0:
            raise TrainingError(f"{modelfile.path}: {name}() gave no batches")
        if iter(source) is source:
            source = batches(modelfile.call(name), batch_size, seed, shuffle=True, what=f"{name}()")


# ------------------------------------------------------------------------------ loss and metric
def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: the tensor itself, `.logits`, `["logits"]` or `[0]`."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TrainingError(f"cannot find logits in the model's outputs ({_describe(outputs)}): "
                        f"define loss(outputs, batch) and metric(outputs, batch) in model.py")


def _flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(target, torch.Tensor):
        raise TrainingError(f"the default loss needs a tensor target, got {_describe(target)}: "
                            f"define loss(outputs, batch) in model.py")
    return logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long()


def default_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy of the logits against the target."""
    logits, target = _flat(logits_of(outputs), split_batch(batch).target)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def default_metric(outputs: Any, batch: Any) -> float:
    """Accuracy of the logits' argmax against the target."""
    logits, target = _flat(logits_of(outputs), split_batch(batch).target)
    keep = target != IGNORE_INDEX
    total = int(keep.sum())
    return float((logits.argmax(-1)[keep] == target[keep]).sum()) / total if total else 0.0


def _batch_weight(batch: Any) -> int:
    target = split_batch(batch).target
    if isinstance(target, torch.Tensor) and target.dim() > 0:
        return int(target.shape[0])
    return 1


def _loss_fn(modelfile: ModelFile) -> Callable[[Any, Any], Any]:
    if modelfile.has("loss"):
        return lambda outputs, batch: modelfile.call("loss", outputs, batch)
    return default_loss


def _metric_fn(modelfile: ModelFile) -> Callable[[Any, Any], Any]:
    if modelfile.has("metric"):
        return lambda outputs, batch: modelfile.call("metric", outputs, batch)
    return default_metric


def _forward(model: torch.nn.Module, batch: Any, step: int | None) -> Any:
    """Run the model on a batch, reporting the user's shape mistakes as user errors."""
    parts = split_batch(batch)
    try:
        return model(*parts.args, **parts.kwargs)
    except UserError:
        raise
    except Exception as exc:
        when = f"at training step {step}" if step is not None else "during evaluation"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainingError(f"the model raised {type(exc).__name__} {when} on a batch of "
                            f"{_describe(batch)}: {first} (check the data convention: "
                            f"(inputs, target) or a dict with 'labels')") from exc


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, modelfile: ModelFile, batch_size: int = 32, seed: int = 0) -> float | None:
    """The metric over one pass of `eval_data()` in eval mode, or None without eval_data()."""
    if not modelfile.has("eval_data"):
        return None
    metric = _metric_fn(modelfile)
    was_training = model.training
    model.eval()
    total = weight = 0.0
    try:
        for batch in batches(modelfile.call("eval_data"), batch_size, seed, shuffle=False,
                             what="eval_data()"):
            n = _batch_weight(batch)
            total += float(metric(_forward(model, batch, None), batch)) * n
            weight += n
    finally:
        model.train(was_training)
    if weight == 0:
        raise TrainingError(f"{modelfile.path}: eval_data() gave no batches")
    return total / weight


# ------------------------------------------------------------------------------------- training
def make_optimizer(prog: Program, train: Any) -> torch.optim.Optimizer:
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


def fine_prune(prog: Program, modelfile: ModelFile, train: Any, progress: bool = True,
               dense_metric: float | None = None) -> TrainResult:
    """Train `prog` for `train.steps` optimizer steps on `train_data()`, pruning as the schedule
    says; evaluate `eval_data()` after training (and every `eval_every` steps)."""
    torch.manual_seed(train.seed)
    result = TrainResult(metric_dense=dense_metric)
    optimizer = make_optimizer(prog, train)
    prog.attach_optimizer(optimizer)
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    loss_fn = _loss_fn(modelfile)
    data = _cycle(modelfile, "train_data", train.batch_size, train.seed)
    estimate_data = _cycle(modelfile, "train_data", train.batch_size, train.seed + 1)
    self_reg = _self_regularizer(prog)
    bar = _Progress(train.steps, progress, train.log_every)
    was_training = prog.training
    start = time.perf_counter()
    prog.train()
    try:
        metric = None
        for step in range(1, train.steps + 1):
            batch = next(data)
            parts = split_batch(batch)
            outputs = _forward(prog, batch, step)
            loss = (prog.task_loss_weight * _as_loss(loss_fn(outputs, batch), step)
                    + prog.distillation_loss(outputs, *parts.args, **parts.kwargs)
                    + prog.regularization())
            if self_reg is not None:
                loss = loss + self_reg.loss(outputs, *parts.args, **parts.kwargs)
            loss.backward()
            if train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(clipped, train.max_grad_norm)
            optimizer.step()
            iteration = _estimate_before_pruning(prog, estimate_data, loss_fn, train.batch_size)
            prog.step()
            optimizer.zero_grad(set_to_none=True)
            if iteration is not None:
                result.pruning_iterations.append(iteration.finish(step, prog))
            result.losses.append(float(loss.detach()))
            result.densities.append(prog.density())
            if train.eval_every and step % train.eval_every == 0 and step < train.steps:
                metric = evaluate(prog, modelfile, train.batch_size, train.seed)
                if metric is not None:
                    result.metric_history.append((step, metric))
                if self_reg is not None and self_reg.update(prog, metric):
                    result.checkpoint_refreshes += 1
            bar.update(step, result.losses[-1], result.densities[-1], metric)
            result.steps = step
        result.metric_pruned = evaluate(prog, modelfile, train.batch_size, train.seed)
        if result.metric_pruned is not None:
            result.metric_history.append((result.steps, result.metric_pruned))
    finally:
        bar.close()
        prog.train(was_training)
        result.seconds = time.perf_counter() - start
    return result


def _self_regularizer(prog: Program):
    """PINS self-regularization when the spec has [self_regularization], else None."""
    table = prog.training_tables.get("self_regularization")
    if table is None:
        return None
    from sparsec.distill import SelfRegularizer

    return SelfRegularizer(prog, table["lambda"], table["temperature"])


# ------------------------------------------------------------------- loss-modelling estimates
def batch_size_of(batch: Any) -> int:
    """Examples in a batch: the first dimension of its target (1 for a scalar target)."""
    return _batch_weight(batch)


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Examples [start, stop) of a batch of `size` examples, in the batch's own structure (every
    tensor whose first dimension is `size` is sliced; anything else is kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop, size) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, start, stop, size) for v in batch)
    return batch


def estimate_examples(data: Iterator[Any], examples: int, chunk: int) -> list[Any]:
    """`examples` examples drawn from `data`, as chunks of `chunk` examples (batch structure kept)."""
    chunks: list[Any] = []
    taken = 0
    while taken < examples:
        batch = next(data)
        size = batch_size_of(batch)
        for start in range(0, size, chunk):
            stop = min(size, start + chunk, start + examples - taken)
            if stop <= start:
                break
            chunks.append(slice_batch(batch, start, stop, size))
            taken += stop - start
    return chunks


@dataclass
class _Iteration:
    """One pruning iteration of a loss-modelling method, measured on its estimate's examples."""

    chunks: list[Any]
    loss_fn: Callable[[Any, Any], Any]
    loss_before: float

    def finish(self, step: int, prog: Program) -> dict[str, float]:
        after = mean_loss(prog, self.chunks, self.loss_fn)
        return {"step": step, "density": prog.density(), "loss_before": self.loss_before,
                "loss_after": after, "delta_loss": abs(after - self.loss_before)}


@torch.no_grad()
def mean_loss(prog: torch.nn.Module, chunks: list[Any], loss_fn: Callable[[Any, Any], Any]) -> float:
    """Mean loss over `chunks` (each weighted by its examples), in eval mode."""
    was_training = prog.training
    prog.eval()
    total = weight = 0.0
    try:
        for chunk in chunks:
            n = batch_size_of(chunk)
            total += float(loss_fn(_forward(prog, chunk, None), chunk)) * n
            weight += n
    finally:
        prog.train(was_training)
    return total / weight


def _estimate_before_pruning(prog: Program, data: Iterator[Any], loss_fn: Callable[[Any, Any], Any],
                             batch_size: int) -> _Iteration | None:
    """Before a loss-modelling pruning iteration: estimate g and the diagonal Fisher (loss
    modelling Algorithm 1, line 6) on fresh examples; None when no iteration is due."""
    if not prog.estimate_due():
        return None
    opts = prog.estimate_options()
    chunks = estimate_examples(data, opts["fisher_examples"], opts["fisher_chunk"])
    prog.estimate_fisher(chunks, lambda chunk: loss_fn(_forward(prog, chunk, None), chunk),
                         chunk_size=opts["fisher_chunk"])
    # L(theta) with the same per-example weighting as the Delta-L measured after pruning
    return _Iteration(chunks, loss_fn, mean_loss(prog, chunks, loss_fn))


def _as_loss(value: Any, step: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TrainingError(f"loss(outputs, batch) must return a scalar tensor, got {_describe(value)}")
    if not torch.isfinite(value):
        raise TrainingError(f"the loss is {float(value)} at training step {step}: lower [train] lr "
                            f"or set [train] max_grad_norm")
    if not value.requires_grad:
        raise TrainingError("the loss does not depend on the model's parameters (no gradient)")
    return value
