"""The spec language: a strict TOML file (or a dict of the same shape) -> a frozen `Spec`.

Why strict: a misspelt key that is silently ignored prunes the wrong layers or to the wrong density,
and the user finds out hours later. So every key is declared in a table of `Field`s, unknown keys
are rejected with a suggestion, and every problem in a spec is collected and reported at once, each
on its own line as `{file}: {key path}: {problem}`.

The tables of Fields are the single source of truth: validation reads them, and `generate_docs()`
renders them to docs/spec.md (`python -m sparsec.spec --docs`). Later features add their own tables
(e.g. [distill], [export]) with `register_table` and their own cross-field rules with
`register_check`; the resolved values of such tables land in `Spec.extras`. Methods add keys to
[[prune]] by declaring `options` (sparsec.methods), schedules add kinds (sparsec.schedules).

A spec never executes code: TOML is read with tomllib only.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from sparsec import methods, schedules
from sparsec.errors import SpecError
from sparsec.schema import KINDS, REQUIRED, Field
from sparsec.schedules import ScheduleParams

DICT_SOURCE = "<dict>"
DOCS_COMMAND = ".venv/bin/python -m sparsec.spec --docs > docs/spec.md"

Problem = tuple[str, str]  # (key path, problem)


# --------------------------------------------------------------------------------------------------
# The resolved spec


@dataclass(frozen=True)
class PruneGroup:
    """One [[prune]] table: which sites, which criterion, how dense, in which geometry."""

    index: int
    targets: tuple[str, ...]
    exclude: tuple[str, ...]
    method: str
    density: float
    scope: str
    block: tuple[int, int]
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "exclude": list(self.exclude),
            "method": self.method,
            "density": self.density,
            "scope": self.scope,
            "block": list(self.block),
            **copy.deepcopy(dict(self.options)),
        }


@dataclass(frozen=True)
class ScheduleSpec:
    """The [schedule] table: how density moves from `initial_density` to each group's density."""

    kind: str = "constant"
    total: int = 0
    warmup: int = 0
    cooldown: int = 0
    every: int = 1
    iterations: int = 1
    initial_density: float = 1.0

    def params(self, final: float) -> ScheduleParams:
        """The schedule function's arguments for a group whose final density is `final`."""
        return ScheduleParams(final=final, total=self.total, warmup=self.warmup, cooldown=self.cooldown,
                              initial=self.initial_density, iterations=self.iterations)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainSpec:
    """The [train] table: the fine-pruning loop that `sparsec compile` runs."""

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    score_lr: float = 1e-2
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    max_grad_norm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CaptureSpec:
    """The [capture] table: how the model becomes a torch.fx graph."""

    method: str = "auto"
    dynamic: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Spec:
    """A validated spec with every default filled. Equality ignores where it was read from."""

    groups: tuple[PruneGroup, ...]
    schedule: ScheduleSpec
    train: TrainSpec | None
    capture: CaptureSpec
    source: str = field(default=DICT_SOURCE, compare=False)
    extras: Mapping[str, Any] = field(default_factory=dict, hash=False)  # registered extra tables

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as TOML-serializable data (no None); load_spec(to_dict()) == self."""
        out: dict[str, Any] = {
            "prune": [group.to_dict() for group in self.groups],
            "schedule": self.schedule.to_dict(),
        }
        if self.train is not None:
            out["train"] = self.train.to_dict()
        out["capture"] = self.capture.to_dict()
        out.update(copy.deepcopy(dict(self.extras)))
        return out


# --------------------------------------------------------------------------------------------------
# The schema registry


@dataclass(frozen=True)
class Derived:
    """A default taken from another key of the resolved spec (train.steps = schedule.total)."""

    path: str  # "table.key" of a non-array table

    def __repr__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Extra:
    """Keys a table entry gains from one of its own values (a [[prune]] group: its method's options)."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    tolerated: frozenset[str] = frozenset()  # not flagged as unknown (options, while the method is bad)
    hints: Mapping[str, str] = field(default_factory=dict)  # unknown key -> why it is not allowed here


FieldsSource = Mapping[str, Field] | Callable[[], Mapping[str, Field]]
Check = Callable[[Mapping[str, Any]], Iterable[Problem]]


@dataclass(frozen=True)
class TableDef:
    """One top-level table of the spec. `fields` may be a function so choices such as the method
    names are read from their registries when a spec is validated, not when this module imports."""

    name: str
    fields_source: FieldsSource
    array: bool = False
    required: bool = False
    fill_when_absent: bool = False  # an absent table means "all defaults" rather than "not given"
    doc: str = ""
    extra: Callable[[Mapping[str, Any]], Extra] | None = None

    def fields(self) -> dict[str, Field]:
        source = self.fields_source
        return dict(source() if callable(source) else source)

    def header(self) -> str:
        return f"[[{self.name}]]" if self.array else f"[{self.name}]"


_TABLES: dict[str, TableDef] = {}
_CHECKS: list[tuple[Check, str]] = []
_CORE_TABLES = ("prune", "schedule", "train", "capture")


def register_table(name: str, fields: FieldsSource, *, array: bool = False, required: bool = False,
                   fill_when_absent: bool = False, doc: str = "",
                   extra: Callable[[Mapping[str, Any]], Extra] | None = None) -> TableDef:
    """Declare a top-level table. Its resolved value appears in `Spec.extras[name]` (a dict, or a
    list of dicts for an array of tables) when given, or always when `fill_when_absent`."""
    if name in _TABLES:
        raise ValueError(f"spec table {name!r} registered twice")
    table = TableDef(name, fields, array=array, required=required, fill_when_absent=fill_when_absent,
                     doc=doc, extra=extra)
    _TABLES[name] = table
    return table


def register_check(doc: str) -> Callable[[Check], Check]:
    """Declare a cross-field rule: a function of the resolved tables (only keys whose own value
    is valid are present) yielding (key path, problem). `doc` is listed in docs/spec.md."""
    def wrap(check: Check) -> Check:
        _CHECKS.append((check, doc))
        return check
    return wrap


def tables() -> dict[str, TableDef]:
    return dict(_TABLES)


# --------------------------------------------------------------------------------------------------
# The core tables


def _prune_fields() -> dict[str, Field]:
    return {
        "targets": Field("list[str]", "Sites this group prunes: fnmatch globs (`*`, `?`, `[seq]`) "
                         "matched against the whole site name, which is the weight's name in "
                         "`model.named_parameters()` (e.g. `encoder.layer.0.attention.self.query.weight`). "
                         "A site is a weight consumed by a linear, convolution or matmul. At least one "
                         "glob."),
        "exclude": Field("list[str]", "Globs of sites to leave dense even though `targets` matches "
                         "them (e.g. `[\"*embed*\", \"*classifier*\"]`).", default=[]),
        "method": Field("str", "The pruning criterion that ranks weights (or blocks); see "
                        "[Methods](#methods) for each method's paper and its own keys.",
                        choices=tuple(methods.names())),
        "density": Field("float", "Final fraction of weights kept, reached at the end of the schedule: "
                         "0.1 keeps 10% (90% sparsity, the movement-pruning paper's headline setting); "
                         "1 prunes nothing.", gt=0, le=1),
        "scope": Field("str", "Where the Top-v selection ranks: `local` keeps `density` of every "
                       "weight matrix separately; `global` ranks all of the group's sites together, so "
                       "layers end at different densities (movement pruning section 6, Figure 5 and 6: "
                       "similar results, global ahead only at very high sparsity).",
                       default="local", choices=("local", "global")),
        "block": Field("pair[int]", "Block shape `[rows, cols]` of the weight's matrix view (out x in "
                       "for a linear); whole blocks are kept or pruned. `[1, 1]` is unstructured; "
                       "`[32, 32]` is where the block-sparse kernel runs fastest. When the block does "
                       "not divide the matrix, the last partial blocks are padded.", default=[1, 1]),
    }


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
    hints = {key: f"it is an option of {_quoted_list(names, 'method')}, not of {chosen.name!r}"
             for key, names in owners.items() if key not in chosen.options}
    return Extra(fields=dict(chosen.options), hints=hints)


def _schedule_fields() -> dict[str, Field]:
    return {
        "kind": Field("str", "Schedule of the density over optimizer steps; see "
                      "[Schedule kinds](#schedule-kinds).", default="constant",
                      choices=tuple(schedules.names())),
        "total": Field("int", "Optimizer steps T covered by the schedule (warm-up, pruning and "
                       "cool-down). 0 means no step-dependent schedule.", default=0, ge=0),
        "warmup": Field("int", "Steps t_i at `initial_density` before pruning starts (movement "
                        "pruning Eq 5).", default=0, ge=0),
        "cooldown": Field("int", "Steps t_f at the final density at the end of the schedule; a few "
                          "cool-down steps help at high sparsity (movement pruning section 5, Eq 5).",
                          default=0, ge=0),
        "every": Field("int", "Recompute the masks every `every` optimizer steps (Delta t of movement "
                       "pruning Eq 5); masks are never recomputed inside a forward pass.",
                       default=1, ge=1),
        "iterations": Field("int", "Number of pruning iterations pi for iterative schedules (loss "
                            "modelling, Algorithm 1: linear or exponential steps).", default=1, ge=1),
        "initial_density": Field("float", "Density v_i at the start of the schedule; 1 is dense (the "
                                 "papers start from the pre-trained dense model).", default=1.0,
                                 gt=0, le=1),
    }


_TRAIN_FIELDS = {
    "steps": Field("int", "Optimizer steps of fine-pruning; one step is one `optimizer.step()` "
                   "followed by one `prog.step()`. Defaults to `schedule.total`; must be at least "
                   "`schedule.total - schedule.cooldown` so the schedule reaches its final density.",
                   default=Derived("schedule.total"), ge=1),
    "batch_size": Field("int", "Examples per optimizer step.", default=32, ge=1),
    "lr": Field("float", "Learning rate of the model's weights (alpha_W). BERT fine-pruning uses "
                "about 3e-5.", default=1e-3, gt=0),
    "score_lr": Field("float", "Learning rate of learned importance scores (alpha_S of movement "
                      "pruning Eq 4) for methods that learn scores; scores need a far larger rate than "
                      "the weights (1e-2 in the movement-pruning setup).", default=1e-2, gt=0),
    "optimizer": Field("str", "`adamw` (Adam with decoupled weight decay), `adam` (weight decay "
                       "added to the gradient) or `sgd` (with `momentum`).", default="adamw",
                       choices=("adamw", "adam", "sgd")),
    "weight_decay": Field("float", "Weight decay coefficient of the optimizer.", default=0.0, ge=0),
    "momentum": Field("float", "Momentum of `sgd`; ignored by adam and adamw.", default=0.0, ge=0, lt=1),
    "seed": Field("int", "Seed of every random number generator the loop uses, for reproducible "
                  "runs and exact resume.", default=0, ge=0),
    "log_every": Field("int", "Log loss, density and learning rates every n steps.", default=10, ge=1),
    "eval_every": Field("int", "Evaluate on the model file's `eval_data()` every n steps; 0 "
                        "evaluates only at the end.", default=0, ge=0),
    "max_grad_norm": Field("float", "Clip the global gradient norm (weights and scores) to this "
                           "value; 0 disables clipping.", default=0.0, ge=0),
}

_CAPTURE_FIELDS = {
    "method": Field("str", "`export` uses `torch.export.export(strict=False)`, which captures "
                    "transformers models; `symbolic_trace` uses `torch.fx.symbolic_trace`, for plain "
                    "modules; `auto` tries export first and falls back to symbolic_trace.",
                    default="auto", choices=("auto", "export", "symbolic_trace")),
    "dynamic": Field("bool", "Mark the batch and sequence dimensions of the example inputs dynamic, "
                     "so the program and its ONNX file accept other sizes.", default=True),
}

register_table("prune", _prune_fields, array=True, required=True, extra=_method_options,
               doc="One table per group of sites that share a method, a density and a block shape. "
                   "Groups must not overlap: a site that two groups select is an error (use "
                   "`exclude`). Besides the keys below, a group takes the keys of its method (see "
                   "[Methods](#methods)).")
register_table("schedule", _schedule_fields, fill_when_absent=True,
               doc="How the density of every group moves from `initial_density` to the group's "
                   "`density` over optimizer steps, and how often masks are recomputed. Optional: "
                   "without it, masks are at the final density from step 0.")
register_table("train", _TRAIN_FIELDS,
               doc="The fine-pruning loop `sparsec compile` runs with the model file's "
                   "`train_data()` and `loss()`. Optional: without it, sparsec compiles without "
                   "training (the caller trains `prog` itself, calling `prog.step()` after every "
                   "optimizer step).")
register_table("capture", _CAPTURE_FIELDS, fill_when_absent=True,
               doc="How the model is captured as a torch.fx graph. Optional.")

_EXPORT_FIELDS = {
    "int8": Field("bool", "Store the kept blocks as int8 with one float32 scale per block (about 4x "
                  "smaller than fp32 blocks; the accuracy cost is reported).", default=False),
    "policy": Field("str", "Which sites become block-sparse ops: `cost` those the cost model expects "
                    "to be at least `min_speedup` faster, `always` every linear/matmul site, `never` "
                    "none (a dense file).", default="cost", choices=("cost", "always", "never")),
    "min_speedup": Field("float", "Estimated speedup a site needs to be lowered (policy `cost`).",
                         default=1.5, gt=0),
    "tolerance": Field("float", "Largest allowed max abs error of onnxruntime vs PyTorch, relative "
                       "to the output scale.", default=1e-4, gt=0),
    "bench": Field("bool", "Time model.onnx against model.dense.onnx in onnxruntime at the end of "
                   "`sparsec compile` and put the speedup in the report.", default=True),
    "bench_repeats": Field("int", "Interleaved timing rounds of that measurement (medians).",
                           default=30, ge=1),
    "bench_batch": Field("int", "First dimension of the inputs for that measurement; 0 uses the "
                         "example inputs' own.", default=0, ge=0),
}
register_table("export", _EXPORT_FIELDS,
               doc="The lower stage of `sparsec compile`: model.onnx with block-sparse "
                   "`sparsec::BlockSparseLinear` nodes and model.dense.onnx, both verified against "
                   "PyTorch. Optional: without it, the defaults below apply.")


_DISTILL_FIELDS = {
    "alpha": Field("float", "Weight of the distillation term: the loss is (1 - alpha) * task loss + "
                   "alpha * T^2 * KL(teacher || student) (movement pruning section 6, 'a linear "
                   "combination of the training loss and a knowledge distillation loss').",
                   default=0.9, ge=0, le=1),
    "temperature": Field("float", "Softmax temperature T of teacher and student (Hinton et al. "
                         "2014).", default=2.0, gt=0),
    "teacher": Field("str", "`dense`: the model as it was before rewriting (a frozen copy taken at "
                     "compile time, in eval mode), the paper's fine-tuned dense BERT.",
                     default="dense", choices=("dense",)),
}

_SELF_REGULARIZATION_FIELDS = {
    "lambda": Field("float", "Weight of the self-regularization term lambda * KL(checkpoint || "
                    "model) added to the loss (PINS Eq 13 adds it with weight 1).", default=1.0, ge=0),
    "temperature": Field("float", "Softmax temperature of the KL term.", default=1.0, gt=0),
}

register_table("distill", _DISTILL_FIELDS,
               doc="Distillation from the dense model (movement pruning section 6). The fine-pruning "
                   "loop trains on `(1 - alpha) * loss + prog.distillation_loss(outputs, *inputs)`; "
                   "API users do the same (`prog.task_loss_weight` is 1 - alpha). Optional.")
register_table("self_regularization", _SELF_REGULARIZATION_FIELDS,
               doc="PINS self-regularization (Eq 13, Algorithm 1): the fine-pruning loop adds "
                   "lambda * KL between the outputs of the latest best checkpoint and the current "
                   "model; the checkpoint starts as the model before pruning and is refreshed "
                   "whenever the metric on `eval_data()` improves (every `train.eval_every` steps). "
                   "Costs a second forward pass per step and a copy of the model "
                   "(docs/BENCHMARKS.md). API users: `sparsec.distill.SelfRegularizer`. Optional.")


# --------------------------------------------------------------------------------------------------
# Cross-field rules


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


@register_check("`[self_regularization]` with a `[train]` table needs `train.eval_every >= 1`: the "
                "checkpoint is refreshed when the evaluation metric improves.")
def _check_self_regularization(resolved: Mapping[str, Any]) -> list[Problem]:
    train = resolved.get("train")
    if resolved.get("self_regularization") is None or train is None or train.get("eval_every") != 0:
        return []
    return [("train.eval_every", "0 never evaluates, so [self_regularization] would never refresh its "
                                 "checkpoint (allowed: an integer, 1 <= x)")]


# --------------------------------------------------------------------------------------------------
# Loading


def load_spec(source: str | os.PathLike | Mapping[str, Any] | Spec) -> Spec:
    """Read and validate a spec: a TOML file path, or a dict of the same shape (a Spec passes
    through). Raises SpecError listing every problem, one line each."""
    if isinstance(source, Spec):
        return source
    label, raw = _read_source(source)
    report = _Report(label)
    resolved = _validate(raw, report)
    report.raise_if_any()
    return _build(resolved, label)


class _Report:
    """Collects problems so that the user sees all of them in one run."""

    def __init__(self, label: str):
        self.label = label
        self.lines: list[str] = []

    def add(self, path: str, problem: str) -> None:
        self.lines.append(f"{self.label}: {path}: {problem}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise SpecError(self.lines)


def _read_source(source: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(source, Mapping):
        return DICT_SOURCE, source
    if not isinstance(source, (str, os.PathLike)):
        raise SpecError([f"<spec>: expected a TOML file path or a dict, got {_describe(source)}"])
    label = os.fsdecode(source)
    return label, _read_toml(label)


def _read_toml(label: str) -> dict[str, Any]:
    path = Path(label)
    if path.is_dir():
        raise SpecError([f"{label}: is a directory, not a TOML spec file"])
    if not path.exists():
        raise SpecError([f"{label}: no such file"])
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SpecError([f"{label}: cannot read ({error.strerror or error})"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError([f"{label}: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError([f"{label}: TOML syntax error: {error}"]) from None


def _validate(raw: Mapping[str, Any], report: _Report) -> dict[str, Any]:
    """Resolved tables (defaults filled, only valid values kept), with every problem reported."""
    _check_top_level_keys(raw, report)
    resolved: dict[str, Any] = {}
    for table in _TABLES.values():
        value = _check_table(table, raw.get(table.name, _ABSENT), report)
        if value is not _ABSENT:
            resolved[table.name] = value
    _resolve_derived(resolved, report)
    for check, _doc in _CHECKS:
        for path, problem in check(resolved):
            report.add(path, problem)
    return resolved


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()


def _check_top_level_keys(raw: Mapping[str, Any], report: _Report) -> None:
    names = list(_TABLES)
    for key, value in raw.items():
        if key in _TABLES:
            continue
        key = str(key)
        what = "unknown table" if isinstance(value, (Mapping, list)) else "unknown top-level key"
        notes = [_home_hint(key) or _suggestion(key, names), "allowed tables: " + ", ".join(names)]
        report.add(key, f"{what} ({'; '.join(n for n in notes if n)})")


def _home_hint(key: str) -> str:
    """'did you mean to put it under [[prune]]?' for a key written above every table header."""
    homes = [table.header() for table in _TABLES.values() if key in table.fields()]
    return f"did you mean to put it under {' or '.join(homes)}?" if homes else ""


def _check_table(table: TableDef, value: Any, report: _Report) -> Any:
    if value is _ABSENT:
        return _absent_table(table, report)
    if table.array:
        return _check_array(table, value, report)
    if not isinstance(value, Mapping):
        report.add(table.name, f"expected a table ({table.header()}), got {_describe(value)}")
        return _ABSENT
    return _check_entry(table, value, table.name, report)


def _absent_table(table: TableDef, report: _Report) -> Any:
    if table.required:
        report.add(table.name, f"required table is missing (add at least one {table.header()})")
        return _ABSENT
    if not table.fill_when_absent:
        return _ABSENT
    return [] if table.array else _check_entry(table, {}, table.name, report)


def _check_array(table: TableDef, value: Any, report: _Report) -> Any:
    name = table.name
    if isinstance(value, Mapping):
        report.add(name, f"expected an array of tables: use {table.header()} (one per group), "
                         f"not [{name}]")
        return _ABSENT
    if not isinstance(value, list):
        report.add(name, f"expected an array of tables ({table.header()}), got {_describe(value)}")
        return _ABSENT
    if not value and table.required:
        report.add(name, f"at least one {table.header()} table is required")
    entries = []
    for i, entry in enumerate(value):
        path = f"{name}[{i}]"
        if not isinstance(entry, Mapping):
            report.add(path, f"expected a table, got {_describe(entry)}")
            entries.append({})
            continue
        entries.append(_check_entry(table, entry, path, report))
    return entries


def _check_entry(table: TableDef, entry: Mapping[str, Any], path: str, report: _Report) -> dict[str, Any]:
    extra = table.extra(entry) if table.extra else Extra()
    allowed = {**table.fields(), **extra.fields}
    _flag_unknown_keys(entry, allowed, extra, table, path, report)
    resolved: dict[str, Any] = {}
    for key, spec_field in allowed.items():
        key_path = f"{path}.{key}"
        if key not in entry:
            if spec_field.required:
                report.add(key_path, "required key is missing")
            else:
                resolved[key] = copy.deepcopy(spec_field.default)
            continue
        value, problems = check_value(spec_field, entry[key], key_path)
        for problem in problems:
            report.add(*problem)
        if not problems:
            resolved[key] = value
    return resolved


def _flag_unknown_keys(entry: Mapping[str, Any], allowed: Mapping[str, Field], extra: Extra,
                       table: TableDef, path: str, report: _Report) -> None:
    for key in entry:
        if key in allowed or key in extra.tolerated:
            continue
        key = str(key)
        hint = extra.hints.get(key) or _other_table_hint(key, table) or _suggestion(key, list(allowed))
        notes = [hint, "allowed keys: " + ", ".join(allowed)]
        report.add(f"{path}.{key}", f"unknown key ({'; '.join(n for n in notes if n)})")


def _other_table_hint(key: str, table: TableDef) -> str:
    homes = [other.header() for other in _TABLES.values()
             if other.name != table.name and key in other.fields()]
    return f"it belongs in {' or '.join(homes)}" if homes else ""


def _suggestion(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def _resolve_derived(resolved: dict[str, Any], report: _Report) -> None:
    """Replace Derived defaults by the value they name, validated as if the user had written it."""
    for table in _TABLES.values():
        fields = table.fields()
        for path, entry in _entries(resolved, table):
            for key, value in list(entry.items()):
                if isinstance(value, Derived) and key in fields:
                    _fill_derived(entry, key, value, fields[key], f"{path}.{key}", resolved, report)


def _entries(resolved: Mapping[str, Any], table: TableDef) -> list[tuple[str, dict[str, Any]]]:
    value = resolved.get(table.name)
    if value is None:
        return []
    if table.array:
        return [(f"{table.name}[{i}]", entry) for i, entry in enumerate(value)]
    return [(table.name, value)]


def _fill_derived(entry: dict[str, Any], key: str, derived: Derived, spec_field: Field, path: str,
                  resolved: Mapping[str, Any], report: _Report) -> None:
    del entry[key]
    table_name, _, source_key = derived.path.partition(".")
    source_table = resolved.get(table_name)
    source = source_table.get(source_key, _ABSENT) if isinstance(source_table, Mapping) else _ABSENT
    if source is _ABSENT:
        return  # the source key is invalid itself, and already reported
    value, problems = check_value(spec_field, source, path)
    if problems:
        report.add(path, f"required key is missing: its default {derived.path} is {_show(source)}, "
                         f"which is not allowed here ({spec_field.allowed()}); set {path} or "
                         f"{derived.path}")
        return
    entry[key] = value


# --------------------------------------------------------------------------------------------------
# Values


def check_value(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    """The value converted to its kind (an int where a float is expected becomes a float), and the
    problems found (empty when valid). Booleans are never numbers."""
    return _KIND_CHECKS[spec_field.kind](spec_field, value, path)


def _expected(spec_field: Field, value: Any, path: str) -> list[Problem]:
    problem = f"expected {KINDS[spec_field.kind]}, got {_describe(value)}"
    if spec_field.allowed() != KINDS[spec_field.kind]:
        problem += f" (allowed: {spec_field.allowed()})"
    return [(path, problem)]


def _check_str(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if not isinstance(value, str):
        return value, _expected(spec_field, value, path)
    return value, _choice_problems(spec_field, value, path)


def _check_int(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(value, bool) or not isinstance(value, int):
        return value, _expected(spec_field, value, path)
    return value, _choice_problems(spec_field, value, path) + _range_problems(spec_field, value, path)


def _check_float(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, _expected(spec_field, value, path)
    number = float(value)
    if not math.isfinite(number):
        return number, [(path, f"{_show(value)} is not a finite number (allowed: {spec_field.allowed()})")]
    return number, _choice_problems(spec_field, number, path) + _range_problems(spec_field, number, path)


def _check_bool(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if not isinstance(value, bool):
        return value, _expected(spec_field, value, path)
    return value, []


def _check_str_list(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(value, str):
        return value, [(path, f"expected a list of strings, got a string ({_show(value)}); write "
                              f"{_as_toml([value])}")]
    if not isinstance(value, (list, tuple)):  # tuples: a Python dict spec may use them
        return value, _expected(spec_field, value, path)
    problems = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append((f"{path}[{i}]", f"expected a string, got {_describe(item)}"))
            continue
        problems += _choice_problems(spec_field, item, f"{path}[{i}]")
    return list(value), problems


def _check_int_pair(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    allowed = f"{KINDS['pair[int]']} [rows, cols]"
    if not isinstance(value, (list, tuple)):
        return value, [(path, f"expected {allowed}, got {_describe(value)}")]
    if len(value) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        return value, [(path, f"expected {allowed}, got {_describe(value)}")]
    in_range = all(x >= 1 and not _range_problems(spec_field, x, path) for x in value)
    if not in_range:
        return value, [(path, f"{_show(value)} is out of range (allowed: {allowed}, each >= 1)")]
    return list(value), []


_KIND_CHECKS: dict[str, Callable[[Field, Any, str], tuple[Any, list[Problem]]]] = {
    "str": _check_str,
    "int": _check_int,
    "float": _check_float,
    "bool": _check_bool,
    "list[str]": _check_str_list,
    "pair[int]": _check_int_pair,
}


def _choice_problems(spec_field: Field, value: Any, path: str) -> list[Problem]:
    if spec_field.choices is None or value in spec_field.choices:
        return []
    problem = f"{_show(value)} is not {spec_field.allowed()}"
    if isinstance(value, str):
        suggestion = _suggestion(value, [c for c in spec_field.choices if isinstance(c, str)])
        if suggestion:
            problem += f" ({suggestion})"
    return [(path, problem)]


def _range_problems(spec_field: Field, value: float, path: str) -> list[Problem]:
    in_range = ((spec_field.gt is None or value > spec_field.gt)
                and (spec_field.ge is None or value >= spec_field.ge)
                and (spec_field.lt is None or value < spec_field.lt)
                and (spec_field.le is None or value <= spec_field.le))
    if in_range:
        return []
    return [(path, f"{_show(value)} is out of range (allowed: {spec_field.allowed()})")]


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _show(value: Any, limit: int = 60) -> str:
    """The value as the user wrote it (true/false for booleans), shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(item, limit) for item in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_toml(value: Any) -> str:
    """A value as written in TOML, e.g. ["encoder.*"] or true: for the kinds of the schema (strings,
    numbers, booleans and flat lists of them) the JSON text is valid inline TOML."""
    return json.dumps(value)


def _describe(value: Any) -> str:
    return f"{_type_name(value)} ({_show(value)})"


def _quoted_list(names: list[str], noun: str) -> str:
    quoted = ", ".join(repr(name) for name in names)
    return f"{noun} {quoted}" if len(names) == 1 else f"{noun}s {quoted}"


# --------------------------------------------------------------------------------------------------
# Building the Spec


def _build(resolved: Mapping[str, Any], label: str) -> Spec:
    groups = tuple(_build_group(i, entry) for i, entry in enumerate(resolved["prune"]))
    train = resolved.get("train")
    extras = {name: value for name, value in resolved.items() if name not in _CORE_TABLES}
    return Spec(groups=groups,
                schedule=ScheduleSpec(**resolved["schedule"]),
                train=TrainSpec(**train) if train is not None else None,
                capture=CaptureSpec(**resolved["capture"]),
                source=label,
                extras=extras)


def _build_group(index: int, entry: Mapping[str, Any]) -> PruneGroup:
    base = _prune_fields()
    options = {key: value for key, value in entry.items() if key not in base}
    return PruneGroup(index=index,
                      targets=tuple(entry["targets"]),
                      exclude=tuple(entry["exclude"]),
                      method=entry["method"],
                      density=entry["density"],
                      scope=entry["scope"],
                      block=(entry["block"][0], entry["block"][1]),
                      options=options)


# --------------------------------------------------------------------------------------------------
# Summary and docs


def format_summary(spec: Spec) -> str:
    """A few readable lines saying what the spec will do, for `sparsec validate`."""
    count = len(spec.groups)
    lines = [f"{spec.source}: {count} prune group{'' if count == 1 else 's'}"]
    for group in spec.groups:
        lines += _group_summary(group)
    lines.append("  " + _schedule_summary(spec.schedule))
    learns_scores = any(methods.get(group.method).learns_scores for group in spec.groups)
    lines.append("  " + _train_summary(spec.train, learns_scores))
    dynamic = "dynamic batch and sequence" if spec.capture.dynamic else "static shapes"
    lines.append(f"  capture: {spec.capture.method} ({dynamic})")
    for name in spec.extras:
        lines.append(f"  [{name}]: given")
    return "\n".join(lines)


def _group_summary(group: PruneGroup) -> list[str]:
    rows, cols = group.block
    block = "unstructured" if group.block == (1, 1) else f"{rows}x{cols} blocks"
    exclude = ", ".join(group.exclude) or "none"
    lines = [f"  prune[{group.index}]: {group.method}, density {group.density:g} "
             f"({1 - group.density:.0%} sparse), {group.scope} scope, {block}",
             f"    targets {', '.join(group.targets)}; exclude {exclude}"]
    if group.options:
        options = ", ".join(f"{key} = {_show(value)}" for key, value in group.options.items())
        lines.append(f"    options {options}")
    return lines


def _schedule_summary(schedule: ScheduleSpec) -> str:
    text = (f"schedule: {schedule.kind} over {schedule.total} steps (warmup {schedule.warmup}, "
            f"cooldown {schedule.cooldown}), from density {schedule.initial_density:g}, "
            f"masks every {schedule.every} step{'' if schedule.every == 1 else 's'}")
    if schedule.iterations > 1:
        text += f", {schedule.iterations} iterations"
    return text


def _train_summary(train: TrainSpec | None, learns_scores: bool) -> str:
    if train is None:
        return "train: none (compile only)"
    scores = f" (scores {train.score_lr:g})" if learns_scores else ""
    text = (f"train: {train.steps} steps, batch {train.batch_size}, {train.optimizer} lr {train.lr:g}"
            f"{scores}, weight decay {train.weight_decay:g}, seed {train.seed}")
    if train.max_grad_norm > 0:
        text += f", clip grad norm {train.max_grad_norm:g}"
    return text


EXAMPLE = '''\
# Prune every encoder linear of a BERT to 10% of its weights with movement pruning.
[[prune]]
targets = ["encoder.layer.*"]
exclude = ["*embed*"]
method = "movement"
density = 0.1
scope = "local"
block = [32, 32]

[schedule]
kind = "cubic"
total = 20000
warmup = 2000
cooldown = 4000

[train]
lr = 3e-5
score_lr = 1e-2
batch_size = 16
'''


def generate_docs() -> str:
    """docs/spec.md: every table, key, method and schedule kind, rendered from the registries."""
    parts = [_docs_header()]
    for table in _TABLES.values():
        parts.append(_table_docs(table))
    parts += [_checks_docs(), _methods_docs(), _schedules_docs()]
    return "\n".join(parts)


def _docs_header() -> str:
    return f"""# Spec reference

<!-- Generated from the schema in sparsec/spec.py, sparsec/methods and sparsec/schedules.
     Do not edit by hand; regenerate with:
     {DOCS_COMMAND} -->

A spec is a TOML file (or a Python dict of the same shape) that says which weights to prune, with
which criterion, to which density, on which schedule, and how to fine-prune. It is strict: an
unknown key or table, a value of the wrong type or out of range, is an error, and every error is
reported at once as `file: key path: problem`. A spec never runs code.

`density` is always the fraction of weights **kept** (0.1 = 90% sparsity).

Validate a spec with `sparsec validate SPEC`. Example:

```toml
{EXAMPLE}```
"""


def _table_docs(table: TableDef) -> str:
    kind = "array of tables" if table.array else "table"
    need = "required" if table.required else "optional"
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for key, spec_field in table.fields().items():
        rows.append(_field_row(key, spec_field))
    return f"## `{table.header()}`\n\n*{kind}, {need}.* {_cell(table.doc)}\n\n" + "\n".join(rows) + "\n"


def _field_row(key: str, spec_field: Field) -> str:
    cells = [f"`{key}`", f"`{spec_field.kind}`", _default_cell(spec_field.default),
             _cell(spec_field.allowed()), _cell(spec_field.doc)]
    return "| " + " | ".join(cells) + " |"


def _default_cell(default: Any) -> str:
    if default is REQUIRED:
        return "**required**"
    if isinstance(default, Derived):
        return f"`{default.path}`"
    return f"`{_as_toml(default)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _checks_docs() -> str:
    rules = "\n".join(f"- {doc}" for _check, doc in _CHECKS)
    return f"## Rules across keys\n\n{rules}\n"


def _methods_docs() -> str:
    parts = ["## Methods\n\nThe values of `[[prune]] method`. A method's keys go in the same "
             "`[[prune]]` table.\n"]
    for name, cls in methods.registered().items():
        scores = "yes (trained with `train.score_lr`)" if cls.learns_scores else "no"
        text = (f"### `{name}`\n\n{_cell(cls.summary)}\n\n- paper: {_cell(cls.paper) or '-'}\n"
                f"- learns scores: {scores}\n")
        if not cls.options:
            parts.append(text + "- keys: none\n")
            continue
        rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        rows += [_field_row(key, spec_field) for key, spec_field in cls.options.items()]
        parts.append(text + "\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _schedules_docs() -> str:
    rows = ["| kind | summary |", "|---|---|"]
    rows += [f"| `{name}` | {_cell(schedules.summary(name))} |" for name in schedules.names()]
    return "## Schedule kinds\n\nThe values of `[schedule] kind`.\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m sparsec.spec --docs` prints docs/spec.md; `python -m sparsec.spec SPEC` validates."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--docs"]:
        sys.stdout.write(generate_docs())
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m sparsec.spec --docs | SPEC", file=sys.stderr)
        return 2
    try:
        print(format_summary(load_spec(args[0])))
    except SpecError as error:
        print(error, file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
