"""INT8 and FP8: the exported, pruned graph quantized with Q/DQ, calibrated on the user's images.

What is quantized: the inputs of the MatMul / Gemm nodes of the Linear layers the adapter names
for low precision (a ViT's blocks: qkv, proj, fc1, fc2), per-channel symmetric weights and
per-tensor symmetric activations (ONNX Runtime's `quantize_static`, QDQ, S8S8, MinMax; FP8 is
E4M3 with the same placement). What stays float: LayerNorm, Softmax, GELU, the residual adds, the
patch embedding and the head (none of them is such a Linear), the attention products, and the
keys SimilarityTopK reads (its input is the float output of the key projection; no Q/DQ touches
it). The key projections themselves stay float where that is cheap, when they project the keys
alone (transformers' k_proj: keys quantized there moved the tiny test tower's kept tokens), and
are quantized where q, k and v are one fused projection (timm, Qwen), whose float copy costs the
compounding of the two speed-ups (docs/quantization.md has the measurements); `float_keys`
True / False forces either. ONNX Runtime's quantizer walks only the main graph, so the operator's function body
is never touched; `check_operator_intact` asserts it, and that no Q/DQ sits on the node's inputs
or outputs.

Pruning changes activation ranges (outlier tokens may be dropped), so calibration runs the pruned
graph. The gate (`QuantizedGate`) never compares elementwise against fp32: (a) the QDQ graph with
ONNX Runtime's optimisations off (reference Q→DQ arithmetic) against all optimisations on (integer
kernels), tightly; (b) against eager fp32 of the same schedule, top-1 agreement and logit cosine
(features: the cosine of each image's token-averaged features, since the two may keep different
tokens) over the gate's images, thresholds the user may set; (c) the overlap (Jaccard) of
the kept tokens of the quantized and the fp32 graphs, reported.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from . import compat, spec
from .config import QUANTIZED
from .errors import GateFailed, InputError
from .parity import agreeing, cosine

WEIGHTED = ("MatMul", "Gemm")
QDQ = ("QuantizeLinear", "DequantizeLinear")

# Tier (a): ONNX Runtime's integer kernels against its reference Q→DQ arithmetic on one QDQ graph.
# They differ by rounding (x86 converts S8 to U8 and fuses requantization). A wrong kernel or fusion
# moves every image, so the mean is held tight; one image may move more, where the rounding of its
# quantized keys flips a kept token (vit_b16, random weights: mean 0.9989, worst image 0.992).
KERNEL_MEAN_COSINE, KERNEL_MIN_COSINE = 0.995, 0.98


def _weighted(node, initializers: set) -> bool:
    return node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in initializers


def key_projections(model: onnx.ModelProto) -> set[str]:
    """The weighted MatMul / Gemm nodes whose outputs reach a SimilarityTopK input through
    unweighted nodes only (the projections of the keys SAINT scores)."""
    initializers = {i.name for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    found, seen = set(), set()
    frontier = [name for node in model.graph.node if node.op_type == spec.OP_TYPE for name in node.input]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if _weighted(node, initializers):
            found.add(node.name)
        else:
            frontier.extend(node.input)
    return found


def nodes_to_quantize(model: onnx.ModelProto, module_names: set[str],
                      float_keys: bool | None) -> tuple[list[str], list[str]]:
    """(the weighted nodes to quantize, the modules of `module_names` kept float because SAINT
    scores their outputs): all key projections with `float_keys`, none without, and by default
    (None) those that project the keys alone."""
    initializers = {i.name for i in model.graph.initializer}
    named = {n.name: module_names & set(compat.onnx_node_modules(n)) for n in model.graph.node
             if _weighted(n, initializers)}
    linear = {name: max(modules, key=len) for name, modules in named.items() if modules}
    if not linear:
        raise InputError("no Linear layer of the model could be found in the exported graph (its nodes carry no "
                         "module names): INT8 needs torch.onnx's dynamo exporter of torch 2.13")
    keys = key_projections(model)
    if float_keys is None:  # auto: float where it is cheap, the key-only projections
        weights = {i.name: i.dims for i in model.graph.initializer}
        fused = {n.name for n in model.graph.node if n.name in keys and _computes_qkv(weights.get(n.input[1]))}
        keep_float = keys - fused
    else:
        keep_float = keys if float_keys else set()
    return [n for n in linear if n not in keep_float], [linear[n] for n in linear if n in keep_float]


def _computes_qkv(dims) -> bool:
    """A projection at least three times wider than its input computes queries, keys and values at
    once (timm's and Qwen's fused qkv), not the keys alone (transformers' k_proj)."""
    return dims is not None and len(dims) == 2 and dims[1] >= 3 * dims[0]


class _Reader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over pixel arrays, a batch at a time."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int):
        self.batches = iter([{input_name: pixels[i:i + batch]} for i in range(0, len(pixels), batch)])

    def get_next(self):
        return next(self.batches, None)


def calibration_record(pixels: np.ndarray, precision: str, nodes: list[str], float_keys: list[str]) -> dict:
    return {"precision": precision, "images": len(pixels),
            "images_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
            "method": "minmax" if precision == "int8" else "distribution", "format": "QDQ, symmetric, per-channel weights",
            "quantized_nodes": len(nodes), "float_key_projections": float_keys}


def quantize(fp32_path: Path, out_path: Path, pixels: np.ndarray, precision: str, module_names: set[str],
             input_name: str, batch: int = 8, float_keys: bool | None = None) -> dict:
    """Write the QDQ model of `fp32_path` to `out_path`; return what the manifest records.
    `float_keys`: see `nodes_to_quantize`."""
    if precision not in QUANTIZED:
        raise InputError(f"precision {precision!r}: quantization takes {', '.join(QUANTIZED)}")
    model = onnx.load(str(fp32_path))
    nodes, kept_float = nodes_to_quantize(model, module_names, float_keys)
    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    # ONNX Runtime calibrates float8 only from the activations' distribution
    method = CalibrationMethod.MinMax if precision == "int8" else CalibrationMethod.Distribution
    record = calibration_record(pixels, precision, nodes, kept_float)
    cache = _calibration_cache(fp32_path, record, nodes)
    record["calibration_cache"] = {"key": cache.stem, "reused": cache.is_file()}
    with tempfile.TemporaryDirectory() as tmp:  # the quantizer writes its augmented model beside its inputs
        source = Path(tmp) / fp32_path.name
        for part in (fp32_path, fp32_path.with_name(fp32_path.name + ".data")):  # with external weights
            if part.exists():
                shutil.copy2(part, Path(tmp) / part.name)
        # its advice to pre-process goes through the root logger, its calibration progress to stdout
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(source), str(out_path), _Reader(input_name, pixels, batch),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHTED), per_channel=True,
                                activation_type=qtype, weight_type=qtype, nodes_to_quantize=nodes, calibrate_method=method,
                                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                            calibration_cache_path=str(cache))
        finally:
            logging.disable(logging.NOTSET)
    check_operator_intact(onnx.load(str(out_path)), model)
    return record


def _calibration_cache(fp32_path: Path, record: dict, nodes: list[str]) -> Path:
    """Where ONNX Runtime keeps the activation ranges of this graph on these images (its
    `calibration_cache_path`: measured once, read back by the next export of the same model,
    schedule, images and method). A cache cut short by an interrupt is removed."""
    from .trt.plugin import cache_dir

    key = hashlib.sha256(json.dumps([hashlib.sha256(fp32_path.read_bytes()).hexdigest(), record["images_sha256"],
                                     record["precision"], record["method"], sorted(nodes)]).encode()).hexdigest()
    path = cache_dir() / "calibration" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except (ValueError, OSError):
        path.unlink(missing_ok=True)
    return path


def check_operator_intact(quantized: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The SAINT function and nodes are what export wrote, and no Q/DQ touches them."""
    def functions(model):
        return {(f.domain, f.name): f.SerializeToString() for f in model.functions}

    def saint_nodes(model):
        return [(n.name, n.domain, [a.SerializeToString() for a in n.attribute])
                for n in model.graph.node if n.op_type == spec.OP_TYPE]

    problems = []
    if functions(quantized) != functions(original):
        problems.append("the model-local function changed")
    if saint_nodes(quantized) != saint_nodes(original):
        problems.append(f"the {spec.OP_TYPE} nodes changed")
    producer = {out: n for n in quantized.graph.node for out in n.output}
    for node in quantized.graph.node:
        if node.op_type == spec.OP_TYPE:
            touching = [producer[i].op_type for i in node.input if i in producer and producer[i].op_type in QDQ]
            touching += [n.op_type for n in quantized.graph.node if n.op_type in QDQ and set(n.input) & set(node.output)]
            if touching:
                problems.append(f"{node.name} has {', '.join(touching)} on its inputs or outputs")
    if any(n.op_type in QDQ for f in quantized.functions for n in f.node):
        problems.append("Q/DQ inside the function")
    if problems:
        raise GateFailed("quantization broke the SAINT operator: " + "; ".join(problems))


@dataclass(frozen=True)
class QuantizedGate:
    """The three tiers of a quantized export's gate (docs/parity.md)."""
    kernel_mean_cosine: float  # (a) integer kernels against reference Q→DQ
    kernel_min_cosine: float
    kernel_top1_agreement: float | None
    top1_agreement: float | None  # (b) against eager fp32 of the same schedule
    min_cosine: float
    mean_cosine: float
    kept_jaccard: float | None  # (c) kept tokens, quantized against fp32 graph (reported)
    images: int
    min_agreement: float
    min_cosine_required: float

    @property
    def failed_tier(self) -> str | None:
        # (a) on cosine alone: near-tied logits (random weights) may swap their top-1 under any rounding
        if self.kernel_mean_cosine < KERNEL_MEAN_COSINE or self.kernel_min_cosine < KERNEL_MIN_COSINE:
            return (f"tier (a), integer kernels against reference Q/DQ: mean cosine {self.kernel_mean_cosine:.5f} "
                    f"(needs ≥ {KERNEL_MEAN_COSINE}), worst image {self.kernel_min_cosine:.5f} (needs ≥ "
                    f"{KERNEL_MIN_COSINE}), top-1 agreement {_percent(self.kernel_top1_agreement)}")
        if self.min_cosine < self.min_cosine_required or (
                self.top1_agreement is not None and self.top1_agreement < self.min_agreement):
            return (f"tier (b), against eager fp32: min cosine {self.min_cosine:.4f} (needs ≥ "
                    f"{self.min_cosine_required}), top-1 agreement {_percent(self.top1_agreement)} (needs ≥ "
                    f"{self.min_agreement:.0%})")
        return None

    @property
    def passed(self) -> bool:
        return self.failed_tier is None

    def summary(self) -> str:
        jaccard = "" if self.kept_jaccard is None else f"; kept tokens {self.kept_jaccard:.1%} the same (Jaccard)"
        return (f"(a) kernels cosine mean {self.kernel_mean_cosine:.5f}, worst {self.kernel_min_cosine:.5f}; (b) vs fp32 top-1 agreement "
                f"{_percent(self.top1_agreement)}, min cosine {self.min_cosine:.4f}{jaccard}; {self.images} images")

    def as_dict(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _with_kept_outputs(path: Path, folder: Path) -> tuple[Path, list[str]]:
    """A copy of the model that also returns every SimilarityTopK node's kept indices."""
    model = onnx.load(str(path))
    kept = [n.output[0] for n in model.graph.node if n.op_type == spec.OP_TYPE]
    for name in kept:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / path.name
    onnx.save(model, str(copy))
    return copy, kept


def _run(path: Path, images: np.ndarray, optimise: bool, batch: int) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: images[i:i + batch]}) for i in range(0, len(images), batch)]
    return [np.concatenate(parts) for parts in zip(*runs)]


def run_graph(path: Path, images: np.ndarray, batch: int = 8) -> np.ndarray:
    """The main output of a graph on ONNX Runtime CPU with every optimisation (integer kernels)."""
    return _run(path, images, True, batch)[0]


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / max(1, len(set(x) | set(y))) for x, y in zip(a, b)]))


def gate(qdq_path: Path, fp32_path: Path, images: np.ndarray, eager: np.ndarray, min_agreement: float,
         min_cosine: float, batch: int = 8) -> QuantizedGate:
    """Run the three tiers on `images` (eager: the fp32 model's outputs for them)."""
    with tempfile.TemporaryDirectory() as tmp:
        quantized, kept = _with_kept_outputs(qdq_path, Path(tmp) / "q")
        reference, _ = _with_kept_outputs(fp32_path, Path(tmp) / "f") if kept else (fp32_path, [])
        integer = _run(quantized, images, True, batch)
        arithmetic = _run(quantized, images, False, batch)
        fp32_kept = _run(reference, images, True, batch)[1:] if kept else []
    ours = integer[0]
    classifier = ours.ndim == 2

    def flat(x):  # features: averaged over tokens (quantization may keep other tokens, row for row)
        return x.mean(1) if x.ndim == 3 else x.reshape(len(x), -1)

    kernel, versus_fp32 = cosine(flat(ours), flat(arithmetic[0])), cosine(flat(ours), flat(eager))
    return QuantizedGate(
        kernel_mean_cosine=float(kernel.mean()), kernel_min_cosine=float(kernel.min()),
        kernel_top1_agreement=float(np.mean(agreeing(ours, arithmetic[0]))) if classifier else None,
        top1_agreement=float(np.mean(agreeing(ours, eager))) if classifier else None,
        min_cosine=float(versus_fp32.min()), mean_cosine=float(versus_fp32.mean()),
        kept_jaccard=float(np.mean([_jaccard(q, f) for q, f in zip(integer[1:], fp32_kept)])) if kept else None,
        images=len(images), min_agreement=min_agreement, min_cosine_required=min_cosine)
