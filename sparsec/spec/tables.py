"""The core tables of the spec and the rules across their keys."""
from __future__ import annotations

import re
from typing import Any, Mapping

from sparsec import methods, schedules
from sparsec.spec.fields import CAPTURE_FIELDS, TRAIN_FIELDS, prune_fields, schedule_fields
from sparsec.spec.model import ScheduleSpec
from sparsec.spec.registry import Extra, Problem, register_check, register_table
from sparsec.spec.values import quoted_list


def _method_options(entry: Mapping[str, Any]) -> Extra:
    """A group's own keys are its method's options; while its method is invalid or missing, no
    option of any method is flagged (the bad method is the one error worth reading)."""
    registered = methods.registered()
    owners: dict[str, list[str]] = {}
    for name, cls in registered.items():
        for key in cls.options:
            owners.setdefault(key, []).append(name)
    method = entry.get("method")
    chosen = registered.get(method) if isinstance(method, str) else None
    if chosen is None:
        return Extra(tolerated=frozenset(owners))
    hints = {key: f"it is an option of {quoted_list(names, 'method')}, not of {chosen.name!r}"
             for key, names in owners.items() if key not in chosen.options}
    return Extra(fields=dict(chosen.options), hints=hints)


register_table("prune", prune_fields, array=True, required=True, extra=_method_options,
               doc="One table per group of sites that share a method, a density and a block shape. "
                   "Groups must not overlap: a site that two groups select is an error (use "
                   "`exclude`). Besides the keys below, a group takes the keys of its method (see "
                   "[Methods](#methods)).")
register_table("schedule", schedule_fields, fill_when_absent=True,
               doc="How the density of every group moves from `initial_density` to the group's "
                   "`density` over optimizer steps, and how often masks are recomputed. Optional: "
                   "without it, masks are at the final density from step 0.")
register_table("train", TRAIN_FIELDS,
               doc="The fine-pruning loop `sparsec compile` runs with the model file's "
                   "`train_data()` and `loss()`. Optional: without it, sparsec compiles without "
                   "training (the caller trains `prog` itself, calling `prog.step()` after every "
                   "optimizer step).")
register_table("capture", CAPTURE_FIELDS, fill_when_absent=True,
               doc="How the model is captured as a torch.fx graph. Optional.")


@register_check('`schedule.kind = "cubic"` needs `total >= 1` and `warmup + cooldown < total`.')
def _check_cubic(resolved: Mapping[str, Any]) -> list[Problem]:
    schedule = resolved.get("schedule") or {}
    if schedule.get("kind") != "cubic" or "total" not in schedule:
        return []
    total = schedule["total"]
    if total < 1:
        return [("schedule.total", f"{total} is out of range for kind 'cubic' (allowed: an integer, "
                                   "1 <= x: the steps T over which the density decays)")]
    if "warmup" not in schedule or "cooldown" not in schedule:
        return []
    warmup, cooldown = schedule["warmup"], schedule["cooldown"]
    if warmup + cooldown < total:
        return []
    return [("schedule.warmup", f"warmup ({warmup}) + cooldown ({cooldown}) = {warmup + cooldown} "
                                f"leaves no steps to prune in (allowed for kind 'cubic': "
                                f"warmup + cooldown < total = {total})")]


@register_check("`linear` and `exponential` schedules over `total >= 1` steps need "
                "`warmup + cooldown < total` (else no iteration falls between them).")
def _check_iterative_span(resolved: Mapping[str, Any]) -> list[Problem]:
    schedule = resolved.get("schedule") or {}
    if schedule.get("kind") not in ("linear", "exponential") or not schedule.get("total") \
            or schedule.get("at_once"):
        return []
    total, warmup, cooldown = schedule["total"], schedule.get("warmup"), schedule.get("cooldown")
    if warmup is None or cooldown is None or warmup + cooldown < total:
        return []
    return [("schedule.warmup", f"warmup ({warmup}) + cooldown ({cooldown}) = {warmup + cooldown} "
                                f"leaves no steps for the pruning iterations (allowed for kind "
                                f"{schedule['kind']!r}: warmup + cooldown < total = {total})")]


@register_check("`schedule.at_once = true` needs an iterative kind (`linear` or `exponential`).")
def _check_at_once(resolved: Mapping[str, Any]) -> list[Problem]:
    schedule = resolved.get("schedule") or {}
    kind = schedule.get("kind")
    if not schedule.get("at_once") or kind in ("linear", "exponential") or kind is None:
        return []
    return [("schedule.at_once", f"true needs kind 'linear' or 'exponential' (the pruning iterations "
                                 f"of loss modelling Algorithm 1), not {kind!r}")]


@register_check("A schedule that prunes after a warm-up needs `train.steps > schedule.warmup`, or "
                "training ends before the first pruning step.")
def _check_train_passes_warmup(resolved: Mapping[str, Any]) -> list[Problem]:
    train, schedule = resolved.get("train") or {}, resolved.get("schedule") or {}
    steps, warmup = train.get("steps"), schedule.get("warmup")
    if steps is None or not warmup or schedule.get("kind") == "constant" or steps > warmup:
        return []
    return [("train.steps", f"{steps} steps end before pruning starts at schedule.warmup = {warmup}, "
                            f"so nothing would be pruned (allowed: an integer, {warmup + 1} <= x)")]


@register_check("`soft_movement` with `control = \"none\"` needs `score_init > threshold`, so that "
                "training starts dense.")
def _check_soft_movement_start(resolved: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for i, group in enumerate(resolved.get("prune") or []):
        if group.get("method") != "soft_movement" or group.get("control") != "none":
            continue
        init, threshold = group.get("score_init"), group.get("threshold")
        if init is not None and threshold is not None and init <= threshold:
            problems.append((f"prune[{i}].score_init", f"{init:g} is not above threshold = {threshold:g}: "
                                                       f"every weight would be pruned at step 0 "
                                                       f"(allowed: score_init > threshold)"))
    return problems


@register_check("`schedule.every <= schedule.total` when `total > 0`.")
def _check_every(resolved: Mapping[str, Any]) -> list[Problem]:
    schedule = resolved.get("schedule") or {}
    total, every = schedule.get("total"), schedule.get("every")
    if total is None or every is None or total == 0 or every <= total:
        return []
    return [("schedule.every", f"{every} is greater than schedule.total ({total}), so masks would not "
                               f"follow the schedule (allowed: an integer, 1 <= x <= {total})")]


@register_check("`train.steps >= schedule.total - schedule.cooldown`, so that training reaches the "
                "final density.")
def _check_train_covers_schedule(resolved: Mapping[str, Any]) -> list[Problem]:
    train, schedule = resolved.get("train") or {}, resolved.get("schedule") or {}
    steps, total, cooldown = train.get("steps"), schedule.get("total"), schedule.get("cooldown")
    if steps is None or total is None or cooldown is None or total == 0:
        return []
    needed = total - cooldown
    if steps >= needed:
        return []
    return [("train.steps", f"{steps} is less than schedule.total - schedule.cooldown = {needed}: the "
                            f"schedule would not reach its final density (allowed: an integer, "
                            f"{needed} <= x; lower schedule.total or raise train.steps)")]


@register_check("`train.device` is `auto`, `cpu`, `cuda` or `cuda:N`.")
def _check_device(resolved: Mapping[str, Any]) -> list[Problem]:
    device = (resolved.get("train") or {}).get("device")
    if not isinstance(device, str) or re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", device):
        return []
    return [("train.device", f"{device!r} is not a device (allowed: 'auto', 'cpu', 'cuda' or 'cuda:N')")]


@register_check('`train.parallel = "fsdp"` trains in `fp32` or `bf16`.')
def _check_sharded_precision(resolved: Mapping[str, Any]) -> list[Problem]:
    train = resolved.get("train") or {}
    if train.get("parallel") == "fsdp" and train.get("precision") == "fp16":
        return [("train.precision", "'fp16' needs a gradient scaler, which sparsec does not run over "
                                    "sharded gradients: with parallel = 'fsdp' use 'bf16' or 'fp32'")]
    return []


@register_check("`train.warmup_steps` and `train.score_warmup_steps` are at most `train.steps`.")
def _check_lr_warmup(resolved: Mapping[str, Any]) -> list[Problem]:
    train = resolved.get("train") or {}
    steps = train.get("steps")
    problems = []
    for key in ("warmup_steps", "score_warmup_steps"):
        value = train.get(key)
        if isinstance(steps, int) and isinstance(value, int) and value > steps:
            problems.append((f"train.{key}", f"{value} is more than train.steps = {steps}: the learning "
                                             f"rate would never finish warming up (allowed: an "
                                             f"integer, 0 <= x <= {steps})"))
    return problems


@register_check("Every `[[prune]]` group has at least one non-empty glob in `targets`.")
def _check_targets(resolved: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for i, group in enumerate(resolved.get("prune") or []):
        targets = group.get("targets")
        if targets == []:
            problems.append((f"prune[{i}].targets", "[] selects no site (allowed: a list of at least "
                                                    "one glob, e.g. [\"encoder.*\"])"))
        for j, glob in enumerate(targets or []):
            if not glob:
                problems.append((f"prune[{i}].targets[{j}]", "'' matches no site (allowed: a non-empty "
                                                             "glob)"))
    return problems


@register_check("A method's `scope` is one it supports: `soft_movement` and `l0` are global by "
                "nature (a threshold or a gate per weight, no ranking); for them `density` is not "
                "a target, the density reached is an outcome of `threshold` / `lambda`.")
def _check_method_scope(resolved: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for i, group in enumerate(resolved.get("prune") or []):
        cls = methods.registered().get(group.get("method"))  # type: ignore[arg-type]
        scope = group.get("scope")
        if cls is None or scope is None or scope in cls.scopes:
            continue
        allowed = ", ".join(repr(s) for s in cls.scopes)
        problems.append((f"prune[{i}].scope", f"{scope!r} is not supported by method {cls.name!r} "
                                              f"(allowed: {allowed})"))
    return problems


@register_check("`balanced = true` keeps the same number of blocks in every block row of each "
                "weight, so it needs `scope = \"local\"` and a method whose masks are a Top-v of its "
                "scores (not `dynsparse`; `soft_movement` and `l0` are global).")
def _check_balanced(resolved: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for i, group in enumerate(resolved.get("prune") or []):
        if not group.get("balanced"):
            continue
        cls = methods.registered().get(group.get("method"))  # type: ignore[arg-type]
        if cls is not None and not cls.balances:
            problems.append((f"prune[{i}].balanced", f"true is not supported by method {cls.name!r}, "
                                                     f"which does not select blocks by Top-v (allowed: "
                                                     f"false)"))
        elif group.get("scope") not in (None, "local"):
            problems.append((f"prune[{i}].balanced", f"true needs scope = 'local' (got "
                                                     f"{group.get('scope')!r}): every weight keeps its "
                                                     f"own blocks per row"))
    return problems


@register_check("A method's schedule is one it supports: `dynsparse` keeps its density constant "
                "(`schedule.kind = \"constant\"`).")
def _check_schedule_kind(resolved: Mapping[str, Any]) -> list[Problem]:
    kind = (resolved.get("schedule") or {}).get("kind")
    problems = []
    for i, group in enumerate(resolved.get("prune") or []):
        cls = methods.registered().get(group.get("method"))  # type: ignore[arg-type]
        if cls is None or kind is None or not cls.schedule_kinds or kind in cls.schedule_kinds:
            continue
        allowed = ", ".join(repr(k) for k in cls.schedule_kinds)
        problems.append(("schedule.kind", f"{kind!r} is not supported by method {cls.name!r} of "
                                          f"prune[{i}] (allowed: {allowed})"))
    return problems


@register_check("Methods that rank by gradients or a data estimate (`pins`, `sensitivity`, `lm`, "
                "`qm`, `obd`) need the schedule to keep every weight at step 0 (no gradient exists "
                "before the first backward): e.g. `cubic` or `one_shot` with `warmup >= 1`.")
def _check_gradient_start(resolved: Mapping[str, Any]) -> list[Problem]:
    schedule = resolved.get("schedule") or {}
    if any(key not in schedule for key in ScheduleSpec.__dataclass_fields__):
        return []
    spec = ScheduleSpec(**schedule)
    problems = []
    for i, group in enumerate(resolved.get("prune") or []):
        cls = methods.registered().get(group.get("method"))  # type: ignore[arg-type]
        if cls is None or not cls.needs_gradients or "density" not in group:
            continue
        start = schedules.density_at(spec.kind, 0, spec.params(group["density"]))
        if start < 1.0:
            problems.append((f"prune[{i}].method", f"{cls.name!r} ranks weights by gradients, but "
                                                   f"schedule kind {spec.kind!r} asks density {start:g} "
                                                   f"at step 0, before any gradient exists (allowed: a "
                                                   f"schedule that is dense at step 0, e.g. kind 'cubic' "
                                                   f"or 'one_shot' with warmup >= 1)"))
    return problems
