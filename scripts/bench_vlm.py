"""SAINT in a LLaVA-shaped model: prefill and whole-generation latency, pruned against unpruned,
beside the FLOPs-ideal ratio (the README's VLM figures).

    python scripts/bench_vlm.py [--text-layers 16 --text-hidden 1024] [--new-tokens 32] [--rounds 3]

The model has random weights (latency does not depend on them): LLaVA-1.5's CLIP ViT-L/14-336
tower and projector at full size (the shipped llava-1.5-7b config) and a Llama language model
of --text-layers × --text-hidden (default 16 × 1024, a few minutes; the README's figures use
32 × 2048, LLaVA-1.5-7B's depth at half its width, since the 7 B model does not fit 23 GB in fp32).
Every mode shares one set of weights.
One prompt: 35 tokens before the image, 576 placeholders (as LLaVA's processor writes them), 20
after. Modes: unpruned; ViT-only with the released code's rule (degree375@19) and with early50;
LLM-only and hybrid with span50 over the reference's layers 7–16 of 32 scaled to the depth.

Prefill = one forward of the prompt with a cache (tower, projector, language model); generation =
`generate` of exactly --new-tokens greedy tokens. Rounds interleave the modes; medians. The ideal
ratio counts multiply-accumulates: tower blocks up to the feature layer, projector, decoder layers
(projections, MLP and attention over the tokens each layer holds), and for generation each decode
step's layers over its cache. Writes bench_vlm.json and bench_vlm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import saint_export as se
from saint_export import compat
from saint_export.adapters import hf_vision

compat.import_torchvision()
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

IMAGE_TOKEN, PAD = 32000, 32001
BEFORE, AFTER = 35, 20  # text tokens around the image


def build(text_layers: int, text_hidden: int, seed: int = 0) -> LlavaForConditionalGeneration:
    shipped = dict(hf_vision.checkpoints()["llava-1.5-7b"]["config"])
    vision = shipped.pop("vision_config")
    shipped.pop("text_config")
    shipped.pop("model_type")
    text = LlamaConfig(vocab_size=32064, hidden_size=text_hidden, intermediate_size=int(text_hidden * 11008 / 4096),
                       num_hidden_layers=text_layers, num_attention_heads=text_hidden // 128,
                       num_key_value_heads=text_hidden // 128, max_position_embeddings=4096, pad_token_id=PAD)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, **shipped)).eval()


def sharing_weights(base: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A second model on the same weight tensors (SAINT patches layers' classes and hooks, never
    weights), so that every mode fits in memory at once."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(base.config)
    model.load_state_dict(base.state_dict(), assign=True)
    buffers = dict(base.named_buffers())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffers[name]
    return model.eval()


def modes(text_layers: int) -> dict[str, tuple[str, str | None]]:
    first, last = round(7 * text_layers / 32), round(16 * text_layers / 32)
    llm = f"span50@{first}-{last}"
    return {"unpruned": ("none", None), "ViT-only degree375@19 (released rule)": ("degree375@19", None),
            "ViT-only early50": ("early50", None), f"LLM-only {llm}": ("none", llm),
            f"hybrid degree375@19 + {llm}": ("degree375@19", llm)}


def ideal_macs(model, keep: str, llm: str | None, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(prefill MACs, whole-generation MACs) of `model` under the two schedules."""
    schedule = se.resolve_schedule(keep, model)
    tower = schedule.macs()
    c = model.config.vision_config.hidden_size
    original, kept = hf_vision.image_token_counts(model, sum(schedule.drops))
    d = model.config.text_config.hidden_size
    projector = kept * (c * d + d * d)
    layers = model.config.text_config.num_hidden_layers
    image = se.resolve_llm_schedule(llm, model, schedule).counts()[:layers] if llm else [kept] * layers
    text = prompt_len - original  # the prompt's other tokens
    i = model.config.text_config.intermediate_size
    per_token = 4 * d * d + 3 * d * i  # q, k, v, o and the gated MLP (as many key/value heads as query heads)
    prefill = tower + projector + sum((n + text) * per_token + 2 * (n + text) ** 2 * d for n in image)
    decode = sum(per_token + 2 * (n + text + step) * d for step in range(1, new_tokens) for n in image)
    return prefill, prefill + decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=16)
    parser.add_argument("--text-hidden", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    ids = torch.tensor([[1] + [100 + t for t in range(BEFORE - 1)] + [IMAGE_TOKEN] * 576
                        + [200 + t for t in range(AFTER)]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))}
    models, calls = {}, {}
    base = build(args.text_layers, args.text_hidden)
    for name, (keep, llm) in modes(args.text_layers).items():
        models[name] = se.apply(sharing_weights(base), keep, llm_schedule=llm)
        model = models[name]
        calls[(name, "prefill")] = lambda m=model: m(**inputs, use_cache=True, logits_to_keep=1)
        calls[(name, "generate")] = lambda m=model: m.generate(**inputs, max_new_tokens=args.new_tokens,
                                                               min_new_tokens=args.new_tokens, do_sample=False)
    for fn in calls.values():  # warm-up
        fn()
    samples = {key: [] for key in calls}
    for round_ in range(args.rounds):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - t0)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    median = {key: statistics.median(s) for key, s in samples.items()}

    rows = []
    base_macs = ideal_macs(models["unpruned"], "none", None, ids.shape[1], args.new_tokens)
    for name, (keep, llm) in modes(args.text_layers).items():
        macs = ideal_macs(models[name], keep, llm, ids.shape[1], args.new_tokens)
        rows.append({"mode": name, "keep_schedule": keep, "llm_schedule": llm,
                     "prefill_s": median[(name, "prefill")], "generate_s": median[(name, "generate")],
                     "prefill_speedup": median[("unpruned", "prefill")] / median[(name, "prefill")],
                     "prefill_ideal": base_macs[0] / macs[0],
                     "generate_speedup": median[("unpruned", "generate")] / median[(name, "generate")],
                     "generate_ideal": base_macs[1] / macs[1]})
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"(eager fp32, {torch.get_num_threads()} threads)")
    params = sum(p.numel() for p in models["unpruned"].parameters()) / 1e6
    header = (f"LLaVA-shaped random model: CLIP ViT-L/14-336 tower + Llama {args.text_layers} × {args.text_hidden} "
              f"({params:.0f} M parameters), prompt {ids.shape[1]} tokens (576 image), {args.new_tokens} new tokens, "
              f"batch 1; {machine}; medians of {args.rounds} interleaved rounds")
    lines = [header, "", "| mode | prefill s | speed-up | ideal | generate s | speed-up | ideal |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['mode']} | {r['prefill_s']:.2f} | {r['prefill_speedup']:.2f}x | {r['prefill_ideal']:.2f}x | "
              f"{r['generate_s']:.2f} | {r['generate_speedup']:.2f}x | {r['generate_ideal']:.2f}x |" for r in rows]
    print("\n".join(lines))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench_vlm.md").write_text("\n".join(lines) + "\n")
    (args.output / "bench_vlm.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
