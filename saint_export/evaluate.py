"""What a keep schedule costs and buys on your images: accuracy, agreement, speed (saint_export.evaluate).

For each schedule: top-1 accuracy where the images carry labels (an ImageFolder tree), and always
top-1 agreement with the unpruned model, the mean cosine of the logits to it, the FLOPs ratio and
the measured images/s. The unpruned model runs eagerly as the reference; the pruned ones run on
the chosen backend (eager PyTorch, or ONNX Runtime on the exported graph).
"""
from __future__ import annotations

import copy
import io
import itertools
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import artifacts, spec
from .adapters import find_adapter
from .config import QUANTIZED, ExportConfig
from .errors import InputError
from .images import Images, load_images
from .models import architecture, check_weights, load
from .parity import cosine
from .patch import apply
from .schedule import KeepSchedule

BACKENDS = ("eager", "onnxruntime")
EVAL_JSON, EVAL_PNG = "eval.json", "eval.png"


@dataclass(frozen=True)
class EvalRecord:
    schedule: str
    images: int
    top1_accuracy: float | None  # None without labels
    top1_agreement: float  # with the unpruned model
    logit_cosine: float  # mean over images, to the unpruned model's logits
    flops_ratio: float
    images_per_second: float
    backend: str
    precision: str = "fp32"


@dataclass
class Evaluation:
    model: str
    records: list[EvalRecord]
    unreadable: list = field(default_factory=list)  # (file, why)

    def table(self) -> str:
        lines = [f"{'schedule':<22} {'prec':>4} {'images':>6} {'top-1 acc':>9} {'agreement':>9} {'cosine':>8} "
                 f"{'FLOPs':>6} {'images/s':>9}  backend"]
        for r in self.records:
            accuracy = "—" if r.top1_accuracy is None else f"{r.top1_accuracy:.1%}"
            lines.append(f"{r.schedule:<22} {r.precision:>4} {r.images:>6} {accuracy:>9} {r.top1_agreement:>9.1%} "
                         f"{r.logit_cosine:>8.4f} {r.flops_ratio:>6.3f} {r.images_per_second:>9.1f}  {r.backend}")
        return "\n".join(lines)

    def save(self, folder: Path, plot: bool = True) -> list[Path]:
        """`eval.json` (one record per schedule) and, with matplotlib installed, `eval.png`."""
        folder = Path(folder)
        written = [artifacts.write_json(folder / EVAL_JSON, [asdict(r) for r in self.records])]
        if plot:
            written.append(plot_evaluation(self, folder / EVAL_PNG))
        return written


def evaluate(model, images, keep_schedules=("none", "early75", "early50", "early25"), *, weights: str | None = None,
             backend: str = "eager", batch_size: int = 16, tau: float = spec.TAU, K: int = spec.VOTE_K,
             gamma: float = spec.GAMMA, img_size: int | None = None, precisions=("fp32",), calibration=None,
             progress=None) -> Evaluation:
    """Evaluate `keep_schedules` of `model` (a name with `weights`, or an unpatched module) on
    `images` (files, flat folders or ImageFolder trees), at each of `precisions` (int8 and fp8 on
    the onnxruntime backend, calibrated on `calibration`)."""
    from .pipeline import Progress

    progress = progress or Progress()
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InputError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    schedules = [keep_schedules] if isinstance(keep_schedules, str) else list(keep_schedules)
    precisions = [precisions] if isinstance(precisions, str) else list(precisions)
    if not schedules or not precisions:
        raise InputError("no keep schedule or precision to evaluate")
    if backend == "eager" and precisions != ["fp32"]:
        raise InputError(f"precision {', '.join(precisions)}: the eager backend runs fp32; use --backend onnxruntime")
    configs = {p: ExportConfig(tau=tau, K=K, gamma=gamma, img_size=img_size, precision=p, target="onnx",
                               calibration=calibration if p in QUANTIZED else (), verify=False,
                               batch=(1, batch_size, batch_size)) for p in precisions}  # checks every choice
    base, name = _base_model(model, weights, img_size)
    info = find_adapter(base).describe(base)
    resolved = [KeepSchedule.for_model(s, info) for s in schedules]
    for schedule in resolved:
        schedule.require_static()
    data, labels = _images(base, images)
    reference, _ = _eager_logits(base, data.pixel_values, batch_size)
    records = []
    for (schedule, text), precision in itertools.product(zip(resolved, schedules), precisions):
        with progress.step(f"eval-{text}-{precision}", f"{text} {precision}: {backend}, {len(data.paths)} images"):
            if backend == "eager":
                pruned = apply(copy.deepcopy(base), schedule, tau=tau, K=K, gamma=gamma)
                logits, seconds = _eager_logits(pruned, data.pixel_values, batch_size)
            else:
                logits, seconds = _exported_logits(base, replace(configs[precision], keep_schedule=text), data)
        records.append(_record(text, schedule.flops_ratio(), logits, reference, labels, seconds, backend, precision))
    return Evaluation(name, records, data.unreadable)


def _exported_logits(base, config: ExportConfig, data) -> tuple[np.ndarray, float]:
    """The exported graph itself, run by the runtime (unverified: timing needs no gate; a quantized
    graph is still calibrated)."""
    from .pipeline import export

    with tempfile.TemporaryDirectory() as tmp:
        folder = export(copy.deepcopy(base), Path(tmp) / "folder", config).folder
        logits, seconds, _ = _runtime_logits(folder, data.pixel_values, True, "onnxruntime-cpu")
    return logits, seconds


def evaluate_folder(folder, images, *, backend: str = "auto", allow_unverified: bool = False,
                    batch_size: int = 16, model: torch.nn.Module | None = None) -> Evaluation:
    """Evaluate an exported folder through the runtime against its own unpruned model, rebuilt
    from the manifest (random or checkpoint weights), or `model` when given."""
    from .manifest import Manifest

    manifest = Manifest.read(folder)
    weights = manifest.model["weights"]
    if model is None:
        # The weights record the pipeline wrote (pipeline._weights_record) → what models.load takes.
        source = weights["source"]
        if source.startswith("loaded module"):
            raise InputError(f"{folder} was exported from a loaded module: pass that (unpruned) model to compare with")
        argument = {"random": "random", "file": weights.get("path")}.get(source, "pretrained")
        if source == "file":
            check_weights(argument)
        model = load(architecture(manifest.model["source_name"], manifest.preprocess.size), argument,
                     seed=weights.get("seed", 0))
    data, labels = _images(model, images)
    reference, _ = _eager_logits(model, data.pixel_values, batch_size)
    logits, seconds, backend_used = _runtime_logits(folder, data.pixel_values, allow_unverified, backend)
    record = _record(manifest.keep_schedule["spec"], manifest.keep_schedule["flops_ratio"], logits, reference,
                     labels, seconds, backend_used, manifest.precision)
    return Evaluation(str(folder), [record], data.unreadable)


def _base_model(model, weights, img_size):
    if isinstance(model, str):
        check_weights(weights or "pretrained")
        return load(architecture(model, img_size), weights or "pretrained"), model
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")
    if weights is not None:
        raise InputError("weights apply to models given by name; this model is already loaded")
    if getattr(model, "saint", None) is not None:
        raise InputError("model already has SAINT applied; pass the unpatched model")
    find_adapter(model).describe(model)
    return model.eval(), type(model).__name__


def _images(model, sources, labels: bool = True) -> tuple[Images, np.ndarray | None]:
    """The images and, from class folders (unless `labels` is False), the head's class indices."""
    adapter = find_adapter(model)
    data = load_images([sources] if isinstance(sources, (str, Path)) else sources, adapter.preprocess(model))
    if not data.labelled or not labels:
        return data, None
    index = adapter.class_indices(model, data.classes)
    return data, np.array([index[c] for c in data.classes])


def _eager_logits(model, pixels: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    with torch.no_grad():
        model(torch.from_numpy(pixels[:1]))  # warm-up, not timed
        t0 = time.perf_counter()
        logits = [model(torch.from_numpy(pixels[i:i + batch_size])).float().numpy()
                  for i in range(0, len(pixels), batch_size)]
    return np.concatenate(logits), time.perf_counter() - t0


def _runtime_logits(folder, pixels, allow_unverified, backend) -> tuple[np.ndarray, float, str]:
    from . import runtime

    with runtime.open(folder, backend, allow_unverified=allow_unverified) as runner:
        runner.infer(pixels[:1])  # warm-up, not timed
        t0 = time.perf_counter()
        logits = runner.infer(pixels)
        seconds = time.perf_counter() - t0
    return logits, seconds, runner.backend


def _record(text, flops_ratio, logits, reference, labels, seconds, backend, precision="fp32") -> EvalRecord:
    top1 = logits.argmax(-1)
    return EvalRecord(
        schedule=text, images=len(logits),
        top1_accuracy=None if labels is None else float((top1 == labels).mean()),
        top1_agreement=float((top1 == reference.argmax(-1)).mean()),
        logit_cosine=float(cosine(logits, reference).mean()),
        flops_ratio=flops_ratio, images_per_second=len(logits) / seconds, backend=backend, precision=precision)


def plot_evaluation(evaluation: Evaluation, path: Path) -> Path:
    """Top-1 agreement with the unpruned model (and accuracy, with labels) against images/s, one
    point per schedule; the unpruned model is starred."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'saint-export[plot]'") from None
    records = evaluation.records
    series = [("top-1 agreement with unpruned", "tab:blue", [r.top1_agreement for r in records])]
    if all(r.top1_accuracy is not None for r in records):
        series.append(("top-1 accuracy", "tab:orange", [r.top1_accuracy for r in records]))
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    speed = [r.images_per_second for r in records]
    for label, colour, values in series:
        axes.plot(speed, [v * 100 for v in values], "o", color=colour, label=label, zorder=3)
        for r, v in zip(records, values):
            if r.flops_ratio == 1.0:
                axes.plot(r.images_per_second, v * 100, "*", color="black", markersize=14, zorder=4)
    for i, r in enumerate(records):
        precision = "" if r.precision == "fp32" else f" {r.precision}"
        axes.annotate(f"{r.schedule}{precision}{' (unpruned)' if r.flops_ratio == 1.0 else ''}\nFLOPs "
                      f"{r.flops_ratio:.2f}",
                      (r.images_per_second, series[0][2][i] * 100), textcoords="offset points",
                      xytext=(6, 6 if i % 2 else -18), fontsize=7)
    axes.set_ylim(-5, 105)
    axes.set_xlabel(f"images/s ({records[0].backend})")
    axes.set_ylabel("%")
    axes.set_title(f"{evaluation.model}: {records[0].images} images", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return artifacts.atomic_write_bytes(Path(path), buffer.getvalue())
