"""The Program: a rewritten model that trains with masks and can be finalized and exported.

It is an nn.Module wrapping the rewritten GraphModule (`prog.module`). Masks are buffers and
scores are parameters of that module, named after the site (`fc1.weight_mask`,
`fc1.weight_scores`), so `state_dict()` holds weights, scores, masks and the schedule position,
and `load_state_dict()` resumes bit-exactly.

Expected loop order (gradient-based criteria read the gradients at `step()`):
    loss = loss_fn(prog(x)) + prog.regularization()
    loss.backward(); optimizer.step(); prog.step(); optimizer.zero_grad()
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

from sparsec import blocks, methods, schedules
from sparsec.ir import Site, get_attr_value, graph_info
from sparsec.methods.base import SiteState
from sparsec.passes.attach_schedule import GroupPlan
from sparsec.passes.insert_masks import mask_name, scores_name
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
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))
        self.example_inputs: tuple = ()   # set by sparsec.compile; used by export_onnx
        self.example_kwargs: dict = {}
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
    def step(self) -> None:
        """Call once per optimizer step, after `optimizer.step()`: advances the schedule and
        recomputes masks when due."""
        self.step_count += 1
        if int(self.step_count) % self._schedule.every == 0:
            self.update_masks()

    def regularization(self) -> torch.Tensor:
        """The term to add to the loss (0 when no regularizer is attached)."""
        total = torch.zeros(())
        for plan in self._plans:
            method = self._methods[plan.index]
            reg = getattr(method, "regularization", None)
            if reg is not None:
                total = total + reg([self._state(n) for n in plan.sites])
        return total

    @torch.no_grad()
    def update_masks(self) -> None:
        """Recompute every group's masks at the schedule's current density."""
        for plan in self._plans:
            self._update_group(plan)

    def _state(self, name: str) -> SiteState:
        return SiteState(site=self._site_by_name[name], weight=get_attr_value(self.module, name),
                         mask=get_attr_value(self.module, mask_name(name)),
                         scores=self.scores().get(name))

    def _update_group(self, plan: GroupPlan) -> None:
        method = self._methods[plan.index]
        density = self.target_density(plan.index)
        states = [self._state(name) for name in plan.sites]
        if density >= 1.0:
            for st in states:
                st.mask.fill_(1)
            return
        importances = [method.importance(st) for st in states]
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
        module.train(self.training)
        return module

    def export_onnx(self, path: str, example_inputs: Any = None, example_kwargs: Any = None,
                    **options: Any):
        """Export the finalized model to ONNX, verified against PyTorch on the example inputs
        (those given to `sparsec.compile` unless others are passed). Options: `dynamic`
        (dynamic batch/sequence, default True), `verify` (default True), `tolerance`."""
        from sparsec.export import export_onnx
        from sparsec.modelfile import as_tuple

        args = as_tuple(example_inputs) if example_inputs is not None else self.example_inputs
        kwargs = dict(example_kwargs) if example_kwargs is not None else self.example_kwargs
        return export_onnx(self.finalize(), path, args, kwargs, **options)
