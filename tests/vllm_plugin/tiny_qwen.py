"""Tiny random Qwen2.5-VL and Qwen3-VL checkpoints that vLLM and transformers both load offline:
- Qwen2.5-VL: a 4-block tower with its windowed layout (full attention at blocks 1 and 3, 56-px
  windows of 2 × 2 merge groups, 14-px patches), a 2-layer Qwen2 language model with M-RoPE;
- Qwen3-VL: a 4-block full-attention tower with learned positions on a 4 × 4 table and DeepStack
  after blocks 1 and 2 (14-px patches, as the Qwen2.5 images), a 2-layer Qwen3 language model
  with interleaved M-RoPE;
each with a byte-level BPE tokenizer trained here with Qwen's special tokens, the image processor
(56 × 56 px up to 64 merged tokens) and a chat template."""
from __future__ import annotations

from pathlib import Path

import torch

import tiny_llava

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["user\nWhat is in this picture? assistant\na dog on a green lawn under the trees.",
          "Describe the photo, please. The river is wide and the boats are small and white.",
          "Which colours do you see? Red, yellow and a little blue near the top of the image."] * 20
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in this picture? Describe it, "
          "please.<|im_end|>\n<|im_start|>assistant\n")
# (height, width) in pixels: 8 × 8 patches (16 merge groups), tall 10 × 6 (15), wide 6 × 12 (18)
IMAGE_SIZES = [(112, 112), (140, 84), (84, 168)]


def images():
    """Images with flat regions (similar keys, so SAINT has something to choose), of IMAGE_SIZES."""
    return tiny_llava.flat_images(IMAGE_SIZES, 4)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


FAMILIES = ("qwen2.5-vl", "qwen3-vl")


def build(folder: Path, family: str = "qwen2.5-vl", seed: int = 0) -> Path:
    """Write the checkpoint (save_pretrained layout) of `family` to `folder` and return it."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    tokenizer = make_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    text = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=256, vocab_size=len(tokenizer), max_position_embeddings=1024,
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6])
    if family == "qwen3-vl":
        config = Qwen3VLConfig(
            vision_config=dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                               num_position_embeddings=16, deepstack_visual_indexes=[1, 2]),
            text_config=dict(text, head_dim=32, rope_parameters=dict(rope, mrope_interleaved=True)), **tokens)
    else:
        config = Qwen2_5_VLConfig(
            vision_config=dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                               fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, in_channels=3, tokens_per_second=2),
            text_config=dict(text, rope_parameters=rope), **tokens)
    torch.manual_seed(seed)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3-vl" else Qwen2_5_VLForConditionalGeneration
    model = tiny_llava.structured_weights(cls(config).eval())
    return save(model, tokenizer, folder)


def save(model, tokenizer, folder: Path, max_merged_tokens: int = 64) -> Path:
    """`model` (Qwen2.5-VL or Qwen3-VL, whose special token ids are `tokenizer`'s), the tokenizer
    and the processor (images from 56 × 56 px up to `max_merged_tokens` merged tokens), written as
    vLLM reads a checkpoint."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    folder = Path(folder)
    model.save_pretrained(folder)
    side = 2 * model.config.vision_config.patch_size  # one merged token's side in pixels
    size = {"shortest_edge": 4 * side * side, "longest_edge": side * side * max_merged_tokens}
    patches = dict(size=size, patch_size=side // 2, merge_size=2, temporal_patch_size=2)
    qwen3 = model.config.model_type == "qwen3_vl"
    processor, video = (Qwen3VLProcessor, Qwen3VLVideoProcessor) if qwen3 else (Qwen2_5_VLProcessor,
                                                                                  Qwen2VLVideoProcessor)
    processor(image_processor=Qwen2VLImageProcessor(**patches), tokenizer=tokenizer, video_processor=video(**patches),
              chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder
