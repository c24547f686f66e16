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
        prog.estimate_fisher(examples, lambda ex: loss_of(prog, ex))
    prog.step(); optimizer.zero_grad()

Per-site state of a method (score averages, uncertainty, saliencies) lives in buffers of the
GraphModule named after the site (`fc1.weight_ema`), so it is in `state_dict()` too.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from sparsec import blocks, methods, schedules
from sparsec.ir import Site, get_attr_value, graph_info
from sparsec.errors import SpecError, TrainingError
from sparsec.methods.base import MaskContext, SiteState, StepContext
from sparsec.passes.attach_schedule import TRAINING_TABLES, GroupPlan
from sparsec.passes.insert_masks import mask_name, scores_name, state_name
from sparsec.topv import top_v


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
        self._plans: tuple[GroupPlan, ...] = info.attached["groups"]
        self._methods: dict[int, methods.Method] = info.attached["methods"]
        self._schedule = info.attached["schedule"]
        for plan in self._plans:
            kinds = self._methods[plan.index].schedule_kinds
            if kinds and self._schedule.kind not in kinds:
                allowed = ", ".join(repr(k) for k in kinds)
                raise SpecError([f"schedule.kind: {self._schedule.kind!r} is not supported by method "
                                 f"{self._methods[plan.index].name!r} (allowed: {allowed})"])
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))
        if any(m.needs_estimate for m in self._methods.values()):
            # the step at which prog.estimate_fisher last ran (-1: never)
            self.register_buffer("estimate_step", torch.full((), -1, dtype=torch.int64))
        self.example_inputs: tuple = ()   # set by sparsec.compile; used by export_onnx
        self.example_kwargs: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._distill = info.attached.get("distill")
        # the spec's training-time tables ([distill], [self_regularization]) for the training loop
        self.training_tables: dict[str, dict] = {k: dict(info.attached[k]) for k in TRAINING_TABLES
                                                 if k in info.attached}
        # The teacher is the dense model before any mask (masks are all ones until update_masks):
        # frozen, in eval mode, and kept out of parameters() and state_dict().
        object.__setattr__(self, "_teacher", self._dense_copy() if self._distill else None)
        self.update_masks()

    # ----------------------------------------------------------------- forward and state views
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def weights(self) -> dict[str, torch.nn.Parameter]:
        return {s.name: get_attr_value(self.module, s.name) for s in self.sites}

    def masks(self) -> dict[str, torch.Tensor]:
        return {s.name: get_attr_value(self.module, mask_name(s.name)) for s in self.sites}

    def scores(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for s in self.sites:
            try:
                out[s.name] = get_attr_value(self.module, scores_name(s.name))
            except AttributeError:
                continue
        return out

    def density(self) -> float:
        """Kept fraction over all sites, read from the masks."""
        kept = total = 0
        for mask in self.masks().values():
            kept += int(torch.count_nonzero(mask))
            total += mask.numel()
        return kept / total if total else 1.0

    def site_densities(self) -> dict[str, float]:
        return {name: int(torch.count_nonzero(m)) / m.numel() for name, m in self.masks().items()}

    def target_density(self, group: int = 0) -> float:
        """The density the schedule asks of `group` at the current step."""
        plan = self._plans[group]
        return schedules.density_at(self._schedule.kind, int(self.step_count),
                                    self._schedule.params(plan.density))

    def score_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.scores().values())

    def model_parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter except the scores (for a separate score learning rate)."""
        ids = {id(p) for p in self.score_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    # ---------------------------------------------------------------------------- training
    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer whose update `pins` reads at `step()` (its dtheta_hat, PINS Eq 11).
        Not part of `state_dict()`: attach it again after resuming."""
        self._optimizer = optimizer

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call once per optimizer step, after `optimizer.step()` and before `zero_grad()`:
        gradient-based methods read the step's gradients (and `optimizer`'s update, attached
        here when given), then the schedule advances and masks are recomputed when due."""
        if optimizer is not None:
            self._optimizer = optimizer
        context = None
        for plan in self._plans:
            method = self._methods[plan.index]
            if not method.observes():
                continue
            context = context or StepContext(step=int(self.step_count), optimizer=self._optimizer)
            with torch.no_grad():
                method.observe([self._state(n) for n in plan.sites], context)
        self.step_count += 1
        if int(self.step_count) % self._schedule.every == 0:
            self.update_masks()
        self._zero_pruned()

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        """theta <- theta_hat * M (PINS Eq 2) for methods trained with dense gradients."""
        for plan in self._plans:
            if not self._methods[plan.index].zeroes_pruned:
                continue
            for name in plan.sites:
                get_attr_value(self.module, name).mul_(get_attr_value(self.module, mask_name(name)))

    def regularization(self) -> torch.Tensor:
        """The term to add to the loss (0 when no regularizer is attached)."""
        total = torch.zeros(())
        for plan in self._plans:
            method = self._methods[plan.index]
            if not method.regularizes():
                continue
            reg = method.regularization([self._state(n) for n in plan.sites])
            if reg is not None:
                total = total + reg
        return total

    # ---------------------------------------------------------------------- distillation
    @property
    def task_loss_weight(self) -> float:
        """Weight of the task loss: 1 - alpha with a [distill] table, else 1."""
        return 1.0 - float(self._distill["alpha"]) if self._distill else 1.0

    def distillation_loss(self, outputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """alpha * T^2 * KL(teacher || student) on the logits of `outputs` (this program's outputs
        on `*args, **kwargs`) with the [distill] table's alpha and temperature T (movement pruning
        section 6; Hinton et al. 2014); 0 without [distill]. The teacher is the dense model as it
        was compiled. Train on `task_loss_weight * task_loss + distillation_loss(...)`."""
        if not self._distill:
            return torch.zeros(())
        from sparsec.distill import distillation_kl
        from sparsec.train import logits_of

        with torch.no_grad():
            teacher = self._teacher(*args, **kwargs)
        kl = distillation_kl(logits_of(outputs), logits_of(teacher), float(self._distill["temperature"]))
        return float(self._distill["alpha"]) * kl

    def _dense_copy(self) -> fx.GraphModule:
        from sparsec.passes.bake_masks import BakeMasks
        from sparsec.pipeline import run_pipeline

        teacher = run_pipeline(copy.deepcopy(self.module), [BakeMasks()])
        self._drop_state_buffers(teacher)
        for param in teacher.parameters():
            param.requires_grad_(False)
        return teacher.eval()

    # ---------------------------------------------------------------- loss-modelling estimates
    def estimate_due(self) -> bool:
        """True when the next `step()` prunes a group whose method needs `estimate_fisher` first
        (lm, qm, obd: a pruning iteration of Algorithm 1 is due)."""
        t = int(self.step_count) + 1
        if t % self._schedule.every:
            return False
        return any(self._methods[p.index].needs_estimate and self._schedule_drops(p, t) for p in self._plans)

    def _schedule_drops(self, plan: GroupPlan, t: int) -> bool:
        """True when the target density at step t is below the one of the previous mask update."""
        return self._density_at(plan, t) < self._density_at(plan, max(0, t - self._schedule.every))

    def estimate_options(self) -> dict[str, int]:
        """How many examples `estimate_fisher` should see and in which chunks: the largest
        `fisher_examples` and smallest `fisher_chunk` of the groups that need an estimate."""
        opts = [self._methods[p.index].opts for p in self._plans if self._methods[p.index].needs_estimate]
        if not opts:
            return {}
        return {"fisher_examples": max(int(o["fisher_examples"]) for o in opts),
                "fisher_chunk": min(int(o["fisher_chunk"]) for o in opts)}

    def estimate_fisher(self, examples: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor],
                        chunk_size: int = 1) -> float:
        """Estimate, for every site whose method needs it, the mean gradient g and the diagonal
        empirical Fisher G_kk = mean_i (dl_i/dtheta_k)^2 (the Gauss-Newton diagonal of loss
        modelling Appendix A) over `examples`: `loss_fn(example)` returns this program's loss on
        one example. Pass single examples for the paper's exact estimate (1000 of them); an item
        that is a chunk of c examples counts its squared mean gradient times `chunk_size` = c.
        Runs in eval mode, leaves `.grad` untouched, and returns the mean loss L(theta).
        Call it before each pruning step (`estimate_due()`), after `optimizer.step()`."""
        plans = [p for p in self._plans if self._methods[p.index].needs_estimate]
        names = [n for p in plans for n in p.sites]
        if not names:
            raise TrainingError("estimate_fisher: no group of this program uses lm, qm or obd")
        weights = [get_attr_value(self.module, n) for n in names]
        grad_sum = [torch.zeros_like(w) for w in weights]
        fisher_sum = [torch.zeros_like(w) for w in weights]
        count, loss_sum = 0, 0.0
        was_training = self.training
        self.eval()
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
            self.train(was_training)
        if count == 0:
            raise TrainingError("estimate_fisher: got no examples")
        for i, name in enumerate(names):
            method = self._methods[self._site_by_name[name].group]  # type: ignore[index]
            method.accept_estimate(self._state(name), grad_sum[i] / count, fisher_sum[i] / count)
        self.estimate_step.fill_(int(self.step_count))
        return loss_sum / count

    @torch.no_grad()
    def update_masks(self) -> None:
        """Recompute every group's masks at the schedule's current density."""
        for plan in self._plans:
            self._update_group(plan)

    def _state(self, name: str) -> SiteState:
        method = self._methods[self._site_by_name[name].group]  # type: ignore[index]
        scores = None
        if method.learns_scores:
            scores = get_attr_value(self.module, scores_name(name))
        return SiteState(site=self._site_by_name[name], weight=get_attr_value(self.module, name),
                         mask=get_attr_value(self.module, mask_name(name)), scores=scores,
                         buffers={k: get_attr_value(self.module, state_name(name, k)) for k in method.state})

    def _density_at(self, plan: GroupPlan, t: int) -> float:
        return schedules.density_at(self._schedule.kind, t, self._schedule.params(plan.density))

    def _update_group(self, plan: GroupPlan) -> None:
        method = self._methods[plan.index]
        density = self.target_density(plan.index)
        states = [self._state(name) for name in plan.sites]
        if density >= 1.0 and method.density_target:
            for st in states:
                st.mask.fill_(1)
            return
        if method.prune_only and not self._schedule_drops(plan, int(self.step_count)):
            return  # Algorithm 1 of loss modelling only prunes, at its iterations: nothing to do now
        if method.needs_estimate and int(self.estimate_step) < int(self.step_count) - 1:
            raise TrainingError(
                f"method {method.name!r} (sites {', '.join(plan.sites[:3])}"
                f"{', ...' if len(plan.sites) > 3 else ''}) prunes at step {int(self.step_count)} "
                f"but has no fresh estimate: call prog.estimate_fisher(examples, loss_fn) after "
                f"optimizer.step() and before prog.step() whenever prog.estimate_due()")
        context = MaskContext(step=int(self.step_count), kind=self._schedule.kind,
                              total=int(self._schedule.total), every=int(self._schedule.every),
                              optimizer=self._optimizer)
        chosen = method.select_at(states, density, plan.scope, context)
        if chosen is not None:
            for st, grid in zip(states, chosen):
                st.mask.copy_(blocks.expand(grid, st.site.shape, st.site.block))
            return
        importances = [method.importance(st) for st in states]
        if method.prune_only:
            importances = [imp.masked_fill(blocks.block_reduce(st.mask, st.site.block, "max") == 0,
                                           float("-inf")) for imp, st in zip(importances, states)]
        even = all(st.site.padding == (0, 0) and st.site.block == states[0].site.block for st in states)
        sizes = None if even else [blocks.block_sizes(st.site.shape, st.site.block) for st in states]
        if plan.scope == "global":
            keeps = top_v(importances, sizes, density)
        else:
            keeps = [top_v([imp], None if sizes is None else [sizes[i]], density, min_blocks=1)[0]
                     for i, imp in enumerate(importances)]
        for st, keep in zip(states, keeps):
            st.mask.copy_(blocks.expand(keep, st.site.shape, st.site.block))

    # ------------------------------------------------------------------------------ output
    def finalize(self) -> fx.GraphModule:
        """A plain module with the masks baked into the weights and no scores or masks."""
        from sparsec.passes.bake_masks import BakeMasks
        from sparsec.pipeline import run_pipeline

        module = copy.deepcopy(self.module)
        module = run_pipeline(module, [BakeMasks()])
        self._drop_state_buffers(module)
        module.train(self.training)
        return module

    def _drop_state_buffers(self, module: fx.GraphModule) -> None:
        """Remove the methods' per-site state buffers from a baked copy."""
        for site in self.sites:
            for key in self._methods[site.group].state:  # type: ignore[index]
                owner, _, leaf = state_name(site.name, key).rpartition(".")
                delattr(module.get_submodule(owner) if owner else module, leaf)

    def lower(self, **options: Any) -> fx.GraphModule:
        """A copy with masks baked and the sites that pay off rewritten into block-sparse ops
        (sparsec.export.ExportOptions: `int8`, `policy`, `min_speedup`, `block`). It runs in
        PyTorch; `graph_info(gm).attached["lowering"]` says per site what was done and why."""
        from sparsec.export import ExportOptions, lower

        return lower(self.module, ExportOptions.of(options))

    def export_onnx(self, path: str, example_inputs: Any = None, example_kwargs: Any = None,
                    **options: Any):
        """Lower and export to ONNX, verified against PyTorch on the example inputs (those given
        to `sparsec.compile` unless others are passed); returns a path-like ExportResult.
        Options (sparsec.export.ExportOptions): `lower` (default True; False writes the dense
        form), `int8` (INT8 blocks with per-block scales), `policy` (cost | always | never),
        `min_speedup`, `block`, `dynamic` (dynamic batch/sequence, default True), `verify`
        (default True), `tolerance` (1e-4, relative to the output scale), `kernel` (also verify
        with sparsec's native kernel when available)."""
        from sparsec.export import ExportOptions, export_onnx, lower
        from sparsec.modelfile import as_tuple

        opts = ExportOptions.of(options)
        args = as_tuple(example_inputs) if example_inputs is not None else self.example_inputs
        kwargs = dict(example_kwargs) if example_kwargs is not None else self.example_kwargs
        dense = self.finalize().eval()
        module = lower(self.module, opts) if opts.lower else dense
        return export_onnx(module, path, args, kwargs, opts, reference=dense if opts.lower else None)
