"""Loading an exported engine: check its manifest against this machine before TensorRT sees it.

TensorRT's own failures here are opaque ("Serialization assertion stdVersionRead ==
serializationVersion failed", "Cannot deserialize plugin since corresponding IPluginCreator not
found"), so every mismatch the manifest can reveal is refused first with a message naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .artifacts import MANIFEST, sha256
from .errors import SaintError


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaintError(f"{folder} is not a saint-export output (no {MANIFEST})") from None
    except (OSError, ValueError) as err:
        raise SaintError(f"{path} is unreadable or corrupt: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "saint-export/1":
        raise SaintError(f"{path} is not a saint-export manifest")
    return manifest


def check_engine(folder: Path, plugin_library: Path | None = None, backend=None,
                 compute_capability: str | None = None) -> dict:
    """Refuse, with the difference named, an engine this machine should not load. Returns the
    manifest's engine record. `backend` (trt.engine.Backend) and `compute_capability` default
    to what this machine has."""
    from .trt.engine import cuda_compute_capability, load_backend

    folder = Path(folder)
    manifest = read_manifest(folder)
    engine = manifest.get("engine")
    if not engine:
        raise SaintError(f"{folder} holds no TensorRT engine (it was exported with --target onnx)")
    plan = folder / engine["file"]
    recorded = manifest.get("files", {}).get(engine["file"], {}).get("sha256")
    if not plan.is_file():
        raise SaintError(f"{plan} is missing")
    if recorded != sha256(plan):
        raise SaintError(f"{plan.name} does not match the checksum in its manifest: corrupt, or not the engine "
                         "that was exported here")
    backend = backend or load_backend("trt-rtx" if engine["backend"] == "tensorrt-rtx" else "trt")
    if backend.name != engine["backend"] or backend.version != engine["version"]:
        raise SaintError(f"engine was built with {engine['backend']} {engine['version']}, but this machine has "
                         f"{backend.name} {backend.version}; rebuild it here")
    if engine["selection"] == "plugin":
        expected = manifest["plugin_library"]["sha256"]
        plugin_library = plugin_library or folder / manifest["plugin_library"]["file"]
        if not Path(plugin_library).is_file():
            raise SaintError(f"engine uses the SimilarityTopK plugin, and its library {plugin_library} is missing")
        actual = sha256(Path(plugin_library))
        if actual != expected:
            raise SaintError(f"plugin library {plugin_library} (sha256 {actual[:12]}…) differs from the one the "
                             f"engine was built with (sha256 {expected[:12]}…)")
    current = compute_capability or cuda_compute_capability()
    if current is None:
        raise SaintError(f"engine is for compute capability {engine['compute_capability']}, and this machine "
                         "has no CUDA GPU to run it")
    if current != engine["compute_capability"]:
        raise SaintError(f"engine was built for compute capability {engine['compute_capability']}, but this GPU "
                         f"is {current}")
    return engine


def load_engine(folder: Path, plugin_library: Path | None = None):
    """check_engine, then deserialize: returns a TensorRT ICudaEngine. Needs a GPU."""
    from .trt.engine import load_backend, load_plugin

    engine_record = check_engine(folder, plugin_library)
    backend = load_backend("trt-rtx" if engine_record["backend"] == "tensorrt-rtx" else "trt")
    if engine_record["selection"] == "plugin":
        load_plugin(backend, Path(plugin_library or Path(folder) / read_manifest(folder)["plugin_library"]["file"]))
    trt = backend.module
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((Path(folder) / engine_record["file"]).read_bytes())
    if engine is None:
        raise SaintError(f"{backend.name} could not deserialize {engine_record['file']}")
    return engine
