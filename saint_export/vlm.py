"""VLMs with a pruned vision tower (ViT-only mode): prompts written the usual way keep working.

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
               original: int, kept: int, pad_token: int, side: str = "left") -> list:
    """Cut each image's `original` placeholders to its first `kept` when the prompt holds
    `original` per image; leave a prompt with `kept` per image alone. Returns ids and mask, padded
    again on `side` (`padding_side`)."""
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
    return repack(keep, [(input_ids, pad_token), (attention_mask, 0)], side)


def padding_side(model, attention_mask: torch.Tensor | None) -> str:
    """The one rule for the side rows are padded on again once SAINT has removed columns: the side
    the caller stated (`apply(..., padding_side=…)`, e.g. the processor's tokenizer.padding_side),
    else the side the prompt is padded on, else left (generate continues from every row's last
    column, so rows that lose different counts must end together)."""
    stated = getattr(model, "saint_padding_side", None)
    if stated is not None:
        return stated
    if attention_mask is None:
        return "left"
    padding = attention_mask == 0
    left, right = bool(padding[:, 0].any()), bool(padding[:, -1].any())
    if left and right:
        raise InputError("the prompt rows are padded on both sides; pad them on one (left for generate), or pass "
                         "padding_side to saint_export.apply")
    return "right" if right else "left"


def repack(keep: torch.Tensor, columns: list, side: str) -> list:
    """Keep the columns `keep` [B, T] marks in each row of each (tensor [..., B, T], pad value) of
    `columns` (None passes through), padded again on `side` to the longest row. The second item is
    the attention mask: its padding goes too (the width is the longest real row), and when rows end
    up of different lengths without one, one is made."""
    mask = columns[1][0]
    if mask is not None:
        keep = keep & mask.bool()
    elif bool((keep.sum(1) != keep.sum(1).max()).any()):
        columns = [columns[0], (torch.ones_like(keep, dtype=torch.long), 0), *columns[2:]]
    index, pad = column_index(keep, side == "left")
    out = []
    for tensor, value in columns:
        if tensor is None:
            out.append(None)
            continue
        gathered = tensor.gather(-1, index.expand(*tensor.shape[:-2], -1, -1))
        out.append(gathered.masked_fill(pad, value))
    return out


def column_index(keep: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns `keep` [B, T] marks, row by row in order, padded to the longest row: (index
    [B, W], pad [B, W] True at the padding slots, which point at column 0)."""
    lengths = keep.sum(1)
    width = int(lengths.max())
    slots = torch.arange(width, device=keep.device).expand(len(keep), -1)
    pad = slots < (width - lengths)[:, None] if left else slots >= lengths[:, None]
    index = torch.zeros(len(keep), width, dtype=torch.long, device=keep.device)
    index[~pad] = keep.nonzero()[:, 1]
    return index, pad

def install(model, original: int, kept: int) -> None:
    """Make `model` (LlavaForConditionalGeneration or LlavaModel) accept prompts with `original`
    placeholders per image while its tower returns `kept` features."""
    if original == kept:
        return
    config = model.config
    text = getattr(config, "text_config", config)
    pad_token = getattr(text, "pad_token_id", None)
    fit = functools.partial(fit_prompt, image_token=config.image_token_id, original=original, kept=kept,
                            pad_token=0 if pad_token is None else pad_token)

    def fit_inputs(kwargs: dict) -> dict | None:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] == 1:
            return None  # decoding steps, features passed in
        mask = kwargs.get("attention_mask")
        new_ids, new_mask = fit(ids, mask, len(kwargs["pixel_values"]), side=padding_side(model, mask))
        if new_ids is ids:
            return None
        if kwargs.get("position_ids") is not None or kwargs.get("labels") is not None:
            raise InputError("prompts with the processor's placeholder count cannot be combined with explicit "
                             "position_ids or labels; write the pruned tower's count of placeholders instead")
        return {**kwargs, "input_ids": new_ids, "attention_mask": new_mask}

    install_input_fit(model, fit_inputs)


def install_input_fit(model, fit) -> None:
    """Rewrite the keyword arguments of `model`'s forward and generate calls that carry
    pixel_values with `fit(kwargs)` → new kwargs (None: leave them): a forward pre-hook, and an
    instance-level `generate` wrapper (generate derives positions and masks from the prompt
    before the first forward) that returns the caller's own prompt followed by the new tokens."""

    def forward_pre_hook(module, args, kwargs):
        if kwargs.get("pixel_values") is None:
            return None  # decoding steps, text-only calls, features passed in
        fitted = fit({"input_ids": args[0], **kwargs} if args else kwargs)
        return None if fitted is None else ((), fitted)

    model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True)
    if not hasattr(model, "generate"):
        return
    original_generate = model.generate

    @functools.wraps(original_generate)
    def generate(input_ids=None, **kwargs):
        fitted = None if kwargs.get("pixel_values") is None else fit({"input_ids": input_ids, **kwargs})
        if fitted is None:
            return original_generate(input_ids=input_ids, **kwargs)
        out = original_generate(**fitted)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        restored = torch.cat([input_ids, sequences[:, fitted["input_ids"].shape[1]:]], 1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out

    model.generate = generate
