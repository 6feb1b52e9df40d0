"""`saint-export tune` on vit_b16 (the README's tuning figures): the tuned front against the early<P>
families, predicted against measured latency, and the chosen schedule re-measured on its own.

    python scripts/bench_tune.py [--model vit_b16] [--images 256 | --photos 48] [--objective speedup>=2]
                                 [--probe 32] [--step 16] [--polish 0] [--hog] [--output bench/tune]

Random weights (no hub); the images are generated (flat 16-px regions with noise, seeded), or with
`--photos N` crops of scikit-image's photographs, so the figures measure the search, the latency
model and the certificate's mechanics, not accuracy on ImageNet. `--hog` runs a busy process
beside the tune (one core of two busy: how a shared machine looks), to see the speed objective
succeed or be refused for noise. The tune runs on
ONNX Runtime CPU at batch 8. Afterwards the chosen schedule and the unpruned model are exported
again and timed side by side (interleaved rounds, medians, as scripts/bench.py does), which is
the "separate run" that checks the chosen speed-up. Writes the tune folder (front.json,
front.png, sensitivity.png, schedule.txt, journal.jsonl) and bench_tune.md into --output.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import saint_export as se
from saint_export.models import architecture, load
from saint_export.runtime.runners import OrtRunner


def generate_images(folder: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cells = rng.integers(2, 8)
        image = np.kron(rng.random((cells, cells, 3)), np.ones((size // cells + 1, size // cells + 1, 1)))[:size, :size]
        image = image + 0.05 * rng.standard_normal((size, size, 3))
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def photo_crops(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` random square crops (flipped at random) of scikit-image's colour photographs."""
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "retina")]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
        crop = photo[top:top + side, left:left + side][:, ::rng.choice([1, -1])]
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size)).save(folder / f"{i:03d}.png")
    return folder


def hog() -> subprocess.Popen:
    """A process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def side_by_side(model, schedules: list[str], batch: int, img_size: int, rounds: int = 9) -> dict[str, float]:
    """Median ms per batch of each schedule's exported graph on ONNX Runtime CPU, interleaved."""
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, schedule in enumerate(schedules):
            folder = se.export(copy.deepcopy(model), Path(tmp) / f"f{i}", se.ExportConfig(
                keep_schedule=schedule, target="onnx", verify=False, batch=(1, batch, batch))).folder
            manifest = se.Manifest.read(folder)
            runners[schedule] = OrtRunner(folder / manifest.onnx["file"], manifest.input, manifest.output, batch, "cpu")
        x = np.random.default_rng(1).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)
        times = {s: [] for s in schedules}
        for runner in runners.values():
            runner.infer(x)
        for _ in range(rounds):
            for schedule, runner in runners.items():
                t0 = time.perf_counter()
                runner.infer(x)
                times[schedule].append(1000 * (time.perf_counter() - t0))
    return {s: statistics.median(t) for s, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--images", type=int, default=256, help="generated images")
    parser.add_argument("--photos", type=int, help="crops of scikit-image's photographs instead")
    parser.add_argument("--objective", default="speedup>=2")
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--polish", type=int, default=0, help="Optuna NSGA-II trials after the greedy path")
    parser.add_argument("--hog", action="store_true", help="a busy process beside the tune")
    parser.add_argument("--output", type=Path, default=Path("bench/tune"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    arch = architecture(args.model)
    images = (photo_crops(args.output / "photos", args.photos, arch.info.img_size) if args.photos
              else generate_images(args.output / "images", args.images, arch.info.img_size))
    busy = hog() if args.hog else None
    t0 = time.perf_counter()
    try:
        result = se.tune(args.model, images, args.objective, weights="random", backend="onnxruntime-cpu",
                         batch=args.batch, probe=args.probe, step=args.step, polish=args.polish, output=args.output)
    finally:
        if busy:
            busy.kill()
    seconds = time.perf_counter() - t0
    print(result.table())
    print(result.guarantee or result.reason)
    model = load(arch, "random")
    chosen = result.closest.spec
    again = side_by_side(model, ["none", chosen], args.batch, arch.info.img_size)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"onnxruntime {__import__('onnxruntime').__version__}")
    fit = result.latency_fit
    images_text = f"{args.photos} photo crops" if args.photos else f"{args.images} generated images"
    lines = [f"{args.model}, random weights, {images_text} ({result.images['tune']} tune, "
             f"{result.images['probe']} probed, {result.images['held_out']} held out), objective {args.objective}, "
             f"polish {args.polish} trials, {'a CPU hog beside it, ' if args.hog else ''}"
             f"ONNX Runtime CPU batch {args.batch}; {machine}; the whole tune {seconds / 60:.1f} min; unpruned "
             f"timings spread {result.noise:.0%}", "",
             "| schedule | source | speed-up (median of paired ratios) | 95% lower bound | predicted ms | measured ms | "
             "tune KL | held-out disagreements | bound (Clopper–Pearson 95%) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in result.finalists:
        marks = (" (front)" if p.pareto else "") + (" ← chosen" if p.selected else "")
        lines.append(f"| `{p.spec}`{marks} | {p.source} | {p.speedup:.2f}x | {p.speedup_low:.2f}x | "
                     f"{p.predicted_ms:.1f} | {p.measured_ms:.1f} | {p.tune_loss:.4f} | "
                     f"{p.failures}/{result.images['held_out']} | {p.failure_bound:.1%} |")
    lines += ["", f"τ {result.tau:g}, γ {result.gamma:g} (searched at early50); export: `{result.command(args.model)}`",
              f"Latency model: measured = {fit['a']:.3f} × block sum + {fit['b']:.2f} ms; relative error in sample "
              f"≤ {fit['in_sample_max_error']:.1%}, leave-one-out median {fit['leave_one_out_median_error']:.1%} and max "
              f"{fit['leave_one_out_max_error']:.1%}, fitted on 3 anchors and tested on the other "
              f"{fit['unfitted_points']}: max {fit['unfitted_max_error']:.1%}.",
              f"Outcome: {result.guarantee or result.reason}",
              f"`{chosen}` re-measured side by side: {again['none']:.1f} ms unpruned, {again[chosen]:.1f} ms "
              f"pruned, {again['none'] / again[chosen]:.2f}x."]
    text = "\n".join(lines)
    print(text)
    (args.output / "bench_tune.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
