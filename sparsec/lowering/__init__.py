"""Lowering: from a pruned program to ONNX with sparsec's block-sparse ops.

`block_format` packs weights (padded blocked-ELL); `onnx_op` defines the `sparsec::BlockSparseLinear`
node and the standard-op ONNX function that stock onnxruntime inlines for it; `onnx_fusions` rewrites
the exported graph (attention on 3-D projections, epilogues folded into the sparse nodes).
"""
