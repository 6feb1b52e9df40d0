"""The one module that reads vLLM's internals (tested on the releases `SUPPORTED_VLLM` lists in
`saint_export.vllm`): subclasses of vLLM's LLaVA model and of its processing info, and the
refusing subclasses of the multimodal models SAINT does not cover yet.

vLLM's engine tokenizes the prompt, runs the HF processor on the images only, and expands each
`<image>` to `get_num_image_tokens()` placeholders; the model's `_image_pixels_to_features` then
returns the tower's features before the projector. SAINT changes both, from the same resolved
schedule: K placeholders, and a tower that keeps K tokens. The counts are checked against each
other when the model loads, because vLLM would find a mismatch only at the first request, and
then kill the engine.
"""
from __future__ import annotations

import functools

import torch

from .. import compat

compat.import_torchvision()  # before vLLM's LLaVA, which imports transformers' image processors

from vllm.model_executor.models import llava  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from ..core import gather_tokens  # noqa: E402
from ..patch import make_droppers  # noqa: E402
from . import settings  # noqa: E402


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
        layers = self.vision_tower.vision_model.encoder.layers
        for index in self.saint_droppers:  # the keys, read off the fused projection as the layer computes them
            layers[index].saint_qkv = []
            layers[index].self_attn.qkv_proj.register_forward_hook(
                lambda module, args, out, layer=layers[index]: layer.saint_qkv.append(out[0]))
        self._check_counts(vllm_config)

    def _check_counts(self, vllm_config) -> None:
        """The placeholders the processor writes equal the features this tower returns, for images of
        any size (the processor resizes them all to the tower's input), from the tower as vLLM built
        it: the tokens its embeddings make, the layers it has, the feature selection."""
        from vllm.multimodal.processing.context import InputProcessingContext

        inner, schedule = self.vision_tower.vision_model, self.saint.schedule
        built = len(inner.encoder.layers)
        if built < schedule.depth:
            raise ValueError(f"SAINT: the schedule covers {schedule.depth} tower layers, vLLM built {built}")
        removed = 1 if self.config.vision_feature_select_strategy == "default" else 0
        returned = inner.embeddings.num_positions - sum(schedule.drops) - removed
        info = SaintLlavaProcessingInfo(InputProcessingContext(vllm_config.model_config, tokenizer=None))
        side = self.config.vision_config.image_size
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
        return _saint_tower(vision_tower, pixel_values, self.saint_droppers, self.config)


def _saint_tower(vision_tower, pixel_values: torch.Tensor, droppers: dict, config) -> torch.Tensor:
    """vLLM's CLIP/SigLIP tower forward (embeddings, pre-norm, the layers it built up to the feature
    layer, the feature selection) with SAINT's selection after the attention residual of each
    pruning layer, survivors in ascending order, as saint_export.adapters.hf_vision does."""
    inner = vision_tower.vision_model
    hidden = inner.embeddings(pixel_values)
    if getattr(inner, "pre_layrnorm", None) is not None:
        hidden = inner.pre_layrnorm(hidden)
    heads = config.vision_config.num_attention_heads
    for index, layer in enumerate(inner.encoder.layers):
        dropper = droppers.get(index)
        if dropper is None:
            hidden = layer(hidden)
            continue
        attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden))
        hidden = hidden + attended
        keys = layer.saint_qkv.pop().chunk(3, dim=-1)[1]  # [B, N, heads · d]: q, k, v side by side
        batch, tokens, _ = keys.shape
        keep = dropper(keys.reshape(batch, tokens, heads, -1).mean(2))
        if keep is not None:
            hidden = gather_tokens(hidden, keep.sort(dim=1).values)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


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
