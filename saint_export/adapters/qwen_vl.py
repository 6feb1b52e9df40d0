"""Qwen2.5-VL and Qwen3-VL (docs/vlm.md): SAINT in their towers, and prompts that keep their M-RoPE
positions.

The tower cuts each image into patches (14 px; Qwen3-VL 16 px), embeds them and runs its blocks;
the patch merger turns each 2 × 2 group into one LLM token. Qwen2.5-VL puts the tokens into
window order (whole groups), attends within windows except at its full-attention blocks
(`fullatt_block_indexes`) and restores raster order after merging; Qwen3-VL attends fully, adds
learned positions, and its DeepStack mergers turn the output of a few blocks into features that
its first decoder layers add at the image positions.

The unit of pruning is the merge group: after the attention residual of a pruning point (a
full-attention block of Qwen2.5-VL, any block of Qwen3-VL) the groups are scored with SAINT on the
keys (before rotary embedding) averaged over heads and over the group's four patches; whole groups
go, so windows and merges stay intact, and DeepStack features taken earlier lose the same groups.
The keep schedule's blocks are the pruning points (`early50` on Qwen2.5-VL's 4 drops over the
first 2).

Resolution is dynamic: every image has its own grid, so the schedule is resolved per image
(`early<P>` is a fraction of each image's tokens; `r:` counts must fit every image). The
features of image i are its survivors in raster order, with their (t, h, w) on the merged grid.

Prompts are written as usual (t·h·w/4 placeholders per image). Before the language model runs,
the dropped placeholders are removed from the prompt, and the survivors and all text keep their
unpruned M-RoPE positions; `rope_deltas` is set so that decoding continues right after them (see
`fit_inputs`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import compat
from ..core import gather_tokens
from ..errors import InputError
from ..images import Preprocess
from ..schedule import KeepSchedule, ScheduleError
from . import ModelInfo, unsupported
from . import hf_vision
from .hf_vision import CLIP_MEAN, CLIP_STD, _config

family = "transformers"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
POSITIONS_NAME = "image_positions"
MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
DEEPSTACK_NAME = "deepstack_features"
VIDEO_ARGUMENTS = ("video_grid_thw", "second_per_grid_ts")  # what M-RoPE reads of a prompt's videos
NOMINAL_SIZE = 448  # the square image an export (and a schedule's counts) is resolved for by default
MERGE = 2  # the spatial merge of the shipped configs: a group is 2 × 2 patches


def _classes():
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, Qwen3VLForConditionalGeneration,
                              Qwen3VLModel)
    return Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, Qwen2_5_VLModel, Qwen3VLModel


def _family(config) -> str:
    """The family's name, from the model's config or its vision config."""
    return "Qwen3-VL" if config.model_type.startswith("qwen3") else "Qwen2.5-VL"


def output_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The exported graph's outputs, the main one first (Qwen3-VL adds its DeepStack features)."""
    deepstack = getattr(_vision_config(model), "deepstack_visual_indexes", None)
    return (OUTPUT_NAME, POSITIONS_NAME, *([DEEPSTACK_NAME] if deepstack else []))


def resolve_name(name: str) -> str | None:
    return hf_vision.resolve_name_of(name, MODEL_TYPES)


def known_names() -> list[str]:
    return hf_vision.known_names_of(MODEL_TYPES)


def create(source_name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    """Qwen2.5-VL with its language model on the meta device (no memory, no weights): exports
    need only the tower and its merger. `img_size` is the square image exports are made for."""
    config = _config(source_name)
    compat.require_transformers(compat.VLM_FAMILIES_MIN, _family(config))
    cls = _classes()[MODEL_TYPES.index(config.model_type)]
    size = NOMINAL_SIZE if img_size is None else img_size
    unit = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    _check_size(size, unit)
    if pretrained:
        model = cls.from_pretrained(source_name, dtype="auto")
        for part in compat.text_parts(model):
            part.to("meta")
        compat.qwen_visual(model).float()
    else:
        device = torch.get_default_device()
        with torch.device("meta"):
            model = cls(config)
        with torch.device(device):
            compat.qwen_set_visual(model, type(compat.qwen_visual(model))._from_config(config.vision_config))
    model.saint_img_size = size
    return model


def set_export_size(model: torch.nn.Module, size: int) -> None:
    """The square image size exports of this (loaded) model are made for."""
    config = _vision_config(model)
    _check_size(size, config.patch_size * config.spatial_merge_size)
    model.saint_img_size = size


def _check_size(size: int, unit: int) -> None:
    if size % unit:
        raise InputError(f"image size {size}: Qwen-VL images are multiples of {unit} px (a 2 × 2 group of "
                         f"{unit // 2}-px patches)")


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    raise InputError(f"weights file {str(path)!r}: transformers checkpoints are folders; pass the folder "
                     "(save_pretrained) as the model, with pretrained weights")


def matches(model: torch.nn.Module) -> bool:
    try:
        return isinstance(model, (*_classes(), ImageFeatures))
    except ImportError:
        return False


def _vision_config(model):
    return model.vision_config if isinstance(model, ImageFeatures) else model.config.vision_config


def describe(model: torch.nn.Module) -> ModelInfo:
    """The tower as the keep schedule sees it: its pruning points (Qwen2.5-VL's full-attention
    blocks, every block of Qwen3-VL's), the merge groups of the square image of side `img_size`
    (default NOMINAL_SIZE) and no protected token."""
    return describe_config(_vision_config(model), getattr(model, "saint_img_size", NOMINAL_SIZE))


def pruning_points(config) -> list[int]:
    """The tower blocks SAINT may prune after, from the vision config."""
    return list(getattr(config, "fullatt_block_indexes", range(config.depth)))


def describe_config(config, size: int = NOMINAL_SIZE) -> ModelInfo:
    """`describe` from a vision config alone (the vLLM plugin's view of the tower)."""
    family = _family(config)
    if config.spatial_merge_size != MERGE:
        raise unsupported(f"{family} with spatial merge {config.spatial_merge_size}")
    unit = config.patch_size * MERGE
    points = pruning_points(config)
    if points != sorted(points) or points[-1] != config.depth - 1:
        raise unsupported(f"{family} whose last block {config.depth - 1} is not a full-attention block")
    # The FLOPs ratio counts patches (4 per merge group), Qwen2.5-VL's SwiGLU MLP as three matrices
    # (an MLP ratio of 1.5 · intermediate / hidden), and its windowed blocks' attention per window.
    matrices = 1.5 if family == "Qwen2.5-VL" else 1.0
    window = getattr(config, "window_size", None)
    return ModelInfo(depth=len(points), num_patches=(size // unit) ** 2, num_protected=0,
                     embed_dim=config.hidden_size, mlp_ratio=matrices * config.intermediate_size / config.hidden_size,
                     img_size=size, patch_size=unit, spans=tuple(b - a for a, b in zip([-1, *points], points)),
                     unit_tokens=MERGE * MERGE, window_tokens=None if window is None else (window // config.patch_size) ** 2)


# --- the pruned tower ------------------------------------------------------------------------------

class Layout(NamedTuple):
    """How the tower lays out the tokens of one image grid (compat.qwen_vision_layout), computed
    once per grid, outside any trace: rotary tables in the blocks' order, that order → raster merge
    group, each group's window and frame (None where the whole image is one) with their (count,
    most groups in one), and Qwen3-VL's learned-position taps (None for Qwen2.5-VL). Windows and
    frames are runs of consecutive groups in the blocks' order."""
    grid: tuple[int, int, int]
    cos: torch.Tensor
    sin: torch.Tensor
    window_index: torch.Tensor
    windows: torch.Tensor | None
    frames: torch.Tensor | None
    taps: tuple | None
    window_shape: tuple[int, int]
    frame_shape: tuple[int, int]

    @classmethod
    def of(cls, tower, grid: tuple[int, int, int]) -> "Layout":
        cos, sin, window_index, windows, frames, taps = compat.qwen_vision_layout(tower, torch.tensor(grid))
        return cls(grid, cos, sin, window_index, windows if len(set(windows.tolist())) > 1 else None,
                   frames if len(set(frames.tolist())) > 1 else None, taps,
                   *((int(ids.max()) + 1, int(ids.bincount().max())) for ids in (windows, frames)))


class TowerPruner:
    """The layout and droppers of every image grid this model has seen, from the one keep schedule
    (bounded caches: a server sees many sizes)."""
    CACHED_GRIDS = 32

    def __init__(self, tower, state):
        self.tower, self.state = tower, state
        self.points = compat.qwen_full_attention_blocks(tower)
        self.layout = functools.lru_cache(maxsize=self.CACHED_GRIDS)(functools.partial(Layout.of, tower))
        self.droppers = functools.lru_cache(maxsize=self.CACHED_GRIDS)(self._droppers)

    def _droppers(self, grid: tuple[int, int, int]) -> dict:
        return grid_droppers(self.state, self.points, grid)


def grid_schedule(spec: str, num_points: int, grid) -> KeepSchedule:
    """`spec` resolved for one image grid (t, h, w patches) over a tower's `num_points` pruning points:
    the one rule for how many merge groups each block drops (the transformers adapter, the vLLM
    plugin and its processor's placeholder count all read it here)."""
    t, h, w = (int(v) for v in grid)
    groups = t * h * w // (MERGE * MERGE)
    try:
        return KeepSchedule.parse(spec, num_points, groups, num_protected=0)
    except ScheduleError as err:
        raise ScheduleError(f"an image of {t}×{h}×{w} patches ({groups} merged tokens): {err}") from None


def kept_groups(spec: str, num_points: int, grid) -> int:
    """The merged tokens (LLM placeholders) an image of `grid` keeps under a static `spec`."""
    return grid_schedule(spec, num_points, grid).patch_counts()[-1]


def grid_droppers(state, points: list[int], grid) -> dict:
    """The TokenDropper of each pruning block (by its index in the tower) for one image grid."""
    from ..patch import droppers_for

    schedule = grid_schedule(state.schedule.spec, len(points), grid)
    return {points[block]: dropper for block, dropper in droppers_for(schedule, state).items()}


def pruned_tower(tower, patches: torch.Tensor, layout: Layout, droppers: dict):
    """`patches` [B, N, C·T·P·P] of B images with the patch grid of `layout` → (features
    [B, K, D_llm] in raster order, their merge groups' raster indices [B, K], and Qwen3-VL's
    DeepStack features of the same K groups, one [B, K, D_llm] per DeepStack layer)."""
    batch, tokens, _ = patches.shape
    unit = MERGE * MERGE
    x = compat.qwen_patch_embed(tower, patches, layout.taps)
    x = x.view(batch, tokens // unit, unit, -1)[:, layout.window_index].reshape(batch, tokens, -1)
    alive = torch.arange(tokens // unit, device=x.device).expand(batch, -1)  # the blocks' groups still there
    cos, sin = layout.cos.expand(batch, -1, -1), layout.sin.expand(batch, -1, -1)
    full = set(compat.qwen_full_attention_blocks(tower))
    deepstack_mergers, deepstack = compat.qwen_deepstack(tower), []
    for index, block in enumerate(compat.qwen_vision_blocks(tower)):
        segments, (count, capacity) = (layout.frames, layout.frame_shape) if index in full else \
            (layout.windows, layout.window_shape)
        # None: one window (or frame) holds the whole image
        attend = dense_attention if segments is None else functools.partial(
            segment_attention, segments[alive].repeat_interleave(unit, 1), count, capacity * unit)
        x, keys = compat.qwen_vision_attention(block, x, cos, sin, attend)
        if index in droppers:
            group_keys = keys.view(batch, -1, unit, keys.shape[-1]).mean(2)
            keep = droppers[index](group_keys)
            if keep is not None:  # whole groups go, from the tokens and from earlier DeepStack features
                keep = keep.sort(dim=1).values
                x, cos, sin = (_gather_groups(t, keep, unit) for t in (x, cos, sin))
                deepstack = [gather_tokens(d, keep) for d in deepstack]
                alive = alive.gather(1, keep)
        x = compat.qwen_vision_mlp(block, x)
        if index in deepstack_mergers:
            deepstack.append(compat.qwen_merge(tower, x, deepstack_mergers[index]))
    merged = compat.qwen_merge(tower, x)
    raster = layout.window_index[alive]
    order = raster.argsort(dim=1)
    return (gather_tokens(merged, order), raster.gather(1, order), [gather_tokens(d, order) for d in deepstack])


def dense_attention(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def segment_attention(segment: torch.Tensor, segments: int, capacity: int, q, k, v, scale):
    """Attention within segments (windows or frames) of the surviving tokens, as transformers'
    cu_seqlens gives it, never over an N × N mask: q, k, v [B, heads, N, d], `segment` [B, N] each
    token's segment of `segments`, ascending (a segment's survivors are consecutive, in the blocks'
    order), `capacity` the most tokens a segment holds unpruned. Eager: one attention per segment,
    the lengths read off the data (as transformers' own non-flash path). Traced: `slot_attention`."""
    if torch.compiler.is_compiling():
        return slot_attention(segment, segments, capacity, q, k, v, scale)
    out = []
    for row in range(len(q)):
        lengths = segment[row].bincount(minlength=segments)
        lengths = lengths[lengths > 0].tolist()
        out.append(torch.cat([F.scaled_dot_product_attention(a, b, c, scale=scale) for a, b, c in
                              zip(*(t[row:row + 1].split(lengths, 2) for t in (q, k, v)))], 2))
    return torch.cat(out)


def slot_attention(segment: torch.Tensor, segments: int, capacity: int, q, k, v, scale):
    """`segment_attention` with shapes that depend on the grid only (what an exported graph needs):
    every segment gets `capacity` slots, the survivors are copied into theirs, empty slots are
    masked out, and the outputs are read back from the survivors' slots."""
    batch, heads, tokens, d = q.shape
    counts = torch.zeros(batch, segments, dtype=torch.long, device=q.device).scatter_add_(
        1, segment, torch.ones_like(segment))
    starts = counts.cumsum(1) - counts
    slot = segment * capacity + torch.arange(tokens, device=q.device) - starts.gather(1, segment)  # [B, N]
    slot = (slot + torch.arange(batch, device=q.device)[:, None] * segments * capacity).flatten()

    def to_slots(t):  # [B, heads, N, d] → [B · segments, heads, capacity, d]
        flat = t.transpose(1, 2).reshape(batch * tokens, heads * d)
        out = flat.new_zeros(batch * segments * capacity, heads * d).index_copy(0, slot, flat)
        return out.view(batch * segments, capacity, heads, d).transpose(1, 2)

    filled = torch.zeros(batch * segments * capacity, dtype=torch.bool, device=q.device).index_fill(0, slot, True)
    # An empty slot's query sees itself, so no row is all masked (its output is never read).
    allowed = filled.view(batch * segments, 1, 1, capacity) | torch.eye(capacity, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(to_slots(q), to_slots(k), to_slots(v), attn_mask=allowed, scale=scale)
    out = out.transpose(1, 2).reshape(batch * segments * capacity, heads * d)
    return out.index_select(0, slot).view(batch, tokens, heads, d).transpose(1, 2)


def _gather_groups(x: torch.Tensor, keep: torch.Tensor, unit: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return gather_tokens(x.reshape(batch, tokens // unit, unit * width), keep).reshape(batch, -1, width)


def grid_positions(raster: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(t, h, w) on the merged grid of merge groups with raster indices `raster` [..., K]: [..., K, 3]."""
    _, h, w = grid
    h, w = h // MERGE, w // MERGE
    return torch.stack([raster // (h * w), raster // w % h, raster % w], -1)


@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """The pruned tower on the processor's flattened patches of every image: (features per image
    [K_i, D_llm], kept merge groups per image [K_i], raster order; DeepStack features per layer and
    image, empty for Qwen2.5-VL). Images of one grid run as one batch (with `dynamic`, each alone:
    its r is decided per image)."""
    tower = compat.qwen_visual(model)
    pruner = model.saint_tower
    grids = [tuple(int(v) for v in grid) for grid in image_grid_thw.tolist()]
    sizes = [t * h * w for t, h, w in grids]
    if sum(sizes) != len(pixel_values):
        raise InputError(f"pixel_values holds {len(pixel_values)} patches but image_grid_thw describes {sum(sizes)}")
    patches = pixel_values.to(next(tower.parameters()).dtype).split(sizes)
    batches: dict = {}
    for image, grid in enumerate(grids):
        batches.setdefault(grid if pruner.state.schedule.drops is not None else image, []).append(image)
    features, kept, deepstack = [None] * len(grids), [None] * len(grids), [None] * len(grids)
    for images in batches.values():
        grid = grids[images[0]]
        feats, raster, stacks = pruned_tower(tower, torch.stack([patches[i] for i in images]), pruner.layout(grid),
                                             pruner.droppers(grid))
        for row, image in enumerate(images):
            features[image], kept[image], deepstack[image] = feats[row], raster[row], [d[row] for d in stacks]
    return features, kept, [list(layer) for layer in zip(*deepstack)]


# --- prompts: cut the dropped placeholders, keep every position --------------------------------------

@torch.no_grad()
def fit_inputs(model, kwargs: dict) -> dict:
    """The keyword arguments of a forward or generate call with pixel_values, rewritten for the
    pruned tower: its features given as `mm_encoder_outputs`, the dropped placeholders removed from
    input_ids / attention_mask / mm_token_type_ids, and `position_ids` [4, B, T'] (text positions,
    then t/h/w) holding the unpruned prompt's M-RoPE positions at the columns that stay. Videos in
    the same prompt keep every token: transformers' own tower runs them."""
    from ..vlm import padding_side, repack

    config = compat.qwen_core(model).config
    family = _family(config)
    ids, mask, grid = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("image_grid_thw")
    if ids is None or grid is None:
        raise InputError(f"{family} with a pruned tower needs input_ids and image_grid_thw beside pixel_values")
    if kwargs.get("position_ids") is not None or kwargs.get("labels") is not None:
        raise InputError(f"a pruned {family} tower computes the prompt's positions itself: do not pass "
                         "position_ids or labels with pixel_values")
    is_image = ids == config.image_token_id
    per_image = [int(t * h * w) // (MERGE * MERGE) for t, h, w in grid.tolist()]
    if int(is_image.sum()) != sum(per_image):
        raise InputError(f"the prompts hold {int(is_image.sum())} image placeholders for {len(per_image)} images: "
                         f"expected {sum(per_image)} (t·h·w/4 per image, the processor's count {per_image})")
    features, kept, deepstack = image_features(model, kwargs["pixel_values"], grid)
    mm_types = kwargs.get("mm_token_type_ids")
    if mm_types is None:  # what the processor writes: 1 at image placeholders, 2 at video ones
        mm_types = is_image.int() + 2 * (ids == config.video_token_id).int()
    videos = {key: kwargs[key] for key in VIDEO_ARGUMENTS if kwargs.get(key) is not None}
    positions, _ = compat.qwen_rope_index(model, ids, mm_types, grid, mask, **videos)
    keep = ~is_image
    image = 0
    for row in range(len(ids)):  # images fill the rows' placeholders in order
        slots = is_image[row].nonzero()[:, 0]
        start = 0
        while start < len(slots):
            if start + per_image[image] > len(slots):
                raise InputError(f"row {row}'s placeholders end inside image {image}'s {per_image[image]}")
            keep[row, slots[start + kept[image]]] = True
            start += per_image[image]
            image += 1
    ids, mask, mm_types, positions = repack(keep, [(ids, 0), (mask, 0), (mm_types, 0), (positions, 1)],
                                            padding_side(model, mask))
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    text = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    # What decoding adds to the cache length (transformers' rope_deltas): the next position is
    # right after the prompt's largest, as unpruned.
    largest = positions.masked_fill(~valid, -1).amax(dim=(0, 2))
    compat.qwen_set_rope_deltas(model, (largest + 1 - valid.sum(1))[:, None])
    rest = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "pixel_values_videos", "input_ids",
                                                          "attention_mask")}
    video = kwargs.get("pixel_values_videos")
    if video is not None:
        video = compat.qwen_video_features(model, video, kwargs.get("video_grid_thw"))
    return {**rest, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_types,
            "position_ids": torch.cat([text[None], positions]),
            **compat.image_features_output(features, deepstack, video)}


def patch(model: torch.nn.Module, droppers: dict) -> None:
    if not droppers:
        return  # nothing is dropped in the tower: the model stays as it is
    if not isinstance(model, _classes()[:2]):
        raise unsupported(f"{type(model).__name__} with a pruned tower (pass the ForConditionalGeneration model)")
    compat.require_transformers(compat.VLM_FAMILIES_MIN, _family(model.config))
    from ..vlm import install_input_fit

    model.saint_tower = TowerPruner(compat.qwen_visual(model), next(iter(droppers.values())).state)
    install_input_fit(model, functools.partial(fit_inputs, model))


def llm_installed(model: torch.nn.Module, state) -> None:
    """After LLM-side SAINT is installed: videos are refused (the LLM side drops image tokens and
    keeps no record of video ones); Qwen3-VL adds DeepStack features at the image positions after
    its first decoder layers, and once image tokens are gone, only the survivors' rows are added."""
    video_token = compat.qwen_core(model).config.video_token_id

    def refuse_videos(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("pixel_values_videos") is not None or (ids is not None and bool((ids == video_token).any())):
            raise InputError(f"LLM-side SAINT prunes image tokens only: prompts with videos are not supported in "
                             f"LLM-only or hybrid mode ({_family(model.config)}); use ViT-only mode (llm_schedule "
                             "none), where videos run unpruned")

    model.register_forward_pre_hook(refuse_videos, with_kwargs=True)
    if not compat.qwen_deepstack(compat.qwen_visual(model)):
        return
    run = state.run

    def surviving_rows(visual_mask, embeds):
        if not run.get("stages"):
            return visual_mask, embeds
        # Row-major rank of every image token of the prompt, read at the columns that survive.
        rank = (visual_mask.flatten().cumsum(0) - 1).view(visual_mask.shape)
        surviving = run["image_now"]
        return surviving, embeds[rank.gather(1, run["original"])[surviving]]

    compat.qwen_wrap_deepstack(model, surviving_rows)


# --- export --------------------------------------------------------------------------------------

class ImageFeatures(torch.nn.Module):
    """What an exported graph computes: images [B, 3, S, S] of the export's size S (normalised as
    `preprocess` says) → (image_features [B, K, D_llm], image_positions [B, K, 3]: each feature's
    (t, h, w) on the merged grid, which the LLM's M-RoPE offsets as it offsets an image; for
    Qwen3-VL also deepstack_features [B, L, K, D_llm], added at the image positions after the
    first L decoder layers)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.saint = getattr(model, "saint", None)
        self.tower = compat.qwen_visual(model)
        self.vision_config = self.tower.config
        self.saint_img_size = getattr(model, "saint_img_size", NOMINAL_SIZE)
        side = self.saint_img_size // self.vision_config.patch_size
        self.grid = (1, side, side)
        pruner = getattr(model, "saint_tower", None) or TowerPruner(self.tower, self.saint)
        # Computed here, outside any trace (its bookkeeping is Python); a tower on the meta device
        # (shapes only: parameter counts) has no rotary table to compute it from.
        self.layout = None if next(self.tower.parameters()).is_meta else pruner.layout(self.grid)
        self.droppers = pruner.droppers(self.grid) if self.saint is not None else {}

    def forward(self, pixel_values: torch.Tensor):
        features, raster, deepstack = pruned_tower(self.tower, patchify(pixel_values, self.vision_config),
                                                   self.layout, self.droppers)
        positions = grid_positions(raster, self.grid)
        return (features, positions, torch.stack(deepstack, 1)) if deepstack else (features, positions)


def patchify(images: torch.Tensor, config) -> torch.Tensor:
    """Images [B, 3, H, W] → the processor's flattened patches [B, N, 3·T·P·P]: each frame repeated
    over the temporal patch, patches in 2 × 2 merge-group order (Qwen2VLImageProcessor's layout)."""
    batch, channels, height, width = images.shape
    p, t, m = config.patch_size, config.temporal_patch_size, MERGE
    gh, gw = height // p, width // p
    x = images[:, None].expand(batch, t, channels, height, width)
    x = x.reshape(batch, t, channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # B, h-groups, w-groups, m, m, C, T, P, P
    return x.reshape(batch, gh * gw, channels * t * p * p)


def export_module(model: torch.nn.Module) -> torch.nn.Module:
    return ImageFeatures(model)


def features_record(model: torch.nn.Module, dropped: int) -> dict:
    info = describe(model)
    kept = info.num_patches - dropped
    config = compat.qwen_core(model).config
    side = info.img_size // _vision_config(model).patch_size
    extra = [{"name": POSITIONS_NAME, "shape": ["batch", kept, 3], "dtype": "int64"}]
    deepstack = getattr(config.vision_config, "deepstack_visual_indexes", None)
    if deepstack:
        extra.append({"name": DEEPSTACK_NAME, "shape": ["batch", len(deepstack), kept, config.text_config.hidden_size],
                      "dtype": "float32"})
    return {
        "tokens_per_image": kept, "unpruned_tokens_per_image": info.num_patches,
        "hidden_size": config.text_config.hidden_size, "image_grid_thw": [1, side, side],
        "image_token_id": config.image_token_id, "extra_outputs": extra,
        "positions": "image_positions[b, k] is feature k's (t, h, w) on the merged grid; the LLM's M-RoPE gives "
                     "it (s + t, s + h, s + w), s = the position of the first placeholder, and the text after the "
                     f"image resumes at s + {side // MERGE} (as unpruned)",
        **({"deepstack": f"deepstack_features[b, l] is added at the image positions after decoder layer l "
                         f"(l < {len(deepstack)})"} if deepstack else {}),
        "transformers": "saint_export.apply(model, <keep schedule>) takes usual prompts; for features computed "
                        "elsewhere write K placeholders per image and pass position_ids built from image_positions",
        "vllm": "saint_export.vllm.qwen_image_embeddings(image_features, image_positions[, deepstack_features]) "
                "with image_grid_thw, as image embeddings (enable_mm_embeds=True) to vLLM with the plugin's saint "
                "entry of this schedule, which keeps the positions (docs/vllm.md)",
    }


def low_precision_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for block in compat.qwen_vision_blocks(compat.qwen_visual(model)) for m in block.modules()
            if isinstance(m, torch.nn.Linear)]


def preprocess(model: torch.nn.Module) -> Preprocess:
    """The image processors' normalisation at the export's square size: Qwen2.5-VL's is OpenAI
    CLIP's mean and std, Qwen3-VL's 0.5 / 0.5."""
    size = describe(model).img_size
    if _vision_config(model).model_type.startswith("qwen3"):
        return Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, interpolation="bicubic")
    return Preprocess(size=size, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0, interpolation="bicubic")


def label_names(model: torch.nn.Module) -> None:
    return None


def class_indices(model: torch.nn.Module, class_names) -> dict[str, int]:
    raise InputError(f"{type(model).__name__} has no classification head: accuracy on class folders needs a classifier")


def llm_image_tokens(model: torch.nn.Module, tower_dropped: int | None) -> None:
    """Image tokens per LLM row: they differ per image (dynamic resolution), so the LLM schedule
    is resolved per row at prefill."""
    return None
