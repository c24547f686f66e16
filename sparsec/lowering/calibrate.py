"""Measured layer costs: one layer shape timed dense vs sparse on the runtime a file targets, cached.

The constant cost model (sparsec.lowering.cost) describes sparsec's kernel on the machine it was
calibrated on. What a user deploys is one of two runtimes, `[export] target`:

    sparsec   onnxruntime with sparsec's native kernel registered (sparsec.runtime.session)
    stock     plain onnxruntime, which inlines each sparse node's ONNX function body

so at export every eligible layer is timed on the target runtime: a one-node model of the layer
(`onnx_op.single_layer_model`, its real packed weight and bias) against the dense MatMul (+ Add)
(`onnx_op.dense_layer_model`), on an input of the rows the layer sees in the example inputs.

Methodology (bench/ and DESIGN.md: two onnxruntime sessions alive in one process distort each
other, the spinning pool threads of one steal the cores of the other): each candidate runs alone,
in its own session, which is closed before the next one is built; ROUNDS alternations of dense and
sparse, in turn first (dense-sparse, sparse-dense: drift cancels), each MEASURE_S seconds of calls
after WARMUP untimed ones; the medians of all calls.

Results are cached on disk (`$SPARSEC_CACHE_DIR/cost/<key>.json`, see sparsec.runtime.build for the
cache root); the key holds the machine (CPU model, cores), the onnxruntime version, the kernel build
(target sparsec), the threads, the rows, the layer's shape, block, kept blocks and longest block row,
so a layer shape is measured once per machine and runtime. `SPARSEC_MEASURE=0` (or `[export]
measure = false`) skips measuring: the constant model decides, and the report says "estimated, not
measured".
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

TARGETS = ("sparsec", "stock")
RUNTIME = {"sparsec": "sparsec kernel", "stock": "stock onnxruntime"}
MEASURE_ENV = "SPARSEC_MEASURE"
DEFAULT_ROWS = 128    # rows timed when the example inputs do not say how many a layer sees
ROUNDS = 2            # alternations dense, sparse (each in a fresh session)
MEASURE_S = 0.2       # seconds of timed calls per candidate and round
WARMUP = 3            # untimed calls after building a session
MAX_CALLS = 400       # per candidate and round (tiny layers)
CACHE_VERSION = 1     # bump when the methodology changes: old entries are ignored


@dataclass(frozen=True)
class LayerCase:
    """What one measurement times: a layer shape on one runtime."""

    target: str                   # sparsec | stock
    shape: tuple[int, int]        # N, K of the weight matrix
    block: tuple[int, int]
    rows: int                     # M: rows of X (batch x sequence of the example inputs)
    kept_blocks: int
    max_per_row: int              # the padded block-row length the function body computes
    threads: int                  # intra-op threads, 0: onnxruntime's default
    int8: bool = False            # INT8 compute (per-row scales), what the file will hold
    conv: tuple[int, ...] = ()    # a convolution: geometry (10) and input image [B, C, H, W]


@dataclass(frozen=True)
class AttentionCase:
    """What one attention measurement times: onnxruntime's Attention against sparsec's kernel."""

    shape: tuple[int, ...]        # B, Sq, Skv, Hq, Hkv, D, Dv
    compute: str                  # fp32 | bf16
    mask: str                     # "" | bool | float, shaped [B, 1, Sq, Skv]
    causal: bool
    threads: int
    target: str = "sparsec"


@dataclass(frozen=True)
class Measurement:
    """Medians of one LayerCase: dense MatMul vs the sparse node, milliseconds per call."""

    dense_ms: float
    sparse_ms: float
    runtime: str                  # "sparsec kernel" | "stock onnxruntime"
    calls: int                    # timed calls per candidate
    cached: bool = False

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def measuring_disabled() -> str:
    """Why measurement is switched off by the environment ('' when it is not)."""
    value = os.environ.get(MEASURE_ENV, "").strip().lower()
    return f"{MEASURE_ENV}={os.environ[MEASURE_ENV]}" if value in ("0", "false", "no", "off") else ""


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """What the cache key says about the machine and onnxruntime."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"system": platform.system(), "arch": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "onnxruntime": ort.__version__}


def kernel_unavailable() -> str:
    """Why sparsec's kernel cannot be timed here ('' when it can)."""
    from sparsec import runtime

    return "" if runtime.kernel_available() else (runtime.unavailable_reason() or "unknown reason")


def _kernel_build() -> str:
    from sparsec import runtime

    path = runtime.kernel_path()
    return path.parent.name if path is not None else ""


def cache_key(case: LayerCase | AttentionCase) -> str:
    fields = {"version": CACHE_VERSION, "machine": machine(), "case": asdict(case),
              "kernel": _kernel_build() if case.target == "sparsec" else ""}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(case: LayerCase | AttentionCase) -> Path:
    from sparsec.runtime.build import cache_dir

    return cache_dir() / "cost" / f"{cache_key(case)}.json"


def measure_layer(case: LayerCase, weight: np.ndarray, bias: np.ndarray | None) -> Measurement:
    """The case's cached measurement, or time it now (`weight` [N, K] with its pruned zeros, the
    layer's bias) and cache it. Raises RuntimeError when the target runtime cannot run here."""
    return _cached(case, lambda: time_layer(case, weight, bias))


def _cached(case: LayerCase | AttentionCase, time_it: Callable[[], tuple[float, float, int]]) -> Measurement:
    """The case's measurement from the cache, or `time_it()` (dense ms, sparse ms, calls) written to it."""
    path = cache_path(case)
    try:
        return Measurement(**{**json.loads(path.read_text()), "cached": True})
    except (OSError, ValueError, TypeError):
        pass
    dense_ms, sparse_ms, calls = time_it()
    result = Measurement(dense_ms, sparse_ms, RUNTIME[case.target], calls)
    _write_atomic(path, json.dumps({k: v for k, v in asdict(result).items() if k != "cached"}))
    return result


def measure_attention(case: AttentionCase) -> Measurement:
    """The case's cached measurement, or time it now (ONNX Attention as "dense", sparsec::Attention
    as "sparse", random inputs) and cache it. Raises RuntimeError where the kernel cannot run."""
    return _cached(case, lambda: _time_attention(case))


def _time_attention(case: AttentionCase) -> tuple[float, float, int]:
    """(onnxruntime's Attention ms, the kernel's ms, calls): one-node models on random inputs."""
    from sparsec.lowering import attention_op

    reason = kernel_unavailable()
    if reason:
        raise RuntimeError(f"sparsec's kernel is not available ({reason})")
    B, Sq, Skv, Hq, Hkv, D, Dv = case.shape
    mask_shape = (B, 1, Sq, Skv)
    attrs = {"is_causal": int(case.causal)}
    onnx_model = attention_op.single_node_model(case.shape, "", case.mask, mask_shape, **attrs)
    kernel_model = attention_op.single_node_model(case.shape, case.compute, case.mask, mask_shape, **attrs)
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((B, Sq, Hq * D)).astype(np.float32),
             "k": rng.standard_normal((B, Skv, Hkv * D)).astype(np.float32),
             "v": rng.standard_normal((B, Skv, Hkv * Dv)).astype(np.float32)}
    if case.mask:
        feeds["mask"] = np.ones(mask_shape, bool) if case.mask == "bool" else np.zeros(mask_shape, np.float32)
    return time_models(onnx_model.SerializeToString(), kernel_model.SerializeToString(), feeds, True, case.threads)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def time_layer(case: LayerCase, weight: np.ndarray, bias: np.ndarray | None) -> tuple[float, float, int]:
    """(dense ms, sparse ms, calls per candidate): the one-node models timed alone, alternating."""
    from sparsec.lowering import block_format, onnx_op

    if case.target == "sparsec":
        reason = kernel_unavailable()
        if reason:
            raise RuntimeError(f"sparsec's kernel is not available ({reason})")
    kernel = case.target == "sparsec"
    if case.conv:   # INT8 convolutions hold int8 blocks, per-block scales, fp32 arithmetic (as exported)
        from sparsec.lowering import conv_op

        geometry, image = list(case.conv[:10]), case.conv[10:]
        packed = block_format.pack(np.ascontiguousarray(weight, dtype=np.float32), block=case.block,
                                   int8=case.int8, per_row=False)
        sparse = conv_op.single_layer_model(packed, geometry, image, bias).SerializeToString()
        dense = conv_op.dense_layer_model(weight, geometry, image, bias).SerializeToString()
        x = np.random.default_rng(0).standard_normal(image).astype(np.float32)
        return time_models(dense, sparse, {"x": x}, kernel, case.threads)
    packed = block_format.pack(np.ascontiguousarray(weight, dtype=np.float32), block=case.block,
                               int8=case.int8, per_row=case.int8)   # int8: INT8 compute, as exported
    sparse = onnx_op.single_layer_model(packed, bias).SerializeToString()
    dense = onnx_op.dense_layer_model(weight, bias).SerializeToString()
    x = np.random.default_rng(0).standard_normal((case.rows, case.shape[1])).astype(np.float32)
    return time_models(dense, sparse, {"x": x}, kernel, case.threads)


def time_models(dense: bytes | str, sparse: bytes | str, feeds: dict[str, np.ndarray], kernel: bool,
                threads: int, seconds: float = MEASURE_S, rounds: int = ROUNDS,
                min_calls: int = 1) -> tuple[float, float, int]:
    """Median ms per call of two models (files or serialized bytes), each run alone in its own
    session (closed before the next is built), ROUNDS alternations of `seconds` of calls (at least
    `min_calls`); the sparse one with sparsec's kernel registered when `kernel`. Returns (dense ms,
    sparse ms, timed calls per candidate)."""
    from sparsec.bench import kernel_session, stock_session

    def sparse_session() -> Any:
        if not kernel:
            return stock_session(sparse, threads or None)
        session, why = kernel_session(sparse, threads or None)
        if session is None:
            raise RuntimeError(why)
        return session

    makers: dict[str, Callable[[], Any]] = {"dense": lambda: stock_session(dense, threads or None),
                                            "sparse": sparse_session}
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(rounds):
        order = ("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")   # ABBA: drift cancels
        for name in order:
            times[name] += _time_alone(makers[name], feeds, seconds, min_calls)
    dense_ms, sparse_ms = (statistics.median(times[n]) * 1000 for n in ("dense", "sparse"))
    return dense_ms, sparse_ms, min(len(t) for t in times.values())


def _time_alone(make: Callable[[], Any], feeds: dict[str, np.ndarray], seconds: float,
                min_calls: int = 1) -> list[float]:
    """Seconds per call of a fresh session, closed (and its threads joined) before returning."""
    session = make()
    try:
        for _ in range(WARMUP):
            session.run(None, feeds)
        out: list[float] = []
        end = time.perf_counter() + seconds
        while len(out) < MAX_CALLS and (len(out) < min_calls or time.perf_counter() < end):
            start = time.perf_counter()
            session.run(None, feeds)
            out.append(time.perf_counter() - start)
        return out
    finally:
        del session
        gc.collect()
