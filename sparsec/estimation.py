"""Data estimates for the loss-modelling methods (lm, qm, obd; Laurent et al. 2020, Algorithm 1).

Before each pruning iteration the mean gradient g and the diagonal curvature G of the loss are
estimated on examples of the training data (`estimate_fisher`); the methods turn them into
saliencies (sparsec.methods.loss_modelling). The fine-pruning loop draws the examples and measures
Delta-L = |L(theta + dtheta) - L(theta)| of the iteration on them (`before_pruning`).

Which groups need an estimate is each method's business (`Method.estimate_options`); the Program
exposes this module as `prog.estimate_due()`, `prog.estimate_options()` and `prog.estimate_fisher()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

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


def estimate_fisher(prog: Any, examples: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor],
                    chunk_size: int = 1) -> float:
    """Estimate, for every site whose method needs it, the mean gradient g and the diagonal
    empirical Fisher G_kk = mean_i (dl_i/dtheta_k)^2 (the Gauss-Newton diagonal of loss modelling
    Appendix A) over `examples`: `loss_fn(example)` returns the program's loss on one example. An
    item that is a chunk of c examples counts its squared mean gradient times `chunk_size` = c.
    Runs in eval mode, leaves `.grad` untouched, and returns the mean loss L(theta)."""
    states = [st for plan in estimating_groups(prog) for st in prog.site_states(plan.index)]
    if not states:
        raise TrainingError("estimate_fisher: no group of this program uses lm, qm or obd")
    weights = [st.weight for st in states]
    grad_sum = [torch.zeros_like(w) for w in weights]
    fisher_sum = [torch.zeros_like(w) for w in weights]
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
                fisher_sum[i] += g * g * chunk_size
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


@dataclass
class Iteration:
    """One pruning iteration of a loss-modelling method, measured on its estimate's examples."""

    chunks: list[Any]
    objective: Objective
    loss_before: float

    def finish(self, step: int, prog: Any) -> dict[str, float]:
        after = mean_loss(prog, self.chunks, self.objective)
        return {"step": step, "density": prog.density(), "loss_before": self.loss_before,
                "loss_after": after, "delta_loss": abs(after - self.loss_before)}


def before_pruning(prog: Any, data: Iterator[Any], objective: Objective) -> Iteration | None:
    """Before a loss-modelling pruning iteration: estimate g and the diagonal Fisher (Algorithm 1,
    line 6) on fresh examples; None when no iteration is due. Call it after `optimizer.step()` and
    before `prog.step()`; `Iteration.finish` after `prog.step()` gives Delta-L."""
    if not due(prog):
        return None
    opts = options(prog)
    chunks = draw_examples(data, opts["fisher_examples"], opts["fisher_chunk"])
    estimate_fisher(prog, chunks, lambda chunk: objective.loss(objective.forward(prog, chunk, None), chunk),
                    chunk_size=opts["fisher_chunk"])
    # L(theta) with the same per-example weighting as the Delta-L measured after pruning
    return Iteration(chunks, objective, mean_loss(prog, chunks, objective))
