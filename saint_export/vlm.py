"""LLaVA with a pruned vision tower (ViT-only mode): prompts written the usual way keep working.

LLaVA's processor writes one image placeholder per original patch (576 for LLaVA-1.5), and
transformers checks that the placeholders match the image features. A pruned tower returns K < n
features per image, so each run of n placeholders is cut to its first K before the model sees
it (the rows are padded again on their own side). A prompt that already holds K placeholders
per image is left as it is, so both give exactly the same result.

`install(model, kept)` does this for `forward` (a pre-hook) and for `generate` (an instance-level
wrapper, because `generate` derives positions and masks from the prompt before the first
forward); `generate` returns the caller's original prompt followed by the new tokens.
"""
from __future__ import annotations

import functools

import torch

from .errors import InputError


@torch.no_grad()
def fit_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: int, image_token: int,
               original: int, kept: int, pad_token: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut each image's `original` placeholders to its first `kept` when the prompt holds
    `original` per image; leave a prompt with `kept` per image alone. Returns ids and mask, padded
    again on the side the input was padded on."""
    is_image = input_ids == image_token
    total = int(is_image.sum())
    if total == images * kept:
        return input_ids, attention_mask
    if total != images * original:
        raise InputError(f"the prompts hold {total} image placeholders for {images} images: expected {original} "
                         f"per image (the processor's count) or {kept} (the pruned tower's)")
    # Within the placeholders of a row, position p belongs to image p // original (images are
    # written in order); the first `kept` of each image stay.
    rank = is_image.cumsum(1) - 1
    keep = ~is_image | (rank % original < kept)
    left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    rows = [input_ids[r][keep[r]] for r in range(len(input_ids))]
    masks = [attention_mask[r][keep[r]] for r in range(len(input_ids))] if attention_mask is not None else None
    width = max(len(row) for row in rows)
    if masks is None and any(len(row) != width for row in rows):  # rows now differ: a mask is needed
        masks, left = [torch.ones_like(row) for row in rows], True

    def pad(items, value):
        out = torch.full((len(items), width), value, dtype=items[0].dtype, device=items[0].device)
        for i, item in enumerate(items):
            if left:
                out[i, width - len(item):] = item
            else:
                out[i, :len(item)] = item
        return out

    return pad(rows, pad_token), (pad(masks, 0) if masks is not None else None)


def install(model, original: int, kept: int) -> None:
    """Make `model` (LlavaForConditionalGeneration or LlavaModel) accept prompts with `original`
    placeholders per image while its tower returns `kept` features."""
    if original == kept:
        return
    config = model.config
    image_token = config.image_token_id
    text = getattr(config, "text_config", config)
    pad_token = getattr(text, "pad_token_id", None)
    pad_token = 0 if pad_token is None else pad_token
    fit = functools.partial(fit_prompt, image_token=image_token, original=original, kept=kept, pad_token=pad_token)

    def forward_pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pixels = kwargs.get("pixel_values")
        if ids is None or pixels is None or ids.shape[1] == 1:
            return None  # decoding steps, text-only calls, features passed in
        new_ids, new_mask = fit(ids, kwargs.get("attention_mask"), len(pixels))
        if new_ids is ids:
            return None
        if kwargs.get("position_ids") is not None or kwargs.get("labels") is not None:
            raise InputError("prompts with the processor's placeholder count cannot be combined with explicit "
                             "position_ids or labels; write the pruned tower's count of placeholders instead")
        kwargs = {**kwargs, "input_ids": new_ids, "attention_mask": new_mask}
        return args[1:] if args else args, kwargs

    model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True)
    if hasattr(model, "generate"):
        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(input_ids=None, attention_mask=None, **kwargs):
            pixels = kwargs.get("pixel_values")
            if input_ids is None or pixels is None:
                return original_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            new_ids, new_mask = fit(input_ids, attention_mask, len(pixels))
            out = original_generate(input_ids=new_ids, attention_mask=new_mask, **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            restored = torch.cat([input_ids, sequences[:, new_ids.shape[1]:]], 1)
            if isinstance(out, torch.Tensor):
                return restored
            out.sequences = restored
            return out

        model.generate = generate
