"""The manifest checked against the graph it describes.

The manifest's checksums cover every other file of a folder but not manifest.json itself, so a
manifest edited by hand (a block's `dropped` raised, a shape or τ changed) would pass them. The
ONNX file is covered, and it holds the truth: its inputs and outputs, the attributes of every
`saint::SimilarityTopK` node, and the schedule and SAINT settings the exporter wrote into its
metadata (`record_in_graph`). `check_graph` compares them with the manifest and names the first
field that disagrees. No torch: onnx reads the graph without its external weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import spec
from ..errors import InputError

SCHEDULE_KEY, SAINT_KEY = "saint_export.keep_schedule", "saint_export.saint"  # ONNX metadata_props keys
_MISSING = "(absent)"


def record_in_graph(metadata_props: dict, keep_schedule: dict, saint: dict) -> None:
    """What the exporter writes into the graph's metadata, for `check_graph` to compare."""
    metadata_props[SCHEDULE_KEY] = json.dumps(keep_schedule, sort_keys=True)
    metadata_props[SAINT_KEY] = json.dumps(saint, sort_keys=True)


def check_graph(folder: Path, manifest) -> None:
    """Raise InputError naming the first manifest field that disagrees with the folder's ONNX graph."""
    import onnx

    path = Path(folder) / manifest.onnx["file"]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: no graph to compare with; the backend that
        return         # loads it next refuses the file in its own words (a BackendError)
    graph = _graph_facts(model)
    claimed = _manifest_facts(manifest, has_metadata="keep_schedule" in graph)
    difference = _first_difference(claimed, graph)
    if difference:
        field, said, found = difference
        raise InputError(f"{folder}: manifest.json disagrees with {path.name} on {field} (manifest: {said}, "
                         f"graph: {found}); the manifest was edited or belongs to another export")


def _manifest_facts(manifest, has_metadata: bool) -> dict:
    schedule, saint = manifest.keep_schedule, manifest.saint
    drops = [block["dropped"] for block in schedule.get("blocks") or [] if block["dropped"]]
    facts = {
        "input": _tensor(manifest.input.name, manifest.input.shape, manifest.input.dtype),
        "output": _tensor(manifest.output.name, manifest.output.shape, manifest.output.dtype),
        # Outputs beside the main one (Qwen's image_positions), as the manifest's features record them
        "extra_outputs": [_tensor(t["name"], t["shape"], t["dtype"])
                          for t in (manifest.features or {}).get("extra_outputs", [])],
    }
    if has_metadata:  # folders exported before the graph carried its record are checked on the rest
        facts |= {"keep_schedule": schedule, "saint": saint}
    facts |= {
        # The degree rule exports as TopK, the vote rule as one SimilarityTopK node per pruning block.
        "operator_nodes": [] if schedule.get("rule") == "degree" else [
            {"op_type": spec.OP_TYPE, "drop": drop, "num_protected": schedule["num_protected"],
             "tau": _f32(saint["tau"]), "vote_k": saint["K"], "gamma": _f32(saint["gamma"]),
             "plugin_version": manifest.onnx["operator"]["plugin_version"]} for drop in drops],
    }
    return facts


def _graph_facts(model) -> dict:
    import onnx

    def tensor(value):
        kind = value.type.tensor_type
        shape = [d.dim_param or None if not d.HasField("dim_value") else d.dim_value for d in kind.shape.dim]
        return _tensor(value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name)

    def attributes(node):
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        found = {"op_type": node.op_type}
        for attribute in spec.ATTRIBUTES:
            value = values.get(attribute.name, _MISSING)
            found[attribute.name] = _f32(value) if attribute.type == "float" and value != _MISSING else value
        version = values.get("plugin_version", _MISSING)
        found["plugin_version"] = version.decode() if isinstance(version, bytes) else version
        return found

    inputs = [v for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    facts = {"input": tensor(inputs[0]) if len(inputs) == 1 else [v.name for v in inputs],
             "output": tensor(model.graph.output[0]),
             "extra_outputs": [tensor(v) for v in model.graph.output[1:]],
             "operator_nodes": [attributes(n) for n in model.graph.node if n.domain == spec.DOMAIN]}
    names = {SCHEDULE_KEY: "keep_schedule", SAINT_KEY: "saint"}
    for prop in model.metadata_props:
        if prop.key in names:
            facts[names[prop.key]] = json.loads(prop.value)
    return facts


def _tensor(name, shape, dtype) -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def _f32(value) -> float:
    """A float as the graph stores it (ONNX FLOAT attributes are float32)."""
    import numpy as np

    return float(np.float32(value))


def _first_difference(claimed, found, path: str = ""):
    """(dotted path, claimed value, found value) of the first difference, or None."""
    if isinstance(claimed, dict) and isinstance(found, dict):
        for key in [*claimed, *(k for k in found if k not in claimed)]:
            difference = _first_difference(claimed.get(key, _MISSING), found.get(key, _MISSING),
                                           f"{path}.{key}" if path else str(key))
            if difference:
                return difference
        return None
    if isinstance(claimed, list) and isinstance(found, list):
        if len(claimed) != len(found):
            return f"{path} (count)", len(claimed), len(found)
        for index, (a, b) in enumerate(zip(claimed, found)):
            difference = _first_difference(a, b, f"{path}[{index}]")
            if difference:
                return difference
        return None
    return None if claimed == found else (path, claimed, found)
