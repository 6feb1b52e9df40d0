"""When two sets of logits agree (docs/parity.md): one rule for every gate. numpy only.

Image features ([B, tokens, width], a VLM tower's output) follow the same closeness rule; top-1
agreement is a classifier's measure and is None for them."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

FP32_TOLERANCE = 1e-4  # fp32: max |ours − eager| ≤ 1e-4 · max(1, max |eager|)
HALF_COSINE = 0.999  # fp16 / bf16: cosine(ours, eager) ≥ 0.999 per image


class Verdict(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class Closeness:
    """Logits of one backend against eager's, with the verdict of `precision`'s rule."""
    precision: str
    max_abs_diff: float
    tolerance: float  # FP32_TOLERANCE · max(1, max |eager|)
    min_cosine: float
    top1_agreement: float | None  # None for image features
    images: int

    @property
    def logits_close(self) -> bool:
        if self.precision == "fp32":
            return self.max_abs_diff <= self.tolerance
        return self.min_cosine >= HALF_COSINE

    @property
    def passed(self) -> bool:
        return self.logits_close and self.top1_agreement in (None, 1.0)

    def failures(self, what: str = "logits") -> list[str]:
        failed = []
        if not self.logits_close:
            failed.append(f"{what}: max |Δ| = {self.max_abs_diff:.3g} > {self.tolerance:.3g}" if self.precision == "fp32"
                          else f"{what}: min cosine {self.min_cosine:.5f} < {HALF_COSINE}")
        if self.top1_agreement is not None and self.top1_agreement < 1.0:
            failed.append(f"{what}: top-1 agreement {self.top1_agreement:.1%} < 100%")
        return failed

    def summary(self) -> str:
        closeness = (f"max |Δ| {self.max_abs_diff:.2g} (≤ {self.tolerance:.2g})" if self.precision == "fp32"
                     else f"min cosine {self.min_cosine:.5f} (≥ {HALF_COSINE})")
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.0%}"
        return f"{closeness}{top1} on {self.images} images"

    def as_dict(self) -> dict:
        return {"passed": self.passed, "precision": self.precision, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "min_cosine": self.min_cosine, "top1_agreement": self.top1_agreement,
                "images": self.images}


def compare_logits(ours, eager, precision: str = "fp32") -> Closeness:
    """`ours` and `eager` are lists of [B, classes] arrays (or one array), paired in order."""
    ours, eager = _as_list(ours), _as_list(eager)
    if len(ours) != len(eager) or any(a.shape != b.shape for a, b in zip(ours, eager)):
        raise ValueError(f"logits of different shapes: {[a.shape for a in ours]} and {[b.shape for b in eager]}")
    scale = max([1.0] + [float(np.abs(b).max()) for b in eager])
    return Closeness(
        precision=precision,
        max_abs_diff=max([0.0] + [float(np.abs(a - b).max()) for a, b in zip(ours, eager)]),
        tolerance=FP32_TOLERANCE * scale,
        min_cosine=min([1.0] + [float(cosine(a, b).min()) for a, b in zip(ours, eager)]),
        top1_agreement=None if eager and eager[0].ndim > 2 else float(np.mean(agreeing(ours, eager) if eager else 0.0)),
        images=sum(len(b) for b in eager))


def agreeing(ours, eager, precision: str = "fp32") -> np.ndarray:
    """Per image, whether `ours` agrees with `eager`: the same top-1 class for logits, features
    within the closeness rule for image features."""
    ours, eager = _as_list(ours), _as_list(eager)
    if not eager:
        return np.zeros(0, dtype=bool)
    if eager[0].ndim == 2:
        return np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, eager)])
    scale = max([1.0] + [float(np.abs(b).max()) for b in eager])
    if precision == "fp32":
        return np.concatenate([np.abs(a - b).reshape(len(b), -1).max(-1) <= FP32_TOLERANCE * scale
                               for a, b in zip(ours, eager)])
    return np.concatenate([cosine(a, b).reshape(len(b), -1).min(-1) >= HALF_COSINE for a, b in zip(ours, eager)])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _as_list(logits) -> list[np.ndarray]:
    arrays = [logits] if isinstance(logits, np.ndarray) else list(logits)
    return [np.asarray(a, dtype=np.float32) for a in arrays]
