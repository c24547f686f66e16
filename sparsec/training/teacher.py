"""The distillation teacher named by `[distill] teacher` (movement pruning section 6, Table 3: the
student starts from the pre-trained model, the teacher is a separately fine-tuned model).

* `dense` (default): the compiled model itself before pruning (the Program's frozen copy).
* `model`: what model.py's `teacher()` returns (a torch module).
* any other value: a folder holding `model.safetensors` (e.g. written by Hugging Face's
  `save_pretrained`, or `safetensors.torch.save_file(model.state_dict(), ...)`); its tensors are
  loaded into the module that model.py's `teacher()` builds, else into a fresh `build_model()`.
  A relative folder is read from the spec file's folder.

A spec never executes code: a folder only provides tensors (read with safetensors); the only code
that runs is the model.py the user passed. The teacher is frozen, in eval mode, on the Program's
device (`Program.set_teacher`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsec.errors import ModelFileError, UserError
from sparsec.modelfile import ModelFile

WEIGHTS = "model.safetensors"


def teacher_source(spec: Any) -> str:
    """The spec's `[distill] teacher` ("dense" without [distill])."""
    table = (getattr(spec, "extras", None) or {}).get("distill")
    return str(table.get("teacher", "dense")) if table else "dense"


def load_teacher(source: str, modelfile: ModelFile | None, spec_source: str | None = None) -> torch.nn.Module | None:
    """The teacher module `source` names, or None for `dense` (the Program keeps its own copy)."""
    if source == "dense":
        return None
    if modelfile is None:
        raise UserError(f"distill.teacher = {source!r} needs a model file (sparsec compile model.py): "
                        f"the teacher is built by its teacher() or build_model()")
    if source == "model":
        if not modelfile.has("teacher"):
            raise ModelFileError(f"{modelfile.path}: the spec's distill.teacher = 'model' needs a "
                                 f"teacher() function returning the teacher module")
        return _module(modelfile, "teacher")
    folder = Path(source)
    if not folder.is_absolute() and spec_source and Path(spec_source).exists():
        folder = Path(spec_source).resolve().parent / folder
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(f"distill.teacher = {source!r}: {weights} does not exist (allowed: 'dense', "
                        f"'model', or a folder holding {WEIGHTS})")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: not a readable safetensors file ({exc})") from None
    module = _module(modelfile, "teacher" if modelfile.has("teacher") else "build_model")
    _load_exactly(module, tensors, weights)
    return module


def _module(modelfile: ModelFile, name: str) -> torch.nn.Module:
    module = modelfile.call(name)
    if not isinstance(module, torch.nn.Module):
        raise ModelFileError(f"{modelfile.path}: {name}() must return a torch.nn.Module, got "
                             f"{type(module).__name__}")
    return module


def _load_exactly(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Every tensor of the module from the file, with its shape; tied copies (one storage under two
    names, which save_pretrained writes once) count as loaded with their twin."""
    own = module.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(own))
    loaded_storages = {own[k].data_ptr() for k in tensors if k in own}
    missing = sorted(k for k in set(own) - set(tensors) if own[k].data_ptr() not in loaded_storages)
    wrong = [f"{k} {list(tensors[k].shape)} (model: {list(own[k].shape)})" for k in sorted(tensors)
             if k in own and tuple(tensors[k].shape) != tuple(own[k].shape)]
    for problem, names in (("has tensors the teacher module lacks", unexpected),
                           ("lacks tensors of the teacher module", missing), ("has other shapes", wrong)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise UserError(f"{where}: {problem}: {shown}")
    module.load_state_dict(tensors, strict=False)
