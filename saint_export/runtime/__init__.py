"""Run exported folders in production: numpy in, numpy out, no torch.

    import saint_export.runtime as rt
    with rt.open("engines/vit_b16-early50") as runner:      # checks the folder first
        logits = runner.infer(pixel_values)                  # float32 [B, 3, H, W] → [B, classes]
        outputs = runner.infer_all(pixel_values)             # a VLM features folder: every output by name

`open` refuses a folder whose manifest or files do not check out, and (unless allowed) a folder
that did not pass its parity gate. `backend="auto"` picks TensorRT when the folder has an engine
that this machine can run, else ONNX Runtime with CUDA when onnxruntime-gpu has a GPU, else ONNX
Runtime on the CPU; `runner.backend` says which and `runner.notes` why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import sha256
from ..errors import BackendError, InputError
from ..images import Images, Preprocess, load_images
from ..manifest import EngineRecord, Manifest
from .graph import check_graph
from .runners import OrtRunner, Runner, TrtRunner

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda")

__all__ = ["open", "check_folder", "check_engine", "top_k", "Runner", "Manifest", "Preprocess", "Images", "load_images",
           "BACKENDS", "InputError", "BackendError"]


def open(folder, backend: str = "auto", *, allow_unverified: bool = False, plugin_library=None,
         contexts: int = 2, threads: int | None = None) -> Runner:  # noqa: A001  (rt.open, like gzip.open)
    """A runner for an exported folder, after `check_folder`.

    backend: auto | tensorrt | onnxruntime (CUDA where available) | onnxruntime-cpu | onnxruntime-cuda.
    allow_unverified: run a folder exported without its parity gate.
    plugin_library: the SimilarityTopK library to load instead of the folder's copy (same sha256).
    contexts: TensorRT execution contexts in the pool (concurrent `infer` calls).
    threads: ONNX Runtime intra-op threads (default: ONNX Runtime's, one per core).
    """
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    folder = Path(folder)
    manifest = check_folder(folder, allow_unverified)
    notes, runner = [], None
    if backend in ("auto", "tensorrt"):
        try:
            engine, trt_backend, library = check_engine(folder, manifest, plugin_library)
            runner = TrtRunner(folder / engine.file, manifest.input, manifest.output, manifest.batch[2], trt_backend,
                               library, contexts)
        except InputError as err:
            if backend == "tensorrt":
                raise
            notes.append(f"TensorRT not used: {err}")
    if runner is None:
        device = {"onnxruntime-cpu": "cpu", "onnxruntime-cuda": "cuda"}.get(backend, "auto")
        runner = OrtRunner(folder / manifest.onnx["file"], manifest.input, manifest.output, manifest.batch[2], device,
                           threads)
    runner.notes = notes + runner.notes
    runner.folder, runner.manifest = folder, manifest
    runner.extra_output_names = tuple(t["name"] for t in (manifest.features or {}).get("extra_outputs", []))
    return runner


def check_folder(folder: Path, allow_unverified: bool = False) -> Manifest:
    """The folder's manifest, once every file it lists matches its size and sha256, what it says
    of the graph (inputs, outputs, schedule, operator attributes) matches the ONNX file, and the
    folder passed its parity gate (or `allow_unverified`)."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    for name, record in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{folder}: {name} is missing")
        if path.stat().st_size != record["bytes"] or sha256(path) != record["sha256"]:
            raise InputError(f"{folder}: {name} does not match the checksum in its manifest (corrupt, truncated "
                             "or replaced)")
    for needed in [manifest.onnx["file"]] + ([manifest.engine.file] if manifest.engine else []):
        if needed not in manifest.files:
            raise InputError(f"{folder}: the manifest lists no checksum for {needed}")
    check_graph(folder, manifest)
    if not manifest.verified and not allow_unverified:
        raise InputError(f"{folder} did not pass a parity gate ({manifest.verification}); re-export it with "
                         "verification, or allow unverified folders explicitly")
    return manifest


def check_engine(folder: Path, manifest: Manifest | None = None, plugin_library=None, backend=None,
                 compute_capability: str | None = None) -> tuple[EngineRecord, object, Path | None]:
    """Refuse, with the difference named, an engine this machine should not load. Returns (engine
    record, TensorRT backend, plugin library). `backend` (trt.backend.Backend) and
    `compute_capability` default to what this machine has.

    TensorRT's own failures are opaque ("Serialization assertion stdVersionRead ==
    serializationVersion failed"), so every mismatch the manifest reveals is refused first."""
    from ..gpu import compute_capability as this_gpu
    from ..trt.backend import TARGET_OF, load_backend

    folder = Path(folder)
    manifest = manifest or check_folder(folder, allow_unverified=True)
    engine = manifest.engine
    if engine is None:
        raise InputError(f"{folder} holds no TensorRT engine (it was exported for ONNX only)")
    backend = backend or load_backend(TARGET_OF[engine.backend])
    if backend.name != engine.backend or backend.version != engine.version:
        raise InputError(f"engine was built with {engine.backend} {engine.version}, but this machine has "
                         f"{backend.name} {backend.version}; rebuild it here")
    library = None
    if engine.plugin is not None:
        library = Path(plugin_library) if plugin_library else folder / engine.plugin.file
        if not library.is_file():
            raise InputError(f"engine uses the {engine.plugin.name} plugin, and its library {library} is missing")
        actual = sha256(library)
        if actual != engine.plugin.sha256:
            raise InputError(f"plugin library {library} (sha256 {actual[:12]}…) differs from the one the engine was "
                             f"built with (sha256 {engine.plugin.sha256[:12]}…)")
    current = compute_capability or this_gpu()
    if current is None:
        raise InputError(f"engine is for compute capability {engine.compute_capability}, and this machine has no "
                         "CUDA GPU to run it")
    if current != engine.compute_capability:
        raise InputError(f"engine was built for compute capability {engine.compute_capability}, but this GPU is "
                         f"{current}")
    return engine, backend, library



def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits [B, classes] → the k most probable classes per row, most probable first: (class
    indices int64 [B, k], softmax probabilities float32 [B, k])."""
    if k < 1:
        raise InputError(f"top-k must be ≥ 1, got {k}")
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = (shifted / shifted.sum(-1, keepdims=True)).astype(np.float32)
    indices = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return indices.astype(np.int64), np.take_along_axis(probabilities, indices, -1)
