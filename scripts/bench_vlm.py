"""SAINT in a LLaVA- or Qwen2.5-VL-shaped model: prefill and whole-generation latency, pruned against
unpruned, beside the FLOPs-ideal ratio (the README's VLM figures).

    python scripts/bench_vlm.py [--family llava|qwen2.5-vl] [--text-layers 16 --text-hidden 1024]
                                [--new-tokens 32] [--rounds 3]

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

--family qwen2.5-vl: Qwen2.5-VL-3B's tower and merger at full size (the shipped qwen2.5-vl-3b
config: 32 blocks, windowed except 7/15/23/31) and a Qwen2 language model of --text-layers ×
--text-hidden; one 448 × 448 image (32 × 32 patches, 256 merged tokens) with 35 text tokens
before and 20 after. Modes: unpruned, ViT-only early50 (groups dropped after blocks 7 and 15),
LLM-only and hybrid with span50. The tower's ideal counts patches (windowed attention within
its 64-patch windows) and the merger. Writes bench_vlm_qwen.json and .md.

--sizes: the sizes users feed these models, unpruned against early50 (anyres: and early25), with the peak
memory each run adds (the process's high-water mark, reset before each run):
- qwen2.5-vl: the tower alone (Qwen2.5-VL-3B's, full size) on square images of 448, 896 and 1344
  px: transformers' own tower unpruned, SAINT's pruned tower (windows attended per window over the
  survivors), both with the merger. Ideal: the tower blocks' MACs (KeepSchedule.flops_ratio:
  patches, windowed and full attention). Writes bench_vlm_qwen_sizes.json and .md.
- llava-onevision / llava-next: prefill (tower on every crop, projector, language model) of the
  shipped 0.5B OneVision (its 24 × 896 language model unless --text-layers/--text-hidden say
  otherwise) or LLaVA-NeXT-Mistral's tower with a Mistral-shaped --text-layers × --text-hidden
  language model, on photos of 640 × 480, 1920 × 1080 and 4000 × 3000; the image tokens the
  language model gets beside the unpruned count. Ideal: MACs of the crops' tower blocks, the
  projector and the decoder layers. Writes bench_vlm_<family>_sizes.json and .md.
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
from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          Qwen2_5_VLForConditionalGeneration)

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


def build_qwen(text_layers: int, text_hidden: int, seed: int = 0, checkpoint: str = "qwen2.5-vl-3b"):
    """`checkpoint`'s tower and mergers (Qwen3-VL: with DeepStack) at full size, its language model
    at `text_layers` × `text_hidden` (the shipped MLP ratio, 128-wide heads)."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    shipped = dict(hf_vision.checkpoints()[checkpoint]["config"])
    vision = dict(shipped.pop("vision_config"), out_hidden_size=text_hidden)
    text = dict(shipped.pop("text_config"))
    text.update(hidden_size=text_hidden, num_hidden_layers=text_layers,
                intermediate_size=int(text_hidden * text["intermediate_size"] / text["hidden_size"]),
                num_attention_heads=text_hidden // 128, num_key_value_heads=max(1, text_hidden // 1024))
    model_type = shipped.pop("model_type")
    cls = Qwen3VLForConditionalGeneration if model_type == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    return cls(AutoConfig.for_model(model_type, vision_config=vision, text_config=text, **shipped)).eval()


def sharing_weights(base):
    """A second model on the same weight tensors (SAINT patches layers' classes and hooks, never
    weights), so that every mode fits in memory at once."""
    with torch.device("meta"):
        model = type(base)(base.config)
    model.load_state_dict(base.state_dict(), assign=True)
    buffers = dict(base.named_buffers())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffers[name]
    return model.eval()


def modes(family: str, text_layers: int) -> dict[str, tuple[str, str | None]]:
    first, last = round(7 * text_layers / 32), round(16 * text_layers / 32)
    llm = f"span50@{first}-{last}"
    if family == "qwen2.5-vl":
        return {"unpruned": ("none", None), "ViT-only early50": ("early50", None), f"LLM-only {llm}": ("none", llm),
                f"hybrid early50 + {llm}": ("early50", llm)}
    return {"unpruned": ("none", None), "ViT-only degree375@19 (released rule)": ("degree375@19", None),
            "ViT-only early50": ("early50", None), f"LLM-only {llm}": ("none", llm),
            f"hybrid degree375@19 + {llm}": ("degree375@19", llm)}


def decoder_macs(text_config, image: list[int], text: int, new_tokens: int) -> tuple[float, float]:
    """(prefill, decode) MACs of the decoder layers holding image[l] image tokens and `text` others."""
    d, i = text_config.hidden_size, text_config.intermediate_size
    kv = text_config.num_key_value_heads * (d // text_config.num_attention_heads)
    per_token = 2 * d * d + 2 * d * kv + 3 * d * i  # q and o, k and v (grouped), the gated MLP
    prefill = sum((n + text) * per_token + 2 * (n + text) ** 2 * d for n in image)
    decode = sum(per_token + 2 * (n + text + step) * d for step in range(1, new_tokens) for n in image)
    return prefill, decode


def ideal_macs(model, keep: str, llm: str | None, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(prefill MACs, whole-generation MACs) of the LLaVA `model` under the two schedules."""
    schedule = se.resolve_schedule(keep, model)
    tower = schedule.macs()
    c = model.config.vision_config.hidden_size
    original, kept = hf_vision.image_token_counts(model, sum(schedule.drops))
    d = model.config.text_config.hidden_size
    projector = kept * (c * d + d * d)
    layers = model.config.text_config.num_hidden_layers
    image = se.resolve_llm_schedule(llm, model, schedule).counts()[:layers] if llm else [kept] * layers
    prefill, decode = decoder_macs(model.config.text_config, image, prompt_len - original, new_tokens)
    return tower + projector + prefill, tower + projector + prefill + decode


def qwen_ideal_macs(model, keep: str, llm: str | None, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """The same for Qwen2.5-VL: its tower's blocks as KeepSchedule counts them (patches, windowed
    and full attention), then the merger on the kept groups."""
    from saint_export.llm import LlmSchedule

    vision = model.config.vision_config
    schedule = se.resolve_schedule(keep, model)
    c = vision.hidden_size
    kept = schedule.patch_counts()[-1]
    merger = kept * (16 * c * c + 4 * c * vision.out_hidden_size)
    layers = model.config.text_config.num_hidden_layers
    image = LlmSchedule.parse(llm, layers, kept).counts()[:layers] if llm else [kept] * layers
    prefill, decode = decoder_macs(model.config.text_config, image, prompt_len - schedule.num_patches, new_tokens)
    return schedule.macs() + merger + prefill, schedule.macs() + merger + prefill + decode


def llava_inputs():
    ids = torch.tensor([[1] + [100 + t for t in range(BEFORE - 1)] + [IMAGE_TOKEN] * 576
                        + [200 + t for t in range(AFTER)]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))}


def qwen_inputs(model):
    from saint_export.adapters.qwen_vl import patchify

    config = model.config
    image = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[100 + t for t in range(BEFORE - 1)] + [config.vision_start_token_id]
                        + [config.image_token_id] * 256 + [config.vision_end_token_id]
                        + [200 + t for t in range(AFTER - 1)]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == config.image_token_id).int(),
            "pixel_values": patchify(image, config.vision_config)[0], "image_grid_thw": torch.tensor([[1, 32, 32]])}


# --- --sizes ------------------------------------------------------------------------------------

QWEN_SIZES = (448, 896, 1344)
PHOTOS = ((480, 640), (1080, 1920), (3000, 4000))  # (height, width)
ANYRES_ALIASES = {"llava-onevision": "llava-onevision-qwen2-0.5b", "llava-next": "llava-v1.6-mistral-7b"}


def peak_memory(fn) -> tuple[float, float]:
    """(seconds, MB the run added to the process's resident peak): the high-water mark is reset
    first (/proc/self/clear_refs, Linux)."""
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, status("VmHWM:") - before


def interleaved(calls: dict, rounds: int) -> dict:
    """Median seconds and largest added peak MB of each call over `rounds` interleaved rounds, after a warm-up."""
    for fn in calls.values():
        fn()
    samples = {key: [] for key in calls}
    for round_ in range(rounds):
        for key, fn in calls.items():
            samples[key].append(peak_memory(fn))
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    return {key: (statistics.median(t for t, _ in s), max(m for _, m in s)) for key, s in samples.items()}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(eager fp32, {torch.get_num_threads()} threads)")


def write(args, stem: str, header: str, columns: list[str], rows: list[dict], cells) -> None:
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" + " ---: |" * (len(columns) - 1)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    print("\n".join(lines))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.output / f"{stem}.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


def qwen_sizes(args) -> None:
    from saint_export.adapters import qwen_vl

    base = build_qwen(1, 2048)  # the tower and merger at full size; the language model is not run
    tower = compat.qwen_visual(base)
    pruned = {"early50": se.apply(sharing_weights(base), "early50")}  # early25 needs more than its 2 points
    calls, ideal = {}, {}
    for size in QWEN_SIZES:
        image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        patches = qwen_vl.patchify(image, base.config.vision_config)[0]
        grid = torch.tensor([[1, size // 14, size // 14]])
        calls[(size, "unpruned")] = lambda p=patches, g=grid: tower(p, grid_thw=g)
        ideal[(size, "unpruned")] = 1.0
        for keep, model in pruned.items():
            calls[(size, keep)] = lambda m=model, p=patches, g=grid: qwen_vl.image_features(m, p, g)
            qwen_vl.set_export_size(model, size)
            ideal[(size, keep)] = 1 / se.resolve_schedule(keep, model).flops_ratio()
    measured = interleaved(calls, args.rounds)
    rows = [{"size": size, "mode": mode, "seconds": measured[(size, mode)][0],
             "speedup": measured[(size, "unpruned")][0] / measured[(size, mode)][0], "ideal": ideal[(size, mode)],
             "peak_mb": measured[(size, mode)][1]} for size, mode in calls]
    header = (f"Qwen2.5-VL-3B's tower and merger (full size, random weights), one square image, batch 1; {machine()}; "
              f"medians of {args.rounds} interleaved rounds; peak MB = what one run adds to the resident peak")
    write(args, "bench_vlm_qwen_sizes", header,
          ["image", "mode", "tower s", "speed-up", "ideal", "of ideal", "peak MB"], rows,
          lambda r: [f"{r['size']} × {r['size']}", r["mode"], f"{r['seconds']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['ideal']:.2f}x", f"{r['speedup'] / r['ideal']:.2f}", f"{max(r['peak_mb'], 0):.0f}"])


def build_anyres(family: str, text_layers: int | None, text_hidden: int | None, seed: int = 0):
    from transformers import AutoConfig, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    fields = dict(hf_vision.checkpoints()[ANYRES_ALIASES[family]]["config"])
    text = dict(fields.pop("text_config"))
    if text_hidden:
        text.update(hidden_size=text_hidden, intermediate_size=int(text_hidden * text["intermediate_size"]
                                                                    / text["hidden_size"]),
                    num_attention_heads=text_hidden // 128, num_key_value_heads=max(1, text_hidden // 1024))
    if text_layers:
        text["num_hidden_layers"] = text_layers
    config = AutoConfig.for_model(fields.pop("model_type"), text_config=text, **fields)
    cls = LlavaOnevisionForConditionalGeneration if family == "llava-onevision" else LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    return cls(config).eval()


def anyres_photo(model, size: tuple[int, int]) -> dict:
    """One photo of `size` (height, width) as the processor gives it: its crops, its placeholders."""
    config = model.config
    crops = compat.anyres_crops(model, [list(size)])
    count, = compat.anyres_token_counts(model, [list(size)], crops)
    side = config.vision_config.image_size
    ids = torch.tensor([[100 + t for t in range(BEFORE)] + [config.image_token_id] * count
                        + [200 + t for t in range(AFTER)]])
    pixels = torch.randn(1, crops[0], 3, side, side, generator=torch.Generator().manual_seed(size[1]))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_sizes": torch.tensor([list(size)])}


def anyres_macs(model, keep: str, size) -> tuple[float, int]:
    """(prefill MACs, image tokens the language model gets) of one photo under `keep`."""
    from saint_export.adapters import llava_anyres

    crops, unpruned = llava_anyres._counts(model, size, None)
    schedule = llava_anyres.crop_schedule(model, keep, size)
    kept = unpruned if keep == "none" else crops * llava_anyres.tokens_per_crop(model, sum(schedule.drops))[1]
    c, d = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    projector = kept * (c * d + d * d)
    layers = model.config.text_config.num_hidden_layers
    prefill, _ = decoder_macs(model.config.text_config, [kept] * layers, BEFORE + AFTER, 1)
    return crops * schedule.macs() + projector + prefill, kept


def anyres_sizes(args) -> None:
    default = (None, None) if args.family == "llava-onevision" else (16, 1024)
    base = build_anyres(args.family, args.text_layers or default[0], args.text_hidden or default[1])
    models = {"none": base, **{keep: se.apply(sharing_weights(base), keep) for keep in ("early50", "early25")}}
    calls, facts = {}, {}
    for size in PHOTOS:
        photo = anyres_photo(base, size)
        for keep, model in models.items():
            calls[(size, keep)] = lambda m=model, x=photo: m(**x, use_cache=True, logits_to_keep=1)
            facts[(size, keep)] = anyres_macs(model, keep, size)
    measured = interleaved(calls, args.rounds)
    rows = []
    for size, keep in calls:
        macs, tokens = facts[(size, keep)]
        rows.append({"height": size[0], "width": size[1], "mode": "unpruned" if keep == "none" else keep,
                     "image_tokens": tokens, "unpruned_tokens": facts[(size, "none")][1],
                     "seconds": measured[(size, keep)][0], "peak_mb": measured[(size, keep)][1],
                     "speedup": measured[(size, "none")][0] / measured[(size, keep)][0],
                     "ideal": facts[(size, "none")][0] / macs})
    text = base.config.text_config
    params = sum(p.numel() for p in base.parameters()) / 1e6
    header = (f"{ANYRES_ALIASES[args.family]}'s tower and projector (full size) with a {text.num_hidden_layers} × "
              f"{text.hidden_size} language model ({params:.0f} M parameters, random weights), one photo, "
              f"{BEFORE + AFTER} text tokens, prefill at batch 1; {machine()}; medians of {args.rounds} interleaved "
              "rounds; peak MB = what one run adds to the resident peak")
    write(args, f"bench_vlm_{args.family}_sizes", header,
          ["photo", "mode", "image tokens", "saved", "prefill s", "speed-up", "ideal", "of ideal", "peak MB"], rows,
          lambda r: [f"{r['width']} × {r['height']}", r["mode"], f"{r['image_tokens']} of {r['unpruned_tokens']}",
                     f"{1 - r['image_tokens'] / r['unpruned_tokens']:.0%}", f"{r['seconds']:.2f}",
                     f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x", f"{r['speedup'] / r['ideal']:.2f}",
                     f"{max(r['peak_mb'], 0):.0f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("llava", "qwen2.5-vl", *ANYRES_ALIASES), default="llava")
    parser.add_argument("--sizes", action="store_true", help="the sizes users feed the model (see above)")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--text-hidden", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.sizes or args.family in ANYRES_ALIASES:
        if args.family == "llava":
            parser.error("--sizes takes --family qwen2.5-vl, llava-onevision or llava-next")
        return qwen_sizes(args) if args.family == "qwen2.5-vl" else anyres_sizes(args)
    args.text_layers, args.text_hidden = args.text_layers or 16, args.text_hidden or 1024

    qwen = args.family == "qwen2.5-vl"
    base = (build_qwen if qwen else build)(args.text_layers, args.text_hidden)
    inputs = qwen_inputs(base) if qwen else llava_inputs()
    ids = inputs["input_ids"]
    family_modes = modes(args.family, args.text_layers)
    models, calls = {}, {}
    for name, (keep, llm) in family_modes.items():
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
    macs_of = qwen_ideal_macs if qwen else ideal_macs
    base_macs = macs_of(models["unpruned"], "none", None, ids.shape[1], args.new_tokens)
    for name, (keep, llm) in family_modes.items():
        macs = macs_of(models[name], keep, llm, ids.shape[1], args.new_tokens)
        rows.append({"mode": name, "keep_schedule": keep, "llm_schedule": llm,
                     "prefill_s": median[(name, "prefill")], "generate_s": median[(name, "generate")],
                     "prefill_speedup": median[("unpruned", "prefill")] / median[(name, "prefill")],
                     "prefill_ideal": base_macs[0] / macs[0],
                     "generate_speedup": median[("unpruned", "generate")] / median[(name, "generate")],
                     "generate_ideal": base_macs[1] / macs[1]})
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"(eager fp32, {torch.get_num_threads()} threads)")
    params = sum(p.numel() for p in models["unpruned"].parameters()) / 1e6
    shape = ("Qwen2.5-VL-shaped random model: Qwen2.5-VL-3B's tower and merger + Qwen2 "
             if qwen else "LLaVA-shaped random model: CLIP ViT-L/14-336 tower + Llama ")
    image = "256 image, one 448 × 448 image" if qwen else "576 image"
    header = (f"{shape}{args.text_layers} × {args.text_hidden} ({params:.0f} M parameters), prompt {ids.shape[1]} "
              f"tokens ({image}), {args.new_tokens} new tokens, batch 1; {machine}; medians of {args.rounds} "
              "interleaved rounds")
    lines = [header, "", "| mode | prefill s | speed-up | ideal | generate s | speed-up | ideal |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['mode']} | {r['prefill_s']:.2f} | {r['prefill_speedup']:.2f}x | {r['prefill_ideal']:.2f}x | "
              f"{r['generate_s']:.2f} | {r['generate_speedup']:.2f}x | {r['generate_ideal']:.2f}x |" for r in rows]
    print("\n".join(lines))
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "bench_vlm_qwen" if qwen else "bench_vlm"
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.output / f"{stem}.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
