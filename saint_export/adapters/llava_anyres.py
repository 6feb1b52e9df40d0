"""LLaVA-NeXT and LLaVA-OneVision (docs/vlm.md): SAINT in the tower of every anyres crop.

Their processors cut an image into a base crop (the whole image, resized) and high-resolution
crops picked from `image_grid_pinpoints` by `image_sizes`; the tower (CLIP for NeXT, SigLIP for
OneVision) runs on every crop. SAINT prunes each crop in the tower exactly as LLaVA-1.5's: the
same static per-crop budget for every crop, base included (hf_vision's encoder layers).

The unpruned model then stitches the high-resolution crops into one grid, unpads it to the
image's aspect ratio, adds a newline token after every grid row (and OneVision shrinks grids
above `anyres_max_9`); all of that assumes full grids. With a pruned tower an image's features
are instead (VisionZip's packing): the base crop's K survivors in raster order, then every
high-resolution survivor in raster order of the stitched grid; no unpadding, no newline tokens,
no shrinking: K × crops features per image. With the tower unpruned (LLM-only), transformers'
own packing stays, and the language model sees the newline tokens as image tokens.

Prompts are written as usual (the processor's unpruned count per image); the positions of these
language models are 1-D, so each image's run of placeholders is cut to its first K × crops.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import compat
from ..errors import InputError
from . import ModelInfo, hf_vision, unsupported

family = "transformers"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
POSITIONS_NAME = "image_positions"
MODEL_TYPES = ("llava_next", "llava_onevision")
PACKING = {"crops": "the same K per crop, base crop included", "order": "base crop first, then the high-resolution "
           "crops' survivors in raster order of the stitched grid", "unpad": "not applied", "newline": "none",
           "anyres_max": "not applied"}


def _classes():
    from transformers import (LlavaNextForConditionalGeneration, LlavaNextModel, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionModel)
    return LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, LlavaNextModel, LlavaOnevisionModel


def _name(config) -> str:
    return "LLaVA-OneVision" if config.model_type == "llava_onevision" else "LLaVA-NeXT"


def resolve_name(name: str) -> str | None:
    return hf_vision.resolve_name_of(name, MODEL_TYPES)


def known_names() -> list[str]:
    return hf_vision.known_names_of(MODEL_TYPES)


def create(source_name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    """The model with its language model on the meta device (no memory, no weights): exports need
    only the tower and the projector. Crops have the tower's fixed size."""
    config = hf_vision._config(source_name)
    compat.require_transformers(compat.VLM_FAMILIES_MIN, _name(config))
    cls = _classes()[MODEL_TYPES.index(config.model_type)]
    if img_size not in (None, config.vision_config.image_size):
        raise InputError(f"image size {img_size}: {source_name}'s crops are {config.vision_config.image_size} px "
                         "(its tower's position embeddings fix it)")
    return hf_vision.vision_parts_only(cls, config, source_name, pretrained)


load_checkpoint = hf_vision.load_checkpoint


def matches(model: torch.nn.Module) -> bool:
    try:
        return isinstance(model, _classes()) or (isinstance(model, hf_vision.ImageFeatures)
                                                 and getattr(model, "saint_anyres", False))
    except ImportError:
        return False


def _config(model):
    return model.saint_config if isinstance(model, hf_vision.ImageFeatures) else compat.llava_core(model).config


def describe(model: torch.nn.Module) -> ModelInfo:
    """One crop through the tower, up to the feature layer."""
    config = _config(model)
    return hf_vision._info(config.vision_config, hf_vision._llava_feature_depth(config, _name(config)))


def tokens_per_crop(model, dropped: int) -> tuple[int, int]:
    """Features per crop: (unpruned, after `dropped` tokens are gone)."""
    return hf_vision.llava_image_token_counts(_config(model), describe(model), dropped)


def patch(model: torch.nn.Module, droppers: dict) -> None:
    hf_vision.patch_tower(model, droppers)
    state = next(iter(droppers.values())).state if droppers else None
    if state is None:
        return  # unpruned: transformers' packing stays
    if state.schedule.drops is None:
        raise InputError(f"{_name(_config(model))} packs K features per crop: the dynamic keep schedule has no "
                         "fixed K; use early<P> (e.g. early50) or r:<r0>,<r1>,…")
    if not isinstance(model, _classes()[:2]):
        raise unsupported(f"{type(model).__name__} with a pruned tower (pass the ForConditionalGeneration model)")
    compat.require_transformers(compat.VLM_FAMILIES_MIN, _name(_config(model)))
    from ..vlm import install_input_fit

    model.saint_crop_tokens = tokens_per_crop(model, sum(state.schedule.drops))[1]
    install_input_fit(model, functools.partial(fit_inputs, model))


# --- features of a pruned tower ------------------------------------------------------------------

@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images=None) -> list:
    """Every image's features, packed as this module's docstring says: [K × crops_i, D_llm] each."""
    config = _config(model)
    crops = compat.anyres_crops(model, image_sizes, batch_num_images)
    if pixel_values.dim() == 5:  # [images, crops (padded), 3, S, S]
        pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)])
    if len(pixel_values) != sum(crops):
        raise InputError(f"pixel_values holds {len(pixel_values)} crops but image_sizes asks for {sum(crops)}")
    tower = hf_vision.ImageFeatures(model, track_positions=True)
    features, positions = tower(pixel_values.to(next(tower.parameters()).dtype))
    side = config.vision_config.image_size // config.vision_config.patch_size
    packed, start = [], 0
    for image, n in enumerate(crops):
        feats, where = features[start:start + n], positions[start:start + n]
        start += n
        if n == 1:
            packed.append(feats[0])
            continue
        rows, cols = compat.anyres_grid(model, image_sizes[image])
        if rows * cols != n - 1:
            raise InputError(f"image {image}: {n - 1} high-resolution crops, but its size asks for {rows} × {cols}")
        crop = torch.arange(n - 1, device=where.device)[:, None]
        row = (crop // cols) * side + where[1:] // side  # in the stitched grid
        col = (crop % cols) * side + where[1:] % side
        order = (row * cols * side + col).flatten().argsort()
        packed.append(torch.cat([feats[0], feats[1:].flatten(0, 1)[order]]))
    return packed


@torch.no_grad()
def fit_inputs(model, kwargs: dict) -> dict | None:
    """A forward or generate call with pixel_values, rewritten for the pruned tower: its packed
    features given as `mm_encoder_outputs`, each image's placeholders cut to their first K × crops."""
    from ..vlm import repack

    ids, mask, sizes = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("image_sizes")
    config = _config(model)
    if ids is None or sizes is None:
        raise InputError(f"{_name(config)} with a pruned tower needs input_ids and image_sizes beside pixel_values")
    if kwargs.get("position_ids") is not None or kwargs.get("labels") is not None:
        raise InputError("prompts with the processor's placeholder count cannot be combined with explicit "
                         "position_ids or labels")
    batch_images = kwargs.get("batch_num_images")
    original = compat.anyres_token_counts(model, sizes, batch_images)
    crops = compat.anyres_crops(model, sizes, batch_images)
    kept = [n * model.saint_crop_tokens for n in crops]
    is_image = ids == config.image_token_id
    if int(is_image.sum()) != sum(original):
        raise InputError(f"the prompts hold {int(is_image.sum())} image placeholders for {len(original)} images: "
                         f"expected {sum(original)} (the processor's count {original})")
    keep = ~is_image
    image = 0
    for row in range(len(ids)):  # images fill the rows' placeholders in order
        slots = is_image[row].nonzero()[:, 0]
        start = 0
        while start < len(slots):
            keep[row, slots[start:start + kept[image]]] = True
            start += original[image]
            image += 1
    features = image_features(model, kwargs["pixel_values"], sizes, batch_images)
    left = mask is not None and bool((mask[:, 0] == 0).any())
    pad = getattr(config.text_config, "pad_token_id", None) or 0
    ids, mask = repack(keep, [(ids, pad), (mask, 0)], left)
    rest = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "input_ids", "attention_mask")}
    return {**rest, "input_ids": ids, "attention_mask": mask, **compat.image_features_output(features)}


# --- export: one crop in, its features and their patch positions out ---------------------------------

def export_module(model: torch.nn.Module) -> torch.nn.Module:
    module = hf_vision.ImageFeatures(model, track_positions=True)
    module.saint_anyres, module.saint_config = True, _config(model)
    return module


def output_names(model: torch.nn.Module) -> tuple[str, ...]:
    return OUTPUT_NAME, POSITIONS_NAME


def features_record(model: torch.nn.Module, dropped: int) -> dict:
    config = _config(model)
    original, kept = tokens_per_crop(model, dropped)
    side = config.vision_config.image_size // config.vision_config.patch_size
    return {
        "tokens_per_crop": kept, "unpruned_tokens_per_crop": original, "tokens_per_image": f"{kept} × crops",
        "unpruned_tokens_per_image": "the processor's (unpadded, with newlines)",
        "hidden_size": config.text_config.hidden_size, "image_token_id": config.image_token_id,
        "image_grid_pinpoints": config.image_grid_pinpoints, "crop_size": config.vision_config.image_size,
        "extra_outputs": [{"name": POSITIONS_NAME, "shape": ["batch", kept], "dtype": "int64"}],
        "positions": f"image_positions[c, k] is feature k's patch index in crop c ({side} × {side}, raster order"
                     + ("; -1 is the class token" if config.vision_config.model_type.startswith("clip")
                        and config.vision_feature_select_strategy == "full" else "") + ")",
        "packing": PACKING,
        "transformers": "saint_export.apply(model, <keep schedule>) takes usual prompts and packs the crops itself",
        "vllm": f"pack each image as 'packing' says and pass it as image embeddings (enable_mm_embeds=True): {kept} "
                "× crops placeholders per image",
    }


def low_precision_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in hf_vision.layers(model).modules() if isinstance(m, torch.nn.Linear)]


def preprocess(model: torch.nn.Module):
    """Each crop as its tower's image processor prepares it (hf_vision.preprocess)."""
    return hf_vision.preprocess(model)


label_names = hf_vision.label_names
class_indices = hf_vision.class_indices


def llm_image_tokens(model: torch.nn.Module, tower_dropped: int | None) -> None:
    """Image tokens per LLM row depend on each image's size (crops, unpadding): resolved per row."""
    return None
