"""CPU throughput: unpruned vs SAINT schedules, eager PyTorch and ONNX Runtime, side by side.

    python scripts/bench_cpu.py [--model vit_b16] [--batch 8] [--schedules none,early50,early25] [--repeats 7]

Random weights (throughput does not depend on them). Every configuration is timed in rounds that
interleave the schedules, so drift on a shared machine hits all of them alike; medians are
reported. The selection operator's share comes from ONNX Runtime's profiler: the time of the
nodes inlined from saint::SimilarityTopK over the time of all nodes (the GatherElements that
then moves the tokens is reported beside it).
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

import torch

import saint_export as se
import saint_export.runtime as rt
from saint_export import models


def time_call(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def selection_share(path: Path, x, runs: int = 3) -> tuple[float, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, x)
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes) or 1
    # ONNX Runtime names the nodes it inlines from the local function _inlfunc_SimilarityTopK_*.
    selection = sum(e["dur"] for e in nodes if "SimilarityTopK" in e["name"])
    gather = sum(e["dur"] for e in nodes if e["args"].get("op_name") == "GatherElements")
    return selection / total, gather / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--schedules", default="none,early50,early25")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    arch = models.architecture(args.model)
    size = arch.info.img_size
    x = torch.randn(args.batch, 3, size, size)
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.schedules.split(","):
            # The exported folder, through the library; timing needs no gate, so the folder is unverified.
            folder = Path(tmp) / spec
            result = se.export(args.model, folder, weights="random",
                               config=se.ExportConfig(keep_schedule=spec, target="onnx", verify=False,
                                                      batch=args.batch))
            runner = rt.open(folder, "onnxruntime-cpu", allow_unverified=True)
            configs[spec] = {"model": se.apply(models.load(arch, "random"), spec), "runner": runner,
                             "path": folder / result.manifest.onnx["file"],
                             "flops_ratio": result.schedule.flops_ratio(), "eager": [], "onnxruntime": []}
        pixels = x.numpy()
        for _ in range(args.repeats):  # rounds interleave the schedules
            for c in configs.values():
                with torch.no_grad():
                    c["eager"] += time_call(lambda: c["model"](x), 1)
                c["onnxruntime"] += time_call(lambda: c["runner"].infer(pixels), 1)
        feed = {result.manifest.input.name: pixels}
        for spec, c in configs.items():
            c["selection_share"], c["gather_share"] = selection_share(c["path"], feed)

    base = configs[args.schedules.split(",")[0]]
    rows = []
    for spec, c in configs.items():
        row = {"schedule": spec, "flops_ratio": c["flops_ratio"], "ideal_speedup": 1 / c["flops_ratio"],
               "selection_share_onnxruntime": c["selection_share"],
               "token_gather_share_onnxruntime": c["gather_share"]}
        for backend in ("eager", "onnxruntime"):
            median = statistics.median(c[backend])
            row[f"{backend}_images_per_s"] = args.batch / median
            row[f"{backend}_speedup"] = statistics.median(base[backend]) / median
            row[f"{backend}_speedup_over_ideal"] = row[f"{backend}_speedup"] / row["ideal_speedup"]
        rows.append(row)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"{args.model} ({arch.source_name}), batch {args.batch}, medians of {args.repeats} rounds; {machine}")
    print(f"| schedule | FLOPs ratio | ideal speed-up | eager img/s | eager speed-up | ORT img/s | "
          f"ORT speed-up | ORT speed-up / ideal | selection operator share (ORT) | token gather share (ORT) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['flops_ratio']:.3f} | {r['ideal_speedup']:.2f}x | "
              f"{r['eager_images_per_s']:.1f} | {r['eager_speedup']:.2f}x | {r['onnxruntime_images_per_s']:.1f} | "
              f"{r['onnxruntime_speedup']:.2f}x | {r['onnxruntime_speedup_over_ideal']:.2f} | "
              f"{r['selection_share_onnxruntime']:.2%} | {r['token_gather_share_onnxruntime']:.2%} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "batch": args.batch, "machine": machine,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
