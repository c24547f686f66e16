"""What a spec says in words: the summary `sparsec validate` prints, and docs/spec.md rendered
from the schema (every table, key, rule, method and schedule kind)."""
from __future__ import annotations

from typing import Any

from sparsec import methods, schedules
from sparsec.schema import REQUIRED, Field
from sparsec.spec.model import PruneGroup, ScheduleSpec, Spec, TrainSpec
from sparsec.spec.registry import Derived, TableDef, checks, tables
from sparsec.spec.values import as_toml, show

DOCS_COMMAND = ".venv/bin/python -m sparsec.spec --docs > docs/spec.md"


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
    for name, table in spec.extras.items():
        entries = table if isinstance(table, list) else [table]
        for entry in entries:
            values = ", ".join(f"{key} = {show(value)}" for key, value in entry.items())
            lines.append(f"  [{name}]: {values or 'given'}")
    return "\n".join(lines)


def _group_summary(group: PruneGroup) -> list[str]:
    rows, cols = group.block
    block = "unstructured" if group.block == (1, 1) else f"{rows}x{cols} blocks"
    exclude = ", ".join(group.exclude) or "none"
    lines = [f"  prune[{group.index}]: {group.method}, density {group.density:g} "
             f"({1 - group.density:.0%} sparse), {group.scope} scope, {block}",
             f"    targets {', '.join(group.targets)}; exclude {exclude}"]
    if group.options:
        options = ", ".join(f"{key} = {show(value)}" for key, value in group.options.items())
        lines.append(f"    options {options}")
    return lines


def _schedule_summary(schedule: ScheduleSpec) -> str:
    text = (f"schedule: {schedule.kind} over {schedule.total} steps (warmup {schedule.warmup}, "
            f"cooldown {schedule.cooldown}), from density {schedule.initial_density:g}, "
            f"masks every {schedule.every} step{'' if schedule.every == 1 else 's'}")
    if schedule.iterations > 1:
        text += f", {schedule.iterations} iterations"
        if schedule.at_once:
            text += f" all at step {schedule.warmup} (at_once: no training in between)"
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
    for table in tables().values():
        parts.append(_table_docs(table))
    parts += [_checks_docs(), _methods_docs(), _schedules_docs()]
    return "\n".join(parts)


def _docs_header() -> str:
    return f"""# Spec reference

<!-- Generated from the schema: sparsec/spec/ (core tables), the feature tables' own modules,
     sparsec/methods and sparsec/schedules.
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
    return f"`{as_toml(default)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _checks_docs() -> str:
    rules = "\n".join(f"- {doc}" for _check, doc in checks())
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

