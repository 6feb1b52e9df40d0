"""Latency on the backend: a per-block cost curve, a model of whole schedules fitted on the
finalists' measurements (with its out-of-sample error), and the finalists timed in paired,
interleaved rounds.

Only this module reads the clock; everything it returns depends on the machine's load, and
nothing the search does depends on it.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ExportConfig
from ..errors import InputError
from ..schedule import KeepSchedule
from .search import Candidate


@dataclass(frozen=True)
class Backend:
    """Where tune times schedules: ONNX Runtime with these providers, or eager PyTorch (none)."""
    providers: tuple

    def check(self, name: str) -> None:
        if not self.providers:
            return
        import onnxruntime as ort

        from ..gpu import cuda_device

        if self.providers[0] == "CUDAExecutionProvider" and (
                self.providers[0] not in ort.get_available_providers() or cuda_device() is None):
            raise InputError(f"backend {name} needs onnxruntime-gpu and a CUDA GPU; this machine has "
                             f"{', '.join(ort.get_available_providers())}")


BACKENDS = {"onnxruntime-cpu": Backend(("CPUExecutionProvider",)),
            "onnxruntime-cuda": Backend(("CUDAExecutionProvider", "CPUExecutionProvider")),
            "eager": Backend(())}


def check_backend(name: str) -> Backend:
    if name == "tensorrt":
        raise InputError("backend 'tensorrt': tune does not time TensorRT engines yet (no machine with a GPU has run "
                         "one here); on a GPU use onnxruntime-cuda")
    if name not in BACKENDS:
        raise InputError(f"backend {name!r}: tune measures on {', '.join(BACKENDS)}")
    BACKENDS[name].check(name)
    return BACKENDS[name]


class LatencyModel:
    """Milliseconds per batch of a static schedule on one backend: a measured curve t(n) of one
    block over its token count, split into attention (tokens in) and MLP (tokens kept) by their
    MAC shares, summed over the blocks; then T = a · Σ + b fitted on whole-model measurements.

    t(n) is the least-squares quadratic c0 + c1·n + c2·n² through the measured points (weighted by
    1/t: relative error), not their interpolation: linear layers grow with n and attention
    scores with n², and one point's noise on shared cores otherwise goes straight into every
    schedule that runs near it."""

    def __init__(self, grid: list[int], block_ms: list[float], schedule: KeepSchedule):
        self.block_ms, self.schedule = block_ms, schedule
        self.curve = np.polyfit(grid, block_ms, min(2, len(grid) - 1), w=1 / np.asarray(block_ms))
        self.a, self.b = 1.0, 0.0

    def _t(self, tokens: float) -> float:
        # Never below the cheapest measurement's share of itself: a quadratic may dip under zero
        # below the measured range.
        return max(float(np.polyval(self.curve, tokens)), 0.5 * min(self.block_ms))

    def blocks_ms(self, drops) -> float:
        s = self.schedule
        counts = [n + s.num_protected for n in replace(s, drops=tuple(drops)).patch_counts()]
        d, ratio = s.embed_dim, s.mlp_ratio

        def attention_share(n):
            return (4 * d + 2 * n) / (4 * d + 2 * n + 2 * d * ratio)
        return sum(attention_share(counts[i]) * self._t(counts[i]) + (1 - attention_share(counts[i + 1]))
                   * self._t(counts[i + 1]) for i in range(s.depth))

    def _coefficients(self, measured: dict) -> tuple[float, float]:
        x = np.array([self.blocks_ms(d) for d in measured])
        y = np.array(list(measured.values()))
        if len(set(x.round(6))) < 2:
            return float(y.mean() / x.mean()), 0.0
        # Weighted by 1/y: the relative error is what matters, and the fastest schedules have least slack.
        a, b = np.polyfit(x, y, 1, w=1 / y)
        return float(a), float(b)

    def fit(self, measured: dict) -> dict:
        """Least squares of the whole-model measurements {drops tuple: ms} on the block sums, and the
        model's relative errors: in sample, leave-one-out, and on the points that three anchors
        (the unpruned model, the middle and the cheapest schedule) were not fitted on."""
        def error(coefficients, drops):
            a, b = coefficients
            return abs(a * self.blocks_ms(drops) + b - measured[drops]) / measured[drops]

        keys = sorted(measured, key=lambda d: -self.blocks_ms(d))
        loo = [error(self._coefficients({k: measured[k] for k in keys if k != key}), key) for key in keys] \
            if len(keys) > 2 else []
        anchors = {keys[0], keys[len(keys) // 2], keys[-1]}
        rest = [k for k in keys if k not in anchors]
        from_anchors = self._coefficients({k: measured[k] for k in anchors})
        self.a, self.b = self._coefficients(measured)
        return {"a": self.a, "b": self.b,
                "in_sample_max_error": max(error((self.a, self.b), k) for k in keys),
                "leave_one_out_median_error": statistics.median(loo) if loo else None,
                "leave_one_out_max_error": max(loo) if loo else None,
                "unfitted_points": len(rest),
                "unfitted_max_error": max(error(from_anchors, k) for k in rest) if rest else None}

    def predict(self, drops) -> float:
        return float(self.a * self.blocks_ms(drops) + self.b)


def interleaved(calls: dict, rounds: int) -> dict:
    """Milliseconds of every call in each of `rounds` rounds, one of each per round (after one
    warm-up each), in round order: a round's timings saw the same load, so they pair."""
    samples = {key: [] for key in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(rounds):
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                samples[key].append(1000 * (time.perf_counter() - t0))
    return samples


class _Block(torch.nn.Module):
    """One block as the unpruned graph runs it, for the latency curve."""

    def __init__(self, parts, block):
        super().__init__()
        self.block, self.block_forward = block, parts.block_forward

    def forward(self, x):
        return self.block_forward(self.block, x, lambda keys: None)


def block_curve(parts, grid, width, backend: Backend, batch, rounds) -> list[float]:
    """Milliseconds of one unpatched block at each token count of `grid`."""
    block = _Block(parts, copy.deepcopy(parts.blocks[0])).eval()
    if not backend.providers:
        run = {n: (lambda x: block(torch.from_numpy(x))) for n in grid}
    else:
        from ..runtime.runners import ort_session

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "block.onnx"
            with torch.no_grad():
                torch.onnx.export(block, (torch.randn(batch, grid[-1], width),), str(path), dynamo=True,
                                  verbose=False, dynamic_shapes=({1: torch.export.Dim("tokens", min=2, max=4096)},))
            session = ort_session(path, list(backend.providers))
        name = session.get_inputs()[0].name
        run = {n: (lambda x: session.run(None, {name: x})) for n in grid}
    inputs = {n: np.random.default_rng(n).standard_normal((batch, n, width)).astype(np.float32) for n in grid}
    samples = interleaved({n: (lambda n=n: run[n](inputs[n])) for n in grid}, rounds * 3)
    return [statistics.median(samples[n]) for n in grid]


def schedule_runner(base, adapter, spec_text: str, backend: Backend, folder: Path, batch: int, hp):
    """A callable running one batch of `spec_text` on `backend` (exported to `folder` for ONNX Runtime)."""
    tau, K, gamma = hp
    if not backend.providers:
        from ..patch import apply

        pruned = adapter.export_module(apply(copy.deepcopy(base), spec_text, tau=tau, K=K, gamma=gamma))
        return lambda x: pruned(torch.from_numpy(x))
    from ..manifest import Manifest
    from ..pipeline import export
    from ..runtime.runners import OrtRunner

    folder = export(copy.deepcopy(base), folder, ExportConfig(
        keep_schedule=spec_text, tau=tau, K=K, gamma=gamma, target="onnx", verify=False,
        batch=(1, batch, batch))).folder
    manifest = Manifest.read(folder)
    device = "cuda" if backend.providers[0] == "CUDAExecutionProvider" else "cpu"
    return OrtRunner(folder / manifest.onnx["file"], manifest.input, manifest.output, batch, device).infer


def time_finalists(base, adapter, picks: list[Candidate], backend: Backend, batch: int, rounds: int, img_size: int,
                   hp, journal, progress) -> dict:
    """Every pick's whole-model timings (ms per batch of `batch`) over 3 × `rounds` interleaved
    rounds, in round order, by r: form; from the journal where it has them."""
    missing = [p for p in picks if "rounds " + p.spec not in journal.entries]
    runners = {}
    with tempfile.TemporaryDirectory() as tmp, progress.step(
            "measure", f"exporting and timing {len(missing)} schedules", total=len(missing)) as advance:
        for i, pick in enumerate(missing):
            runners[pick.spec] = schedule_runner(base, adapter, pick.spec, backend, Path(tmp) / f"f{i}", batch, hp)
            advance(i + 1)
        x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)
        times = interleaved({key: (lambda fn=fn: fn(x)) for key, fn in runners.items()}, rounds * 3)
    for key, samples in times.items():
        journal.get("rounds " + key, lambda s=samples: s)
    return {p.spec: journal.entries["rounds " + p.spec] for p in picks}
