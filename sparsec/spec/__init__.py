"""The spec language: a strict TOML file (or a dict of the same shape) -> a frozen `Spec`.

Why strict: a misspelt key that is silently ignored prunes the wrong layers or to the wrong density,
and the user finds out hours later. So every key is declared as a `Field` (sparsec.schema), unknown
keys are rejected with a suggestion, and every problem in a spec is collected and reported at once,
each on its own line as `{file}: {key path}: {problem}`.

    model.py     the resolved Spec (dataclasses whose defaults come from the Fields)
    fields.py    the Fields of the core tables ([[prune]], [schedule], [train], [capture])
    tables.py    the core tables' registration and the rules across their keys
    registry.py  register_table / register_check; feature tables ([export], [distill],
                 [self_regularization]) register themselves in their own modules
    values.py    checking one value against its Field
    validate.py  load_spec: reading TOML and validating every table
    docs.py      `sparsec validate`'s summary and docs/spec.md (`python -m sparsec.spec --docs`)

A spec never executes code: TOML is read with tomllib only.
"""
from __future__ import annotations

from sparsec.spec.docs import format_summary, generate_docs
from sparsec.spec.model import DICT_SOURCE, CaptureSpec, PruneGroup, ScheduleSpec, Spec, TrainSpec
from sparsec.spec.registry import register_check, register_table, tables
from sparsec.spec.validate import load_spec

__all__ = ["load_spec", "Spec", "PruneGroup", "ScheduleSpec", "TrainSpec", "CaptureSpec", "DICT_SOURCE",
           "format_summary", "generate_docs", "register_table", "register_check", "tables"]
