"""A bounded, loopback-only load test of `saint-export serve` (the README's serving table).

    python scripts/load_test.py engines/vit_b16-early50 [--seconds 8] [--concurrency 1,4,8,16]

It serves the folder itself (saint_export.serving.Service on 127.0.0.1, free ports), so it cannot
load anything but this machine. For each protocol (HTTP, gRPC) and concurrency level, N client
threads run a closed loop (send one request, wait for its answer, send the next) until the level's
time or request budget is spent. Reported per level: throughput, client-side p50/p90/p99 latency,
Triton's own per-request queue and compute times, the average executed batch and the batch-size
histogram (from the statistics API, as deltas over the level), and failures. Every request must
succeed, and Triton must count exactly the inferences the clients completed, or the script exits 1.

Beside it, the same folder run directly by saint_export.runtime (no server): one image per call,
and the batch profile's opt batch per call, so the cost of serving is visible.
perf_analyzer is not installable here (docs/serving.md), hence this script.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

import saint_export.runtime as rt
from saint_export import serving


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    import onnxruntime

    return f"{model}, {os.cpu_count()} cores, no GPU in use, onnxruntime {onnxruntime.__version__}"


def client_module(protocol: str):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    return {"http": http, "grpc": grpc}[protocol]


def server_stats(service) -> dict:
    import tritonclient.grpc as grpc

    stats = grpc.InferenceServerClient(service.grpc_url).get_inference_statistics(service.model_name, as_json=True)
    model = stats["model_stats"][0]
    inference = model["inference_stats"]
    ns = {key: int(inference[key].get("ns", 0)) for key in ("queue", "compute_input", "compute_infer",
                                                            "compute_output")}
    return {"inferences": int(model.get("inference_count", 0)), "executions": int(model.get("execution_count", 0)),
            "requests": int(inference["success"].get("count", 0)), **ns,
            "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])}}


def settled_stats(service, timeout: float = 3.0) -> dict:
    """Statistics once they stop moving: Triton updates them just after it sends a response, so a
    client can hold its answer a moment before the server has counted it."""
    previous, deadline = server_stats(service), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = server_stats(service)
        if current["inferences"] == previous["inferences"]:
            return current
        previous = current
    return previous


def run_level(service, protocol: str, clients: int, x: np.ndarray, seconds: float, max_requests: int) -> dict:
    module = client_module(protocol)
    url = service.http_url if protocol == "http" else service.grpc_url
    latencies, failures, lock = [], [], threading.Lock()
    budget = iter(range(max_requests))
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client() -> None:
        connection = module.InferenceServerClient(url)
        request = module.InferInput(service.manifest.input.name, list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        start.wait()
        while time.perf_counter() < deadline[0]:
            with lock:
                if next(budget, None) is None:
                    return
            t0 = time.perf_counter()
            try:
                connection.infer(service.model_name, [request])
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001  (every failure is counted and reported)
                with lock:
                    failures.append(str(err).splitlines()[0])

    before = settled_stats(service)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    after = settled_stats(service)
    requests = after["requests"] - before["requests"]
    batches = {size: after["batches"][size] - before["batches"].get(size, 0) for size in sorted(after["batches"])}
    batches = {size: count for size, count in batches.items() if count}
    executions = after["executions"] - before["executions"]
    per_request_ms = {key: (after[key] - before[key]) / max(requests, 1) / 1e6
                      for key in ("queue", "compute_input", "compute_infer", "compute_output")}
    ms = sorted(1e3 * s for s in latencies)
    return {"protocol": protocol, "clients": clients, "requests": len(latencies), "failed": len(failures),
            "failures": collections.Counter(failures).most_common(3),
            "server_inferences": after["inferences"] - before["inferences"],
            "images_per_s": len(latencies) * len(x) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)) if ms else None, "p90_ms": float(np.percentile(ms, 90)) if ms else None,
            "p99_ms": float(np.percentile(ms, 99)) if ms else None,
            "queue_ms": per_request_ms["queue"],
            "compute_ms": per_request_ms["compute_input"] + per_request_ms["compute_infer"]
            + per_request_ms["compute_output"],
            "average_batch": (after["inferences"] - before["inferences"]) / max(executions, 1),
            "batches": batches}


def direct(folder: Path, x: np.ndarray, batch: int, seconds: float, threads: int | None) -> float:
    """Images per second of the runtime itself, one call at a time, median over 1-second windows."""
    with rt.open(folder, "onnxruntime-cpu", threads=threads) as runner:
        feed = np.repeat(x, batch, axis=0)
        runner.infer(feed)
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                runner.infer(feed)
                count += 1
            rates.append(count * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def markdown(results: list[dict], direct_rates: dict[int, float]) -> str:
    lines = ["| protocol | clients | images/s | p50 ms | p90 ms | p99 ms | server queue ms | server compute ms | "
             "avg batch | batch histogram | failed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        histogram = " ".join(f"{size}:{count}" for size, count in r["batches"].items())
        lines.append(f"| {r['protocol']} | {r['clients']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['queue_ms']:.1f} | {r['compute_ms']:.1f} | "
                     f"{r['average_batch']:.2f} | {histogram} | {r['failed']} |")
    lines.append("")
    lines += [f"Direct runtime (no server, ONNX Runtime CPU), batch {batch}: {rate:.1f} images/s"
              for batch, rate in direct_rates.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--seconds", type=float, default=8.0, help="per level (default 8)")
    parser.add_argument("--max-requests", type=int, default=5000, help="per level (default 5000)")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--max-queue-delay-us", type=int, default=serving.configs.DEFAULT_QUEUE_DELAY_US)
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per instance")
    parser.add_argument("--output", type=Path, help="write load_test.json and load_test.md here")
    args = parser.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    with serving.Service(args.folder, http_port=serving.free_port(), grpc_port=serving.free_port(),
                         metrics_port=serving.free_port(), instances=args.instances,
                         queue_delay_us=args.max_queue_delay_us, threads=args.threads) as service:
        manifest = service.manifest
        x = np.random.default_rng(0).standard_normal((1, *manifest.input.shape[1:])).astype(np.float32)
        print(f"serving {args.folder} ({manifest.model['name']}, {manifest.keep_schedule['spec']}) on "
              f"{service.backend}; {machine()}", file=sys.stderr)
        results = []
        for protocol in protocols:
            for clients in levels:
                results.append(run_level(service, protocol, clients, x, args.seconds, args.max_requests))
                r = results[-1]
                print(f"  {protocol} × {clients}: {r['images_per_s']:.1f} images/s, p50 {r['p50_ms']:.1f} ms, "
                      f"{r['failed']} failed", file=sys.stderr)
    direct_rates = {batch: direct(args.folder, x, batch, min(args.seconds, 5.0), args.threads)
                    for batch in sorted({1, manifest.batch[1]})}
    text = (f"{args.folder.name}: {manifest.model['name']} {manifest.keep_schedule['spec']}, batch-1 requests, "
            f"{args.instances} instance(s), max queue delay {args.max_queue_delay_us} µs, {args.seconds:g} s per "
            f"level; {machine()}.\n\n" + markdown(results, direct_rates))
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "load_test.md").write_text(text + "\n")
        (args.output / "load_test.json").write_text(json.dumps({"machine": machine(), "results": results,
                                                                "direct": direct_rates}, indent=2) + "\n")
    lost = [r for r in results if r["failed"] or r["server_inferences"] != r["requests"]]
    for r in lost:
        print(f"{r['protocol']} × {r['clients']}: {r['failed']} failed ({r['failures']}), server counted "
              f"{r['server_inferences']} of {r['requests']} completed", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
