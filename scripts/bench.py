"""The README's performance section in one run: pruned against unpruned, beside the FLOPs ideal.

    python scripts/bench.py [--models vit_b16,vit_h14] [--rounds 7] [--int8] [--output bench/]

For each model (random weights: throughput does not depend on them) and each schedule (none,
early75, early50, early25 and a schedule calibrated on the scikit-image photographs), it times
eager PyTorch and ONNX Runtime on the CPU (the exported folder, run by saint_export.runtime), in
rounds that interleave the schedules so that drift on a shared machine hits all alike, and
reports medians. Where a CUDA GPU exists it adds eager and torch.compile (CUDA graphs) rows in
fp16, naming the GPU. With `--int8`, every schedule is also exported as INT8 (calibrated on 32
crops of the photographs, gate on) and timed on ONNX Runtime CPU in the same interleaved rounds as
the fp32 folders, with a table of how the two speed-ups compound. Writes bench.json, bench.md (the
tables) and bench.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import saint_export as se
import saint_export.runtime as rt
from bench_tune import photo_crops  # noqa: E402  (crops of the scikit-image photographs)
from saint_export import models

SCHEDULES = ("none", "early75", "early50", "early25")


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(calls: dict, rounds: int) -> dict:
    """Median seconds per call, over `rounds` rounds that each run every call once (after a warm-up)."""
    for fn in calls.values():
        fn()
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(time_once(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def selection_share(path: Path, feed: dict, runs: int = 3) -> float:
    """Share of ONNX Runtime's node time spent in the nodes inlined from saint::SimilarityTopK."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return sum(e["dur"] for e in nodes if "SimilarityTopK" in e["name"]) / max(sum(e["dur"] for e in nodes), 1)


def shared_weight_models(arch, schedules: dict, device="cpu", dtype=torch.float32) -> dict:
    """One pruned model per schedule, all sharing one set of weights (vit_h14 five times would not fit)."""
    base = models.load(arch, "random").to(device, dtype)
    state = base.state_dict()
    pruned = {}
    for name, schedule in schedules.items():
        with torch.device("meta"):
            model = arch.adapter.create(arch.source_name, pretrained=False, img_size=arch.info.img_size)
        model.load_state_dict(state, assign=True)
        pruned[name] = se.apply(model.eval(), schedule)
    return pruned


def bench_model(name: str, batch: int, rounds: int, photos: list[Path], work: Path, int8: Path | None = None,
                float_keys: bool | None = None) -> dict:
    arch = models.architecture(name)
    size = arch.info.img_size
    calibration = se.calibrate(name, photos, percentile=50, weights="random")
    calib_path = calibration.save(work / f"{name}-calib.json")
    schedules = {s: s for s in SCHEDULES} | {"calibrated": f"calib:{calib_path}"}
    resolved = {s: se.resolve_schedule(spec, name) for s, spec in schedules.items()}
    x = torch.randn(batch, 3, size, size)
    rows = {s: {"schedule": s, "spec": schedules[s], "flops_ratio": resolved[s].flops_ratio(),
                "mean_tokens": float(np.mean(resolved[s].patch_counts()[:-1])) + arch.info.num_protected}
            for s in schedules}

    with torch.no_grad():  # eager PyTorch, CPU
        eager = shared_weight_models(arch, schedules)
        seconds = interleaved({s: (lambda m=m: m(x)) for s, m in eager.items()}, rounds)
        del eager
    for s, t in seconds.items():
        rows[s]["eager_cpu_images_per_s"] = batch / t

    runners, feed = {}, {"pixel_values": x.numpy()}
    precisions = {"ort_cpu": {}} | ({"ort_cpu_int8": {"precision": "int8", "calibration": (int8,),
                                                      "float_keys": float_keys}} if int8 else {})
    for s, spec in schedules.items():  # ONNX Runtime, CPU, on the exported folders (fp32 and INT8 side by side)
        for key, options in precisions.items():
            folder = work / f"{name}-{s}-{key}"
            se.export(name, folder, weights="random", config=se.ExportConfig(
                keep_schedule=spec, target="onnx", verify="precision" in options, batch=(1, batch, batch),
                **options))
            runners[s, key] = rt.open(folder, "onnxruntime-cpu", allow_unverified=True)
        rows[s]["selection_share_ort"] = selection_share(work / f"{name}-{s}-ort_cpu" / "model.onnx", feed)
    seconds = interleaved({k: (lambda r=r: r.infer(x.numpy())) for k, r in runners.items()}, rounds)
    for (s, key), t in seconds.items():
        rows[s][f"{key}_images_per_s"] = batch / t
        runners[s, key].close()

    if torch.cuda.is_available():  # GPU rows: fp16 eager and torch.compile with CUDA graphs
        gpu_x = x.cuda().half()
        with torch.no_grad():
            gpu = shared_weight_models(arch, schedules, "cuda", torch.float16)
            for label, wrap in (("eager_gpu", lambda m: m), ("compiled_gpu",
                                lambda m: torch.compile(m, mode="reduce-overhead", fullgraph=True))):
                calls = {s: (lambda m=wrap(m): (m(gpu_x), torch.cuda.synchronize())) for s, m in gpu.items()}
                for s, t in interleaved(calls, rounds).items():
                    rows[s][f"{label}_images_per_s"] = batch / t
    base = rows["none"]
    for row in rows.values():
        for key in [k for k in row if k.endswith("_images_per_s")]:
            row[key.replace("_images_per_s", "_speedup")] = row[key] / base[key]
        if int8:  # INT8 against fp32: of this schedule, and of the unpruned model (both speed-ups at once)
            row["int8_over_fp32"] = row["ort_cpu_int8_images_per_s"] / row["ort_cpu_images_per_s"]
            row["int8_combined_speedup"] = row["ort_cpu_int8_images_per_s"] / base["ort_cpu_images_per_s"]
    return {"model": name, "source_name": arch.source_name, "batch": batch, "rows": list(rows.values())}


def markdown(result: dict) -> str:
    backends = [k[:-len("_images_per_s")] for k in result["rows"][0] if k.endswith("_images_per_s")]
    names = {"eager_cpu": "eager CPU", "ort_cpu": "ORT CPU", "ort_cpu_int8": "ORT CPU INT8",
             "eager_gpu": "eager GPU fp16", "compiled_gpu": "compiled GPU fp16"}
    header = ["schedule", "FLOPs ratio", "ideal speed-up"]
    for b in backends:
        header += [f"{names[b]} img/s", f"{names[b]} speed-up", f"{names[b]} / ideal"]
    header.append("selection share (ORT)")
    lines = [f"**{result['model']}** ({result['source_name']}), batch {result['batch']}",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        cells = [r["schedule"] if r["schedule"] != "calibrated" else f"calibrated ({r['spec'].split('/')[-1]})",
                 f"{r['flops_ratio']:.3f}", f"{1 / r['flops_ratio']:.2f}x"]
        for b in backends:
            cells += [f"{r[b + '_images_per_s']:.2f}", f"{r[b + '_speedup']:.2f}x",
                      f"{r[b + '_speedup'] * r['flops_ratio']:.2f}"]
        cells.append(f"{r['selection_share_ort']:.2%}")
        lines.append("| " + " | ".join(cells) + " |")
    if "int8_combined_speedup" in result["rows"][0]:
        lines += ["", "INT8 and pruning together (ORT CPU, one run): pruning's speed-up in fp32, INT8's on the "
                  "unpruned model, their product, and the measured INT8 pruned over fp32 unpruned",
                  "", "| schedule | FLOPs-ideal | pruning (fp32) | INT8 (unpruned) | product | INT8 pruned vs fp32 "
                  "unpruned | measured / product | INT8 pruned vs fp32 pruned | INT8 pruned vs INT8 unpruned |",
                  "|---|---|---|---|---|---|---|---|---|"]
        quant = result["rows"][0]["int8_over_fp32"]  # the unpruned row comes first
        for r in result["rows"]:
            product = r["ort_cpu_speedup"] * quant
            lines.append(f"| {r['schedule']} | {1 / r['flops_ratio']:.2f}x | {r['ort_cpu_speedup']:.2f}x | "
                         f"{quant:.2f}x | {product:.2f}x | {r['int8_combined_speedup']:.2f}x | "
                         f"{r['int8_combined_speedup'] / product:.2f} | {r['int8_over_fp32']:.2f}x | "
                         f"{r['ort_cpu_int8_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), dpi=120, squeeze=False)
    for axes, result in zip(panels[0], results):
        rows = sorted(result["rows"], key=lambda r: -r["mean_tokens"])
        tokens = [r["mean_tokens"] for r in rows]
        axes.plot(tokens, [1 / r["flops_ratio"] for r in rows], "--", color="gray", label="FLOPs-ideal speed-up")
        for key, label in (("eager_cpu", "eager CPU"), ("ort_cpu", "ONNX Runtime CPU"),
                           ("ort_cpu_int8", "ONNX Runtime CPU INT8 (vs INT8 unpruned)"),
                           ("eager_gpu", "eager GPU fp16"), ("compiled_gpu", "compiled GPU fp16")):
            if key + "_speedup" in rows[0]:
                axes.plot(tokens, [r[key + "_speedup"] for r in rows], "o-", label=label)
        for r in rows:
            axes.annotate(r["schedule"], (r["mean_tokens"], 1 / r["flops_ratio"]), textcoords="offset points",
                          xytext=(4, 6), fontsize=7)
        axes.set_xlabel("mean tokens per block (kept)")
        axes.set_ylabel("speed-up over unpruned")
        axes.set_title(f"{result['model']}, batch {result['batch']}", fontsize=10)
        axes.invert_xaxis()
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_b16,vit_h14")
    p.add_argument("--batches", default="8,4", help="batch per model (CPU)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--int8", action="store_true", help="also INT8 folders on ONNX Runtime CPU")
    p.add_argument("--float-keys", action="store_true", help="INT8 with the key projections float")
    p.add_argument("--output", type=Path, default=Path("bench"))
    args = p.parse_args()
    from skimage import data
    from PIL import Image

    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = []
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"):
            photos.append(work / f"{name}.png")
            Image.fromarray(getattr(data, name)()).convert("RGB").save(photos[-1])
        int8 = photo_crops(work / "calibration", 32, 224) if args.int8 else None
        for name, batch in zip(args.models.split(","), map(int, args.batches.split(","))):
            print(f"benchmarking {name} …", flush=True)
            results.append(bench_model(name, batch, args.rounds, photos, work, int8, args.float_keys or None))
    vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    machine = (f"{platform.machine()} ({'with' if vnni else 'without'} AVX-512 VNNI), {os.cpu_count()} cores, torch "
               f"{torch.__version__}, onnxruntime "
               f"{ort.__version__}" + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    int8_note = f" INT8{' with float key projections' if args.float_keys else ''}." if args.int8 else ""
    text = "\n\n".join([f"Medians of {args.rounds} interleaved rounds; {machine}.{int8_note}"]
                       + [markdown(r) for r in results])
    (args.output / "bench.md").write_text(text + "\n")
    (args.output / "bench.json").write_text(json.dumps({"machine": machine, "rounds": args.rounds,
                                                        "results": results}, indent=2))
    plot(results, args.output / "bench.png")
    print(text)


if __name__ == "__main__":
    main()
