"""Tiny random LLaVA-NeXT and LLaVA-OneVision checkpoints that vLLM and transformers both load
offline, with anyres geometry at a small scale: 32-px crops of 4-px patches (8 × 8 = 64 per crop;
CLIP adds a class token), pinpoints from 1 × 2 up to 4 × 4 crops, so images pick different grids
and the largest passes OneVision's anyres_max_9 (its features shrink). LLaVA-NeXT: CLIP, feature
layer -2 without the class token, a 2-layer Llama; LLaVA-OneVision: SigLIP, the last layer's
tokens, a 2-layer Qwen2. Byte-level BPE tokenizers trained here, the processors, a chat template."""
from __future__ import annotations

from pathlib import Path

import torch

import tiny_llava

FAMILIES = ("llava-next", "llava-onevision")
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [128, 128]]
CROP, PATCH = 32, 4
PROMPT = "USER: <image>\nWhat is in this picture? Describe it, please.\nASSISTANT:"
# (height, width): square 2 × 2 crops, tall 3 × 1, wide 1 × 3, and a photo-like 4:3 one at 4 × 4 (17 crops;
# OneVision shrinks its grid past anyres_max_9)
IMAGE_SIZES = [(60, 60), (90, 30), (30, 90), (400, 300)]


def images():
    """Images with flat regions (similar keys, so SAINT has something to choose), of IMAGE_SIZES."""
    return tiny_llava.flat_images(IMAGE_SIZES, 6)


def build(folder: Path, family: str = "llava-next", seed: int = 0) -> Path:
    """Write the checkpoint (save_pretrained layout) of `family` to `folder` and return it."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration)

    tokenizer = tiny_llava.make_tokenizer(extra_special=("<video>",))
    tokens = dict(image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2, image_size=CROP,
                 patch_size=PATCH)
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if family == "llava-onevision":
        config = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **tower),
                                      text_config=dict(model_type="qwen2", **text), vision_feature_layer=-1,
                                      vision_feature_select_strategy="full",
                                      video_token_index=tokenizer.convert_tokens_to_ids("<video>"), **tokens)
        cls = LlavaOnevisionForConditionalGeneration
    else:
        config = LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", **tower),
                                 text_config=dict(model_type="llama", **text), vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", **tokens)
        cls = LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    model = tiny_llava.structured_weights(cls(config).eval())
    return save(model, tokenizer, folder)


def save(model, tokenizer, folder: Path) -> Path:
    """`model` (LLaVA-NeXT or LLaVA-OneVision), `tokenizer` (tiny_llava's, with `<video>`) and the
    processor of the model's crop size, patch size and pinpoints, written as vLLM reads a
    checkpoint."""
    from transformers import (LlavaNextImageProcessor, LlavaNextProcessor, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor)
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    config = model.config
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    if config.model_type == "llava_onevision":
        config.video_token_index = tokenizer.convert_tokens_to_ids("<video>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    tiny_llava._hub_layout(folder)
    crop, patch, pinpoints = (config.vision_config.image_size, config.vision_config.patch_size,
                              config.image_grid_pinpoints)
    common = dict(tokenizer=tokenizer, chat_template=tiny_llava.CHAT_TEMPLATE,
                  vision_feature_select_strategy=config.vision_feature_select_strategy)
    if config.model_type == "llava_onevision":
        size = {"height": crop, "width": crop}
        LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
                                video_processor=LlavaOnevisionVideoProcessor(size=size),
                                num_image_tokens=(crop // patch) ** 2, **common).save_pretrained(folder)
    else:
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": crop}, image_grid_pinpoints=pinpoints,
                                                  crop_size={"height": crop, "width": crop})
        LlavaNextProcessor(image_processor=image_processor, patch_size=patch, num_additional_image_tokens=1,
                           **common).save_pretrained(folder)
    return folder
