"""ONNX → serialized engine, for TensorRT 10/11 and TensorRT-RTX (imports onnx, not torch).

Networks are strongly typed (TensorRT 11 and TensorRT-RTX have nothing else), so precision is
whatever the exported graph says. The batch axis gets one optimisation profile (min, opt, max).
With a plugin library loaded, each saint::SimilarityTopK node becomes our IPluginV3; without
one, the parser inlines the node's model-local function into standard layers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from .. import spec
from ..errors import BackendError, InputError
from ..gpu import compute_capability as this_gpu
from ..onnx_graph import saint_nodes
from .backend import Backend, creator_names, load_plugin, make_logger, unload_plugin


@dataclass(frozen=True)
class BuiltEngine:
    """What the builder knows about the engine it wrote (the pipeline adds plugin and parity)."""
    file: str
    compute_capability: str
    operator_backend: str  # "plugin" | "onnx-function" | "none" (no operator node: the degree rule)
    plugin_layers: int
    strongly_typed: bool
    build_seconds: float


def preflight(backend: Backend, onnx_path: Path, use_plugin: bool) -> int:
    """Every custom node must resolve: to our plugin when one is loaded, else to a local function.
    Returns the number of saint nodes."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    functions = {(f.domain, f.name) for f in model.functions}
    registry = backend.module.get_plugin_registry()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        version = attrs.get("plugin_version", spec.PLUGIN_VERSION.encode()).decode()
        namespace = attrs.get("plugin_namespace", node.domain.encode()).decode()
        resolves = any(c.name == node.op_type and c.plugin_version == version and c.plugin_namespace == namespace
                       for c in registry.all_creators)
        if use_plugin and not resolves:
            raise InputError(f"node {node.name} ({node.domain}::{node.op_type}, plugin_version {version}, "
                             f"plugin_namespace {namespace}) matches no registered plugin creator; "
                             f"registered: {creator_names(registry)}")
        if not resolves and (node.domain, node.op_type) not in functions:
            raise InputError(f"node {node.name} ({node.domain}::{node.op_type}) has neither a plugin nor a "
                             "local function for TensorRT to use; build with the plugin library")
    return len(saint_nodes(model))


def build_engine(backend: Backend, onnx_path: Path, plan_path: Path, batch: tuple[int, int, int],
                 plugin_library: Path | None, compute_capability: str | None,
                 timing_cache: Path | None) -> BuiltEngine:
    """Build `plan_path` from `onnx_path`."""
    trt = backend.module
    if plugin_library is not None:
        load_plugin(backend, plugin_library)
    else:
        unload_plugin(backend)
    saint_count = preflight(backend, onnx_path, plugin_library is not None)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    strongly_typed = bool(network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) \
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else False
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"{backend.name} could not parse {onnx_path.name}: {'; '.join(errors)[:500]}")
    plugin_layers = sum(1 for i in range(network.num_layers)
                        if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    if plugin_library is not None and plugin_layers != saint_count:
        raise BackendError(f"{saint_count} {spec.OP_TYPE} nodes but {plugin_layers} plugin layers after parsing")

    config = builder.create_builder_config()
    if backend.target == "trt-rtx":
        cc = compute_capability or this_gpu()
        if cc is None:
            raise InputError("TensorRT-RTX needs a compute capability to build without a GPU (e.g. 8.9)")
        enum = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""), None)
        if enum is None:
            supported = [m for m in dir(trt.ComputeCapability) if m.startswith("SM")]
            raise InputError(f"TensorRT-RTX {backend.version} cannot build for compute capability {cc}; "
                             f"it supports {', '.join(supported)}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(enum, 0)
    else:
        cc = this_gpu()
        if compute_capability and compute_capability != cc:
            raise InputError(f"TensorRT builds for the GPU it runs on ({cc}); a compute capability "
                             f"({compute_capability}) can only be chosen for TensorRT-RTX")
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        tail = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (batch[0], *tail), (batch[1], *tail), (batch[2], *tail))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None and backend.target == "trt":  # TensorRT-RTX has no timing cache (no-op)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise BackendError(f"{backend.name} failed to build the engine: {'; '.join(logger.errors)[:500]}")
    plan_path.write_bytes(memoryview(plan))
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    operator_backend = "plugin" if plugin_layers else "onnx-function" if saint_count else "none"
    return BuiltEngine(plan_path.name, cc, operator_backend, plugin_layers, strongly_typed, round(seconds, 2))
