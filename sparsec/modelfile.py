"""Loading a user's model.py.

model.py defines `build_model()` and `example_inputs()`; optionally `example_kwargs()`,
`train_data()`, `eval_data()`, `loss(outputs, batch)` and `metric(outputs, batch)`.
Every problem is reported as a ModelFileError naming the file and the function.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from sparsec.errors import ModelFileError, UserError

REQUIRED = ("build_model", "example_inputs")
OPTIONAL = ("example_kwargs", "train_data", "eval_data", "loss", "metric")


@dataclass
class ModelFile:
    """What model.py provides, already called where it is cheap (model, example inputs)."""

    path: Path
    module: ModuleType
    model: torch.nn.Module
    example_inputs: tuple
    example_kwargs: dict

    def has(self, name: str) -> bool:
        return callable(getattr(self.module, name, None))

    def function(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self.module, name, None)
        return fn if callable(fn) else None

    def call(self, name: str, *args: Any) -> Any:
        """Call an optional function of model.py, reporting its exceptions as user errors."""
        fn = self.function(name)
        if fn is None:
            raise ModelFileError(f"{self.path}: {name}() is not defined")
        with user_code(self.path, f"{name}()"):
            return fn(*args)


@contextlib.contextmanager
def user_code(path: Path, where: str) -> Iterator[None]:
    """Run model.py's code: its exceptions, and its attempts to end the process (sys.exit,
    os._exit, which would otherwise exit silently, with code 0), become one ModelFileError line."""
    real_exit = os._exit

    def refuse_exit(code: int) -> None:
        raise ModelFileError(f"{path}: {where} called os._exit({code}); model.py must return, not "
                             f"end the process")

    os._exit = refuse_exit  # type: ignore[assignment]
    try:
        yield
    except UserError:
        raise
    except SystemExit as exc:
        raise ModelFileError(f"{path}: {where} called sys.exit({exc.code!r}); model.py must return, "
                             f"not end the process") from None
    except Exception as exc:  # the user's code: show their message, not our traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelFileError(f"{path}: {where} raised {type(exc).__name__}: {first}") from exc
    finally:
        os._exit = real_exit  # type: ignore[assignment]


def import_file(path: str | os.PathLike) -> ModuleType:
    """Import model.py as a fresh module; its own folder is importable while it loads."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir() or path.suffix != ".py":
        raise ModelFileError(f"{path}: expected a Python file (model.py)")
    name = f"sparsec_user_model_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        with user_code(path, "importing it"):
            try:
                spec.loader.exec_module(module)
            except SyntaxError as exc:
                raise ModelFileError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def as_tuple(value: Any) -> tuple:
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def load(path: str | os.PathLike) -> ModelFile:
    """Import model.py, check its functions, build the model and the example inputs."""
    module = import_file(path)
    path = Path(path)
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise ModelFileError(f"{path}: missing function{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(m + '()' for m in missing)} (model.py must define "
                             f"build_model() and example_inputs())")
    partial = ModelFile(path, module, torch.nn.Module(), (), {})
    model = partial.call("build_model")
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(f"{path}: build_model() must return a torch.nn.Module, "
                             f"got {type(model).__name__}")
    returned = partial.call("example_inputs")
    kwargs: dict = {}
    if isinstance(returned, Mapping):  # Hugging Face style: the model's keyword arguments
        inputs, kwargs = (), dict(returned)
    else:
        inputs = as_tuple(returned)
    if partial.has("example_kwargs"):
        extra = partial.call("example_kwargs")
        if not isinstance(extra, Mapping):
            raise ModelFileError(f"{path}: example_kwargs() must return a dict, got {type(extra).__name__}")
        clash = sorted(set(kwargs) & set(extra))
        if clash:
            raise ModelFileError(f"{path}: {', '.join(clash)} given by both example_inputs() and example_kwargs()")
        kwargs.update(extra)
    leaves = [x for x in (*inputs, *kwargs.values())]
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        got = type(returned).__name__ if returned is not None else "None"
        raise ModelFileError(f"{path}: example_inputs() must return a tensor, a tuple of example "
                             f"arguments or a dict of keyword arguments holding a tensor, got {got}")
    return ModelFile(path, module, model, inputs, kwargs)
