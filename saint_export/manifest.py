"""`manifest.json`: the typed, versioned record of an output folder (docs/artifacts.md).

One writer (`Manifest.write`, called by the pipeline) and one reader (`Manifest.read`, used by
the runtime, `check` and serving). No torch, no onnx. `_READERS` is where a reader for an older
format goes when a format changes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .artifacts import MANIFEST as FILENAME
from .artifacts import atomic_write_text
from .errors import InputError
from .images import Preprocess

FORMAT = "saint-export/2"


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: list  # "batch" for the dynamic axis
    dtype: str = "float32"


@dataclass(frozen=True)
class PluginRecord:
    """The SimilarityTopK plugin library an engine was built with (shipped in the folder)."""
    file: str
    sha256: str
    name: str
    version: str
    namespace: str


@dataclass(frozen=True)
class EngineRecord:
    file: str
    backend: str  # "tensorrt" | "tensorrt-rtx"
    version: str
    compute_capability: str
    operator_backend: str  # how SimilarityTopK runs: "plugin" | "onnx-function" | "none" (no such node)
    plugin_layers: int
    strongly_typed: bool  # read from the built network
    build_seconds: float
    plugin: PluginRecord | None = None
    verified: bool = False
    verification: str = "not run"


@dataclass(frozen=True)
class Manifest:
    verified: bool
    verification: str
    model: dict  # name, source_name, family, weights, parameters
    input: TensorRecord
    output: TensorRecord
    preprocess: Preprocess
    keep_schedule: dict  # KeepSchedule.as_dict()
    saint: dict  # tau, K, gamma
    precision: str
    batch: tuple[int, int, int]  # profile min, opt, max: the runtime splits larger batches
    onnx: dict  # file, opset, exporter, operator
    engine: EngineRecord | None = None
    labels: str | None = None  # file with one class name per line, when the head's classes are known
    features: dict | None = None  # a VLM's image features: tokens per image, how LLM runtimes take them
    quantization: dict | None = None  # int8 / fp8: calibration (images, their hash, method), nodes, the gate
    gpu: str | None = None
    versions: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name → {"sha256", "bytes"}: every other file of the folder
    format: str = FORMAT

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocess"] = self.preprocess.as_dict()
        data["batch"] = dict(zip(("min", "opt", "max"), self.batch))
        return json.dumps({"format": data.pop("format"), **data}, indent=2) + "\n"

    def write(self, folder: Path) -> Path:
        return atomic_write_text(Path(folder) / FILENAME, self.to_json())

    @classmethod
    def from_json(cls, text: str, where: str = FILENAME) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise InputError(f"{where} is corrupt: {err}") from None
        if not isinstance(data, dict) or data.get("format") not in _READERS:
            raise InputError(f"{where} is not a saint-export manifest (format "
                             f"{data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT!r})")
        try:
            return _READERS[data["format"]](data)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where} is not a complete {data['format']} manifest ({type(err).__name__}: "
                             f"{err})") from None

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / FILENAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise InputError(f"{folder} is not a saint-export output folder (no {FILENAME})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path} is unreadable: {err}") from None
        return cls.from_json(text, str(path))


def _from_current(data: dict) -> Manifest:
    data = dict(data)
    engine = data.get("engine")
    if engine is not None:
        plugin = engine.get("plugin")
        engine = EngineRecord(**{**engine, "plugin": PluginRecord(**plugin) if plugin else None})
    batch = data["batch"]
    known = {f.name for f in fields(Manifest)}
    return Manifest(**{k: v for k, v in data.items() if k in known} | {
        "input": TensorRecord(**data["input"]), "output": TensorRecord(**data["output"]),
        "preprocess": Preprocess.from_dict(data["preprocess"]), "engine": engine,
        "batch": (batch["min"], batch["opt"], batch["max"])})


# format → reader. saint-export/1 (0.1.0) recorded no crop fraction and no batch profile for ONNX-only
# folders, so it cannot be migrated without guessing: such folders are refused and re-exported.
_READERS = {FORMAT: _from_current}
