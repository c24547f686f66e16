"""The Program: a rewritten model that trains with masks and can be finalized and exported.

It is an nn.Module wrapping the rewritten GraphModule (`prog.module`). Masks are buffers and
scores are parameters of that module, named after the site (`fc1.weight_mask`,
`fc1.weight_scores`), so `state_dict()` holds weights, scores, masks and the schedule position,
and `load_state_dict()` resumes bit-exactly.

Expected loop order (gradient-based criteria read the gradients at `step()`, so `zero_grad()` comes
after it; `pins` also reads the update the optimizer has just applied, so attach the optimizer):
    prog.attach_optimizer(optimizer)                    # once (or prog.step(optimizer=optimizer))
    out = prog(x)
    loss = prog.task_loss_weight * loss_fn(out) + prog.distillation_loss(out, x) + prog.regularization()
    loss.backward(); optimizer.step()
    if prog.estimate_due():                             # loss-modelling methods (lm, qm, obd) only
        prog.estimate_fisher(examples, lambda ex: loss_of(prog, ex),
                             logits_fn=lambda ex: logits_and_targets(prog, ex))   # [N, C], [N]
    prog.step(); optimizer.zero_grad()

The Program decides *when* (the schedule, `step()`); each group's Method decides *what* through
its hooks (sparsec.methods.base); sparsec.masking does the Top_v; sparsec.estimation the data
estimates. Per-site state of a method (score averages, saliencies) lives in buffers of the
GraphModule named after the site (`fc1.weight_ema`), so it is in `state_dict()` too; methods and
tools reach it through `site_states()`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from sparsec import estimation, masking, schedules
from sparsec.errors import SpecError, TrainingError
from sparsec.ir import (GroupPlan, TrainingTables, get_attr_value, graph_info, mask_name,
                        scores_name, state_name)
from sparsec.methods.base import MaskContext, Method, StepContext
from sparsec.site import Site, SiteState
from sparsec.spec.model import ScheduleSpec


class Program(torch.nn.Module):
    def __init__(self, module: fx.GraphModule):
        super().__init__()
        info = graph_info(module)
        missing = {"masks_inserted", "schedule_attached"} - info.facts
        if missing:
            raise ValueError(f"Program needs a rewritten module (missing: {', '.join(sorted(missing))})")
        self.module = module
        self.sites: list[Site] = list(info.sites.values())
        self._site_by_name = {s.name: s for s in self.sites}
        self._groups: tuple[GroupPlan, ...] = info.groups
        self._methods: dict[int, Method] = dict(info.methods)
        assert info.schedule is not None
        self._schedule: ScheduleSpec = info.schedule
        for plan in self._groups:
            kinds = self._methods[plan.index].schedule_kinds
            if kinds and self._schedule.kind not in kinds:
                allowed = ", ".join(repr(k) for k in kinds)
                raise SpecError([f"schedule.kind: {self._schedule.kind!r} is not supported by method "
                                 f"{plan.method!r} (allowed: {allowed})"])
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))
        if estimation.estimating_groups(self):
            # the step at which prog.estimate_fisher last ran (-1: never)
            self.register_buffer("estimate_step", torch.full((), -1, dtype=torch.int64))
        self.example_inputs: tuple = ()   # set by sparsec.compile; used by export_onnx
        self.example_kwargs: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        # at_once schedules: group -> (step, pruning iterations done by prune_iteration at that step)
        self._iterations_done: dict[int, tuple[int, int]] = {}
        # the spec's training-time tables ([distill], [self_regularization]) for the training loop
        self.training_tables: TrainingTables = info.training
        # The teacher is the dense model before any mask (masks are all ones until update_masks):
        # frozen, in eval mode, and kept out of parameters() and state_dict().
        distill = self.training_tables.distill
        object.__setattr__(self, "_teacher", self._frozen_dense_copy() if distill else None)
        self.update_masks()

    # ----------------------------------------------------------------- forward and state views
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Program:
        """`.to()`, `.cuda()`, `.half()` reach the distillation teacher too (it is kept out of the
        submodules so that it stays out of parameters() and state_dict())."""
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    @property
    def groups(self) -> tuple[GroupPlan, ...]:
        """One plan per [[prune]] group: its index, method, final density, scope and sites."""
        return self._groups

    @property
    def schedule(self) -> ScheduleSpec:
        return self._schedule

    def method(self, group: int) -> Method:
        """The Method instance of group `group` (its options in `.opts`)."""
        return self._methods[group]

    def state_of(self, name: str) -> SiteState:
        """The live tensors of site `name`: weight, mask, scores and the method's state buffers."""
        site = self._site_by_name[name]
        method = self._methods[site.group]  # type: ignore[index]
        scores = get_attr_value(self.module, scores_name(name)) if method.learns_scores else None
        return SiteState(site=site, weight=get_attr_value(self.module, name),
                         mask=get_attr_value(self.module, mask_name(name)), scores=scores,
                         buffers={k: get_attr_value(self.module, state_name(name, k)) for k in method.state})

    def site_states(self, group: int | None = None) -> list[SiteState]:
        """The SiteState of every site (of one group when `group` is given), in graph order."""
        if group is None:
            return [self.state_of(s.name) for s in self.sites]
        return [self.state_of(name) for name in self._groups[group].sites]

    def weights(self) -> dict[str, torch.nn.Parameter]:
        return {s.name: get_attr_value(self.module, s.name) for s in self.sites}

    def masks(self) -> dict[str, torch.Tensor]:
        return {s.name: get_attr_value(self.module, mask_name(s.name)) for s in self.sites}

    def scores(self) -> dict[str, torch.nn.Parameter]:
        return {s.name: get_attr_value(self.module, scores_name(s.name)) for s in self.sites
                if self._methods[s.group].learns_scores}  # type: ignore[index]

    def density(self) -> float:
        """Kept fraction over all sites, read from the masks."""
        kept = total = 0
        for mask in self.masks().values():
            kept += int(torch.count_nonzero(mask))
            total += mask.numel()
        return kept / total if total else 1.0

    def group_density(self, group: int) -> float:
        """Kept fraction over the sites of one group, read from the masks."""
        masks = [get_attr_value(self.module, mask_name(name)) for name in self._groups[group].sites]
        total = sum(m.numel() for m in masks)
        return sum(int(torch.count_nonzero(m)) for m in masks) / total if total else 1.0

    def site_densities(self) -> dict[str, float]:
        return {name: int(torch.count_nonzero(m)) / m.numel() for name, m in self.masks().items()}

    def density_at(self, group: int, step: int) -> float:
        """The density the schedule asks of `group` at optimizer step `step`."""
        return schedules.density_at(self._schedule.kind, step,
                                    self._schedule.params(self._groups[group].density))

    def target_density(self, group: int = 0) -> float:
        """The density the schedule asks of `group` at the current step."""
        return self.density_at(group, int(self.step_count))

    def score_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.scores().values())

    def model_parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter except the scores (for a separate score learning rate)."""
        ids = {id(p) for p in self.score_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    # ---------------------------------------------------------------------------- training
    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer whose update `pins` reads at `step()` (its dtheta_hat, PINS Eq 11) and whose
        moments `dynsparse` zeroes. Not part of `state_dict()`: attach it again after resuming."""
        self._optimizer = optimizer

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call once per optimizer step, after `optimizer.step()` and before `zero_grad()`:
        gradient-based methods read the step's gradients (and `optimizer`'s update, attached
        here when given), then the schedule advances and masks are recomputed when due."""
        if optimizer is not None:
            self._optimizer = optimizer
        context = StepContext(step=int(self.step_count), optimizer=self._optimizer)
        for plan in self._groups:
            method = self._methods[plan.index]
            if method.observes():
                with torch.no_grad():
                    method.observe(self.site_states(plan.index), context)
        self.step_count += 1
        if int(self.step_count) % self._schedule.every == 0:
            self.update_masks()
        for plan in self._groups:
            method = self._methods[plan.index]
            if method.acts_after_step():
                method.after_step(self.site_states(plan.index), context)

    def step_reads_parameters(self) -> bool:
        """Whether the next `step()` reads or writes weights, scores, gradients or the optimizer's
        state: a method observes every step or acts after it, or the masks are recomputed. (A
        sharded trainer gathers them whole only then.)"""
        if (int(self.step_count) + 1) % self._schedule.every == 0:
            return True
        return any(m.observes() or m.acts_after_step() for m in self._methods.values())

    @torch.no_grad()
    def update_masks(self) -> None:
        """Recompute every group's masks at the schedule's current density."""
        step = int(self.step_count)
        for plan in self._groups:
            previous = self.density_at(plan.index, max(0, step - self._schedule.every))
            density = self.target_density(plan.index)
            self._check_iterations_done(plan, step, previous, density)
            self._select(plan, previous, density)

    @torch.no_grad()
    def prune_iteration(self, group: int, previous: float, density: float) -> None:
        """One of the first pi - 1 pruning iterations of an `at_once` schedule (loss modelling
        Algorithm 1 inside one step): mask `group` at `density` now, without advancing the step.
        Call it after a fresh `estimate_fisher`; sparsec.estimation.before_pruning does both."""
        self._select(self._groups[group], previous, density)
        step = int(self.step_count)
        done_at, done = self._iterations_done.get(group, (-1, 0))
        self._iterations_done[group] = (step, done + 1 if done_at == step else 1)

    def _select(self, plan: GroupPlan, previous: float, density: float) -> None:
        step = int(self.step_count)
        context = MaskContext(
            step=step, kind=self._schedule.kind, total=int(self._schedule.total),
            every=int(self._schedule.every), optimizer=self._optimizer, previous_density=previous,
            estimated_at=int(self.estimate_step) if hasattr(self, "estimate_step") else -1)
        states = self.site_states(plan.index)
        grids = self._methods[plan.index].select(states, density, plan.scope, context)
        if grids is not None:
            masking.write(states, grids)

    def _check_iterations_done(self, plan: GroupPlan, step: int, previous: float, density: float) -> None:
        """An `at_once` schedule prunes an estimating group in pi iterations at one step: the first
        pi - 1 must have been done (`prune_iteration`) before the last one, at `prog.step()`."""
        pi = int(self._schedule.iterations)
        if not (self._schedule.at_once and pi > 1 and density < previous
                and self._methods[plan.index].estimate_options() is not None):
            return
        done_at, done = self._iterations_done.get(plan.index, (-1, 0))
        if done_at != step - 1 or done != pi - 1:
            raise TrainingError(
                f"group {plan.index} ({plan.method}): schedule.at_once prunes in {pi} iterations at "
                f"step {step}, but {done if done_at == step - 1 else 0} of the first {pi - 1} were done: "
                f"call sparsec.estimation.before_pruning(prog, data, objective) after optimizer.step() "
                f"and before prog.step() (the fine-pruning loop and the Trainer do)")

    def regularization(self) -> torch.Tensor:
        """The term to add to the loss (0 when no regularizer is attached)."""
        total = torch.zeros(())
        for plan in self._groups:
            method = self._methods[plan.index]
            if not method.regularizes():
                continue
            reg = method.regularization(self.site_states(plan.index))
            if reg is not None:
                total = total + reg
        return total

    # ---------------------------------------------------------------------- distillation
    @property
    def task_loss_weight(self) -> float:
        """Weight of the task loss: 1 - alpha with a [distill] table, else 1."""
        distill = self.training_tables.distill
        return 1.0 - float(distill["alpha"]) if distill else 1.0

    def distillation_loss(self, outputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """alpha * T^2 * KL(teacher || student) on the logits of `outputs` (this program's outputs
        on `*args, **kwargs`) with the [distill] table's alpha and temperature T (movement pruning
        section 6; Hinton et al. 2014); 0 without [distill]. The teacher is the dense model as it
        was compiled, or the one given to `set_teacher` (`[distill] teacher`). Train on `task_loss_weight * task_loss + distillation_loss(...)`."""
        distill = self.training_tables.distill
        if not distill:
            return torch.zeros(())
        from sparsec.training.distill import distillation_kl
        from sparsec.training.losses import logits_of

        with torch.no_grad():
            teacher = self._teacher(*args, **kwargs)
        kl = distillation_kl(logits_of(outputs), logits_of(teacher), float(distill["temperature"]))
        return float(distill["alpha"]) * kl

    def set_teacher(self, teacher: torch.nn.Module) -> None:
        """Distil from `teacher` instead of the dense copy (movement pruning Table 3: a separately
        fine-tuned model; sparsec.training.teacher loads the one `[distill] teacher` names). It is
        frozen, put in eval mode and moved to the Program's device; it stays out of parameters()
        and state_dict()."""
        if not self.training_tables.distill:
            raise SpecError(["distill: set_teacher needs a [distill] table in the spec"])
        for param in teacher.parameters():
            param.requires_grad_(False)
        device = next(iter(self.parameters()), torch.zeros(())).device
        object.__setattr__(self, "_teacher", teacher.to(device).eval())

    def _frozen_dense_copy(self) -> fx.GraphModule:
        teacher = self.finalize()
        for param in teacher.parameters():
            param.requires_grad_(False)
        return teacher.eval()

    # ---------------------------------------------------------------- loss-modelling estimates
    def estimate_due(self) -> bool:
        """True when the next `step()` prunes a group whose method needs `estimate_fisher` first
        (lm, qm, obd: a pruning iteration of Algorithm 1 is due)."""
        return estimation.due(self)

    def estimate_options(self) -> dict[str, int]:
        """How many examples `estimate_fisher` should see and in which chunks."""
        return estimation.options(self)

    def estimate_fisher(self, examples: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor],
                        chunk_size: int = 1,
                        logits_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
        """Estimate g and the diagonal curvature for the groups that need them (see
        sparsec.estimation.estimate_fisher; `logits_fn(example)` -> (logits [N, C], targets [N])
        of the cross-entropy is needed by curvature `ggn` / `ggn_mc`); returns the mean loss
        L(theta). Call it after `optimizer.step()` and before `prog.step()` whenever
        `estimate_due()`."""
        return estimation.estimate_fisher(self, examples, loss_fn, chunk_size, logits_fn)

    # ------------------------------------------------------------------------------ output
    def finalize(self) -> fx.GraphModule:
        """A plain module with the masks baked into the weights and no scores, masks or method
        state, in eval mode (call `.train()` on it to fine-tune further)."""
        from sparsec.lowering import stage

        return stage.baked_copy(self.module).eval()

    def lower(self, **options: Any) -> fx.GraphModule:
        """A copy with masks baked and the sites that pay off rewritten into sparse ops
        (sparsec.export.ExportOptions: `int8`, `policy`, `min_speedup`, `block`, and `target`
        (`sparsec` | `stock`), `measure`, `threads`: the runtime whose measured speed decides). It
        runs in PyTorch; `graph_info(gm).lowering` says per site what was done and why."""
        from sparsec.export.options import ExportOptions
        from sparsec.lowering import stage

        return stage.lowered_copy(self.module, **ExportOptions.of(options).lowering())

    def export_onnx(self, path: str, example_inputs: Any = None, example_kwargs: Any = None,
                    **options: Any):
        """Lower and export to ONNX, verified against PyTorch on the example inputs (those given
        to `sparsec.compile` unless others are passed); returns a path-like ExportResult.
        Options (sparsec.export.ExportOptions): `lower` (default True; False writes the dense
        form), `int8` (INT8 compute: int8 blocks with per-row scales, inputs quantized per row),
        `policy` (cost | always | never), `min_speedup`, `block`, `target` (`sparsec`: the kernel,
        or `stock`: plain onnxruntime, then the file is also timed against the dense one and never
        slower: see `result.stock_check`), `measure` (time layers on this machine, default True),
        `threads`, `dynamic` (dynamic batch/sequence, default True), `verify` (default True),
        `tolerance` (1e-4, relative to the output scale; `int8_tolerance`, 1e-2, with int8),
        `kernel` (also verify
        with sparsec's native kernel when available)."""
        from sparsec.export import export_module
        from sparsec.export.options import ExportOptions
        from sparsec.modelfile import as_tuple

        opts = ExportOptions.of(options)
        args = as_tuple(example_inputs) if example_inputs is not None else self.example_inputs
        kwargs = dict(example_kwargs) if example_kwargs is not None else self.example_kwargs
        return export_module(self.module, path, args, kwargs, opts)

