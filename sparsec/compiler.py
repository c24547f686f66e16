"""`sparsec.compile`: the whole front half of the pipeline in one straight line.

    spec -> capture -> passes (verified after each) -> Program
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from sparsec.capture import capture
from sparsec.modelfile import as_tuple
from sparsec.passes import build_pipeline
from sparsec.pipeline import Instruments, run_pipeline
from sparsec.program import Program


def compile(model: torch.nn.Module, spec: Any, example_inputs: Any,
            example_kwargs: Mapping[str, Any] | None = None, *,
            instruments: Instruments | None = None) -> Program:
    """Capture `model`, rewrite it as `spec` asks and return the trainable Program.

    spec: a path to a TOML file, a dict of the same shape, or a loaded `Spec`.
    The Program shares its weights with `model`.
    """
    from sparsec.spec import Spec, load_spec

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    gm = capture(model, as_tuple(example_inputs), dict(example_kwargs or {}),
                 method=spec.capture.method, dynamic=spec.capture.dynamic)
    gm = run_pipeline(gm, build_pipeline(spec), instruments)
    prog = Program(gm)
    prog.example_inputs = as_tuple(example_inputs)
    prog.example_kwargs = dict(example_kwargs or {})
    prog.train(model.training)
    return prog
