"""LLaVA-NeXT and LLaVA-OneVision (docs/vlm.md): SAINT in the tower of every anyres crop.

Their processors cut an image into a base crop (the whole image, resized) and high-resolution
crops picked from `image_grid_pinpoints` by `image_sizes`; the tower (CLIP for NeXT, SigLIP for
OneVision) runs on every crop. SAINT prunes each crop in the tower exactly as LLaVA-1.5's, with
the same static budget for every crop of an image, base included (hf_vision's encoder layers).

The unpruned model then stitches the high-resolution crops into one grid, unpads it to the
image's aspect ratio, adds a newline token after every grid row (and OneVision shrinks grids
above `anyres_max_9`), so it feeds the language model U tokens, fewer than crops × n for most
photos. The budget follows U (BUDGET_RULE): `early<P>` gives every crop of an image ⌊round(P% ·
U) / crops⌋ features, so the image feeds P% of what the unpruned model would, at every size, and
the count depends on the image size alone (what a server must know before the tower runs). Fixed
counts (`r:`, `calib:`) stay as written and are refused for an image whose K × crops exceeds U.

With a pruned tower an image's features are packed as VisionZip packs them: the base crop's K
survivors in raster order, then every high-resolution survivor in raster order of the stitched
grid; no unpadding, no newline tokens, no shrinking: K × crops features per image. With the tower
unpruned (LLM-only), transformers' own packing stays, and the language model sees the newline
tokens as image tokens.

Prompts are written as usual (the processor's count U per image); the positions of these
language models are 1-D, so each image's run of placeholders is cut to its first K × crops.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch

from .. import compat
from ..errors import InputError
from ..schedule import KeepSchedule, ScheduleError
from . import ModelInfo, hf_vision, unsupported

family = "transformers"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
POSITIONS_NAME = "image_positions"
MODEL_TYPES = ("llava_next", "llava_onevision")
PACKING = {"crops": "the same K per crop, base crop included", "order": "base crop first, then the high-resolution "
           "crops' survivors in raster order of the stitched grid", "unpad": "not applied", "newline": "none",
           "anyres_max": "not applied"}
BUDGET_RULE = ("early<P>: an image with C crops that the unpruned model feeds to the language model as U tokens "
               "(the processor's count: unpadded, with newlines, after anyres_max) keeps K = ⌊round(P% · U) / C⌋ "
               "features in every crop (at most a whole crop), K × C ≤ P% · U in all; r:<…> and calib:<…> keep "
               "their fixed K per crop, and an image whose K × C exceeds U is refused")


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
    only the tower and the projector. Crops have the tower's fixed size; `img_size` is the square
    image an export's per-crop budget is resolved for (default: one crop's size)."""
    config = hf_vision._config(source_name)
    compat.require_transformers(compat.VLM_FAMILIES_MIN, _name(config))
    cls = _classes()[MODEL_TYPES.index(config.model_type)]
    model = hf_vision.vision_parts_only(cls, config, source_name, pretrained)
    if img_size is not None:
        set_export_size(model, img_size)
    return model


def set_export_size(model: torch.nn.Module, size: int) -> None:
    """The square image (size × size px) whose per-crop budget an export of this model keeps."""
    if not (isinstance(size, int) and size > 0):
        raise InputError(f"image size must be a positive integer, got {size!r}")
    model.saint_img_size = size


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
    """One crop through the tower, up to the feature layer, with the budget of a crop of the square
    export image (`set_export_size`; default: one crop's size)."""
    config = _config(model)
    size = getattr(model, "saint_img_size", None) or config.vision_config.image_size
    return image_info(model, [size, size])


def tokens_per_crop(model, dropped: int) -> tuple[int, int]:
    """Features per crop: (unpruned, after `dropped` tokens are gone)."""
    return crop_token_counts(_config(model), dropped)


def crop_token_counts(config, dropped: int) -> tuple[int, int]:
    """The same from the model's config alone (what the vLLM plugin has)."""
    return hf_vision.llava_image_token_counts(config, _crop_info(config), dropped)


def _crop_info(config) -> ModelInfo:
    return hf_vision._info(config.vision_config, hf_vision._llava_feature_depth(config, _name(config)))


def image_info(model, image_size, crops: int | None = None) -> ModelInfo:
    """The tower as the keep schedule sees one crop of an image of `image_size` (height, width),
    cut into `crops` crops (default: as anyres cuts it): `early<P>` keeps BUDGET_RULE's share."""
    return _budget_info(_config(model), *_counts(model, image_size, crops))


def _budget_info(config, crops: int, unpruned: int) -> ModelInfo:
    info = _crop_info(config)
    features = crop_token_counts(config, 0)[0]
    extra = features - info.num_patches  # a class token that reaches the features ('full' CLIP)

    def early_target(percent: float) -> int:
        per_crop = min(features, math.floor(percent / 100 * unpruned + 0.5) // crops)
        if per_crop - extra < 1:
            raise ScheduleError(f"early{percent:g} keeps {per_crop} features per crop: too few")
        return per_crop - extra

    return dataclasses.replace(info, early_target=early_target)


def _counts(model, image_size, crops: int | None) -> tuple[int, int]:
    """(crops, tokens the unpruned model feeds the language model) of one image."""
    size = [[int(v) for v in image_size]]
    crops = compat.anyres_crops(model, size)[0] if crops is None else crops
    return crops, compat.anyres_token_counts(model, size, [crops])[0]


def _size_text(image_size, crops: int, unpruned: int) -> str:
    height, width = (int(v) for v in image_size)
    return f"an image of {width}×{height} px ({crops} crops, {unpruned} tokens unpruned)"


def crop_schedule(model, spec, image_size, crops: int | None = None) -> KeepSchedule:
    """`spec` resolved for one crop of an image of `image_size` (height, width) as BUDGET_RULE
    says; one line when the image cannot take it."""
    return budget_schedule(_config(model), spec, image_size, *_counts(model, image_size, crops))


def budget_schedule(config, spec: str, image_size, crops: int, unpruned: int) -> KeepSchedule:
    """BUDGET_RULE's one home: `spec` resolved for one crop of an image of `image_size` (height,
    width) cut into `crops` crops, which the unpruned model feeds the language model as `unpruned`
    tokens (the processor's count), from the config alone: the transformers adapter and the vLLM
    plugin's processor and tower all resolve budgets here. One line when the image cannot take it."""
    try:
        schedule = KeepSchedule.for_model(spec, _budget_info(config, crops, unpruned))
    except ScheduleError as err:
        raise ScheduleError(f"{_size_text(image_size, crops, unpruned)}: {err}") from None
    kept = crop_token_counts(config, sum(schedule.drops or ()))[1]
    if any(schedule.drops or ()) and kept * crops > unpruned:  # (nothing dropped: transformers' own packing)
        raise ScheduleError(f"{_size_text(image_size, crops, unpruned)}: keep schedule {schedule.spec!r} keeps {kept} "
                            f"features per crop, {kept * crops} in all, more than the unpruned model; use early<P>, "
                            "which scales with the image")
    return schedule


def image_tokens(config, schedule: KeepSchedule, crops: int, unpruned: int) -> int:
    """The features an image of `crops` crops feeds the language model under a `budget_schedule`:
    K × crops when the tower prunes, else the processor's own count (transformers' packing)."""
    if not any(schedule.drops or ()):
        return unpruned
    return crop_token_counts(config, sum(schedule.drops))[1] * crops


class CropBudgets:
    """The per-crop droppers of every image size this model has seen (bounded: a server sees many
    sizes), all from the one keep schedule that `apply` was given."""
    CACHED_SIZES = 64

    def __init__(self, model, state):
        self.model, self.state = model, state
        self.droppers = functools.lru_cache(maxsize=self.CACHED_SIZES)(self._droppers)

    def _droppers(self, image_size: tuple[int, int], crops: int) -> dict:
        from ..patch import droppers_for

        return droppers_for(crop_schedule(self.model, self.state.schedule.spec, image_size, crops), self.state)


def patch(model: torch.nn.Module, droppers: dict) -> None:
    state = next(iter(droppers.values())).state if droppers else None
    if state is None:
        return  # unpruned: transformers' packing stays
    if state.schedule.drops is None:
        raise InputError(f"{_name(_config(model))} packs K features per crop: the dynamic keep schedule has no "
                         "fixed K; use early<P> (e.g. early50) or r:<r0>,<r1>,…")
    if not isinstance(model, _classes()[:2]):
        raise unsupported(f"{type(model).__name__} with a pruned tower (pass the ForConditionalGeneration model)")
    compat.require_transformers(compat.VLM_FAMILIES_MIN, _name(_config(model)))
    size = getattr(model, "saint_img_size", None) or _config(model).vision_config.image_size
    crop_schedule(model, state.schedule.spec, [size, size])  # the export's image must take it
    # Every block an image of any size may prune at; the export's droppers until a call sets others.
    hf_vision.patch_tower(model, {block: droppers.get(block) for block in state.schedule.blocks_at_any_size})
    model.saint_export_droppers = droppers
    model.saint_crop_budgets = CropBudgets(model, state)
    from ..vlm import install_input_fit

    install_input_fit(model, functools.partial(fit_inputs, model))


# --- features of a pruned tower ------------------------------------------------------------------

@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images=None) -> list:
    """Every image's features, packed as this module's docstring says: [K × crops_i, D_llm] each.
    Images whose size gives the same per-crop budget share one run of the tower."""
    crops = compat.anyres_crops(model, image_sizes, batch_num_images)
    if pixel_values.dim() == 5:  # [images, crops (padded), 3, S, S]
        pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)])
    if len(pixel_values) != sum(crops):
        raise InputError(f"pixel_values holds {len(pixel_values)} crops but image_sizes asks for {sum(crops)}")
    budgets = getattr(model, "saint_crop_budgets", None)
    droppers = [None if budgets is None else budgets.droppers(tuple(int(v) for v in size), n)
                for size, n in zip(image_sizes.tolist(), crops)]
    starts = [0, *itertools.accumulate(crops)]
    packed = [None] * len(crops)
    for group in _groups(droppers):
        tower = hf_vision.ImageFeatures(model, track_positions=True, droppers=droppers[group[0]])
        pixels = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in group])
        features, positions = tower(pixels.to(next(tower.parameters()).dtype))
        for image, feats, where in zip(group, features.split([crops[i] for i in group]),
                                       positions.split([crops[i] for i in group])):
            packed[image] = _pack(model, feats, where, image_sizes[image], image)
    return packed


def _groups(droppers: list) -> list[list[int]]:
    """Indices of the images that share droppers (the same per-crop budget), in order."""
    groups: dict[int, list[int]] = {}
    for image, chosen in enumerate(droppers):
        groups.setdefault(id(chosen), []).append(image)
    return list(groups.values())


def _pack(model, features: torch.Tensor, where: torch.Tensor, image_size, image: int) -> torch.Tensor:
    """One image's crops' features [crops, K, D] (patch indices `where` [crops, K]), packed."""
    if len(features) == 1:
        return features[0]
    grid = compat.anyres_grid(_config(model), image_size)
    if grid[0] * grid[1] != len(features) - 1:
        raise InputError(f"image {image}: {len(features) - 1} high-resolution crops, but its size asks for "
                         f"{grid[0]} × {grid[1]}")
    return pack_crops(features, where, grid, _config(model))


def pack_crops(features: torch.Tensor, where: torch.Tensor, grid: tuple[int, int], config) -> torch.Tensor:
    """PACKING's one home: one image's crops' features [crops, K, D] (patch indices `where`
    [crops, K]; the high-resolution crops a `grid` of rows × columns) → the base crop's, then the
    high-resolution survivors in raster order of the stitched grid: [K × crops, D]."""
    if len(features) == 1:
        return features[0]
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = grid
    crop = torch.arange(len(features) - 1, device=where.device)[:, None]
    row = (crop // cols) * side + where[1:] // side  # in the stitched grid
    col = (crop % cols) * side + where[1:] % side
    order = (row * cols * side + col).flatten().argsort()
    return torch.cat([features[0], features[1:].flatten(0, 1)[order]])


@torch.no_grad()
def fit_inputs(model, kwargs: dict) -> dict | None:
    """A forward or generate call with pixel_values, rewritten for the pruned tower: its packed
    features given as `mm_encoder_outputs`, each image's placeholders cut to their first K × crops."""
    from ..vlm import padding_side, repack

    ids, mask, sizes = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("image_sizes")
    config = _config(model)
    if ids is None or sizes is None:
        raise InputError(f"{_name(config)} with a pruned tower needs input_ids and image_sizes beside pixel_values")
    if kwargs.get("position_ids") is not None or kwargs.get("labels") is not None:
        raise InputError("prompts with the processor's placeholder count cannot be combined with explicit "
                         "position_ids or labels")
    batch_images = kwargs.get("batch_num_images")
    original = compat.anyres_token_counts(model, sizes, compat.anyres_crops(model, sizes, batch_images))
    is_image = ids == config.image_token_id
    if int(is_image.sum()) != sum(original):
        raise InputError(f"the prompts hold {int(is_image.sum())} image placeholders for {len(original)} images: "
                         f"expected {sum(original)} (the processor's count {original})")
    features = image_features(model, kwargs["pixel_values"], sizes, batch_images)
    kept = [len(f) for f in features]
    keep = ~is_image
    image = 0
    for row in range(len(ids)):  # images fill the rows' placeholders in order
        slots = is_image[row].nonzero()[:, 0]
        start = 0
        while start < len(slots):
            keep[row, slots[start:start + kept[image]]] = True
            start += original[image]
            image += 1
    pad = getattr(config.text_config, "pad_token_id", None) or 0
    ids, mask = repack(keep, [(ids, pad), (mask, 0)], padding_side(model, mask))
    rest = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "input_ids", "attention_mask")}
    return {**rest, "input_ids": ids, "attention_mask": mask, **compat.image_features_output(features)}


# --- export: one crop in, its features and their patch positions out ---------------------------------

def export_module(model: torch.nn.Module) -> torch.nn.Module:
    module = hf_vision.ImageFeatures(model, track_positions=True,
                                     droppers=getattr(model, "saint_export_droppers", None))
    module.saint_anyres, module.saint_config = True, _config(model)
    return module


def output_names(model: torch.nn.Module) -> tuple[str, ...]:
    return OUTPUT_NAME, POSITIONS_NAME


def features_record(model: torch.nn.Module, dropped: int) -> dict:
    config = _config(model)
    original, kept = tokens_per_crop(model, dropped)
    side = config.vision_config.image_size // config.vision_config.patch_size
    size = getattr(model, "saint_img_size", None) or config.vision_config.image_size
    crops, unpruned = _counts(model, [size, size], None)
    return {
        "tokens_per_crop": kept, "unpruned_tokens_per_crop": original, "tokens_per_image": f"{kept} × crops",
        "unpruned_tokens_per_image": "the processor's (unpadded, with newlines)",
        "budget_rule": BUDGET_RULE,
        "resolved_for": {"image_size": [size, size], "crops": crops, "unpruned_tokens": unpruned,
                         "tokens": kept * crops},
        "serves": "the images whose size gives this tokens_per_crop under budget_rule (every size where K × crops "
                  "≤ the unpruned count, for a fixed-count schedule); other sizes need their own export",
        "hidden_size": config.text_config.hidden_size, "image_token_id": config.image_token_id,
        "image_grid_pinpoints": config.image_grid_pinpoints, "crop_size": config.vision_config.image_size,
        "extra_outputs": [{"name": POSITIONS_NAME, "shape": ["batch", kept], "dtype": "int64"}],
        "positions": f"image_positions[c, k] is feature k's patch index in crop c ({side} × {side}, raster order"
                     + ("; -1 is the class token" if config.vision_config.model_type.startswith("clip")
                        and config.vision_feature_select_strategy == "full" else "") + ")",
        "packing": PACKING,
        "transformers": "saint_export.apply(model, <keep schedule>) takes usual prompts and packs the crops itself",
        "vllm": f"pack each image's crops with saint_export.adapters.llava_anyres.pack_crops ('packing') and pass "
                f"them as image embeddings ({kept} × crops rows per image, enable_mm_embeds=True) to vLLM with the "
                "plugin's saint entry of this schedule, which batches any lengths (docs/vllm.md)",
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
