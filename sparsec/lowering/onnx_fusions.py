"""Rewrites of the exported ONNX graph that keep its outputs exact and save onnxruntime work.

torch.onnx writes the PyTorch program op for op; three patterns around sparsec's layers cost
time that the same arithmetic does not need:

- `attention_head_layout`: `scaled_dot_product_attention` becomes ONNX `Attention` (opset 23) on
  [batch, heads, seq, head] inputs made by Reshape + Transpose of each projection, and its output is
  transposed back. Attention also takes [batch, seq, heads * head] inputs (with `q_num_heads` and
  `kv_num_heads`) and then returns [batch, seq, heads * head]: the four Transposes per layer go.
- `fuse_epilogues`: `Gelu(BlockSparseLinear(x))`, `BlockSparseLinear(x) + residual` and then a
  LayerNormalization of that sum become one BlockSparseLinear with `activation`, a `residual`
  input and `ln_scale` / `ln_bias` / `epsilon`: the kernel applies the first two where it stores
  each output tile (no extra pass over the activations) and normalises each row once it is
  complete; the function body does the same in standard ops.
- `drop_softmax_nan_guards` (older opsets, where attention is decomposed): see its docstring.

Each returns how many places it rewrote. Only nodes orphaned by a rewrite are removed.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    """Producers, consumers and constant values of a graph's tensors (refresh after edits)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inits = {init.name: init for init in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.shapes = {v.name: v.type.tensor_type.shape for v in [*graph.value_info, *graph.input, *graph.output]
                       if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def static_shape(self, name: str) -> list[int | str] | None:
        """Dims of `name` from the graph's value_info: ints, or dim_param names; None when unknown."""
        shape = self.shapes.get(name)
        if shape is None:
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def producer_of(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _remove_orphans(graph: onnx.GraphProto, candidates: Iterable[onnx.NodeProto]) -> None:
    """Remove candidate nodes none of whose outputs is read any more (repeatedly: chains go too)."""
    pending = list(candidates)
    while pending:
        index = GraphIndex(graph)
        dead = [n for n in pending
                if not any(index.consumers.get(o) or o in index.outputs for o in n.output if o)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
            pending.remove(node)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {name for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
             for sub in a.g.node for name in sub.input}
    for init in [i for i in graph.initializer if i.name not in used and i.name not in {o.name for o in graph.output}]:
        graph.initializer.remove(init)


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _shape_entries(index: GraphIndex, name: str) -> list[int | str | None] | None:
    """The entries of a 1-D shape tensor, as far as the graph says them statically: ints for
    constants, dim_param names for dims read with Shape from tensors of known shape, None for
    unknown entries; None when even the length is unknown."""
    value = index.constant(name)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)] if value.ndim <= 1 else None
    node = index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Shape":
        dims = index.static_shape(node.input[0])
        if dims is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", len(dims))
        return [d if d not in (0, "?", "") else None for d in dims[slice(start, end)]]
    if node.op_type == "Concat" and _attr(node, "axis", 0) == 0:
        parts = [_shape_entries(index, i) for i in node.input]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    return None


def _heads_input(index: GraphIndex, name: str) -> dict | None:
    """When `name` = Transpose(Reshape(a, [d0, d1, H, D]), perm [0, 2, 1, 3]) with D (and H, or a
    known width of `a` that D divides) static: {"reshape", "transpose", "heads", "width",
    "identity"}, width = H * D. `identity`: a is already [d0, d1, H * D] (its known dims are d0
    and d1), so the 3-D Attention can read it as it is."""
    transpose = index.producer_of(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = index.producer_of(transpose.input[0], "Reshape")
    if reshape is None:
        return None
    entries = _shape_entries(index, reshape.input[1])
    if entries is None or len(entries) != 4 or not isinstance(entries[3], int) or entries[3] <= 0:
        return None
    source_dims = index.static_shape(reshape.input[0])
    allowzero = _attr(reshape, "allowzero", 0)
    width = source_dims[2] if source_dims is not None and len(source_dims) == 3 else None
    identity = False
    if isinstance(width, int) and width > 0:
        lead = entries[:2]
        matched = [e is not None and (e == d or (e == 0 and not allowzero)) for e, d in zip(lead, source_dims)]
        identity = all(matched) or (sum(matched) == 1 and lead.count(-1) == 1 and isinstance(entries[2], int)
                                    and entries[2] > 0 and entries[2] * entries[3] == width)
    heads = entries[2]
    if heads == -1 and identity and width % entries[3] == 0:
        heads = width // entries[3]
    if not isinstance(heads, int) or heads <= 0 or (identity and heads * entries[3] != width):
        return None
    return {"reshape": reshape, "transpose": transpose, "heads": heads, "width": heads * entries[3],
            "identity": identity}


def _three_d(graph: onnx.GraphProto, found: dict, added: list[onnx.NodeProto],
             inits: list[onnx.TensorProto]) -> str:
    """The projection `a` as [d0, d1, H * D]: `a` itself when it already is, else Reshape(a,
    [d0, d1, H * D]) with the 4-D target's own leading entries (the same rows the 4-D Reshape made)."""
    reshape = found["reshape"]
    source = reshape.input[0]
    if found["identity"]:
        return source
    names = {key: _unique(graph, f"{source}_heads3d_{key}") for key in ("start", "end", "width", "lead", "shape")}
    inits += [numpy_helper.from_array(np.array([0], np.int64), names["start"]),
              numpy_helper.from_array(np.array([2], np.int64), names["end"]),
              numpy_helper.from_array(np.array([found["width"]], np.int64), names["width"])]
    out = _unique(graph, f"{source}_heads3d")
    added += [helper.make_node("Slice", [reshape.input[1], names["start"], names["end"]], [names["lead"]]),
              helper.make_node("Concat", [names["lead"], names["width"]], [names["shape"]], axis=0),
              helper.make_node("Reshape", [source, names["shape"]], [out],
                               allowzero=_attr(reshape, "allowzero", 0))]
    return out


def _attention_output_dims(index: GraphIndex, qkv: list[dict]) -> list | None:
    """Static dims of the 3-D Attention output [d0, d1, Hq * Dv] when Q was used as it is."""
    q, _, v = qkv
    dims = index.static_shape(q["reshape"].input[0])
    if not q["identity"] or dims is None or v["width"] % v["heads"]:
        return None
    return [dims[0], dims[1], q["heads"] * (v["width"] // v["heads"])]


def _reshape_is_identity(index: GraphIndex, reshape: onnx.NodeProto, target: list, dims: list | None) -> bool:
    """Whether Reshape(x, target) returns x unchanged, x having the static `dims`."""
    if dims is None or len(target) != len(dims) or reshape.output[0] in index.outputs:
        return False
    allowzero = _attr(reshape, "allowzero", 0)
    known = [isinstance(d, int) and d > 0 or (isinstance(d, str) and d not in ("", "?")) for d in dims]
    matched = [k and (e == d or (e == 0 and not allowzero)) for e, d, k in zip(target, dims, known)]
    unmatched = [e for e, m in zip(target, matched) if not m]
    return all(known) and (not unmatched or unmatched == [-1])


def _bypass(graph: onnx.GraphProto, index: GraphIndex, node: onnx.NodeProto) -> None:
    """Replace every read of node's output by its input, and remove the node."""
    for reader in index.consumers.get(node.output[0], []):
        for i, name in enumerate(reader.input):
            if name == node.output[0]:
                reader.input[i] = node.input[0]
    graph.node.remove(node)


def attention_head_layout(model: onnx.ModelProto) -> int:
    """Feed each ONNX Attention its projections as [batch, seq, heads * head] (see module doc)."""
    graph = model.graph
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        index = GraphIndex(graph)
        extra_inputs = [i for i in node.input[4:] if i]
        extra_outputs = [o for o in node.output[1:] if o and (index.consumers.get(o) or o in index.outputs)]
        qkv = [_heads_input(index, name) for name in node.input[:3]]
        out_transpose = index.only_consumer(node.output[0])
        if (extra_inputs or extra_outputs or any(p is None for p in qkv) or out_transpose is None
                or out_transpose.op_type != "Transpose" or list(_attr(out_transpose, "perm", [])) != [0, 2, 1, 3]):
            continue
        q, k, v = qkv
        if k["heads"] != v["heads"]:
            continue
        added: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        inputs = [_three_d(graph, found, added, inits) for found in qkv]
        y3 = _unique(graph, f"{node.output[0]}_3d")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.name not in ("q_num_heads", "kv_num_heads")}
        fused = helper.make_node("Attention", [*inputs, *node.input[3:4]], [y3], name=node.name,
                                 q_num_heads=q["heads"], kv_num_heads=k["heads"], **attrs)
        # The old output transposed is [d0, seq, H, Dv]; the 3-D output holds the same values as
        # [d0, seq, H * Dv]. A Reshape reading it gets the 3-D tensor; anything else a 4-D view.
        heads_out = q["heads"]
        readers = index.consumers.get(out_transpose.output[0], [])
        for reader in readers:
            target = _shape_entries(index, reader.input[1]) if reader.op_type == "Reshape" else None
            # A 0 entry copies the input's dim at that position: the same dim for positions 0 and 1 only.
            same = target is not None and (_attr(reader, "allowzero", 0) or all(e is not None and e != 0 for e in target[2:]))
            if same and reader.input[0] == out_transpose.output[0]:
                reader.input[0] = y3
                if _reshape_is_identity(index, reader, target, _attention_output_dims(index, qkv)):
                    _bypass(graph, index, reader)
        if any(r.input[0] == out_transpose.output[0] for r in readers) or out_transpose.output[0] in index.outputs:
            shape_name = _unique(graph, f"{y3}_4d_shape")
            inits.append(numpy_helper.from_array(np.array([0, 0, heads_out, -1], np.int64), shape_name))
            after = helper.make_node("Reshape", [y3, shape_name], [out_transpose.output[0]])
            graph.node.insert(list(graph.node).index(out_transpose), after)
            graph.node.remove(out_transpose)
        position = list(graph.node).index(node)
        for offset, new in enumerate([*added, fused]):
            graph.node.insert(position + offset, new)
        graph.initializer.extend(inits)
        graph.node.remove(node)
        orphans = [out_transpose] if out_transpose in graph.node else []
        orphans += [found[key] for found in qkv for key in ("transpose", "reshape")]
        _remove_orphans(graph, orphans)
        rewritten += 1
    _drop_unused_initializers(graph)
    return rewritten


def drop_softmax_nan_guards(model: onnx.ModelProto) -> int:
    """Remove the NaN guard that torch.onnx puts after the softmax of scaled_dot_product_attention
    when it decomposes it (opsets before 23), `Where(IsNaN(P), 0, P)` with `P = Softmax(scores +
    bias)`, where the mask bias is `Where(mask, a, b)` with finite constants a and b (transformers'
    masks use finfo.min, not -inf), or there is no bias. Returns how many guards were removed.

    Exactness: softmax yields NaN only for a row holding a NaN or +inf, or whose entries are all
    -inf. With a finite bias, that needs a non-finite attention score (|score| >= ~1e31, or NaN in
    the activations), which finite inputs and weights do not produce; for every other input the guard
    is the identity, so the output is bit-for-bit unchanged. Removing it saves two full passes over
    every [batch, heads, seq, seq] probability tensor (about 1.5 ms of 15 ms in BERT-base on 2 cores).
    A bias with -inf (a boolean mask that can mask a whole row) keeps its guard."""
    graph = model.graph
    index = GraphIndex(graph)

    def finite_bias(name: str) -> bool:
        node = index.producer.get(name)
        if node is None or node.op_type != "Where":
            return False
        values = [index.constant(i) for i in node.input[1:]]
        return all(v is not None and v.dtype.kind == "f" and bool(np.isfinite(v).all()) for v in values)

    def guarded_softmax_is_finite(softmax) -> bool:
        if softmax is None or softmax.op_type != "Softmax":
            return False
        scores = index.producer.get(softmax.input[0])
        if scores is None:
            return False
        if scores.op_type in ("MatMul", "FusedMatMul"):
            return True  # no mask
        return scores.op_type == "Add" and any(finite_bias(i) for i in scores.input)

    removed = []
    for where in graph.node:
        if where.op_type != "Where" or where.output[0] in index.outputs:
            continue
        isnan = index.producer.get(where.input[0])
        zero = index.constant(where.input[1])
        prob = where.input[2]
        if (isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != prob or zero is None
                or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0
                or not guarded_softmax_is_finite(index.producer.get(prob))):
            continue
        for node in index.consumers.get(where.output[0], []):
            for i, name in enumerate(node.input):
                if name == where.output[0]:
                    node.input[i] = prob
        removed.append(where)
        if all(c is where for c in index.consumers.get(isnan.output[0], [])):
            removed.append(isnan)
    for node in removed:
        graph.node.remove(node)
    return sum(node.op_type == "Where" for node in removed)


def _same_shape(index: GraphIndex, a: str, b: str) -> bool:
    """Whether a and b have the same shape by the graph's value_info: every dim the same number or
    the same named symbol (an unknown dim, or an unknown shape, is not provably the same)."""
    sa, sb = index.static_shape(a), index.static_shape(b)
    return (sa is not None and sb is not None and len(sa) == len(sb)
            and all(x == y and x not in (0, "?", "") for x, y in zip(sa, sb)))


def _move_to(graph: onnx.GraphProto, node: onnx.NodeProto, replaced: onnx.NodeProto) -> onnx.NodeProto:
    """Put `node` where `replaced` is (later in topological order), drop `replaced`, and return the
    node as it now is in the graph (protobuf inserts a copy)."""
    graph.node.remove(node)
    position = list(graph.node).index(replaced)
    graph.node.insert(position, node)
    graph.node.remove(replaced)
    return graph.node[position]


def fuse_epilogues(model: onnx.ModelProto) -> int:
    """Fold `Gelu` after a BlockSparseLinear into its `activation`, then a same-shape `Add` of the
    result and another tensor into its `residual` input, then a LayerNormalization of that (see
    module doc). A node's output must have no other reader. The fused node takes the place of the
    Gelu / Add / LayerNormalization it absorbs, where every input it reads is available."""
    from sparsec.lowering.onnx_op import ACTIVATIONS, INPUTS, Variant
    from sparsec.lowering.translate import sparse_nodes

    graph = model.graph
    fused = 0
    by_approximate = {approx: name for name, approx in ACTIVATIONS.items()}
    for node in sparse_nodes(model):
        variant = Variant.of(node)
        index = GraphIndex(graph)
        reader = index.only_consumer(node.output[0])
        if (not variant.activation and not variant.residual and reader is not None
                and reader.op_type == "Gelu" and reader.domain in ("", "ai.onnx")):
            approximate = _attr(reader, "approximate", b"none")
            approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
            if approximate in by_approximate:
                node.attribute.append(helper.make_attribute("activation", by_approximate[approximate]))
                node.output[0] = reader.output[0]
                node = _move_to(graph, node, reader)
                variant = Variant.of(node)
                fused += 1
                index = GraphIndex(graph)
                reader = index.only_consumer(node.output[0])
        if (variant.residual or reader is None or reader.op_type != "Add" or reader.domain not in ("", "ai.onnx")
                or len(reader.input) != 2 or reader.input[0] == reader.input[1]):
            continue
        residual = reader.input[1] if reader.input[0] == node.output[0] else reader.input[0]
        if not (_same_shape(index, residual, node.output[0]) and _same_shape(index, residual, reader.output[0])):
            continue
        _set_input(node, INPUTS.index("residual"), residual)
        node.output[0] = reader.output[0]
        node = _move_to(graph, node, reader)
        fused += 1
        index = GraphIndex(graph)
        fused += _fuse_layer_norm(graph, index, node, index.only_consumer(node.output[0]))
    return fused


def _set_input(node: onnx.NodeProto, position: int, name: str) -> None:
    while len(node.input) <= position:
        node.input.append("")
    node.input[position] = name


def _fuse_layer_norm(graph: onnx.GraphProto, index: GraphIndex, node: onnx.NodeProto,
                     reader: onnx.NodeProto | None) -> int:
    """Fold LayerNormalization over the last axis of the node's output (scale and bias of shape
    [N], float32 statistics, only its normalised output read) into the node. Returns 1 or 0."""
    from sparsec.lowering.onnx_op import INPUTS

    n = _attr(node, "N")
    if (reader is None or reader.op_type != "LayerNormalization" or reader.domain not in ("", "ai.onnx")
            or len(reader.input) != 3 or not all(reader.input)
            or any(o and (index.consumers.get(o) or o in index.outputs) for o in reader.output[1:])
            or _attr(reader, "stash_type", 1) != 1):
        return 0
    dims = index.static_shape(node.output[0])
    axis = _attr(reader, "axis", -1)
    if dims is None or axis not in (-1, len(dims) - 1):
        return 0
    for name in reader.input[1:]:
        shape = index.static_shape(name)
        if shape is None and name in index.inits:
            shape = list(index.inits[name].dims)
        if shape != [n]:
            return 0
    _set_input(node, INPUTS.index("ln_scale"), reader.input[1])
    _set_input(node, INPUTS.index("ln_bias"), reader.input[2])
    node.attribute.append(helper.make_attribute("epsilon", float(_attr(reader, "epsilon", 1e-5))))
    node.output[0] = reader.output[0]
    _move_to(graph, node, reader)
    return 1
