"""`sparsec bench MODEL.onnx`: dense vs block-sparse latency in onnxruntime, in one process.

The sparse file runs on stock onnxruntime (its function bodies inlined) and, when the native kernel
is available, with sparsec's kernel registered; the dense file (`--dense`, default the
`model.dense.onnx` next to MODEL) runs on stock onnxruntime. Runs are interleaved (one call of each
variant per round) so machine noise hits them alike; the report gives medians and ratios from the
same run, file sizes and one row per sparse node (shape, block, density, storage).
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sparsec.errors import UserError
from sparsec.text import format_table

DENSE = "dense (onnxruntime)"
DENSE_TUNED = "dense (sparsec.runtime session)"
SPARSE_STOCK = "sparse (onnxruntime, function body)"
SPARSE_KERNEL = "sparse (sparsec kernel)"
# A file with no sparse node (every layer stayed dense: policy `never`, or the stock target shipped
# the dense graph) is timed under this name, with no speedup: it is the dense graph, so its ratio to
# the dense file would be the timing noise read as a speedup.
NO_SPARSE_NODES = "model, no sparse nodes (onnxruntime)"
NO_SPARSE_NOTE = ("the model has no block-sparse nodes (every layer is dense): its time is the dense "
                  "graph's, so no speedup is given")

_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64,
          "int32": np.int32, "bool": np.bool_}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


@dataclass
class Layer:
    node: str
    shape: tuple[int, int]      # N, K
    block: tuple[int, int]
    block_density: float        # kept blocks / all blocks
    stored: float               # padded blocks / all blocks
    dtype: str
    bytes: int                  # values + indices + scales
    weight: str = ""            # the weight it holds, from its tensors' names ("...query+key+value.weight": fused)

    def row(self) -> tuple[str, ...]:
        return (self.weight or "?", f"{self.shape[0]}x{self.shape[1]}", f"{self.block[0]}x{self.block[1]}",
                f"{self.block_density:.3f}", f"{self.stored:.3f}", self.dtype, _size(self.bytes), self.node)


def _weight_name(values: str) -> str:
    """The weight a sparse node's `values` tensor packs: 'fc1.weight_values' -> 'fc1.weight' (a
    BatchNormalization folded in leaves '.bn' after it), '' when the name says nothing."""
    head, found, _ = values.partition("_values")
    return head if found else ""


@dataclass
class BenchResult:
    model: str
    dense: str | None
    threads: int | None
    repeats: int
    medians_ms: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    protocol: str = ""

    def ratio(self, variant: str) -> float | None:
        if DENSE not in self.medians_ms or variant not in self.medians_ms or variant == NO_SPARSE_NODES:
            return None
        return self.medians_ms[DENSE] / self.medians_ms[variant]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup"] = {v: self.ratio(v) for v in self.medians_ms if v != DENSE}
        return out


def sparse_layers(path: str | Path) -> list[Layer]:
    """One Layer per sparse node of the file (each lowering target's nodes)."""
    import onnx_ir as ir

    from sparsec.lowering import targets
    from sparsec.lowering.onnx_op import stored_values

    model = ir.load(str(path))
    layers = []
    for node in (n for target in targets.all_targets() for n in target.onnx_nodes(model)):
        stored = stored_values(node)
        nnz = node.inputs[3]
        if stored is None or nnz is None or nnz.const_value is None:
            continue
        (r, s, br, bc), dtype, values_bytes, blocks = stored
        n, k = node.attributes["N"].as_int(), node.attributes["K"].as_int()
        grid = r * -(-k // bc)
        kept = int(nnz.const_value.numpy().sum())
        # the layer's own data: indices, bias, INT8 scales (not the epilogue's LayerNorm parameters)
        others = [v for v in node.inputs[2:6] if v is not None and v.is_initializer() and v.const_value is not None]
        size = values_bytes + sum(v.const_value.nbytes for v in others)  # type: ignore[union-attr]
        layers.append(Layer(node.name or "", (n, k), (br, bc), kept / grid, blocks / grid,
                            "int8" if dtype == ir.DataType.INT8 else "fp32", size,
                            _weight_name(node.inputs[1].name or "")))
    return layers


def example_feeds(path: str | Path, session: Any, batch: int | None = None, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Inputs shaped like the example inputs recorded at export (random floats, zero token ids,
    all-ones masks), with the first dimension set to `batch` when given; dimensions not recorded
    default to 1."""
    import onnx

    from sparsec.lowering.onnx_graph import METADATA_INPUTS

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    recorded = json.loads(meta.get(METADATA_INPUTS, "{}"))
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        info = recorded.get(inp.name, {})
        shape = list(info.get("shape") or [d if isinstance(d, int) else 1 for d in inp.shape])
        if batch and shape:
            fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
            if fixed is not None and fixed != batch:
                raise UserError(f"{path}: input {inp.name!r} has a fixed first dimension of {fixed} (export "
                                f"specialized it to the example input's); --batch {batch} needs a file "
                                "exported with an example batch larger than 1")
            shape[0] = batch
        dtype = _NUMPY.get(info.get("dtype", ""), _ORT_TYPES.get(inp.type, np.float32))
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


DEFAULT_REPEATS = 50  # interleaved rounds of `sparsec bench`
SETTLE_S = 0.05  # pause before each timed call: the previous session's pool threads stop spinning
WARM_S = 0.005   # then untimed calls for at least this long (at least one)


def timing_session_options(threads: int | None):
    """SessionOptions for timing: `threads` intra-op threads, onnxruntime's default spin-waiting (as a
    deployed session runs; without it every parallel op pays a thread wake-up, which penalises models
    of many short ops, the sparse ones, more than dense ones). Sessions timed in turn would then steal
    each other's cores (the spinning pool threads of the session that just ran: dense BERT-base took
    99 ms instead of 74 on 2 cores), so `interleaved` pauses SETTLE_S until they park, then makes
    untimed calls for WARM_S (waking this session's threads) before each timed one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return options


def timing_protocol(threads: int | None) -> str:
    return (f"threads: {threads or 'onnxruntime default'} (default spin-waiting; each timed call after a "
            f"{SETTLE_S * 1000:.0f} ms pause and {WARM_S * 1000:.0f} ms of untimed calls)")


def stock_session(path: str | Path | bytes, threads: int | None):
    """A stock onnxruntime session (no sparsec kernel) for timing: see timing_session_options."""
    import onnxruntime as ort

    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, timing_session_options(threads), providers=["CPUExecutionProvider"])


def kernel_session(path: str | Path | bytes, threads: int | None) -> tuple[Any, str]:
    """A sparsec.runtime session (kernel registered, tuned fusions), or None and why not."""
    try:
        from sparsec import runtime
    except ImportError:
        return None, "sparsec.runtime is not installed"
    if not runtime.kernel_available():
        return None, "the native kernel is not available (see the warning above)"
    model = path if isinstance(path, bytes) else str(path)
    return runtime.session(model, threads=threads, options=timing_session_options(threads)), ""


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                settle: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` interleaved rounds after `warmup` calls each.
    With `settle` > 0 each timed call follows a pause of `settle` seconds and untimed calls for
    WARM_S (at least one): it runs with its own session's threads awake, the cores at full clock
    and no other session's threads spinning (see timing_session_options)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                time.sleep(settle)  # the other sessions' pool threads stop spinning and park
                warm_until = time.perf_counter() + WARM_S
                fn()                # this session's threads wake up and spin, as between calls,
                while time.perf_counter() < warm_until:
                    fn()            # and the cores are back at full clock after the pause
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def bench(model: str | Path, dense: str | Path | None = None, threads: int | None = None,
          repeats: int = DEFAULT_REPEATS, kernel: bool = True, batch: int | None = None) -> BenchResult:
    """Time the sparse file (and the dense one) in onnxruntime. A file that is not a readable ONNX
    model onnxruntime can load and run on its example inputs is a UserError naming it."""
    if repeats < 1 or (batch is not None and batch < 1) or (threads is not None and threads < 1):
        raise UserError(f"--repeats, --batch and --threads must be at least 1 (got {repeats}, {batch}, "
                        f"{threads})")
    model = Path(model)
    if not model.is_file():
        raise UserError(f"{model}: no such ONNX file")
    with _file_errors(model):
        return _bench(model, dense, threads, repeats, kernel, batch)


@contextlib.contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # onnx, onnx_ir and onnxruntime raise their own types on a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"{path}: not an ONNX model sparsec can time ({type(exc).__name__}: {first})") from exc


def _bench(model: Path, dense: str | Path | None, threads: int | None, repeats: int, kernel: bool,
           batch: int | None) -> BenchResult:
    if dense is None:
        sibling = model.with_name(model.name.removesuffix(".onnx") + ".dense.onnx")
        dense = sibling if sibling.is_file() else None
    elif not Path(dense).is_file():
        raise UserError(f"{dense}: no such ONNX file (--dense)")
    result = BenchResult(str(model), str(dense) if dense else None, threads, repeats)
    result.layers = sparse_layers(model)
    result.sizes = {"model": model.stat().st_size}
    own = SPARSE_STOCK if result.layers else NO_SPARSE_NODES
    sessions = {own: stock_session(model, threads)}
    if not result.layers:
        result.notes.append(NO_SPARSE_NOTE)
    if dense is not None:
        result.sizes["dense"] = Path(dense).stat().st_size
        sessions = {DENSE: stock_session(dense, threads), **sessions}
        tuned, _ = kernel_session(dense, threads)
        if tuned is not None:  # the same session settings as the kernel's, for a like-for-like ratio
            sessions[DENSE_TUNED] = tuned
    else:
        result.notes.append("no dense file: give --dense (or keep model.dense.onnx next to MODEL)")
    if kernel and result.layers:
        session, why = kernel_session(model, threads)
        if session is None:
            result.notes.append(f"kernel not measured: {why}")
        else:
            sessions[SPARSE_KERNEL] = session
    feeds = example_feeds(model, sessions[own], batch)
    result.inputs = {name: list(value.shape) for name, value in feeds.items()}
    fns = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    times = interleaved(fns, repeats, settle=SETTLE_S)
    result.protocol = timing_protocol(threads)
    result.medians_ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return result


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_bench(result: BenchResult) -> str:
    lines = [f"model   {result.model} ({_size(result.sizes['model'])})"]
    if result.dense:
        ratio = result.sizes["dense"] / result.sizes["model"]
        lines.append(f"dense   {result.dense} ({_size(result.sizes['dense'])}): file {ratio:.1f}x smaller")
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in result.inputs.items())
    lines.append(f"timing  {result.repeats} interleaved rounds, medians, {result.protocol}; inputs: {shapes}")
    rows = []
    for name, ms in result.medians_ms.items():
        ratio = result.ratio(name)
        rows.append((name, f"{ms:.3f} ms", "-" if ratio is None or name == DENSE else f"{ratio:.2f}x"))
    lines += format_table(("variant", "median", "speedup"), rows, {1, 2})
    if DENSE_TUNED in result.medians_ms and SPARSE_KERNEL in result.medians_ms:
        like = result.medians_ms[DENSE_TUNED] / result.medians_ms[SPARSE_KERNEL]
        lines.append(f"kernel vs dense with the same session settings: {like:.2f}x")
    if result.layers:
        lines += ["", f"{len(result.layers)} block-sparse node{'s' * (len(result.layers) != 1)}:"]
        lines += format_table(("weight", "shape", "block", "density", "stored", "dtype", "bytes", "node"),
                              [layer.row() for layer in result.layers], {3, 4, 6})
    else:
        lines += ["", "no block-sparse nodes: every layer is dense"]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
