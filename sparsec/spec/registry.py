"""The spec's schema registry: the tables a spec may hold and the rules across their keys.

Every table is declared with `register_table` (its `Field`s, whether it is an array, required,
filled with defaults when absent) and every cross-field rule with `register_check`. The core tables
([[prune]], [schedule], [train], [capture]) are declared in sparsec.spec.tables; feature tables
declare themselves in the module of the feature ([export] in sparsec.export.options, [distill] and
[self_regularization] in sparsec.training.distill), which `tables()` imports by name (TABLE_MODULES)
before a spec is validated or documented, so the spec package imports no feature.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from sparsec.schema import Field

Problem = tuple[str, str]  # (key path, problem)

# Modules that register tables when imported: the core tables, then the features'.
TABLE_MODULES = ("sparsec.spec.tables", "sparsec.export.options", "sparsec.training.distill")


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
    module: str = ""                # the module that registered it (orders tables in the docs)

    def fields(self) -> dict[str, Field]:
        source = self.fields_source
        return dict(source() if callable(source) else source)

    def header(self) -> str:
        return f"[[{self.name}]]" if self.array else f"[{self.name}]"


_TABLES: dict[str, TableDef] = {}
_CHECKS: list[tuple[Check, str]] = []
CORE_TABLES = ("prune", "schedule", "train", "capture")


def register_table(name: str, fields: FieldsSource, *, array: bool = False, required: bool = False,
                   fill_when_absent: bool = False, doc: str = "",
                   extra: Callable[[Mapping[str, Any]], Extra] | None = None) -> TableDef:
    """Declare a top-level table. Its resolved value appears in `Spec.extras[name]` (a dict, or a
    list of dicts for an array of tables) when given, or always when `fill_when_absent`."""
    if name in _TABLES:
        raise ValueError(f"spec table {name!r} registered twice")
    table = TableDef(name, fields, array=array, required=required, fill_when_absent=fill_when_absent,
                     doc=doc, extra=extra, module=sys._getframe(1).f_globals.get("__name__", ""))
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
    """Every table, in the order of TABLE_MODULES (whatever was imported first), then of registration."""
    _load_tables()
    ordered = sorted(_TABLES.values(), key=lambda t: _module_rank(t.module))
    return {table.name: table for table in ordered}


def checks() -> list[tuple[Check, str]]:
    """Every cross-field rule with its documentation, in the order of TABLE_MODULES."""
    _load_tables()
    return sorted(_CHECKS, key=lambda item: _module_rank(item[0].__module__))


def _module_rank(module: str) -> int:
    return TABLE_MODULES.index(module) if module in TABLE_MODULES else len(TABLE_MODULES)


def _load_tables() -> None:
    """Import the modules that declare tables (each registers itself once, at its import)."""
    for module in TABLE_MODULES:
        importlib.import_module(module)
