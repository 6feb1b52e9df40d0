"""Engine precision, expressed in the exported graph (strongly typed TensorRT builds what it reads).

fp16 / bf16: the transformer blocks' Linear layers (qkv, proj, MLP: ~95% of a ViT's FLOPs) compute in
the low precision; the residual stream, LayerNorm, the attention softmax, SAINT's scoring (keys
arrive in fp32), the patch embedding and the head stay fp32. Cast nodes around each Linear make
the choice explicit in ONNX, so no builder flag or autocast pass is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SaintError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LowPrecisionLinear(torch.nn.Linear):
    """nn.Linear whose weights and product are fp16/bf16, on an fp32 input and output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Switch the blocks' Linear layers of `model` to `precision`, in place."""
    if precision not in DTYPES:
        raise SaintError(f"precision {precision!r}: expected one of {', '.join(DTYPES)}")
    if precision == "fp32":
        return model
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise SaintError(f"precision {precision} needs a model with transformer blocks (model.blocks)")
    for module in blocks.modules():
        if type(module) is torch.nn.Linear:
            module.to(DTYPES[precision])
            module.__class__ = LowPrecisionLinear
    return model
