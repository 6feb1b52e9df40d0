"""Tiny random LLaVA-NeXT and LLaVA-OneVision (no hub), and prompts for them: two images whose sizes
pick different crop grids (1 × 2 and 2 × 2 high-resolution crops), left-padded rows."""
import torch

from saint_export import compat

compat.import_torchvision()  # before transformers' image utilities (CPU torch, CUDA torchvision)

from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,  # noqa: E402
                          LlavaOnevisionForConditionalGeneration)

IMAGE, PAD = 100, 0
FAMILIES = ("llava-next", "llava-onevision")
SIZES = ((30, 70), (60, 60))  # (H, W): best grids 32 × 64 (1 × 2 crops) and 64 × 64 (2 × 2 crops)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=2, image_size=32,
             patch_size=4)  # 8 × 8 = 64 patches per crop
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, pad_token_id=PAD)
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build(family="llava-next", seed=0):
    torch.manual_seed(seed)
    if family == "llava-onevision":  # SigLIP (no class token), all of the last layer's tokens
        config = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **TOWER),
                                      text_config=dict(model_type="qwen2", **TEXT), image_token_index=IMAGE,
                                      image_grid_pinpoints=PINPOINTS)
        model = LlavaOnevisionForConditionalGeneration(config)
    else:  # CLIP, the second-last layer without its class token
        config = LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", **TOWER),
                                 text_config=dict(model_type="llama", **TEXT), image_token_index=IMAGE,
                                 image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def crops(seed=1):
    """[2 images, 5 crops (the first image's last 2 are padding), 3, 32, 32], flat 8-px regions plus noise."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(2, 5, 3, 4, 4, generator=g).repeat_interleave(8, 3).repeat_interleave(8, 4)
    return blocks + 0.05 * torch.randn(2, 5, 3, 32, 32, generator=g)


def inputs(family="llava-next", seed=1, texts=((3, 4), (5, 2))):
    """Processor-style inputs: one image per row with transformers' own count of placeholders
    (unpadded, with newlines), rows left-padded."""
    pixel_values, sizes = crops(seed), torch.tensor(SIZES)
    model = build(family)
    with torch.no_grad():
        counts = [len(f) for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = [[5 + t % 90 for t in range(a)] + [IMAGE] * n + list(range(40, 40 + b)) for (a, b), n in zip(texts, counts)]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=sizes)
