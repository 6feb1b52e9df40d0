"""A tiny random LLaVA-1.5-shaped checkpoint that vLLM and transformers both load offline: CLIP
tower (112 px, patch 14: 64 patches + CLS, feature layer -2, 'default' selection), a 2-layer
Llama, a byte-level BPE tokenizer trained here with `<image>` as a special token, the processor
and a chat template."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
CORPUS = ["USER: What is in this picture? ASSISTANT: a cat on a red sofa near the window.",
          "Describe the image in detail, please. The sky is blue and the grass is green.",
          "How many objects are there? There are three apples and two oranges on the table."] * 20


def build(folder: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint to `folder` (save_pretrained layout vLLM reads) and return it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = make_tokenizer()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=112, patch_size=14, projection_dim=64)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=64)
    torch.manual_seed(seed)
    model = structured_weights(LlavaForConditionalGeneration(config).eval())
    return save(model, tokenizer, folder)


def structured_weights(model):
    """`model` with random matrices of some structure, so that tokens differ and generation varies."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    return model


def flat_images(sizes, cells: int) -> list:
    """Images of `sizes` (height, width) made of cells × cells flat regions plus noise (similar keys,
    so SAINT has something to choose)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for height, width in sizes:
        blocks = rng.integers(0, 255, (cells, cells, 3))
        base = np.kron(blocks, np.ones((height // cells + 1, width // cells + 1, 1)))[:height, :width]
        out.append(Image.fromarray((base + rng.integers(0, 30, (height, width, 3))).clip(0, 255).astype("uint8")))
    return out


def make_tokenizer(extra_special: tuple[str, ...] = ()):
    """A byte-level BPE trained on a small corpus, with `<image>` (and `extra_special`) as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def save(model, tokenizer, folder: Path) -> Path:
    """`model` (a LlavaForConditionalGeneration), `tokenizer` and a LLaVA processor for the model's
    tower, written to `folder` as vLLM reads a checkpoint."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    folder = Path(folder)
    model.config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.save_pretrained(folder)
    _hub_layout(folder)
    vision = model.config.vision_config
    side = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    return folder


def _hub_layout(folder: Path) -> None:
    """transformers 5.x saves the tower as `vision_tower.embeddings.*`; vLLM (and the hub's
    checkpoints) name it `vision_tower.vision_model.embeddings.*`. transformers reads both."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("model*.safetensors"):
        renamed = {}
        for key, value in load_file(path).items():
            for prefix in ("model.vision_tower.", "vision_tower."):
                if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                    key = prefix + "vision_model." + key[len(prefix):]
                    break
            renamed[key] = value
        save_file(renamed, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                              if "vision_tower." in k and "vision_model." not in k else k: v
                              for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
