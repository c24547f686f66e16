"""Files: which source files belong to the libraries sparsec runs on (and which to the user), the
mode of the files sparsec writes, how it writes tensors (safetensors) and text (atomically).

Error messages and IR headers point at the user's own line (the model's forward, model.py), not at
torch's or sparsec's internals. That is decided by package location, never by a substring of the
path: a checkout in a folder named `sparsec` or `torch` is still the user's code.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    import torch

    roots = [Path(torch.__file__).parent, Path(__file__).parent]  # torch's package and sparsec's
    try:
        import sympy  # torch.export's symbolic shapes run through it

        roots.append(Path(sympy.__file__).parent)
    except ImportError:
        pass
    return tuple(str(root.resolve()) + os.sep for root in roots)


@functools.lru_cache(maxsize=1)
def _stdlib() -> tuple[str, tuple[str, ...]]:
    """The standard library's folder, and the package folders that may lie inside it."""
    paths = sysconfig.get_paths()
    packages = tuple(str(Path(paths[key]).resolve()) + os.sep for key in ("purelib", "platlib"))
    return str(Path(paths["stdlib"]).resolve()) + os.sep, packages


def is_library_file(filename: str) -> bool:
    """True for frames of torch, sparsec, sympy and the standard library (and frozen modules)."""
    if not filename or filename.startswith("<"):
        return True
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, RuntimeError):
        resolved = filename
    if resolved.startswith(_library_roots()):
        return True
    stdlib, packages = _stdlib()
    return resolved.startswith(stdlib) and not resolved.startswith(packages)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of an ordinary new file: what the umask leaves of 0o666 (temporary files, which
    sparsec renames into place, are created private)."""
    return 0o666 & ~umask()


def save_tensors(state: dict[str, Any], path: Path) -> None:
    """safetensors needs contiguous tensors that share no storage: save private copies."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in state.items()
               if isinstance(t, torch.Tensor)}
    save_file(tensors, str(path), metadata={"format": "pt", "writer": "sparsec"})
    os.chmod(path, file_mode())  # safetensors writes it private


def write_text_atomically(path: Path, text: str) -> None:
    """`path` replaced by `text` in one rename (temp file in the same folder)."""
    from sparsec.errors import UserError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
