"""Model names → architectures and loaded models, through the family adapters."""
from __future__ import annotations

import difflib
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .adapters import ModelInfo, adapters, unsupported
from .errors import InputError

WEIGHTS = ("pretrained", "random")  # or a checkpoint path


class ModelError(InputError):
    """An unknown or unsupported model, unusable weights or an impossible image size."""


@dataclass(frozen=True)
class Architecture:
    name: str  # what the user typed
    source_name: str  # the family's own name (timm name with weight tag)
    adapter: ModuleType
    info: ModelInfo
    num_params: int


def resolve(name: str) -> tuple[ModuleType, str]:
    """An alias or a family's model name → (adapter, source name)."""
    for adapter in adapters():
        source_name = adapter.resolve_name(name)
        if source_name is not None:
            return adapter, source_name
    known = [n for adapter in adapters() for n in adapter.known_names()]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelError(f"unknown model {name!r}: neither an alias nor a model name of a supported family{hint}")


def architecture(name: str, img_size: int | None = None) -> Architecture:
    """Shapes of a model, built on the meta device (no weights, no memory, no download)."""
    adapter, source_name = resolve(name)
    with torch.device("meta"):
        model = adapter.create(source_name, pretrained=False, img_size=None)
        if not adapter.matches(model):  # a name the family knows, but not a model SAINT supports
            raise unsupported(f"{name!r} ({type(model).__name__})")
        info = adapter.describe(model)
        if img_size is not None:
            # Families with dynamic resolution (Qwen, anyres) check the size themselves (set_export_size).
            if not hasattr(adapter, "set_export_size") and (img_size <= 0 or img_size % info.patch_size):
                raise ModelError(f"image size {img_size} is not a positive multiple of the patch size "
                                 f"{info.patch_size} of {source_name}")
            model = adapter.create(source_name, pretrained=False, img_size=img_size)
            info = adapter.describe(model)
    exported = adapter.export_module(model)
    return Architecture(name, source_name, adapter, info, sum(p.numel() for p in exported.parameters()))


def load(arch: Architecture, weights: str = "pretrained", seed: int = 0) -> torch.nn.Module:
    """Create the model in eval mode with `weights`: 'pretrained', 'random' (seeded, reproducible,
    without touching torch's global RNG) or a checkpoint path."""
    if weights == "pretrained":
        _require_hub(arch.source_name)
        model = arch.adapter.create(arch.source_name, pretrained=True, img_size=arch.info.img_size)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = arch.adapter.create(arch.source_name, pretrained=False, img_size=arch.info.img_size)
        if weights != "random":
            arch.adapter.load_checkpoint(model, Path(weights))
    return model.eval()


def check_weights(weights: str) -> None:
    """Cheap checks that need no model: a checkpoint path must be a readable file."""
    if weights in WEIGHTS:
        return
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights {weights!r}: no such file (expected pretrained, random or a checkpoint path)")
    if not os.access(path, os.R_OK):
        raise ModelError(f"checkpoint file {weights!r} is not readable")


def _require_hub(source_name: str) -> None:
    """Fail in one line, without a minute of retries, when the model hub is unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or Path(source_name).is_dir():
        return  # the user wants the local cache, or the checkpoint is a local folder
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        raise ModelError(f"pretrained weights for {source_name} need the model hub, and {url.hostname} cannot be "
                         "reached; use random weights or a local checkpoint file "
                         "(or set HF_HUB_OFFLINE=1 to use a local hub cache)") from None
