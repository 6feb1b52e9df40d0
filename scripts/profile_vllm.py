"""Where a LLaVA request's time to first token goes inside vLLM, unpruned against SAINT schedules:
the tower's attention and MLPs, SAINT's scoring and gathers, the projector, the language model's
prefill, and the rest of the request (image decoding and processing, scheduling, sampling), each
beside its FLOPs-ideal ratio. It explains the gap between scripts/bench_vllm.py's TTFT ratio and
the ideal. Runs in vLLM's environment:

    .venv-vllm/bin/python scripts/profile_vllm.py [--schedules none early50 ...] [--requests 5]

The model is bench_vllm.py's LLaVA (full CLIP ViT-L/14-336 tower, Llama 12 × 2048, random weights,
bf16). Each schedule runs in a process of its own with vLLM's engine in that process (no engine
worker), so timers on the model's modules see every step; prefix and image caching are off. Times
are medians over --requests single requests (each one image of its own and one new token), after
a warm-up. Writes profile_vllm.json and .md under --output.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests" / "vllm_plugin")]

PARTS = ("request", "tower", "tower attention", "tower MLPs", "SAINT scoring", "tower rest", "projector",
         "LM prefill", "outside the model")


def timed(store: dict, name: str, function):
    """`function`, adding its wall time to store[name] (the CPU runs every op synchronously)."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            store[name] += time.perf_counter() - start
    return wrapper


def install_timers(model) -> None:
    """Timers on the parts of vLLM's LLaVA model (run through LLM.apply_model, in the engine)."""
    store = model.saint_profile = collections.defaultdict(float)
    model._image_pixels_to_features = timed(store, "tower", model._image_pixels_to_features)
    for layer in model.vision_tower.vision_model.encoder.layers:
        layer.self_attn.forward = timed(store, "tower attention", layer.self_attn.forward)
        layer.mlp.forward = timed(store, "tower MLPs", layer.mlp.forward)
    for block, dropper in getattr(model, "saint_droppers", {}).items():
        model.saint_droppers[block] = timed(store, "SAINT scoring", dropper)
    model.multi_modal_projector.forward = timed(store, "projector", model.multi_modal_projector.forward)
    decoder = model.language_model.model  # what LLaVA's forward calls
    language_model = decoder.forward

    def prefill_timer(*args, **kwargs):  # decode steps (one token) are not part of the prefill
        start = time.perf_counter()
        out = language_model(*args, **kwargs)
        tokens = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        count = (embeds if embeds is not None else tokens).shape[0]
        if count > 1:
            store["LM prefill"] += time.perf_counter() - start
        return out
    decoder.forward = prefill_timer


def take_profile(model) -> dict:
    profile = dict(model.saint_profile)
    model.saint_profile.clear()
    return profile


def child(args) -> None:
    """One schedule's engine in this process: per-request part times as JSON on stdout's last line."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    import bench_vllm
    from vllm import LLM, SamplingParams

    import saint_export.vllm as saint_vllm

    overrides = {} if args.child == "none" else saint_vllm.overrides(args.child)
    llm = LLM(model=str(args.folder), dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False, mm_processor_cache_gb=0,
              hf_overrides=overrides)
    llm.apply_model(install_timers)
    one_token = SamplingParams(max_tokens=1, temperature=0)
    samples, prompt = collections.defaultdict(list), None
    for request in range(args.requests + 1):  # the first is a warm-up
        llm.apply_model(take_profile)
        start = time.perf_counter()
        out = llm.chat(bench_vllm.messages(1000 + request, (336, 336)), one_token, use_tqdm=False)
        wall = time.perf_counter() - start
        profile = llm.apply_model(take_profile)[0]
        prompt = len(out[0].prompt_token_ids)
        if request == 0:
            continue
        profile["request"] = wall
        profile["tower rest"] = (profile.get("tower", 0) - profile.get("tower attention", 0)
                                 - profile.get("tower MLPs", 0) - profile.get("SAINT scoring", 0))
        profile["outside the model"] = wall - profile.get("tower", 0) - profile.get("projector", 0) - profile[
            "LM prefill"]
        for part in PARTS:
            samples[part].append(profile.get(part, 0.0))
    print(json.dumps({"prompt": prompt, "median": {p: statistics.median(v) for p, v in samples.items()}}))


def ideal_parts(folder: Path, schedule: str, prompt_none: int) -> dict:
    """MACs of the tower, the projector and the language model's prefill under `schedule`."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    import bench_vlm
    import saint_export as se
    from saint_export.adapters import hf_vision

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(folder))
    resolved = se.resolve_schedule(schedule, model)
    original, kept = hf_vision.image_token_counts(model, sum(resolved.drops))
    c, d = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    layers = model.config.text_config.num_hidden_layers
    prefill, _ = bench_vlm.decoder_macs(model.config.text_config, [kept] * layers, prompt_none - original, 0)
    tower = resolved.macs()
    return {"tower": tower, "projector": kept * (c * d + d * d), "LM prefill": prefill,
            "request": tower + kept * (c * d + d * d) + prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", nargs="+", default=["none", "degree375@19", "early50"])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import bench_vllm

    schedules = ["none"] + [s for s in args.schedules if s != "none"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench_vllm.llava_checkpoint(Path(tmp) / "model", None, None)
        for schedule in schedules:
            run = subprocess.run([sys.executable, __file__, "--child", schedule, "--folder", str(folder),
                                  "--requests", str(args.requests)], capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"the {schedule} engine failed:\n{run.stderr[-3000:]}")
            results[schedule] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{schedule}: {results[schedule]}", flush=True)
        ideal = {s: ideal_parts(folder, s, results["none"]["prompt"]) for s in schedules}
    import torch
    import vllm

    base = results["none"]["median"]
    header = (f"Where LLaVA's TTFT goes in vLLM (bench_vllm.py's LLaVA model, 336 × 336 image, one new token); "
              f"{platform.machine()}, {os.cpu_count()} cores, no GPU, vllm-cpu {vllm.__version__}, torch "
              f"{torch.__version__}; medians of {args.requests} requests, ms; speed-up against none, ideal = MAC ratio")
    lines = [header, "", "| part | " + " | ".join(schedules) + " | " + " | ".join(
        f"{s} speed-up | ideal" for s in schedules[1:]) + " |",
             "| --- |" + " ---: |" * (len(schedules) + 2 * (len(schedules) - 1))]
    for part in PARTS:
        cells = [f"{1000 * results[s]['median'][part]:.0f}" for s in schedules]
        for s in schedules[1:]:
            now = results[s]["median"][part]
            cells.append(f"{base[part] / now:.2f}x" if now > 0 and base[part] > 0 else "–")
            cells.append(f"{ideal['none'][part] / ideal[s][part]:.2f}x" if part in ideal[s] else "–")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "profile_vllm.md").write_text("\n".join(lines) + "\n")
    (args.output / "profile_vllm.json").write_text(json.dumps({"setup": header, "results": results, "ideal_macs": ideal},
                                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
