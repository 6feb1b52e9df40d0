"""`ExportConfig`: every choice of an export, checked when it is made (no torch, no model needed)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import spec
from .errors import InputError
from .schedule import parse_spec

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")  # Q/DQ after export, calibrated on images (saint_export/quantize.py)
MIN_CALIBRATION_IMAGES = 16
# The quantized gate's defaults against eager fp32 (top-1 agreement, the worst image's output
# cosine): they hold on the tests' random-weight models, whose near-tied logits flip under any
# rounding (E4M3 keeps 3 mantissa bits to INT8's 7, so FP8 flips more of them), and whose 32-wide
# towers quantize coarsely. Set them higher for trained weights.
QUANTIZED_GATE = {"int8": (0.85, 0.95), "fp8": (0.7, 0.95)}
FP8_MIN_OPSET = 19  # float8 Q/DQ types
TARGETS = ("auto", "onnx", "trt", "trt-rtx")  # how far to go; auto: the furthest this machine can build
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23  # what torch.onnx (dynamo) writes


@dataclass(frozen=True)
class ExportConfig:
    """How to export. Every field is checked on construction.

    keep_schedule: none | early<P>[@<B>] | r:<r0>,… | calib:<file> (docs/keep-schedules.md).
    tau, K, gamma: SAINT's threshold, votes and sharpness (K is the operator's `vote_k`).
    precision: fp32 | fp16 | bf16 | int8 | fp8, for the Linear layers the adapter names
        (docs/parity.md; int8 and fp8: Q/DQ on their inputs after export, docs/quantization.md).
    calibration, calibration_images: int8 / fp8 only: image files or folders, and how many of them
        calibrate the activations' ranges (at least 16).
    float_keys: int8 / fp8 only: keep the projections of the keys SAINT scores float (True), quantize
        them (False), or (None) keep float only those that project the keys alone.
    quantized_agreement, quantized_cosine: int8 / fp8 only: the gate's top-1 agreement and minimum
        output cosine against eager fp32 of the same schedule (default: QUANTIZED_GATE).
    opset: ONNX opset, 18 to 23.
    target: auto | onnx | trt | trt-rtx.
    batch: the batch profile (min, opt, max); the gate runs batch 1 and opt, the runtime splits
        batches above max.
    verify: run the parity gate (a folder exported without it is marked unverified).
    parity_images: synthetic parity images (flat regions and exact ties).
    images: image files or folders added to the parity images.
    plugin_library: "auto" (build the SimilarityTopK plugin), "none" (TensorRT runs the node's ONNX
        function) or the path of a built library.
    compute_capability: TensorRT-RTX target GPU ("8.9"); default: this machine's GPU, else 8.9.
    timing_cache: TensorRT timing cache file; default: one per backend in the cache folder.
    img_size: input resolution, for models loaded by name (default: the model's).
    llm_schedule, llm_tau: LLaVA only: SAINT inside the language model during prefill
        (docs/vlm.md). No LLM runtime drops tokens inside prefill, so it is not in the graph: the
        manifest records it, with its table, for `saint_export.apply` in PyTorch.
    """
    keep_schedule: str = "early50"
    tau: float = spec.TAU
    K: int = spec.VOTE_K
    gamma: float = spec.GAMMA
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    target: str = "auto"
    batch: tuple[int, int, int] = (1, 8, 32)
    verify: bool = True
    parity_images: int = 8
    images: tuple[Path, ...] = field(default_factory=tuple)
    plugin_library: str | Path = "auto"
    compute_capability: str | None = None
    timing_cache: Path | None = None
    img_size: int | None = None
    llm_schedule: str = "none"
    llm_tau: float = spec.LLM_TAU
    calibration: tuple[Path, ...] = field(default_factory=tuple)
    calibration_images: int = 128
    float_keys: bool | None = None  # None: float where the key projection is its own Linear
    quantized_agreement: float | None = None  # None: QUANTIZED_GATE's default for the precision
    quantized_cosine: float | None = None

    def __post_init__(self):
        parse_spec(self.keep_schedule)
        check_hyperparameters(self.tau, self.K, self.gamma)
        _choice("precision", self.precision, PRECISIONS)
        _choice("target", self.target, TARGETS)
        if not (isinstance(self.opset, int) and MIN_OPSET <= self.opset <= MAX_OPSET):
            raise InputError(f"opset {self.opset!r} is not supported: the exporter writes opsets {MIN_OPSET} to "
                             f"{MAX_OPSET}")
        object.__setattr__(self, "batch", parse_batch(self.batch))
        if not (isinstance(self.parity_images, int) and self.parity_images >= 1):
            raise InputError(f"parity_images must be an integer ≥ 1, got {self.parity_images!r}")
        images = (self.images,) if isinstance(self.images, (str, Path)) else tuple(self.images or ())
        object.__setattr__(self, "images", tuple(Path(p) for p in images))
        for source in self.images:
            if not source.exists():
                raise InputError(f"image source {str(source)!r} does not exist")
        if self.plugin_library not in ("auto", "none"):
            if not Path(self.plugin_library).is_file():
                raise InputError(f"plugin library {str(self.plugin_library)!r}: no such file")
            object.__setattr__(self, "plugin_library", Path(self.plugin_library))
        if self.compute_capability is not None:
            object.__setattr__(self, "compute_capability", parse_compute_capability(self.compute_capability))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        check_hyperparameters(self.llm_tau, self.K, self.gamma)
        if not isinstance(self.llm_schedule, str):
            raise InputError(f"LLM schedule must be a string, got {type(self.llm_schedule).__name__}")
        if self.img_size is not None and not (isinstance(self.img_size, int) and self.img_size > 0):
            raise InputError(f"image size must be a positive integer, got {self.img_size!r}")
        self._check_quantization()

    def _check_quantization(self) -> None:
        sources = (self.calibration,) if isinstance(self.calibration, (str, Path)) else tuple(self.calibration or ())
        object.__setattr__(self, "calibration", tuple(Path(p) for p in sources))
        if self.precision not in QUANTIZED:
            if self.calibration or self.float_keys is not None:
                raise InputError(f"{'calibration images' if self.calibration else 'float keys'} apply to int8 and "
                                 f"fp8; precision is {self.precision}")
            return
        if not self.calibration:
            raise InputError(f"precision {self.precision} needs calibration images (--calibration DIR): the activations' "
                             "ranges are measured on them")
        for source in self.calibration:
            if not source.exists():
                raise InputError(f"calibration source {str(source)!r} does not exist")
        if not (isinstance(self.calibration_images, int) and self.calibration_images >= MIN_CALIBRATION_IMAGES):
            raise InputError(f"calibration_images must be an integer ≥ {MIN_CALIBRATION_IMAGES}, got "
                             f"{self.calibration_images!r}")
        for name, default in zip(("quantized_agreement", "quantized_cosine"), QUANTIZED_GATE[self.precision]):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise InputError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.precision == "fp8":
            if self.opset < FP8_MIN_OPSET:  # only the default 18 is lower: raised to what float8 types need
                object.__setattr__(self, "opset", FP8_MIN_OPSET)
            if self.compute_capability is not None and tuple(map(int, self.compute_capability.split("."))) < (8, 9):
                raise InputError(f"precision fp8 needs compute capability 8.9 or later (Ada, Hopper, Blackwell); the "
                                 f"target is {self.compute_capability}: use int8")


def _choice(what: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{what} {value!r}: expected one of {', '.join(choices)}")


def check_hyperparameters(tau, K, gamma) -> None:
    if not (isinstance(tau, (int, float)) and -1.0 <= tau <= 1.0):
        raise InputError(f"tau must be a cosine similarity in [-1, 1], got {tau!r}")
    if not (isinstance(K, int) and K >= 1):
        raise InputError(f"K (votes for a redundant row) must be an integer ≥ 1, got {K!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise InputError(f"gamma must be a finite number ≥ 0, got {gamma!r}")


def parse_batch(value) -> tuple[int, int, int]:
    """(min, opt, max), "min,opt,max", or N (meaning 1, N, N) → (min, opt, max)."""
    values = value
    if isinstance(value, str):
        try:
            values = [int(v) for v in value.split(",")]
        except ValueError:
            values = []
    elif isinstance(value, int):
        values = [value]
    values = list(values) if isinstance(values, (list, tuple)) else []
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not all(isinstance(v, int) for v in values) or not 1 <= values[0] <= values[1] <= values[2]:
        raise InputError(f"batch profile {value!r}: expected N or min,opt,max with 1 ≤ min ≤ opt ≤ max")
    return tuple(values)


def parse_compute_capability(text) -> str:
    """"89", "8.9" or "sm89" → "8.9"."""
    digits = str(text).lower().removeprefix("sm").replace(".", "").replace("_", "")
    if not digits.isdigit() or len(digits) not in (2, 3):
        raise InputError(f"compute capability {text!r}: expected e.g. 89, 8.9 or sm89")
    return f"{digits[:-1]}.{digits[-1]}"
