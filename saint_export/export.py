"""ONNX export of a SAINT-patched model: torch.export (dynamo) → ONNX with the saint operator."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from . import ops
from .errors import SaintError

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23  # torch.onnx (dynamo) support
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# Protobuf cannot hold more than 2 GiB; above this the weights go to `<model>.onnx.data`.
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_onnx(model: torch.nn.Module, path: Path, image_shape: tuple[int, int, int],
                opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export `model` (eval mode) to `path` with a dynamic batch axis. Returns the files written."""
    state = getattr(model, "saint", None)
    if state is not None:
        state.schedule.require_static()
    check_opset(opset)
    model.eval()
    example = torch.randn(2, *image_shape)  # batch 2, so the batch axis is not specialised to 1
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            custom_translation_table=ops.CUSTOM_TRANSLATION_TABLE)
    function = ir.serde.deserialize_function(ops.function_proto(opset))
    program.model.functions[function.identifier()] = function
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SaintError(f"--opset {opset} is not supported: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")


def saint_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The SimilarityTopK nodes of the main graph, in execution (= block) order."""
    return [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.OP_TYPE]


def write_forced_model(path: Path, forced_path: Path) -> list[tuple[str, str, str]]:
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
    onnx.save(model, str(forced_path))
    return names
