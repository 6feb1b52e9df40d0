"""Model names, architectures and weights (timm)."""
from __future__ import annotations

import difflib
import os
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from .adapters import find_adapter
from .errors import SaintError

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


class ModelError(SaintError):
    """An unknown model, unusable weights or an impossible image size."""


@dataclass(frozen=True)
class Architecture:
    name: str  # what the user typed
    timm_name: str
    img_size: int
    patch_size: int
    depth: int
    num_patches: int
    num_protected: int
    embed_dim: int
    mlp_ratio: float
    num_params: int


def resolve_name(name: str) -> str:
    """An alias or a timm model name (with or without a weight tag) → the timm name."""
    timm_name = ALIASES.get(name, name)
    if timm.is_model(timm_name.split(".")[0]):
        return timm_name
    close = difflib.get_close_matches(name, list(ALIASES) + timm.list_models("*vit*") + timm.list_models("deit*"),
                                      n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelError(f"unknown model {name!r}: neither an alias ({', '.join(ALIASES)}) nor a timm model name{hint}")


def architecture(name: str, img_size: int | None = None) -> Architecture:
    """Shapes of a model, built on the meta device (no weights, no memory, no download)."""
    timm_name = resolve_name(name)
    with torch.device("meta"):
        model = _create(timm_name, pretrained=False, img_size=None)
        patch = model.patch_embed.patch_size[0]
        if img_size is not None:
            if img_size <= 0 or img_size % patch:
                raise ModelError(f"--img-size {img_size} is not a positive multiple of the patch size {patch} "
                                 f"of {timm_name}")
            model = _create(timm_name, pretrained=False, img_size=img_size)
    info = find_adapter(model).describe(model)
    size = model.patch_embed.img_size[0]
    return Architecture(name, timm_name, size, patch, info.depth, info.num_patches, info.num_protected,
                        info.embed_dim, info.mlp_ratio, sum(p.numel() for p in model.parameters()))


def load(arch: Architecture, weights: str = "pretrained", seed: int = 0) -> torch.nn.Module:
    """Create the model in eval mode with `weights`: 'pretrained', 'random' or a checkpoint path."""
    if weights == "pretrained":
        _require_hub(arch.timm_name)
        model = _create(arch.timm_name, pretrained=True, img_size=arch.img_size)
    else:
        torch.manual_seed(seed)  # random weights are reproducible
        model = _create(arch.timm_name, pretrained=False, img_size=arch.img_size)
        if weights != "random":
            load_checkpoint(model, Path(weights))
    return model.eval()


def check_weights_arg(weights: str) -> None:
    """Cheap checks that need no model: a checkpoint path must be a readable file."""
    if weights in ("pretrained", "random"):
        return
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"--weights {weights!r}: no such file (use pretrained, random or a checkpoint path)")
    if not os.access(path, os.R_OK):
        raise ModelError(f"--weights {weights!r}: file is not readable")


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a timm-format state dict (.safetensors, .pth/.pt/.bin) strictly into `model`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file
        raise ModelError(f"--weights {str(path)!r} is not a readable checkpoint: {str(err).splitlines()[0]}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {str(path)!r} does not hold a state dict of tensors")
    state = timm.models.clean_state_dict(state)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:
            raise ModelError(f"--weights {str(path)!r} does not fit {type(model).__name__}: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ModelError(f"--weights {str(path)!r} does not match the model: {detail[:300]}") from None


def _create(timm_name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    kwargs = {} if img_size is None else {"img_size": img_size}
    return timm.create_model(timm_name, pretrained=pretrained, **kwargs)


def _require_hub(timm_name: str) -> None:
    """Fail in one line, without timm's minute of retries, when the model hub is unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return  # the user wants the local cache
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        raise ModelError(f"pretrained weights for {timm_name} need the model hub, and {url.hostname} cannot be "
                         "reached; use --weights random, or --weights <checkpoint file> "
                         "(or set HF_HUB_OFFLINE=1 to use a local hub cache)") from None
