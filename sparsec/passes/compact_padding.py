"""compact_padding: store each sparse node's `values` without its padding slots (every lowering
target's nodes: BlockSparseLinear and BlockSparseConv hold them alike, input 1, row_nnz input 3).

before: `values` [R, S, BR, BC] initializer, rows keeping fewer than S blocks padded with zero blocks
after:  `values = Gather(values.kept, values.slots, axis=0)` with the kept blocks [kept + 1, BR, BC]
        (the last one zero) and a slot index [R, S] as initializers (onnx_op.compact_arrays)
onnxruntime folds the Gather of constants when the session loads, so the kernel and the function
body still see constant values; the file stores only kept blocks. Balanced rows (every row keeps
S blocks) have no padding and are left as they are.
requires: functions_attached.  ensures: padding_compacted.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from sparsec.lowering import onnx_op, targets
from sparsec.pipeline import OnnxPass, PassResult


@dataclass(frozen=True)
class CompactPadding(OnnxPass):
    name = "compact_padding"
    requires = ("functions_attached",)
    ensures = ("padding_compacted",)

    def run(self, model: ir.Model) -> PassResult:
        graph = model.graph
        compacted = 0
        first = next(iter(graph), None)
        for node in (n for target in targets.all_targets() for n in target.onnx_nodes(model)):
            values, row_nnz = node.inputs[1], node.inputs[3]
            if (values is None or row_nnz is None or not values.is_initializer()
                    or not row_nnz.is_initializer() or values.const_value is None or row_nnz.const_value is None):
                continue
            padded, counts = values.const_value.numpy(), row_nnz.const_value.numpy()
            if bool((counts == padded.shape[1]).all()):
                continue  # balanced rows: no padding to drop
            kept, slots = onnx_op.compact_arrays(padded, counts)
            name = values.name
            kept_value = ir.Value(name=f"{name}.kept", const_value=ir.tensor(kept, name=f"{name}.kept"))
            slots_value = ir.Value(name=f"{name}.slots", const_value=ir.tensor(slots, name=f"{name}.slots"))
            for init in (kept_value, slots_value):
                init.shape, init.dtype = init.const_value.shape, init.const_value.dtype  # type: ignore[union-attr]
                graph.register_initializer(init)
            gather = ir.Node("", "Gather", [kept_value, slots_value], [ir.AttrInt64("axis", 0)],
                             name=f"{name}.expand", num_outputs=1)
            expanded = gather.outputs[0]
            expanded.type, expanded.shape = values.type, values.shape
            for user, index in list(values.uses()):
                user.replace_input_with(index, expanded)
            graph.initializers.pop(name)
            expanded.name = name
            if first is not None:
                graph.insert_before(first, gather)  # it reads initializers only: it goes first
            else:
                graph.append(gather)
            compacted += 1
        return PassResult(model, modified=compacted > 0)
