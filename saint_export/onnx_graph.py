"""Queries and rewrites of exported ONNX graphs (onnx only: no torch, no onnxscript)."""
from __future__ import annotations

from pathlib import Path

import onnx

from . import spec


def saint_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The SimilarityTopK nodes of the main graph, in execution (= block) order."""
    return [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]


def write_audit_model(path: Path, audit_path: Path) -> list[tuple[str, str, str]]:
    """A teacher-forced copy of `path` (same weights file) for the parity gate: every
    SimilarityTopK node's keep_index becomes a graph input that downstream nodes read, while the
    node's own selection and vote_rows are exposed as outputs. Fed eager's kept tokens, the graph
    then runs every block on the same tokens as eager, so each block's selection and the logits
    can be compared without one block's float noise cascading into the next.

    Returns (forced input, own keep_index output, vote_rows output) per pruning block, in order.
    """
    model = onnx.load(str(path), load_external_data=False)
    names = []
    for node in saint_nodes(model):
        forced, vote_rows = node.output
        own = f"{forced}__own"
        node.output[0] = own
        model.graph.input.append(onnx.helper.make_tensor_value_info(forced, onnx.TensorProto.INT64, None))
        model.graph.output.extend([onnx.helper.make_tensor_value_info(own, onnx.TensorProto.INT64, None),
                                   onnx.helper.make_tensor_value_info(vote_rows, onnx.TensorProto.INT64, None)])
        names.append((forced, own, vote_rows))
    onnx.save(model, str(audit_path))
    return names
