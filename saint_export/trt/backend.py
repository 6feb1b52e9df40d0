"""TensorRT 10/11 and TensorRT-RTX behind one thin adapter: import, logger, plugin registry.

No torch and no onnx, so the runtime can use it in a serving process.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .. import spec
from ..errors import BackendError, InputError
from ..gpu import compute_capability

MODULES = {"trt": ("tensorrt",), "trt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}  # target → importable
BACKEND_NAMES = {"trt": "tensorrt", "trt-rtx": "tensorrt-rtx"}  # target → name in manifests
TARGET_OF = {name: target for target, name in BACKEND_NAMES.items()}


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
    for module_name in MODULES[target]:
        try:
            return Backend(target, importlib.import_module(module_name))
        except (ImportError, OSError) as err:  # OSError: bindings present, libraries missing
            problems.append(f"{module_name}: {str(err).splitlines()[0]}")
    hint = ("install TensorRT 10/11 with its libraries (pip install tensorrt, or NVIDIA's SDK)" if target == "trt"
            else "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    raise InputError(f"target {target!r} needs {BACKEND_NAMES[target]}, which cannot be imported here "
                     f"({'; '.join(problems)}); {hint}, or export ONNX only")


def available_target() -> tuple[str, list[str]]:
    """The furthest target this machine can build, and what was skipped and why."""
    skipped = []
    try:
        load_backend("trt")
        if compute_capability():
            return "trt", skipped
        skipped.append("trt: TensorRT is installed but its builder needs a CUDA GPU, and there is none")
    except InputError:
        skipped.append("trt: TensorRT is not installed")
    try:
        load_backend("trt-rtx")
        return "trt-rtx", skipped
    except InputError:
        skipped.append("trt-rtx: TensorRT-RTX is not installed")
    return "onnx", skipped


def make_logger(trt: ModuleType):
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
    found = importlib.util.find_spec("tensorrt_rtx_libs")
    libs = Path(found.origin).parent if found and found.origin else None
    if libs is None or (libs / "libtensorrt_rtx.so").exists() or not (libs / "libtensorrt_rtx.so.1").exists():
        return
    try:
        (libs / "libtensorrt_rtx.so").symlink_to("libtensorrt_rtx.so.1")
    except OSError as err:
        raise BackendError(f"TensorRT-RTX cannot load plugins until {libs}/libtensorrt_rtx.so exists ({err}); "
                           f"run: ln -s libtensorrt_rtx.so.1 {libs}/libtensorrt_rtx.so") from None


def load_plugin(backend: Backend, library: Path) -> None:
    """Register the plugin library's creators (idempotent) and check ours is among them."""
    if backend.target == "trt-rtx":
        ensure_rtx_parser_can_load_plugins()
    registry = backend.module.get_plugin_registry()
    if find_creator(registry) is None:
        handle = registry.load_library(str(library))
        if handle is None:
            raise BackendError(f"{backend.name} could not load the plugin library {library}")
        _loaded_libraries[backend.target] = handle
    if find_creator(registry) is None:
        raise InputError(f"{library} does not register {spec.OP_TYPE} version {spec.PLUGIN_VERSION} in namespace "
                         f"{spec.DOMAIN}; registered: {creator_names(registry)}")


def unload_plugin(backend: Backend) -> None:
    """The plugin registry lives as long as the process: a library loaded for an earlier build
    would otherwise shadow the ONNX function that a plugin-free build asks for."""
    registry = backend.module.get_plugin_registry()
    handle = _loaded_libraries.pop(backend.target, None)
    if handle is not None:
        registry.deregister_library(handle)
    if find_creator(registry) is not None:
        raise BackendError(f"a {spec.OP_TYPE} plugin was registered in this process outside saint-export, so "
                           "TensorRT would use it: build with the plugin, or in a fresh process")


_loaded_libraries: dict = {}  # target → handle from IPluginRegistry.load_library


def find_creator(registry):
    return next((c for c in registry.all_creators if c.name == spec.OP_TYPE
                 and c.plugin_version == spec.PLUGIN_VERSION and c.plugin_namespace == spec.DOMAIN), None)


def creator_names(registry) -> str:
    names = sorted(f"{c.plugin_namespace}::{c.name} v{c.plugin_version}" for c in registry.all_creators)
    return ", ".join(names) or "none"
