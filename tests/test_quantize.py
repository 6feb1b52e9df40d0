"""INT8 and FP8 exports: the pruned graph quantized on MatMul/Gemm inputs only, the SAINT operator
untouched, the three-tier gate, the folder running like any other, and bad input in one line."""
import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image
from conftest import only_error_line, photo_arrays, run

import saint_export as se
from saint_export.cli import main
import saint_export.runtime as rt
from saint_export import quantize, spec
from saint_export.errors import GateFailed

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_libs") is not None
HAS_TOOLKIT = shutil.which("nvcc") is not None and shutil.which("cmake") is not None


def crops(folder, count: int, seed: int = 0):
    """`count` random crops of the scikit-image photographs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = photo_arrays()
    for i in range(count):
        photo = photos[i % len(photos)]
        side = min(photo.shape[:2]) // 2
        top, left = (int(rng.integers(0, photo.shape[k] - side)) for k in (0, 1))
        Image.fromarray(photo[top:top + side, left:left + side]).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return crops(tmp_path_factory.mktemp("calibration"), 24)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, calibration):
    """test_vit early50 as fp32 and as int8, the same random weights."""
    root = tmp_path_factory.mktemp("quantized")
    for precision in ("fp32", "int8"):
        extra = ["--precision", "int8", "--calibration", str(calibration)] if precision == "int8" else []
        code = main(["test_vit", "-s", "early50", "--weights", "random", "--target", "onnx", "--batch", "1,4,8",
                            "--parity-images", "4", "-o", str(root / precision), *extra])
        assert code == 0
    return root


def graph(folder):
    return onnx.load(str(folder / "model.onnx"))


def linear_inputs(model):
    """The weighted MatMul/Gemm nodes: (quantized, float), by what feeds their two inputs."""
    producer = {out: n for n in model.graph.node for out in n.output}
    initializers = {i.name for i in model.graph.initializer}
    quantized, float_linear = [], []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and (node.input[1] in initializers or node.input[1] in producer and
                                                   producer[node.input[1]].op_type == "DequantizeLinear"):
            fed = [producer[i].op_type if i in producer else "initializer" for i in node.input[:2]]
            (quantized if fed == ["DequantizeLinear", "DequantizeLinear"] else float_linear).append(node.name)
    return quantized, float_linear


def test_only_the_blocks_linear_inputs_are_quantized_and_the_operator_is_untouched(exported):
    model, fp32 = graph(exported / "int8"), graph(exported / "fp32")
    manifest = json.loads((exported / "int8" / "manifest.json").read_text())
    record = manifest["quantization"]
    assert manifest["precision"] == "int8" and record["precision"] == "int8" and record["images"] == 24
    assert len(record["images_sha256"]) == 64 and record["method"] == "minmax"
    # timm fuses q, k and v: by default its projections are quantized, keys included
    assert record["float_key_projections"] == []
    quantized, float_linear = linear_inputs(model)
    assert len(quantized) == record["quantized_nodes"] == 6 * 4  # 6 blocks × (qkv, proj, fc1, fc2)
    assert len(float_linear) == 1  # the head
    producer = {out: n for n in model.graph.node for out in n.output}
    assert not any(n.op_type in quantize.QDQ for n in model.graph.node if n.op_type == "Conv")
    # The operator: its function byte for byte, its nodes and attributes, nothing quantized around it
    assert [f.SerializeToString() for f in model.functions] == [f.SerializeToString() for f in fp32.functions]
    saint = [n for n in model.graph.node if n.op_type == spec.OP_TYPE]
    assert [(n.domain, n.attribute) for n in saint] == [(n.domain, n.attribute) for n in fp32.graph.node
                                                        if n.op_type == spec.OP_TYPE]
    assert len(saint) == 3 and all(producer[n.input[0]].op_type not in quantize.QDQ for n in saint)
    consumers = [n for n in model.graph.node if set(n.input) & {o for s in saint for o in s.output}]
    assert consumers and not any(n.op_type in quantize.QDQ for n in consumers)
    quantize.check_operator_intact(model, fp32)


def test_float_keys_keep_the_key_projections_float(calibration, tmp_path):
    result = se.export("test_vit", tmp_path / "q", weights="random", config=se.ExportConfig(
        keep_schedule="early50", target="onnx", precision="int8", calibration=calibration, float_keys=True,
        batch=(1, 4, 8), parity_images=4))
    record = result.manifest.quantization
    # early50 prunes blocks 0-2: their qkv projections make the keys SAINT scores
    assert record["float_key_projections"] == [f"blocks.{b}.attn.qkv" for b in range(3)]
    assert record["quantized_nodes"] == 6 * 4 - 3
    quantized, float_linear = linear_inputs(graph(tmp_path / "q"))
    assert len(quantized) == 21 and len(float_linear) == 3 + 1  # the three key projections and the head
    assert record["gate"]["passed"] and record["gate"]["kept_jaccard"] >= 0.9


def test_calibration_is_cached_by_its_hash_and_reused(calibration, tmp_path, monkeypatch):
    monkeypatch.setenv("SAINT_EXPORT_CACHE", str(tmp_path / "cache"))
    records = []
    for run_ in ("first", "second"):
        result = se.export("test_vit", tmp_path / run_, weights="random", config=se.ExportConfig(
            keep_schedule="early50", target="onnx", precision="int8", calibration=calibration, batch=(1, 4, 8),
            verify=False))
        records.append(result.manifest.quantization["calibration_cache"])
    assert records[0]["key"] == records[1]["key"] and [r["reused"] for r in records] == [False, True]
    assert (tmp_path / "cache" / "calibration" / f"{records[0]['key']}.json").is_file()
    assert graph(tmp_path / "first").SerializeToString() == graph(tmp_path / "second").SerializeToString()


def test_the_gate_ran_its_three_tiers(exported):
    gate = json.loads((exported / "int8" / "manifest.json").read_text())["quantization"]["gate"]
    assert gate["passed"] and gate["kernel_mean_cosine"] >= quantize.KERNEL_MEAN_COSINE
    assert gate["kernel_min_cosine"] >= quantize.KERNEL_MIN_COSINE
    assert gate["top1_agreement"] >= 0.85 and gate["min_cosine"] >= 0.95 and 0.9 <= gate["kept_jaccard"] <= 1
    assert gate["mean_cosine"] >= 0.997
    report = json.loads((exported / "int8" / "report.json").read_text())
    assert report["quantized_gate"] == gate and report["parity"]["passed"]  # the fp32 graph passed its own gate


def test_the_folder_runs_through_the_runtime_and_infer(exported, calibration, capsys):
    runner = rt.open(exported / "int8")
    x = np.random.default_rng(3).standard_normal((5, 3, 160, 160)).astype(np.float32)
    np.testing.assert_allclose(runner.infer(x), quantize.run_graph(exported / "int8" / "model.onnx", x), rtol=1e-5,
                               atol=1e-5)
    code, out, err = run(capsys, "infer", str(exported / "int8"), str(calibration / "00.png"))
    assert code == 0 and "00.png" in out, err


def test_triton_takes_the_int8_folder_and_its_own_checks_pass(exported, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run(capsys, "triton", str(exported / "int8"), "--repository", str(repo))
    assert code == 0, err
    assert "configuration checks passed for saint_onnx" in out
    assert (repo / "saint_onnx" / "1" / "model.onnx").read_bytes() == (exported / "int8" / "model.onnx").read_bytes()


def test_a_tampered_operator_is_refused(exported):
    fp32, model = graph(exported / "fp32"), graph(exported / "int8")
    saint = next(n for n in model.graph.node if n.op_type == spec.OP_TYPE)
    keys = saint.input[0]
    scale = onnx.helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [0.1])
    model.graph.initializer.append(scale)
    model.graph.node.extend([onnx.helper.make_node("QuantizeLinear", [keys, "scale"], ["keys_q"]),
                             onnx.helper.make_node("DequantizeLinear", ["keys_q", "scale"], ["keys_dq"])])
    saint.input[0] = "keys_dq"
    with pytest.raises(GateFailed, match=f"{saint.name} has DequantizeLinear on its inputs or outputs"):
        quantize.check_operator_intact(model, fp32)
    edited = graph(exported / "int8")
    edited.functions[0].node[0].op_type = "Identity"
    with pytest.raises(GateFailed, match="the model-local function changed"):
        quantize.check_operator_intact(edited, fp32)


def test_fp8_raises_the_opset_and_passes_its_gate(calibration, tmp_path):
    result = se.export("test_vit", tmp_path / "fp8", weights="random", config=se.ExportConfig(
        keep_schedule="early50", target="onnx", precision="fp8", calibration=calibration, batch=(1, 4, 8),
        parity_images=4))
    manifest = result.manifest
    assert manifest.onnx["opset"] == 19 and manifest.quantization["gate"]["passed"]
    model = graph(tmp_path / "fp8")
    types = {i.data_type for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    assert types == {onnx.TensorProto.FLOAT8E4M3FN}  # weights stored as E4M3


def test_a_gate_threshold_missed_fails_naming_the_tier_and_writes_nothing(calibration, tmp_path, capsys):
    code, _, err = run(capsys, "test_vit", "-s", "early50", "--weights", "random", "--target", "onnx",
                       "--precision", "int8", "--calibration", str(calibration), "--min-cosine", "0.999999",
                       "-o", str(tmp_path / "q"))
    assert code == 3 and "int8 gate failed at tier (b), against eager fp32: min cosine" in err
    assert "(needs ≥ 0.999999)" in err and not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, message", [
    (["--precision", "int8"], "precision int8 needs calibration images (--calibration DIR)"),
    (["--precision", "int8", "--calibration", "FEW"], "int8 calibration needs at least 16 readable images; "),
    (["--precision", "int8", "--calibration", "CAL", "--calibration-images", "8"],
     "calibration_images must be an integer ≥ 16, got 8"),
    (["--calibration", "CAL"], "calibration images apply to int8 and fp8; precision is fp32"),
    (["--float-keys", "yes"], "float keys apply to int8 and fp8; precision is fp32"),
    (["--precision", "fp8", "--calibration", "CAL", "--target", "trt-rtx", "--compute-capability", "8.6"],
     "precision fp8 needs compute capability 8.9 or later (Ada, Hopper, Blackwell); the target is 8.6: use int8"),
])
def test_bad_quantization_input_is_one_line(argv, message, calibration, tmp_path, capsys):
    few = crops(tmp_path / "few", 3)
    argv = [str(few) if a == "FEW" else str(calibration) if a == "CAL" else a for a in argv]
    code, _, err = run(capsys, "test_vit", "--weights", "random", "--target", "onnx", "-o", str(tmp_path / "q"), *argv)
    assert code == 2 and only_error_line(err).startswith(f"saint-export: error: {message}")
    assert not (tmp_path / "q").exists()


def test_an_unknown_precision_is_refused_and_fp8_raises_the_default_opset(calibration, tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse's choices
        main(["test_vit", "--weights", "random", "-o", str(tmp_path / "q"), "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(se.InputError, match="precision 'int4': expected one of fp32, fp16, bf16, int8, fp8"):
        se.ExportConfig(precision="int4")
    assert se.ExportConfig(precision="fp8", calibration=calibration).opset == 19


def test_a_clip_tower_is_quantized_and_gated_on_feature_cosine(tmp_path):
    import torch
    from test_vlm import make_tower, pixels

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(pixels(20)):
        array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i}.png")
    result = se.export(make_tower("clip"), tmp_path / "clip", se.ExportConfig(
        keep_schedule="early50", target="onnx", precision="int8", calibration=folder, batch=(1, 4, 8),
        parity_images=4))
    gate = result.manifest.quantization["gate"]
    assert gate["passed"] and gate["top1_agreement"] is None and gate["min_cosine"] >= 0.95
    # its k_proj projects the keys alone: float by default (early50 prunes 2 of its 4 layers)
    keys = result.manifest.quantization["float_key_projections"]
    assert len(keys) == 2 and all(k.endswith("k_proj") for k in keys)
    assert result.manifest.quantization["quantized_nodes"] == 4 * 6 - 2  # q, k, v, out, fc1, fc2 per layer
    runner = rt.open(tmp_path / "clip")
    out = runner.infer(pixels(2).numpy().astype(np.float32))
    assert out.ndim == 3 and torch.isfinite(torch.from_numpy(out)).all()


@pytest.mark.skipif(not (HAS_RTX and HAS_TOOLKIT), reason="needs TensorRT-RTX and the CUDA toolkit to build the plugin")
def test_rtx_builds_a_strongly_typed_int8_engine_with_the_plugin(exported, calibration, tmp_path):
    result = se.export("test_vit", tmp_path / "rtx", weights="random", config=se.ExportConfig(
        keep_schedule="early50", target="trt-rtx", compute_capability="89", precision="int8", calibration=calibration,
        batch=(1, 2, 4), parity_images=2))
    engine = result.manifest.engine
    assert engine.strongly_typed and engine.operator_backend == "plugin" and engine.plugin_layers == 3
    assert (tmp_path / "rtx" / "engine.plan").stat().st_size > 50_000


def test_eval_puts_fp32_and_int8_side_by_side(calibration, tmp_path, capsys):
    code, out, err = run(capsys, "eval", "test_vit", "--weights", "random", "--images", str(calibration),
                         "-s", "none,early50", "--backend", "onnxruntime", "--precision", "fp32,int8",
                         "--calibration", str(calibration), "-o", str(tmp_path / "eval"))
    assert code == 0, err
    records = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [(r["schedule"], r["precision"]) for r in records] == [
        ("none", "fp32"), ("none", "int8"), ("early50", "fp32"), ("early50", "int8")]
    assert records[0]["top1_agreement"] == 1.0 and all(r["logit_cosine"] > 0.95 for r in records)
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 10_000
    code, _, err = run(capsys, "eval", "test_vit", "--weights", "random", "--images", str(calibration),
                       "--precision", "int8", "--calibration", str(calibration), "-o", str(tmp_path / "e2"))
    assert code == 2 and only_error_line(err) == ("saint-export: error: precision int8: the eager backend runs fp32; "
                                                  "use --backend onnxruntime")
