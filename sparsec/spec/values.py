"""Checking one value of a spec against its `Field`: kinds, choices, ranges, and the wording of
the problems (the value shown as the user wrote it, a suggestion for a near miss)."""
from __future__ import annotations

import difflib
import json
import math
from typing import Any, Callable, Mapping

from sparsec.schema import KINDS, Field

Problem = tuple[str, str]  # (key path, problem)


def check_value(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    """The value converted to its kind (an int where a float is expected becomes a float), and the
    problems found (empty when valid). Booleans are never numbers."""
    return _KIND_CHECKS[spec_field.kind](spec_field, value, path)


def _expected(spec_field: Field, value: Any, path: str) -> list[Problem]:
    problem = f"expected {KINDS[spec_field.kind]}, got {describe(value)}"
    if spec_field.allowed() != KINDS[spec_field.kind]:
        problem += f" (allowed: {spec_field.allowed()})"
    return [(path, problem)]


def _check_str(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if not isinstance(value, str):
        return value, _expected(spec_field, value, path)
    return value, _choice_problems(spec_field, value, path)


INT_LIMIT = 2 ** 63   # integers go to torch and numpy as int64


def _check_int(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(value, bool) or not isinstance(value, int):
        return value, _expected(spec_field, value, path)
    if not -INT_LIMIT <= value < INT_LIMIT:
        return value, [(path, f"{show(value)} does not fit a 64-bit integer (allowed: {spec_field.allowed()})")]
    return value, _choice_problems(spec_field, value, path) + _range_problems(spec_field, value, path)


def _check_float(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, _expected(spec_field, value, path)
    number = float(value)
    if not math.isfinite(number):
        return number, [(path, f"{show(value)} is not a finite number (allowed: {spec_field.allowed()})")]
    return number, _choice_problems(spec_field, number, path) + _range_problems(spec_field, number, path)


def _check_bool(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if not isinstance(value, bool):
        return value, _expected(spec_field, value, path)
    return value, []


def _check_str_list(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    if isinstance(value, str):
        return value, [(path, f"expected a list of strings, got a string ({show(value)}); write "
                              f"{as_toml([value])}")]
    if not isinstance(value, (list, tuple)):  # tuples: a Python dict spec may use them
        return value, _expected(spec_field, value, path)
    problems = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append((f"{path}[{i}]", f"expected a string, got {describe(item)}"))
            continue
        problems += _choice_problems(spec_field, item, f"{path}[{i}]")
    return list(value), problems


def _check_int_pair(spec_field: Field, value: Any, path: str) -> tuple[Any, list[Problem]]:
    allowed = f"{KINDS['pair[int]']} [rows, cols]"
    if not isinstance(value, (list, tuple)):
        return value, [(path, f"expected {allowed}, got {describe(value)}")]
    if len(value) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        return value, [(path, f"expected {allowed}, got {describe(value)}")]
    in_range = all(x >= 1 and not _range_problems(spec_field, x, path) for x in value)
    if not in_range:
        bound = f"1 <= each <= {spec_field.le:g}" if spec_field.le is not None else "each >= 1"
        return value, [(path, f"{show(value)} is out of range (allowed: {allowed}, {bound})")]
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
    problem = f"{show(value)} is not {spec_field.allowed()}"
    if isinstance(value, str):
        hint = suggestion(value, [c for c in spec_field.choices if isinstance(c, str)])
        if hint:
            problem += f" ({hint})"
    return [(path, problem)]


def _range_problems(spec_field: Field, value: float, path: str) -> list[Problem]:
    in_range = ((spec_field.gt is None or value > spec_field.gt)
                and (spec_field.ge is None or value >= spec_field.ge)
                and (spec_field.lt is None or value < spec_field.lt)
                and (spec_field.le is None or value <= spec_field.le))
    if in_range:
        return []
    return [(path, f"{show(value)} is out of range (allowed: {spec_field.allowed()})")]


def type_name(value: Any) -> str:
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


def show(value: Any, limit: int = 60) -> str:
    """The value as the user wrote it (true/false for booleans), shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(item, limit) for item in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_toml(value: Any) -> str:
    """A value as written in TOML, e.g. ["encoder.*"] or true: for the kinds of the schema (strings,
    numbers, booleans and flat lists of them) the JSON text is valid inline TOML."""
    return json.dumps(value)


def describe(value: Any) -> str:
    return f"{type_name(value)} ({show(value)})"


def quoted_list(names: list[str], noun: str) -> str:
    quoted = ", ".join(repr(name) for name in names)
    return f"{noun} {quoted}" if len(names) == 1 else f"{noun}s {quoted}"


def suggestion(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}?" if close else ""

