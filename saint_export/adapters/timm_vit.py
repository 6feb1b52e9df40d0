"""timm VisionTransformer family (ViT, DeiT, DeiT-III, registers, distillation token).

Pruning blocks become `SaintBlock` (a class swap: parameters and state_dict stay as they are);
the other blocks are left untouched. Attention stays on F.scaled_dot_product_attention: SAINT
needs only the keys, which the block reads off the qkv projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..core import gather_tokens
from ..errors import SaintError
from . import ModelInfo

name = "timm"


def matches(model: torch.nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def describe(model: VisionTransformer) -> ModelInfo:
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, SaintBlock) or type(block.attn) is not Attention:
            raise SaintError(f"unsupported timm block {i}: {type(block).__name__} with "
                             f"{type(block.attn).__name__}; SAINT supports pre-norm Block + Attention")
    first = model.blocks[0]
    return ModelInfo(depth=len(model.blocks), num_patches=model.patch_embed.num_patches,
                     num_protected=model.num_prefix_tokens, embed_dim=model.embed_dim,
                     mlp_ratio=first.mlp.fc1.out_features / model.embed_dim)


def patch(model: VisionTransformer, droppers: dict) -> None:
    for index, dropper in droppers.items():
        block = model.blocks[index]
        block.__class__ = SaintBlock
        block.saint_dropper = dropper


class SaintBlock(Block):
    """Block whose MLP runs on the tokens SAINT keeps (selection after the attention residual)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise SaintError("SAINT pruning blocks do not support attention masks")
        attended, keys = attention_with_keys(self.attn, self.norm1(x))
        x = x + self.drop_path1(self.ls1(attended))
        keep_index = self.saint_dropper(keys)
        if keep_index is not None:
            x = gather_tokens(x, keep_index)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def attention_with_keys(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention.forward (fused path), also returning the keys averaged over heads.

    The keys are taken before q/k-norm, as in the reference implementation.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    keys = k.mean(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = attn.norm(x.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), keys
