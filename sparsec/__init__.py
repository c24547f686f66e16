"""sparsec: a compiler for neural-network sparsity.

    prog = sparsec.compile(model, "specs/movement.toml", example_inputs)
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from sparsec.errors import CaptureError, ModelFileError, PassError, SpecError, UserError
from sparsec.program import Program
from sparsec.site import Site

__all__ = ["compile", "Program", "Site", "UserError", "SpecError", "ModelFileError",
           "CaptureError", "PassError", "runtime"]
__version__ = "0.1.0"


def compile(model: torch.nn.Module, spec: Any, example_inputs: Any,
            example_kwargs: Mapping[str, Any] | None = None, *, instruments: Any = None) -> Program:
    """Capture `model`, rewrite it as `spec` asks and return the trainable Program.

    spec: a path to a TOML file, a dict of the same shape, or a loaded `Spec`. The Program shares
    its weights with `model`. `instruments` (sparsec.pipeline.Instruments) print or time the passes.
    """
    from sparsec import driver
    from sparsec.modelfile import as_tuple
    from sparsec.pipeline import Instruments
    from sparsec.spec import load_spec

    job = driver.Job(model=model, spec=load_spec(spec), example_inputs=as_tuple(example_inputs),
                     example_kwargs=dict(example_kwargs or {}), stop_after="rewrite",
                     instruments=instruments or Instruments())
    outcome = driver.run(job)
    assert outcome.program is not None
    return outcome.program


def __getattr__(name: str):
    if name == "runtime":  # onnxruntime is imported only when used
        import importlib

        return importlib.import_module("sparsec.runtime")
    raise AttributeError(name)
