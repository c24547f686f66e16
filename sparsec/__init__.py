"""sparsec: a compiler for neural-network sparsity.

    prog = sparsec.compile(model, "specs/movement.toml", example_inputs)
"""
from __future__ import annotations

from sparsec.compiler import compile
from sparsec.errors import CaptureError, ModelFileError, PassError, SpecError, UserError
from sparsec.ir import Site
from sparsec.program import Program

__all__ = ["compile", "Program", "Site", "UserError", "SpecError", "ModelFileError",
           "CaptureError", "PassError", "runtime"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "runtime":  # onnxruntime is imported only when used
        import importlib

        return importlib.import_module("sparsec.runtime")
    raise AttributeError(name)
