"""The shipped configs' real geometry (crop and patch sizes, pinpoints, anyres_max, tower depth, window
sizes, full-attention blocks) with narrow widths and a short language model, random weights: what
users' image sizes do to token counts, packing, positions and speed, in seconds per test."""
import torch

from saint_export import compat

compat.import_torchvision()

from transformers import AutoConfig  # noqa: E402

from saint_export.adapters import hf_vision  # noqa: E402

NARROW_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
NARROW_TEXT = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
PAD, VOCAB = 0, 128
SPECIAL_TOKENS = dict(image_token_index=100, image_token_id=100, video_token_index=101, video_token_id=101,
                      vision_start_token_id=102, vision_end_token_id=103)


def config(alias: str, text_layers: int = 2, **vision):
    """`alias`'s shipped config with narrow widths (and `vision` overrides), `text_layers` decoder layers."""
    fields = dict(hf_vision.checkpoints()[alias]["config"])
    for key, token in SPECIAL_TOKENS.items():  # a small vocabulary: logits of long prompts stay small
        if key in fields:
            fields[key] = token
    vision_config = dict(fields.pop("vision_config"), **NARROW_VISION, **vision)
    if vision_config["model_type"].startswith("qwen"):
        vision_config["out_hidden_size"] = NARROW_TEXT["hidden_size"]
    text_config = dict(fields.pop("text_config"), **NARROW_TEXT, num_hidden_layers=text_layers,
                       vocab_size=VOCAB, pad_token_id=PAD)
    text_config.pop("head_dim", None)
    if "rope_parameters" in text_config:  # M-RoPE sections over the narrow head (12 = 2 · (2 + 2 + 2))
        text_config["rope_parameters"] = dict(text_config["rope_parameters"], mrope_section=[2, 2, 2])
    fields.pop("pad_token_id", None)
    return AutoConfig.for_model(fields.pop("model_type"), vision_config=vision_config, text_config=text_config,
                                **fields)


def build(alias: str, text_layers: int = 2, seed: int = 0, **vision):
    from transformers import (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)

    model_config = config(alias, text_layers, **vision)
    cls = {"llava_next": LlavaNextForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration,
           "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration}[model_config.model_type]
    torch.manual_seed(seed)
    model = cls(model_config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def anyres_inputs(model, sizes, texts=None, seed=1):
    """Processor-style anyres inputs for images of `sizes` (height, width): crops with flat regions,
    one image per row with the unpruned model's placeholder count, rows left-padded."""
    config = model.config
    crops = compat.anyres_crops(model, torch.tensor(sizes))
    counts = compat.anyres_token_counts(model, sizes, crops)
    side = config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    cells = side // 24 + 1
    pixel_values = torch.zeros(len(sizes), max(crops), 3, side, side)
    for image, n in enumerate(crops):
        blocks = torch.rand(n, 3, cells, cells, generator=g).repeat_interleave(24, 2).repeat_interleave(24, 3)
        pixel_values[image, :n] = blocks[..., :side, :side] + 0.05 * torch.randn(n, 3, side, side, generator=g)
    texts = texts or [(3 + i, 4) for i in range(len(sizes))]
    token = config.image_token_id
    rows = [list(range(5, 5 + a)) + [token] * n + list(range(40, 40 + b)) for (a, b), n in zip(texts, counts)]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=torch.tensor(sizes)), counts


def qwen_inputs(model, sizes, texts=None, seed=1):
    """Processor-style Qwen-VL inputs for images of `sizes` (height, width; multiples of the merged
    patch): flattened patches, t·h·w/4 placeholders per image between vision start and end, one
    image per row, rows left-padded."""
    from saint_export.adapters.qwen_vl import patchify

    config = model.config
    patch = config.vision_config.patch_size
    g = torch.Generator().manual_seed(seed)
    patches, grids, rows = [], [], []
    texts = texts or [(3 + i, 4) for i in range(len(sizes))]
    for (before, after), (h, w) in zip(texts, sizes):
        cells = torch.rand(3, h // (2 * patch) + 1, w // (2 * patch) + 1, generator=g)
        image = cells.repeat_interleave(2 * patch, 1).repeat_interleave(2 * patch, 2)[:, :h, :w]
        patches.append(patchify((image + 0.05 * torch.randn(3, h, w, generator=g))[None], config.vision_config)[0])
        grids.append([1, h // patch, w // patch])
        rows.append([5 + t % 90 for t in range(before)] + [config.vision_start_token_id]
                    + [config.image_token_id] * (h * w // (patch * patch * 4)) + [config.vision_end_token_id]
                    + [5 + t % 90 for t in range(after)])
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(patches), image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == config.image_token_id).int())


def decoder_widths(model):
    """Record the sequence width every decoder layer runs on, per forward: a list of lists."""
    seen = []

    def record(layer, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if compat.decoder_layer_index(layer) == 0:
            seen.append([])
        seen[-1].append(hidden.shape[1])

    for layer in compat.decoder_layers(model):
        layer.register_forward_pre_hook(record, with_kwargs=True)
    return seen
