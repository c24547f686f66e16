"""User-facing errors.

Every error a user can cause (bad spec, bad model file, capture failure, a pass whose
preconditions are unmet) is a `UserError`: the CLI prints its message as one line (or one line
per problem for a spec) and exits with code 2, without a traceback unless `--debug` is given.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit code 2."""

    exit_code = 2


class SpecError(UserError):
    """One or more problems in a spec; `errors` lists every problem, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class ModelFileError(UserError):
    """model.py is missing a function, returns the wrong type, or raises on import."""


class CaptureError(UserError):
    """The model could not be captured as a graph."""


class PassError(UserError):
    """A pass found its preconditions unmet, or the verifier rejected its output."""


class TrainingError(UserError):
    """The training loop cannot proceed (e.g. no gradient where a criterion needs one)."""
