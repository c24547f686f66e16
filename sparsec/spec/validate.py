"""Reading and validating a spec: TOML (or a dict) -> resolved tables -> `Spec`.

Every problem is collected and reported at once, one line each, as `{file}: {key path}: {problem}`.
A spec never executes code: TOML is read with tomllib only.
"""
from __future__ import annotations

import copy
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

from sparsec.errors import SpecError
from sparsec.schema import Field
from sparsec.spec.fields import prune_fields
from sparsec.spec.model import DICT_SOURCE, CaptureSpec, PruneGroup, ScheduleSpec, Spec, TrainSpec
from sparsec.spec.registry import CORE_TABLES, Derived, Extra, TableDef, checks, tables
from sparsec.spec.values import check_value, describe, show, suggestion


def load_spec(source: str | os.PathLike | Mapping[str, Any] | Spec, overrides: Sequence[str] = ()) -> Spec:
    """Read and validate a spec: a TOML file path, or a dict of the same shape (a Spec passes
    through), with `overrides` ("train.steps=40", the CLI's --set) applied first. Raises SpecError
    listing every problem, one line each."""
    if isinstance(source, Spec) and not overrides:
        return source
    if isinstance(source, Spec):
        source = source.to_dict()
    label, raw = _read_source(source)
    if overrides:
        raw = apply_overrides(raw, overrides)
    report = _Report(label)
    try:
        resolved = _validate(raw, report)
    except RecursionError:
        raise SpecError([f"{label}: arrays or tables nested too deeply"]) from None
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


_OVERRIDE = re.compile(r"^(?P<table>[A-Za-z_][\w-]*)(?:\[(?P<index>\d+)\])?\.(?P<key>[A-Za-z_][\w-]*)=(?P<value>.*)$", re.S)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each "table.key=value" (or "array[i].key=value", or "array.key=value"
    for every entry) set; the value is read as TOML (`40`, `false`, `[32, 32]`, `"x"`), or taken as
    a string when it is not TOML. The result is validated as any spec."""
    out = copy.deepcopy(dict(raw))
    problems = []
    for item in overrides:
        match = _OVERRIDE.match(item)
        if match is None:
            problems.append(f"--set {item}: expected TABLE.KEY=VALUE (e.g. train.steps=40 or "
                            f"prune[0].density=0.1)")
            continue
        table, index, key, text = match["table"], match["index"], match["key"], match["value"].strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            value = text
        target = out.setdefault(table, [{}] if index is not None else {})
        if isinstance(target, list):
            entries = target if index is None else target[int(index):int(index) + 1]
            if not entries or not all(isinstance(e, dict) for e in entries):
                problems.append(f"--set {item}: [[{table}]] has {len(target)} entr{'y' if len(target) == 1 else 'ies'}")
                continue
            for entry in entries:
                entry[key] = value
        elif isinstance(target, dict) and index is None:
            target[key] = value
        else:
            problems.append(f"--set {item}: {table} is not an array of tables")
    if problems:
        raise SpecError(problems)
    return out


def _read_source(source: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(source, Mapping):
        return DICT_SOURCE, source
    if not isinstance(source, (str, os.PathLike)):
        raise SpecError([f"<spec>: expected a TOML file path or a dict, got {describe(source)}"])
    label = os.fsdecode(source)
    return label, _read_toml(label)


MAX_SPEC_BYTES = 1 << 20   # a spec is a few hundred bytes; more is not a spec


def _read_toml(label: str) -> dict[str, Any]:
    """The TOML of a regular file of at most MAX_SPEC_BYTES (never a FIFO or a device, which could
    block or never end), UTF-8 without a byte-order mark, nested no deeper than Python can parse."""
    path = Path(label)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SpecError([f"{label}: no such file"]) from None
    except OSError as error:
        raise SpecError([f"{label}: cannot read ({error.strerror or error})"]) from None
    if stat.S_ISDIR(info.st_mode):
        raise SpecError([f"{label}: is a directory, not a TOML spec file"])
    if not stat.S_ISREG(info.st_mode):
        raise SpecError([f"{label}: is not a regular file (a pipe or a device); give a TOML spec file"])
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise SpecError([f"{label}: cannot read ({error.strerror or error})"]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError([f"{label}: is larger than {MAX_SPEC_BYTES >> 20} MiB, too large for a spec"])
    if data.startswith(b"\xef\xbb\xbf"):
        raise SpecError([f"{label}: starts with a UTF-8 byte-order mark (BOM), which TOML does not "
                         f"allow; save the file as UTF-8 without BOM"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError([f"{label}: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError([f"{label}: TOML syntax error: {error}"]) from None
    except RecursionError:
        raise SpecError([f"{label}: arrays or tables nested too deeply"]) from None


def _validate(raw: Mapping[str, Any], report: _Report) -> dict[str, Any]:
    """Resolved tables (defaults filled, only valid values kept), with every problem reported."""
    _check_top_level_keys(raw, report)
    resolved: dict[str, Any] = {}
    for table in tables().values():
        value = _check_table(table, raw.get(table.name, _ABSENT), report)
        if value is not _ABSENT:
            resolved[table.name] = value
    _resolve_derived(resolved, report)
    for check, _doc in checks():
        for path, problem in check(resolved):
            report.add(path, problem)
    return resolved


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()


def _check_top_level_keys(raw: Mapping[str, Any], report: _Report) -> None:
    names = list(tables())
    for key, value in raw.items():
        if key in tables():
            continue
        key = str(key)
        what = "unknown table" if isinstance(value, (Mapping, list)) else "unknown top-level key"
        notes = [_home_hint(key) or suggestion(key, names), "allowed tables: " + ", ".join(names)]
        report.add(key, f"{what} ({'; '.join(n for n in notes if n)})")


def _home_hint(key: str) -> str:
    """'did you mean to put it under [[prune]]?' for a key written above every table header."""
    homes = [table.header() for table in tables().values() if key in table.fields()]
    return f"did you mean to put it under {' or '.join(homes)}?" if homes else ""


def _check_table(table: TableDef, value: Any, report: _Report) -> Any:
    if value is _ABSENT:
        return _absent_table(table, report)
    if table.array:
        return _check_array(table, value, report)
    if not isinstance(value, Mapping):
        report.add(table.name, f"expected a table ({table.header()}), got {describe(value)}")
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
        report.add(name, f"expected an array of tables ({table.header()}), got {describe(value)}")
        return _ABSENT
    if not value and table.required:
        report.add(name, f"at least one {table.header()} table is required")
    entries = []
    for i, entry in enumerate(value):
        path = f"{name}[{i}]"
        if not isinstance(entry, Mapping):
            report.add(path, f"expected a table, got {describe(entry)}")
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
        hint = extra.hints.get(key) or _other_table_hint(key, table) or suggestion(key, list(allowed))
        notes = [hint, "allowed keys: " + ", ".join(allowed)]
        report.add(f"{path}.{key}", f"unknown key ({'; '.join(n for n in notes if n)})")


def _other_table_hint(key: str, table: TableDef) -> str:
    homes = [other.header() for other in tables().values()
             if other.name != table.name and key in other.fields()]
    return f"it belongs in {' or '.join(homes)}" if homes else ""


def _resolve_derived(resolved: dict[str, Any], report: _Report) -> None:
    """Replace Derived defaults by the value they name, validated as if the user had written it."""
    for table in tables().values():
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
        report.add(path, f"required key is missing: its default {derived.path} is {show(source)}, "
                         f"which is not allowed here ({spec_field.allowed()}); set {path} or "
                         f"{derived.path}")
        return
    entry[key] = value


def _build(resolved: Mapping[str, Any], label: str) -> Spec:
    groups = tuple(_build_group(i, entry) for i, entry in enumerate(resolved["prune"]))
    train = resolved.get("train")
    extras = {name: value for name, value in resolved.items() if name not in CORE_TABLES}
    return Spec(groups=groups,
                schedule=ScheduleSpec(**resolved["schedule"]),
                train=TrainSpec(**train) if train is not None else None,
                capture=CaptureSpec(**resolved["capture"]),
                source=label,
                extras=extras)


def _build_group(index: int, entry: Mapping[str, Any]) -> PruneGroup:
    base = prune_fields()
    options = {key: value for key, value in entry.items() if key not in base}
    return PruneGroup(index=index,
                      targets=tuple(entry["targets"]),
                      exclude=tuple(entry["exclude"]),
                      method=entry["method"],
                      density=entry["density"],
                      scope=entry["scope"],
                      block=(entry["block"][0], entry["block"][1]),
                      balanced=entry["balanced"],
                      options=options)

