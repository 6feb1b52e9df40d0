"""The `saint::SimilarityTopK` operator contract: the one home of every fact about it.

Imports neither torch nor onnx, so the runtime, the TensorRT code, the CLI and the manifest can
all read it. The torch op and the ONNX function (`ops.py`), the schedule limits (`schedule.py`),
the engine builder (`trt/`) and the plugin probe test (`tests/test_plugin.py`, which compares the
C++ creator's fields with `ATTRIBUTES`) read these names; docs/operator.md describes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DOMAIN = "saint"  # ONNX domain, and the TensorRT plugin namespace
OP_TYPE = "SimilarityTopK"  # ONNX op_type, and the TensorRT plugin name
DOMAIN_VERSION = 1  # the ONNX opset version of the saint domain
# Bump when an attribute is added or removed, or the output order, tie rule or precision contract
# changes: engines, manifests and Triton configs pin it.
PLUGIN_VERSION = "2"  # 2: similarities on SIMILARITY_GRID, NaN as 0

# The precision contract (docs/operator.md): a similarity is the fp64 cosine rounded (half to even)
# to a multiple of SIMILARITY_GRID, and a NaN one (a key with a NaN or infinite component) is 0.
# The grid holds fp32's precision at |s| ≥ 0.5, removes the ~1e-16 noise of any summation order
# everywhere (rounding to fp32 did not at 0: orthogonal keys gave 0 in one backend and 1e-17 in
# another), and makes every sum of similarities exact, so all backends score bit for bit alike.
SIMILARITY_GRID = 2.0 ** -24

INPUTS = ("keys",)  # [B, N, d] fp32 / fp16 / bf16: head-averaged attention keys of all N tokens
OUTPUTS = ("keep_index", "vote_rows")  # int64 [B, N - drop] and int64 [B]
KEY_TYPES = ("float32", "float16", "bfloat16")

# SAINT's hyper-parameters (arXiv 2503.11549): similarity threshold τ, votes K, sharpness γ.
TAU = 0.75
VOTE_K = 5
GAMMA = 10.0
LLM_TAU = 0.83  # τ inside a VLM's language model: the released VLM code's saint_threshold


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int" (ONNX INT, int32 in the plugin) or "float" (ONNX FLOAT, float32)
    doc: str


# Every attribute is required on the node: the exporter writes all of them, and the plugin's
# creator refuses a node that lacks one (a silent default `drop` would prune nothing).
ATTRIBUTES = (
    Attribute("num_protected", "int", "leading tokens that never take part (CLS, distillation, registers)"),
    Attribute("drop", "int", "A tokens to drop: 0 ≤ drop ≤ ⌈n/2⌉ and n − drop ≥ 1, n = N − num_protected"),
    Attribute("tau", "float", "similarity threshold τ"),
    Attribute("vote_k", "int", "votes that make a row redundant (K), ≥ 1"),
    Attribute("gamma", "float", "score sharpness γ"),
)
# The node also carries these, for TensorRT's parser to find the plugin (not plugin fields).
PLUGIN_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}

# TensorRT's ITopKLayer limit. The operator ranks the n_A = ⌈n/2⌉ A tokens; engines built with and
# without the plugin must accept the same models, so the plugin keeps the same limit.
TOPK_LIMIT = 3840


def max_drop(patches: int) -> int:
    """The most a block with `patches` patch tokens may drop: the A half, leaving at least one."""
    return min(math.ceil(patches / 2), patches - 1)


def drop_problem(patches: int, drop: int) -> str | None:
    """Why `drop` is impossible for a block that sees `patches` patch tokens, or None."""
    n_a = math.ceil(patches / 2)
    if drop < 0:
        return f"drops {drop}, a negative count"
    if drop > n_a:
        return f"drops {drop} but can drop at most ⌈{patches}/2⌉ = {n_a} (the A half of its {patches} patches)"
    if patches - drop < 1:
        return f"would drop all {patches} remaining patches; at least one patch token must remain"
    if drop > 0 and n_a > TOPK_LIMIT:
        return f"ranks {n_a} tokens, above TensorRT's TopK limit of {TOPK_LIMIT}"
    return None
