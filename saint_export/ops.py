"""The `saint::SimilarityTopK` operator (docs/operator.md; contract in `spec.py`) for PyTorch and ONNX.

- `torch.ops.saint.similarity_topk`: a torch.library custom op whose eager implementation is
  `core.similarity_topk` (the reference) and whose fake implementation gives static shapes, so
  torch.export sees one opaque node instead of tracing the selection.
- In ONNX it becomes a `saint::SimilarityTopK` node carrying the TensorRT plugin attributes
  (`plugin_namespace`, `plugin_version`), plus a model-local function of the same name and domain
  that spells the operator out in standard ops, so ONNX Runtime runs the same file and TensorRT
  (≥ 10.7) prefers the registered plugin over the function.
"""
from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from . import core, spec
from .spec import DOMAIN, OP_TYPE


@torch.library.custom_op("saint::similarity_topk", mutates_args=())
def similarity_topk(keys: torch.Tensor, num_protected: int, drop: int, tau: float, vote_k: int,
                    gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    return core.similarity_topk(keys, num_protected, drop, tau, vote_k, gamma)


@similarity_topk.register_fake
def _similarity_topk_shapes(keys, num_protected, drop, tau, vote_k, gamma):
    batch, num_tokens, _ = keys.shape
    return (keys.new_empty((batch, num_tokens - drop), dtype=torch.int64),
            keys.new_empty((batch,), dtype=torch.int64))


def _register_onnx_schema() -> None:
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    types = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    onnx_types = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}
    attributes = [OpSchema.Attribute(a.name, types[a.type], a.doc, required=True) for a in spec.ATTRIBUTES]
    attributes += [OpSchema.Attribute(name, OpSchema.AttrType.STRING, "TensorRT plugin lookup", required=False)
                   for name in spec.PLUGIN_ATTRIBUTES]
    onnx.defs.register_schema(OpSchema(
        OP_TYPE, DOMAIN, spec.DOMAIN_VERSION,
        doc="SAINT similarity top-k: kept token indices in SAINT order, and the vote diagnostic.",
        inputs=[OpSchema.FormalParameter(spec.INPUTS[0], "T")],
        outputs=[OpSchema.FormalParameter(name, "tensor(int64)") for name in spec.OUTPUTS],
        type_constraints=[("T", [onnx_types[t] for t in spec.KEY_TYPES], "keys")],
        attributes=attributes,
    ))


_register_onnx_schema()
_saint_opset = onnxscript.values.Opset(DOMAIN, spec.DOMAIN_VERSION)

FLOAT, INT64, DOUBLE = 1, 7, 11  # onnx.TensorProto data types for Cast


@onnxscript.script(_saint_opset, default_opset=op)
def SimilarityTopK(keys, num_protected: int, drop: int, tau: float, vote_k: int, gamma: float):
    """core.similarity_topk in standard ONNX ops, line for line (fp64 accumulation, fp32 score)."""
    end = op.Constant(value_ints=[9223372036854775807])
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    last = op.Constant(value_ints=[-1])
    fone = op.Cast(op.Constant(value_float=1.0), to=DOUBLE)
    p = op.Reshape(op.Constant(value_int=num_protected), one)
    t = op.Cast(op.Constant(value_float=tau), to=DOUBLE)

    patches = op.Slice(op.Cast(keys, to=DOUBLE), p, end, one)
    norm = op.Sqrt(op.ReduceSum(op.Mul(patches, patches), last, keepdims=1))
    unit = op.Div(patches, op.Max(norm, op.Cast(op.Constant(value_float=1e-12), to=DOUBLE)))
    set_b = op.Slice(unit, one, end, one, two)
    sim = op.MatMul(op.Slice(unit, zero, end, one, two), op.Transpose(set_b, perm=[0, 2, 1]))
    # core.snap_similarity: on the 2^-24 grid (spec.SIMILARITY_GRID; Round is half to even), NaN as 0
    steps = op.Cast(op.Constant(value_float=16777216.0), to=DOUBLE)
    fzero = op.Cast(op.Constant(value_float=0.0), to=DOUBLE)
    sim = op.Where(op.IsNaN(sim), fzero, op.Div(op.Round(op.Mul(sim, steps)), steps))
    edges = op.Cast(op.GreaterOrEqual(sim, t), to=DOUBLE)
    votes = op.ReduceSum(edges, last, keepdims=0)
    mean_valid = op.Div(op.ReduceSum(op.Mul(sim, edges), last, keepdims=0), op.Max(votes, fone))
    n_b = op.Cast(op.Shape(set_b, start=1, end=2), to=DOUBLE)
    mean_all = op.Div(op.ReduceSum(sim, last, keepdims=0), op.Max(n_b, fone))
    g = op.Cast(op.Constant(value_float=gamma), to=DOUBLE)
    voted = op.Mul(votes, op.Exp(op.Mul(g, op.Sub(mean_valid, t))))
    score = op.Cast(op.Where(op.Greater(votes, fzero), voted, mean_all), to=FLOAT)
    k = op.Cast(op.Constant(value_int=vote_k), to=DOUBLE)
    vote_rows = op.ReduceSum(op.Cast(op.GreaterOrEqual(votes, k), to=INT64), last, keepdims=0)

    # TopK: descending, lower index first on ties (ONNX spec); the first `drop` go.
    sorted_scores, order = op.TopK(score, op.Shape(score, start=1, end=2), axis=-1, largest=1, sorted=1)
    kept_a = op.Add(op.Mul(op.Slice(order, op.Reshape(op.Constant(value_int=drop), one), end, one), two), p)
    batch = op.Shape(keys, start=0, end=1)
    protected = op.Range(op.Squeeze(zero), op.Squeeze(p), op.Squeeze(one))
    all_b = op.Range(op.Squeeze(op.Add(p, one)), op.Squeeze(op.Shape(keys, start=1, end=2)), op.Squeeze(two))
    keep_index = op.Concat(
        op.Expand(op.Unsqueeze(protected, zero), op.Concat(batch, op.Shape(protected), axis=0)),
        kept_a,
        op.Expand(op.Unsqueeze(all_b, zero), op.Concat(batch, op.Shape(all_b), axis=0)),
        axis=1)
    return keep_index, vote_rows


def function_proto(opset: int = 18) -> onnx.FunctionProto:
    """The model-local function; it also declares the plugin attributes the node carries.

    ONNX requires a function to import the model's opset; every operator of the body means the
    same in opsets 18 to 23.
    """
    proto = SimilarityTopK.to_function_proto()
    proto.attribute.extend(spec.PLUGIN_ATTRIBUTES)
    for entry in proto.opset_import:
        if entry.domain == "":
            entry.version = opset
    return proto


def _onnx_translation(keys, num_protected: int, drop: int, tau: float, vote_k: int, gamma: float):
    return _saint_opset.SimilarityTopK(
        keys, num_protected=num_protected, drop=drop, tau=tau, vote_k=vote_k, gamma=gamma,
        **spec.PLUGIN_ATTRIBUTES, _num_outputs=len(spec.OUTPUTS))


CUSTOM_TRANSLATION_TABLE = {torch.ops.saint.similarity_topk.default: _onnx_translation}
