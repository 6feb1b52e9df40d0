"""ONNX → serialized engine, for TensorRT 10/11 and TensorRT-RTX through one thin adapter.

Networks are strongly typed (TensorRT 11 and TensorRT-RTX have nothing else), so precision is
whatever the exported graph says. The batch axis gets one optimisation profile (min, opt, max).
With a plugin library loaded, each saint::SimilarityTopK node becomes our IPluginV3; without
one, the parser inlines the node's model-local function into standard layers.
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import onnx

from ..errors import SaintError
from ..export import saint_nodes

TARGETS = {"trt": ("tensorrt",), "trt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
BACKEND_NAMES = {"trt": "tensorrt", "trt-rtx": "tensorrt-rtx"}


@dataclass
class Backend:
    target: str  # "trt" | "trt-rtx"
    module: ModuleType

    @property
    def name(self) -> str:
        return BACKEND_NAMES[self.target]

    @property
    def version(self) -> str:
        return self.module.__version__


def load_backend(target: str) -> Backend:
    """Import TensorRT or TensorRT-RTX, or fail in one line saying what is missing."""
    problems = []
    for module_name in TARGETS[target]:
        try:
            return Backend(target, importlib.import_module(module_name))
        except (ImportError, OSError) as err:  # OSError: bindings present, libraries missing
            problems.append(f"{module_name}: {str(err).splitlines()[0]}")
    hint = ("install TensorRT 10/11 with its libraries (pip install tensorrt, or NVIDIA's SDK)" if target == "trt"
            else "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    raise SaintError(f"--target {target} needs {BACKEND_NAMES[target]}, which cannot be imported here "
                     f"({'; '.join(problems)}); {hint}, or use --target onnx")


def cuda_compute_capability() -> str | None:
    """The first GPU's compute capability ("9.0"), or None without a usable GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # a broken CUDA install is the same as none here
        pass
    return None


def available_target() -> tuple[str, list[str]]:
    """The furthest target this machine can build, and what was skipped and why."""
    skipped = []
    try:
        load_backend("trt")
        if cuda_compute_capability():
            return "trt", skipped
        skipped.append("trt: TensorRT is installed but its builder needs a CUDA GPU, and there is none")
    except SaintError:
        skipped.append("trt: TensorRT is not installed")
    try:
        load_backend("trt-rtx")
        return "trt-rtx", skipped
    except SaintError:
        skipped.append("trt-rtx: TensorRT-RTX is not installed")
    return "onnx", skipped


def _make_logger(trt: ModuleType):
    """A TensorRT logger that keeps the errors, so that a failure can be reported in one line."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)

    return Logger()


def ensure_rtx_parser_can_load_plugins() -> None:
    """TensorRT-RTX's ONNX parser dlopens "libtensorrt_rtx.so" when it imports a plugin node, but
    the wheel ships only libtensorrt_rtx.so.1; the failed dlopen ends in std::terminate. Adding
    the missing development symlink next to the library fixes it."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    libs = Path(spec.origin).parent if spec and spec.origin else None
    if libs is None or (libs / "libtensorrt_rtx.so").exists() or not (libs / "libtensorrt_rtx.so.1").exists():
        return
    try:
        (libs / "libtensorrt_rtx.so").symlink_to("libtensorrt_rtx.so.1")
    except OSError as err:
        raise SaintError(f"TensorRT-RTX cannot load plugins until {libs}/libtensorrt_rtx.so exists ({err}); "
                         f"run: ln -s libtensorrt_rtx.so.1 {libs}/libtensorrt_rtx.so") from None


def load_plugin(backend: Backend, library: Path) -> None:
    """Register the plugin library's creators (idempotent) and check ours is among them."""
    trt = backend.module
    if backend.target == "trt-rtx":
        ensure_rtx_parser_can_load_plugins()
    registry = trt.get_plugin_registry()
    if _find_creator(registry) is None:
        handle = registry.load_library(str(library))
        if handle is None:
            raise SaintError(f"{backend.name} could not load the plugin library {library}")
        _loaded_libraries[backend.target] = handle
    if _find_creator(registry) is None:
        raise SaintError(f"{library} does not register SimilarityTopK version 1 in namespace saint; registered: "
                         f"{_creator_names(registry)}")


def unload_plugin(backend: Backend) -> None:
    """The plugin registry lives as long as the process: a library loaded for an earlier build
    would otherwise shadow the ONNX function that a plugin-free build asks for."""
    registry = backend.module.get_plugin_registry()
    handle = _loaded_libraries.pop(backend.target, None)
    if handle is not None:
        registry.deregister_library(handle)
    if _find_creator(registry) is not None:
        raise SaintError("a SimilarityTopK plugin was registered in this process outside saint-export, so "
                         "TensorRT would use it: build without --plugin-lib none, or in a fresh process")


_loaded_libraries: dict = {}  # target → handle from IPluginRegistry.load_library


def _find_creator(registry):
    return next((c for c in registry.all_creators if c.name == "SimilarityTopK" and c.plugin_version == "1"
                 and c.plugin_namespace == "saint"), None)


def _creator_names(registry) -> str:
    names = sorted(f"{c.plugin_namespace}::{c.name} v{c.plugin_version}" for c in registry.all_creators)
    return ", ".join(names) or "none"


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
        version = attrs.get("plugin_version", b"1").decode()
        namespace = attrs.get("plugin_namespace", node.domain.encode()).decode()
        resolves = any(c.name == node.op_type and c.plugin_version == version and c.plugin_namespace == namespace
                       for c in registry.all_creators)
        if use_plugin and not resolves:
            raise SaintError(f"node {node.name} ({node.domain}::{node.op_type}, plugin_version {version}, "
                             f"plugin_namespace {namespace}) matches no registered plugin creator; "
                             f"registered: {_creator_names(registry)}")
        if not resolves and (node.domain, node.op_type) not in functions:
            raise SaintError(f"node {node.name} ({node.domain}::{node.op_type}) has neither a plugin nor a "
                             "local function for TensorRT to use; pass --plugin-lib")
    return len(saint_nodes(model))


def parse_compute_capability(text: str) -> str:
    """"89", "8.9" or "sm89" → "8.9"."""
    digits = text.lower().removeprefix("sm").replace(".", "").replace("_", "")
    if not digits.isdigit() or len(digits) not in (2, 3):
        raise SaintError(f"--compute-capability {text!r}: expected e.g. 89, 8.9 or sm89")
    return f"{digits[:-1]}.{digits[-1]}"


def build_engine(backend: Backend, onnx_path: Path, plan_path: Path, batch: tuple[int, int, int],
                 plugin_library: Path | None, compute_capability: str | None, timing_cache: Path | None) -> dict:
    """Build `plan_path` from `onnx_path`. Returns what the manifest records about the engine."""
    trt = backend.module
    if plugin_library is not None:
        load_plugin(backend, plugin_library)
    else:
        unload_plugin(backend)
    saint_count = preflight(backend, onnx_path, plugin_library is not None)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SaintError(f"{backend.name} could not parse {onnx_path.name}: {'; '.join(errors)[:500]}")
    plugin_layers = sum(1 for i in range(network.num_layers)
                        if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    if plugin_library is not None and plugin_layers != saint_count:
        raise SaintError(f"{saint_count} SimilarityTopK nodes but {plugin_layers} plugin layers after parsing")

    config = builder.create_builder_config()
    if backend.target == "trt-rtx":
        cc = compute_capability or cuda_compute_capability()
        if cc is None:
            raise SaintError("TensorRT-RTX needs a compute capability to build without a GPU: "
                             "pass --compute-capability (e.g. 89)")
        enum = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""), None)
        if enum is None:
            supported = [m for m in dir(trt.ComputeCapability) if m.startswith("SM")]
            raise SaintError(f"TensorRT-RTX {backend.version} cannot build for compute capability {cc}; "
                             f"it supports {', '.join(supported)}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(enum, 0)
    else:
        cc = cuda_compute_capability()
        if compute_capability and compute_capability != cc:
            raise SaintError(f"TensorRT builds for the GPU it runs on ({cc}); --compute-capability "
                             f"{compute_capability} is for --target trt-rtx")
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
        raise SaintError(f"{backend.name} failed to build the engine: {'; '.join(logger.errors)[:500]}")
    plan_path.write_bytes(memoryview(plan))
    if cache is not None:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {"file": plan_path.name, "backend": backend.name, "version": backend.version,
            "compute_capability": cc, "selection": "plugin" if plugin_layers else "onnx-function",
            "plugin_layers": plugin_layers, "strongly_typed": True,
            "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "build_seconds": round(seconds, 2)}
