"""Run sparsec's ONNX files: onnxruntime sessions with the native block-sparse kernel registered.

    sess = sparsec.runtime.session("model.onnx", threads=2)
    sess.run(None, {"x": x})

The kernel library is built from source at first use and cached (see `sparsec.runtime.build`).
Where it cannot be built or loaded, sessions still run: onnxruntime inlines each
`sparsec::BlockSparseLinear` node's ONNX function body (standard ops, slower), and sparsec warns once
per process saying why. `SPARSEC_DISABLE_KERNEL=1` forces that path; `SPARSEC_KERNEL_LIB=/path.so`
uses a library built elsewhere.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnxruntime as ort

__all__ = ["session", "session_options", "kernel_available", "kernel_path", "build_kernel",
           "unavailable_reason", "KernelUnavailableWarning", "BuildError"]


class BuildError(RuntimeError):
    """The kernel could not be built or loaded; `str(err)` is a one-line reason."""


class KernelUnavailableWarning(RuntimeWarning):
    """The native kernel is not used; block-sparse ops run through their ONNX function bodies."""


class _State:
    """Per-process memo of the build attempt and of whether the fallback warning was given."""

    library: Path | None = None
    failure: str | None = None
    attempted = False
    warned = False


def _reset() -> None:
    """Forget the build attempt and the warning (tests)."""
    _State.library, _State.failure, _State.attempted, _State.warned = None, None, False, False


def _disabled() -> bool:
    return os.environ.get("SPARSEC_DISABLE_KERNEL", "").strip() not in ("", "0", "false", "no")


def build_kernel(force: bool = False) -> Path:
    """Build the kernel library now (or reuse the cached one) and return its path; raises BuildError."""
    prebuilt = os.environ.get("SPARSEC_KERNEL_LIB")
    if prebuilt and not force:
        path = Path(prebuilt).expanduser()
        if not path.is_file():
            raise BuildError(f"SPARSEC_KERNEL_LIB={prebuilt} does not exist")
        return path
    from sparsec.runtime import build as builder

    return builder.build(force=force).library


def _check_loads(library: Path) -> None:
    try:
        ort.SessionOptions().register_custom_ops_library(str(library))
    except Exception as err:  # onnxruntime raises its own Fail/RuntimeException types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BuildError(f"onnxruntime {ort.__version__} rejected {library}: {first}") from None


def _library() -> Path | None:
    if not _State.attempted:
        _State.attempted = True
        try:
            library = build_kernel()
            _check_loads(library)
            _State.library = library
        except BuildError as err:
            _State.failure = str(err)
    return _State.library


def unavailable_reason() -> str | None:
    """Why the kernel is not used in this process (None when it is)."""
    if _disabled():
        return "disabled by SPARSEC_DISABLE_KERNEL"
    if _library() is None:
        return _State.failure
    return None


def kernel_path() -> Path | None:
    """The kernel library this process uses, building it on first call; None when unavailable."""
    return None if _disabled() else _library()


def kernel_available() -> bool:
    """True when the native kernel is built and onnxruntime accepts it."""
    return kernel_path() is not None


def _warn_fallback(reason: str) -> None:
    if _State.warned:
        return
    _State.warned = True
    warnings.warn(f"sparsec native kernel unavailable ({reason}); block-sparse layers run through "
                  "their ONNX function bodies on stock onnxruntime (correct, slower)",
                  KernelUnavailableWarning, stacklevel=4)


def _register(options: ort.SessionOptions, threads: int | None) -> ort.SessionOptions:
    if threads:
        options.intra_op_num_threads = int(threads)
    library = kernel_path()
    if library is not None:
        options.register_custom_ops_library(str(library))
    else:
        _warn_fallback(unavailable_reason() or "unknown reason")
    return options


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions with the kernel registered when available (warns once when it is not)."""
    return _register(ort.SessionOptions(), threads)


# Graph fusions that make onnxruntime 1.32 slower on this CPU: SkipLayerNormalization (Add +
# LayerNormalization fused) ran a [1, 128, 768] normalization in 0.20 ms against 0.03 ms unfused
# (2 threads, AVX-512 EPYC; 25 of them are ~4.5 ms of BERT-base). sparsec's sessions skip them.
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def session(path: str | os.PathLike | bytes, threads: int | None = None,
            options: ort.SessionOptions | None = None, tuned: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session for `path` (a file, or serialized model bytes) with the sparsec
    kernel registered when available. `threads`: intra-op threads (default: onnxruntime's).
    `options`: start from these SessionOptions (the kernel is registered into them).
    `tuned`: skip the graph fusions in SLOW_FUSIONS (measured slower here)."""
    options = _register(options if options is not None else ort.SessionOptions(), threads)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(SLOW_FUSIONS) if tuned else None)
