"""timm VisionTransformer family (ViT, DeiT, DeiT-III, registers, distillation token).

Pruning blocks become `SaintBlock` (a class swap: parameters and state_dict stay as they are);
the other blocks are left untouched. Attention stays on F.scaled_dot_product_attention: SAINT
needs only the keys, which the block reads off the qkv projection.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from .. import compat
from ..compat import import_torchvision

import_torchvision()  # before timm, which imports torchvision

import timm  # noqa: E402
from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

from ..core import gather_tokens  # noqa: E402
from ..errors import InputError  # noqa: E402
from ..images import Preprocess  # noqa: E402
from . import ModelInfo, ProbeParts, unsupported  # noqa: E402

family = "timm"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"

# Short names → pinned timm names (with their weight tags) that have ImageNet-1k heads.
ALIASES = {
    "vit_s16": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_b16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_l16": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "vit_h14": "deit3_huge_patch14_224.fb_in22k_ft_in1k",
    "deit_s16": "deit_small_patch16_224.fb_in1k",
    "deit_b16": "deit_base_patch16_224.fb_in1k",
    "deit_b16_distilled": "deit_base_distilled_patch16_224.fb_in1k",
    "deit3_s16": "deit3_small_patch16_224.fb_in22k_ft_in1k",
    "deit3_b16": "deit3_base_patch16_224.fb_in22k_ft_in1k",
    "deit3_l16": "deit3_large_patch16_224.fb_in22k_ft_in1k",
    "deit3_b16_384": "deit3_base_patch16_384.fb_in22k_ft_in1k",
}


def resolve_name(name: str) -> str | None:
    timm_name = ALIASES.get(name, name)
    return timm_name if timm.is_model(timm_name.split(".")[0]) else None


def known_names() -> list[str]:
    return list(ALIASES) + timm.list_models("*vit*") + timm.list_models("deit*")


def create(source_name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    kwargs = {} if img_size is None else {"img_size": img_size}
    return timm.create_model(source_name, pretrained=pretrained, **kwargs)


def export_module(model: torch.nn.Module) -> torch.nn.Module:
    return model  # the classifier as it is: pixel_values → logits


def features_record(model: torch.nn.Module, dropped: int) -> None:
    return None


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a timm-format state dict (.safetensors, .pth/.pt/.bin) strictly into `model`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file
        raise InputError(f"checkpoint file {str(path)!r} is not readable: {str(err).splitlines()[0]}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint file {str(path)!r} does not hold a state dict of tensors")
    state = timm.models.clean_state_dict(state)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:
            raise InputError(f"checkpoint file {str(path)!r} does not fit {type(model).__name__}: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise InputError(f"checkpoint file {str(path)!r} does not match the model: {detail[:300]}") from None


def matches(model: torch.nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def describe(model: VisionTransformer) -> ModelInfo:
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, SaintBlock) or type(block.attn) is not Attention:
            raise unsupported(f"{type(model).__name__} (timm block {i} is {type(block).__name__} with "
                              f"{type(block.attn).__name__}, not the pre-norm Block with Attention)")
    height, width = model.patch_embed.img_size
    if height != width:
        raise unsupported(f"{type(model).__name__} with a non-square input {height}x{width}")
    return ModelInfo(depth=len(model.blocks), num_patches=model.patch_embed.num_patches,
                     num_protected=model.num_prefix_tokens, embed_dim=model.embed_dim,
                     mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim, img_size=height,
                     patch_size=model.patch_embed.patch_size[0])


def patch(model: VisionTransformer, droppers: dict) -> None:
    for index, dropper in droppers.items():
        block = model.blocks[index]
        block.__class__ = SaintBlock
        block.saint_dropper = dropper


def low_precision_modules(model: VisionTransformer) -> list[torch.nn.Linear]:
    """The blocks' Linear layers (qkv, proj, MLP): ~95% of a ViT's FLOPs. Patch embedding, norms
    and head stay fp32."""
    return [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]


def preprocess(model: VisionTransformer) -> Preprocess:
    """timm's eval transform for this model (resolve_data_config), as numbers."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    if config.get("crop_mode", "center") != "center":
        raise InputError(f"{type(model).__name__}: crop mode {config['crop_mode']!r} is not supported "
                         "(only centre crops)")
    size = describe(model).img_size
    return Preprocess(size=size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                      crop_pct=float(config["crop_pct"]), interpolation=config["interpolation"])


def label_names(model: VisionTransformer) -> list[str] | None:
    """ImageNet-1k class descriptions when the head is an ImageNet-1k head, else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    if infer_imagenet_subset(model) != "imagenet-1k" or model.num_classes != 1000:
        return None
    info = ImageNetInfo("imagenet-1k")
    return [info.index_to_description(i) for i in range(model.num_classes)]


def class_indices(model: VisionTransformer, class_names) -> dict[str, int]:
    """Class folder names → the head's class indices: ImageNet synsets (n01440764, …) through
    timm's ImageNet-1k table when every folder is one, else the ImageFolder convention (sorted
    folder names → 0, 1, …), for heads trained on that folder."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    names = sorted(set(class_names))
    if all(re.fullmatch(r"n\d{8}", name) for name in names):
        if infer_imagenet_subset(model) != "imagenet-1k" or model.num_classes != 1000:
            raise InputError(f"the class folders are ImageNet synsets, but {type(model).__name__}'s head is not "
                             "an ImageNet-1k head")
        index = {synset: i for i, synset in enumerate(ImageNetInfo("imagenet-1k").label_names())}
        unknown = [name for name in names if name not in index]
        if unknown:
            raise InputError(f"class folders {', '.join(unknown[:3])} are not ImageNet-1k synsets")
        return {name: index[name] for name in names}
    if len(names) > model.num_classes:
        raise InputError(f"{len(names)} class folders, but the model's head has {model.num_classes} classes")
    return {name: i for i, name in enumerate(names)}


class SaintBlock(Block):
    """Block whose MLP runs on the tokens SAINT keeps (selection after the attention residual).

    Modifications to timm's `Block.forward` (timm 1.0.x): the attention is `timm_attention_with_keys`,
    the selection runs between the attention residual and the MLP, and masks are refused."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise InputError("SAINT pruning blocks do not support attention masks")
        return block_forward(self, x, self.saint_dropper)


def block_forward(block: Block, x: torch.Tensor, select) -> torch.Tensor:
    """A timm Block's forward with `select(keys)` → kept token indices (or None: all) between the
    attention residual and the MLP. `tune` runs unpatched blocks through it, one at a time."""
    attended, keys = compat.timm_attention_with_keys(block.attn, block.norm1(x))
    x = x + block.drop_path1(block.ls1(attended))
    keep_index = select(keys)
    if keep_index is not None:
        x = gather_tokens(x, keep_index)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def stem(model: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tokens entering the first block (timm's forward_features up to the blocks)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixel_values))))


def head(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The logits from the last block's tokens."""
    return model.forward_head(model.norm(x))


def probe_parts(model: VisionTransformer) -> ProbeParts:
    return ProbeParts(lambda x: stem(model, x), list(model.blocks), block_forward, lambda x: head(model, x))
