"""Model-family adapters: everything that knows a model family lives behind this boundary.

An adapter is a module (ToMe's pattern: one module per family, the same entry points) with:

| entry point | what it does |
| --- | --- |
| `family` | the family's name, recorded in manifests |
| `INPUT_NAME`, `OUTPUT_NAME` | the exported graph's input and output names |
| `resolve_name(name)` | an alias or source name → the source name, or None if not this family's |
| `known_names()` | names to suggest for a typo |
| `create(source_name, pretrained, img_size)` | the model, on the current default device |
| `load_checkpoint(model, path)` | a local checkpoint, strictly |
| `matches(model)` | whether the module is of this family at all |
| `describe(model)` | `ModelInfo`, or `InputError` for an unsupported variant of the family |
| `patch(model, droppers)` | put `TokenDropper`s into the pruning blocks |
| `export_module(model)` | the module the graph is exported from (pixel_values → the output); its parameters are what a name loads |
| `output_names(model)` | optional: the graph's outputs when there are more than `OUTPUT_NAME` (Qwen's positions) |
| `features_record(model, dropped)` | for a VLM, how an LLM runtime takes the exported features (manifest `features`), else None |
| `low_precision_modules(model)` | the Linear layers that fp16 / bf16 lowers |
| `preprocess(model)` | `images.Preprocess`: how an image becomes the model's input |
| `label_names(model)` | the head's class names, or None |
| `class_indices(model, class_names)` | image-folder class names → the head's class indices |
| `probe_parts(model)` | optional: `ProbeParts`, the model cut at its blocks (what `tune` searches on) |

Nothing outside `adapters/` and `models.py` touches a model's attributes.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ..errors import InputError

ADAPTERS = ("timm_vit", "qwen_vl", "llava_anyres", "hf_vision")  # modules of this package, asked in order
SUPPORTED = ("timm VisionTransformer-family models (ViT, DeiT, DeiT-III, register and distilled variants) and "
             "transformers CLIP/SigLIP vision towers, LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL")


@dataclass(frozen=True)
class ModelInfo:
    depth: int
    num_patches: int
    num_protected: int
    embed_dim: int
    mlp_ratio: float
    img_size: int
    patch_size: int
    # For the FLOPs ratio where the schedule's blocks are only some of the model's (Qwen2.5-VL's
    # full-attention blocks): how many blocks each stands for, itself and those since the previous.
    spans: tuple[int, ...] | None = None
    # The patch count `early<P>` brings the tokens to, as a function of P (None: round(P% ·
    # num_patches)); LLaVA-NeXT/OneVision scale it to what the unpruned model feeds the LLM.
    early_target: Callable[[float], int] | None = None
    # Tokens per pruning unit (Qwen's merge group: 4 patches), and the tokens of one attention window
    # of the blocks between pruning points (Qwen2.5-VL's windowed blocks; None: full attention).
    unit_tokens: int = 1
    window_tokens: int | None = None


class ProbeParts(NamedTuple):
    """A model cut at its pruning blocks, for `tune` (which caches every block's input):
    export_module(model)(pixels) == head(blocks run in turn on stem(pixels)) when nothing drops."""
    stem: Callable  # pixel_values → the first block's tokens [B, N, C]
    blocks: list  # the blocks a schedule covers, in order
    block_forward: Callable  # (block, tokens, select) → tokens; select(keys [B, N, d]) → kept indices or None
    head: Callable  # the last block's tokens → the exported graph's (main) output


def adapters() -> list:
    return [importlib.import_module(f"{__name__}.{name}") for name in ADAPTERS]


def find_adapter(model):
    """The adapter of `model`'s family, or one line saying what is supported."""
    for adapter in adapters():
        if adapter.matches(model):
            return adapter
    raise unsupported(type(model).__name__)


def output_names(adapter, model) -> tuple[str, ...]:
    """The exported graph's outputs, the main one first (an adapter may add more: Qwen's positions)."""
    return adapter.output_names(model) if hasattr(adapter, "output_names") else (adapter.OUTPUT_NAME,)


def unsupported(what: str) -> InputError:
    return InputError(f"unsupported model {what}: SAINT supports {SUPPORTED}")
