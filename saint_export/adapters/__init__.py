"""Framework adapters: each knows one model family's blocks and where its keys are."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SaintError


@dataclass(frozen=True)
class ModelInfo:
    depth: int
    num_patches: int
    num_protected: int
    embed_dim: int
    mlp_ratio: float


def find_adapter(model: torch.nn.Module):
    from . import timm_vit

    for adapter in (timm_vit,):
        if adapter.matches(model):
            return adapter
    raise SaintError(f"unsupported model {type(model).__name__}: SAINT supports timm VisionTransformer-family "
                     "models (ViT, DeiT, DeiT-III, register and distilled variants)")
