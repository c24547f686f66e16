"""Data estimates for the loss-modelling methods (lm, qm, obd; Laurent et al. 2020, Algorithm 1).

Before each pruning iteration the mean gradient g and the diagonal curvature G of the loss are
estimated on examples of the training data (`estimate_fisher`); the methods turn them into
saliencies (sparsec.methods.loss_modelling). The fine-pruning loop draws the examples and measures
Delta-L = |L(theta + dtheta) - L(theta)| of the iteration on them (`before_pruning`).

Which groups need an estimate is each method's business (`Method.estimate_options`); the Program
exposes this module as `prog.estimate_due()`, `prog.estimate_options()` and `prog.estimate_fisher()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from sparsec import curvature, schedules
from sparsec.errors import TrainingError
from sparsec.ir import GroupPlan
from sparsec.training.data import batch_size_of, slice_batch
from sparsec.training.losses import Objective


def estimating_groups(prog: Any) -> list[GroupPlan]:
    """The groups whose method needs an estimate before it prunes."""
    return [plan for plan in prog.groups if prog.method(plan.index).estimate_options() is not None]


def due(prog: Any) -> bool:
    """True when the next `prog.step()` prunes a group whose method needs an estimate first."""
    t = int(prog.step_count) + 1
    every = prog.schedule.every
    if t % every:
        return False
    return any(prog.density_at(plan.index, t) < prog.density_at(plan.index, max(0, t - every))
               for plan in estimating_groups(prog))


def options(prog: Any) -> dict[str, int]:
    """How many examples the estimate should see and in which chunks: the largest `fisher_examples`
    and smallest `fisher_chunk` of the groups that need one ({} when none does)."""
    opts = [prog.method(plan.index).estimate_options() for plan in estimating_groups(prog)]
    if not opts:
        return {}
    return {"fisher_examples": max(o["fisher_examples"] for o in opts),
            "fisher_chunk": min(o["fisher_chunk"] for o in opts)}


def curvature_of(prog: Any, group: int) -> str:
    """The `curvature` option of a group's method (sparsec.curvature), or "none" for a method that
    reads only the gradient (lm): its G is left at zero and costs nothing."""
    method = prog.method(group)
    if not getattr(method, "needs_curvature", True):
        return "none"
    return str(method.opts.get("curvature", "empirical_fisher"))


def estimate_fisher(prog: Any, examples: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor],
                    chunk_size: int = 1,
                    logits_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """Estimate, for every site whose method needs it, the mean gradient g and the diagonal
    curvature G of its group's `curvature` (sparsec.curvature: the Gauss-Newton diagonal of loss
    modelling Eq 8 exactly or by sampled labels, or the empirical Fisher) over `examples`.
    `loss_fn(example)` returns the program's loss on one item (a chunk of `chunk_size` examples);
    `logits_fn(example)` its logits `[N, C]` and class targets `[N]` (-100: ignored) of the softmax
    cross-entropy, needed by `ggn` and `ggn_mc`. Runs in eval mode, leaves `.grad` untouched, and
    returns the mean loss L(theta)."""
    states = [st for plan in estimating_groups(prog) for st in prog.site_states(plan.index)]
    if not states:
        raise TrainingError("estimate_fisher: no group of this program uses lm, qm or obd")
    kinds = [curvature_of(prog, st.site.group) for st in states]
    if logits_fn is None and any(k in ("ggn", "ggn_mc") for k in kinds):
        raise TrainingError(
            "estimate_fisher: curvature 'ggn' / 'ggn_mc' (the Gauss-Newton diagonal of a softmax "
            "cross-entropy) needs logits_fn(example) -> (logits [N, C], targets [N]); pass it, or set "
            "curvature = \"empirical_fisher\" in the [[prune]] group")
    weights = [st.weight for st in states]
    grad_sum = [torch.zeros_like(w) for w in weights]
    fisher_sum = [torch.zeros_like(w) for w in weights]
    exact = [i for i, k in enumerate(kinds) if k == "ggn"]
    sampled = [i for i, k in enumerate(kinds) if k == "ggn_mc"]
    count, loss_sum = 0, 0.0
    was_training = prog.training
    prog.eval()
    try:
        for example in examples:
            loss = loss_fn(example)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, g in enumerate(grads):
                if g is None:
                    continue
                grad_sum[i] += g
                if kinds[i] == "empirical_fisher":
                    fisher_sum[i] += g * g * chunk_size
            if exact or sampled:
                logits, target = logits_fn(example)  # type: ignore[misc]
                for idx, diagonal in ((exact, curvature.ggn_diagonal), (sampled, curvature.ggn_mc_diagonal)):
                    if idx:
                        for i, d in zip(idx, diagonal(logits, target, [weights[i] for i in idx])):
                            fisher_sum[i] += d
            count += 1
            loss_sum += float(loss.detach())
    finally:
        prog.train(was_training)
    count, loss_sum = _summed_over_processes(grad_sum + fisher_sum, count, loss_sum)
    if count == 0:
        raise TrainingError("estimate_fisher: got no examples")
    for i, st in enumerate(states):
        prog.method(st.site.group).accept_estimate(st, grad_sum[i] / count, fisher_sum[i] / count)
    prog.estimate_step.fill_(int(prog.step_count))
    return loss_sum / count


def _summed_over_processes(tensors: list[torch.Tensor], count: int, loss_sum: float,
                           device: torch.device | None = None) -> tuple[int, float]:
    """Under an initialised process group of several processes (torchrun), the sums of every
    process's estimate (in place) and counts, so every process selects from the same g and G."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return count, loss_sum
    for t in tensors:
        dist.all_reduce(t)
    device = tensors[0].device if tensors else (device or torch.device("cpu"))
    totals = torch.tensor([float(count), loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return int(totals[0].item()), float(totals[1].item())


# ------------------------------------------------------------------ in the fine-pruning loop
def draw_examples(data: Iterator[Any], examples: int, chunk: int) -> list[Any]:
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


@torch.no_grad()
def mean_loss(prog: torch.nn.Module, chunks: list[Any], objective: Objective) -> float:
    """Mean loss over `chunks` (each weighted by its examples), in eval mode."""
    was_training = prog.training
    prog.eval()
    total = weight = 0.0
    try:
        for chunk in chunks:
            n = batch_size_of(chunk)
            total += float(objective.loss(objective.forward(prog, chunk, None), chunk)) * n
            weight += n
    finally:
        prog.train(was_training)
    weight, total = _summed_over_processes([], int(weight), total, next(prog.parameters()).device)
    return total / weight


def logits_fn_of(prog: Any, objective: Objective) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None:
    """The objective's cross-entropy logits and targets of an item, for `estimate_fisher`."""
    rows = objective.rows
    if rows is None:
        return None
    return lambda chunk: rows(objective.forward(prog, chunk, None), chunk)


def check(prog: Any, objective: Objective) -> None:
    """Before training: a group whose curvature is the Gauss-Newton diagonal of a softmax
    cross-entropy needs an objective that is one (not model.py's own `loss`)."""
    if objective.rows is not None:
        return
    for plan in estimating_groups(prog):
        kind = curvature_of(prog, plan.index)
        if kind in ("ggn", "ggn_mc"):
            raise TrainingError(
                f"prune[{plan.index}].curvature = {kind!r} is the Gauss-Newton diagonal of a softmax "
                f"cross-entropy, but the loss is {objective.description}: set curvature = "
                f"\"empirical_fisher\" in that [[prune]] group")


@dataclass
class Iteration:
    """The pruning iterations of a loss-modelling prune at one step (one, or pi with an `at_once`
    schedule), each measured on its own estimate's examples; `whole` is Delta-L of the whole
    prune, measured on the first iteration's examples (loss modelling Table 1: before any
    fine-tuning). `finish` after `prog.step()` completes them."""

    chunks: list[Any]
    objective: Objective
    loss_before: float
    number: int = 1
    records: list[dict[str, float]] = field(default_factory=list)
    first: tuple[list[Any], float, float] | None = None   # chunks, L(theta), density before
    density_before: float = 1.0
    whole: dict[str, float] = field(default_factory=dict)

    def finish(self, step: int, prog: Any) -> dict[str, float]:
        """The last iteration's record (all of them are in `records` afterwards)."""
        after = mean_loss(prog, self.chunks, self.objective)
        record = {"step": step, "iteration": self.number, "density": prog.density(),
                  "loss_before": self.loss_before, "loss_after": after,
                  "delta_loss": abs(after - self.loss_before)}
        self.records.append(record)
        chunks, before, density = self.first or (self.chunks, self.loss_before, self.density_before)
        whole_after = after if self.first is None else mean_loss(prog, chunks, self.objective)
        self.whole = {"step": step, "iterations": len(self.records), "density_before": density,
                      "density": prog.density(), "loss_before": before, "loss_after": whole_after,
                      "delta_loss": abs(whole_after - before)}
        return record


def before_pruning(prog: Any, data: Iterator[Any], objective: Objective) -> Iteration | None:
    """Before a loss-modelling prune: estimate g and the diagonal curvature (Algorithm 1, line 6)
    on fresh examples; None when no prune is due. With an `at_once` schedule this runs the first
    pi - 1 iterations too (estimate, prune to the next density, measure), with no training in
    between. Call it after `optimizer.step()` and before `prog.step()`; `Iteration.finish` after
    `prog.step()` gives Delta-L of each iteration and of the whole prune."""
    if not due(prog):
        return None
    check(prog, objective)
    opts = options(prog)
    chunk = opts["fisher_chunk"]
    logits_fn = logits_fn_of(prog, objective)

    def loss_fn(item: Any) -> torch.Tensor:
        return objective.loss(objective.forward(prog, item, None), item)

    def estimate() -> tuple[list[Any], float]:
        chunks = draw_examples(data, opts["fisher_examples"], chunk)
        estimate_fisher(prog, chunks, loss_fn, chunk_size=chunk, logits_fn=logits_fn)
        # L(theta) with the same per-example weighting as the Delta-L measured after pruning
        return chunks, mean_loss(prog, chunks, objective)

    schedule, step = prog.schedule, int(prog.step_count) + 1
    density_before = prog.density()
    records: list[dict[str, float]] = []
    first = None
    pi = int(schedule.iterations)
    if schedule.at_once and pi > 1:
        for i in range(1, pi):
            chunks, before = estimate()
            if first is None:
                first = (chunks, before, density_before)
            for plan in estimating_groups(prog):
                params = schedule.params(plan.density)
                prog.prune_iteration(plan.index, schedules.density_after_iteration(schedule.kind, i - 1, params),
                                     schedules.density_after_iteration(schedule.kind, i, params))
            after = mean_loss(prog, chunks, objective)
            records.append({"step": step, "iteration": i, "density": prog.density(), "loss_before": before,
                            "loss_after": after, "delta_loss": abs(after - before)})
    number = schedules.pruning_iteration(step, schedule.params(1.0)) if schedule.kind in schedules.ITERATIVE else 1
    chunks, before = estimate()
    return Iteration(chunks, objective, before, number, records, first, density_before)
