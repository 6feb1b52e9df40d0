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
from .adapters import find_adapter, output_names
from .config import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from .errors import InputError
from .runtime.graph import record_in_graph

# Protobuf cannot hold more than 2 GiB; above this the weights go to `<model>.onnx.data`.
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_onnx(model: torch.nn.Module, path: Path, image_shape: tuple[int, int, int],
                opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export `model` (eval mode) to `path` with a dynamic batch axis. Returns the files written."""
    state = getattr(model, "saint", None)
    if state is not None:
        state.schedule.require_static()
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset {opset} is not supported: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")
    adapter = find_adapter(model)
    model.eval()
    example = torch.randn(2, *image_shape)  # batch 2, so the batch axis is not specialised to 1
    # The dynamo exporter prints its progress and warns about every decomposition it makes.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[adapter.INPUT_NAME], output_names=list(output_names(adapter, model)),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            custom_translation_table=ops.CUSTOM_TRANSLATION_TABLE)
    function = ir.serde.deserialize_function(ops.function_proto(opset))
    program.model.functions[function.identifier()] = function
    if state is not None:  # the manifest is checked against this record (runtime.graph)
        record_in_graph(program.model.metadata_props, state.schedule.as_dict(),
                        {"tau": state.tau, "K": state.vote_k, "gamma": state.gamma})
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]
