"""Engine precision, expressed in the exported graph (strongly typed TensorRT builds what it reads).

fp16 / bf16: the Linear layers the adapter names (for ViTs the blocks' qkv, proj and MLP: ~95% of the
FLOPs) compute in the low precision; the residual stream, LayerNorm, the attention softmax, SAINT's scoring (keys
arrive in fp32), the patch embedding and the head stay fp32. Cast nodes around each Linear make
the choice explicit in ONNX, so no builder flag or autocast pass is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import find_adapter
from .config import PRECISIONS
from .errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LowPrecisionLinear(torch.nn.Linear):
    """nn.Linear whose weights and product are fp16/bf16, on an fp32 input and output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Switch the Linear layers the model's adapter names to `precision`, in place. int8 and fp8
    leave the model fp32: they quantize its exported graph (saint_export/quantize.py)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision not in DTYPES or precision == "fp32":
        return model
    for module in find_adapter(model).low_precision_modules(model):
        if type(module) is torch.nn.Linear:
            module.to(DTYPES[precision])
            module.__class__ = LowPrecisionLinear
    return model
