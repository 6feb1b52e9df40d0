"""Tiny random Qwen2.5-VL and Qwen3-VL (no hub) and prompts for them: two images of different sizes,
left-padded rows."""
import torch

from saint_export import compat

compat.import_torchvision()  # before transformers' image utilities (CPU torch, CUDA torchvision)

from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,  # noqa: E402
                          Qwen3VLForConditionalGeneration)

IMAGE, VIDEO, START, END, PAD = 190, 191, 192, 193, 0
SIZES = ((112, 112), (84, 140))  # patch grids 8 × 8 and 6 × 10: 16 and 15 merged tokens
FAMILIES = ("qwen2.5-vl", "qwen3-vl")
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def config(family="qwen2.5-vl"):
    if family == "qwen3-vl":  # full attention, learned positions on a 4 × 4 table, DeepStack after blocks 1 and 2
        return Qwen3VLConfig(
            vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=48,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                               num_position_embeddings=16, deepstack_visual_indexes=[1, 2]),
            text_config=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=12, intermediate_size=96, vocab_size=200, max_position_embeddings=512,
                             pad_token_id=PAD, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                    mrope_section=[2, 2, 2])),
            **TOKENS)
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=48,
                           fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        text_config=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=200, max_position_embeddings=512, pad_token_id=PAD,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2])),
        **TOKENS)


def build(family="qwen2.5-vl", seed=0):
    torch.manual_seed(seed)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3-vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(config(family)).eval()
    model.generation_config.pad_token_id = PAD
    return model


def images(sizes=SIZES, seed=1):
    """Images with flat 28-px regions (similar keys, so SAINT has something to drop) plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        blocks = torch.rand(3, h // 28 + 1, w // 28 + 1, generator=g).repeat_interleave(28, 1).repeat_interleave(28, 2)
        out.append(blocks[:, :h, :w] + 0.05 * torch.randn(3, h, w, generator=g))
    return out


def inputs(sizes=SIZES, seed=1, texts=((3, 4), (5, 2))):
    """Processor-style inputs: one image per row, t·h·w/4 placeholders each, rows left-padded."""
    from saint_export.adapters.qwen_vl import patchify

    model_config = config().vision_config
    patches, grids, rows = [], [], []
    for (before, after), image in zip(texts, images(sizes, seed)):
        flat = patchify(image[None], model_config)[0]
        t, h, w = 1, image.shape[1] // 14, image.shape[2] // 14
        patches.append(flat)
        grids.append([t, h, w])
        rows.append(list(range(5, 5 + before)) + [START] + [IMAGE] * (t * h * w // 4) + [END]
                    + list(range(40, 40 + after)))
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(patches),
                image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == IMAGE).int())


def first(batch_inputs, rows):
    """The first `rows` rows (and their images) of `inputs()`."""
    out = dict(batch_inputs)
    grids = batch_inputs["image_grid_thw"][:rows]
    out["pixel_values"] = batch_inputs["pixel_values"][:int(grids.prod(-1).sum())]
    out["image_grid_thw"] = grids
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = batch_inputs[key][:rows]
    keep = out["attention_mask"].bool().any(0)  # drop columns that are padding in every kept row
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = out[key][:, keep]
    return out


def mixed_inputs(family="qwen2.5-vl", seed=2):
    """Row 0: two images (8 × 8 and 6 × 10 patches) between text; row 1: a video of 2 × 8 × 8 patches
    (Qwen3-VL: a timestamp token before each frame, as its processor writes) and a third image
    (8 × 8); rows left-padded, mm_token_type_ids 1 at image and 2 at video placeholders."""
    from saint_export.adapters.qwen_vl import patchify

    model_config = config(family).vision_config
    a, b, c = (patchify(image[None], model_config)[0] for image in images(((112, 112), (84, 140), (112, 112)), seed))
    video = torch.randn(2 * 8 * 8, a.shape[1], generator=torch.Generator().manual_seed(seed))
    frame = [START] + [VIDEO] * 16 + [END]
    clip = ([70] + frame) * 2 if family == "qwen3-vl" else [START] + [VIDEO] * 32 + [END]
    rows = [[5, 6, START] + [IMAGE] * 16 + [END, 7, START] + [IMAGE] * 15 + [END, 8, 9],
            [5] + clip + [6, START] + [IMAGE] * 16 + [END, 7]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([a, b, c]),
                image_grid_thw=torch.tensor([[1, 8, 8], [1, 6, 10], [1, 8, 8]]), pixel_values_videos=video,
                video_grid_thw=torch.tensor([[2, 8, 8]]), mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int())
