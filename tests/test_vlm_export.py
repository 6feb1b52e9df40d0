"""Export of transformers towers and LLaVA's image features (tower up to the feature layer, feature
selection, projector) through the parity gate, by library and CLI; checkpoints by alias with
shipped configs. Tiny random configs, no hub."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import only_error_line, run
from test_vlm import make_tower, pixels, tiny_llava

import saint_export as se
from saint_export import runtime
from saint_export.adapters import hf_vision
from saint_export.models import architecture, load

ONNX_ONLY = dict(target="onnx", batch=(1, 3, 4), parity_images=4)


def llava_features(model, x):
    """transformers' own image-feature path (every tower layer, hidden_states[feature layer])."""
    with torch.no_grad():
        return torch.stack(model.model.get_image_features(
            pixel_values=x, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output)


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("schedule", ["none", "early50", "degree20@1"])
def test_exported_module_equals_transformers_image_features(strategy, schedule):
    model = se.apply(tiny_llava(strategy), schedule)
    x = pixels(3)
    with torch.no_grad():
        got = hf_vision.export_module(model)(x)
    want = llava_features(model, x)
    original, kept = hf_vision.image_token_counts(model, sum(model.saint.schedule.drops))
    assert got.shape == (3, kept, 64) and torch.equal(got, want)
    assert len(hf_vision.export_module(model).layers) == 3, "the tower runs only up to its feature layer (-2 of 4)"


@pytest.mark.parametrize("schedule", ["early50", "degree20@1"])
def test_llava_export_passes_the_gate_at_batch_1_and_3_and_the_runtime_runs_it(tmp_path, schedule):
    model = tiny_llava()
    result = se.export(model, tmp_path / "f", se.ExportConfig(keep_schedule=schedule, **ONNX_ONLY))
    kept = 64 - sum(result.schedule.drops)  # CLS dropped by the 'default' strategy
    assert result.parity.passed and result.parity.batch_sizes == [1, 3]
    assert result.parity.top1_free_running == 1.0 and result.parity.logits.top1_agreement is None
    manifest = se.Manifest.read(tmp_path / "f")
    assert manifest.output.name == "image_features" and manifest.output.shape == ["batch", kept, 64]
    assert manifest.features["tokens_per_image"] == kept and manifest.features["unpruned_tokens_per_image"] == 64
    assert f"max_batch_size × {kept}" in manifest.features["tensorrt_llm"]
    assert manifest.keep_schedule["rule"] == ("degree" if schedule.startswith("degree") else "vote")
    x = pixels(3)
    with runtime.open(tmp_path / "f", "onnxruntime") as runner:
        served = runner.infer(x.numpy())
    want = llava_features(model, x).numpy()
    assert served.shape == (3, kept, 64) and np.abs(served - want).max() < 1e-4


@pytest.mark.parametrize("kind, shape", [("clip", [33, 32]), ("clip-projection", [512]), ("siglip", [32, 32])])
def test_tower_exports(tmp_path, kind, shape):
    result = se.export(make_tower(kind), tmp_path / kind, se.ExportConfig(keep_schedule="early50", **ONNX_ONLY))
    assert result.parity.passed and result.manifest.output.shape == ["batch", *shape]
    assert result.manifest.features is None


def test_llm_schedule_is_recorded_for_pytorch_and_checked_first(tmp_path):
    config = se.ExportConfig(keep_schedule="early50", llm_schedule="span50@1-2", **ONNX_ONLY)
    manifest = se.export(tiny_llava(), tmp_path / "f", config).manifest
    record = manifest.features["llm_schedule"]
    assert record["spec"] == "span50@1-2" and record["image_tokens"] == 32 and record["drops"] == [0, 8, 8, 0]
    assert record["tau"] == se.LLM_TAU == 0.83 and "PyTorch" in record["applies_in"]
    for llm_schedule, message in [("r:0,17", "layer 1 drops 17 but can drop at most"),
                                  ("span50@1-9", "layers 1-9 are not within 0-3")]:
        with pytest.raises(se.InputError, match=message):
            se.export(tiny_llava(), tmp_path / "g", se.ExportConfig(llm_schedule=llm_schedule, **ONNX_ONLY))
    with pytest.raises(se.InputError, match="an LLM schedule needs a VLM"):
        se.export(make_tower("clip"), tmp_path / "g", se.ExportConfig(llm_schedule="dynamic", **ONNX_ONLY))
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("alias", list(hf_vision._own_checkpoints()))  # Qwen and anyres: their own tests
def test_every_alias_resolves_offline_from_its_shipped_config(alias):
    arch = architecture(alias)
    assert arch.source_name == hf_vision.checkpoints()[alias]["repo"]
    assert se.resolve_schedule("early50", alias).flops_ratio() < 0.7
    if alias.startswith("llava"):
        llm = se.resolve_llm_schedule("span50@7-16", alias, "degree375@19")
        assert llm.image_tokens == 375 and llm.depth == (32 if "7b" in alias else 40)


def test_llava_alias_random_weights_build_only_the_exported_parts():
    model = load(architecture("llava-1.5-7b"), "random")
    assert all(p.device.type == "meta" for p in model.model.language_model.parameters())
    exported = hf_vision.export_module(model)
    assert all(p.device.type == "cpu" for p in exported.parameters())
    assert sum(p.numel() for p in exported.parameters()) == architecture("llava-1.5-7b").num_params
    assert hf_vision.describe(model).num_patches == 576 and hf_vision.feature_depth(model) == 23


def test_cli_exports_a_local_checkpoint_folder_in_each_mode(tmp_path, capsys):
    folder = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(folder)
    code, out, err = run(capsys, str(folder), "--mode", "hybrid", "-s", "degree20@1", "--llm-schedule", "span50@1-2",
                         "-o", str(tmp_path / "hybrid"), "--batch", "1,3,4", "--parity-images", "4",
                         "--target", "onnx")
    assert code == 0, err
    manifest = json.loads((tmp_path / "hybrid" / "manifest.json").read_text())
    assert manifest["model"]["weights"] == {"source": "checkpoint folder", "path": str(folder.absolute())}
    assert manifest["output"]["shape"] == ["batch", 20, 64]
    assert manifest["features"]["llm_schedule"]["drops"] == [0, 5, 5, 0]
    assert "20 tokens per image (from 64)" in out and "LLM schedule span50@1-2: applied in PyTorch" in out
    assert "LLM schedule 'span50@1-2': 4 decoder layers" in err
    code, out, err = run(capsys, str(folder), "--mode", "llm", "-o", str(tmp_path / "llm"), "--batch", "1,3,4",
                         "--parity-images", "4", "--target", "onnx", "--weights", "random")
    assert code == 0, err
    manifest = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    assert manifest["keep_schedule"]["spec"] == "none" and manifest["features"]["llm_schedule"]["spec"] == "dynamic"
    assert manifest["output"]["shape"] == ["batch", 64, 64]


def test_infer_prints_and_saves_features_and_serve_refuses_them(tmp_path, capsys):
    se.export(tiny_llava(), tmp_path / "f", se.ExportConfig(keep_schedule="early50", **ONNX_ONLY))
    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(image)
    code, out, err = run(capsys, "infer", str(tmp_path / "f"), str(image), "--save", str(tmp_path / "o.npy"))
    assert code == 0, err
    assert f"{image}: image_features [32, 64]" in out and np.load(tmp_path / "o.npy").shape == (1, 32, 64)
    code, out, err = run(capsys, "serve", str(tmp_path / "f"))
    assert code == 2 and "not class logits: serve runs classifiers" in only_error_line(err)


@pytest.mark.parametrize("argv, message", [
    (["--mode", "vit", "--llm-schedule", "dynamic"], "--mode vit prunes only the vision tower"),
    (["--mode", "llm", "-s", "early50"], "--mode llm prunes only inside the language model"),
    (["--mode", "hybrid", "--llm-schedule", "span50@7-40"], "layers 7-40 are not within 0-31"),
    (["--mode", "hybrid", "-s", "degree375@19", "--llm-schedule", "r:189"], "layer 0 drops 189 but can drop at most"),
])
def test_cli_bad_vlm_arguments_get_one_line(tmp_path, capsys, argv, message):
    code, out, err = run(capsys, "llava-1.5-7b", *argv, "-o", str(tmp_path / "o"), "--print-schedule")
    assert code == 2 and message in only_error_line(err)
    assert not (tmp_path / "o").exists()


def test_cli_unknown_checkpoint_and_llm_mode_on_a_vit(tmp_path, capsys):
    code, _, err = run(capsys, "llava-1.5-7", "--print-schedule")
    assert code == 2 and "did you mean llava-1.5-7b" in only_error_line(err)
    code, _, err = run(capsys, "test_vit", "--mode", "llm", "--print-schedule")
    assert code == 2 and ("an LLM schedule needs a VLM (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL), "
                          "not test_vit") in only_error_line(err)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    code, _, err = run(capsys, "clip-vit-b16", "--weights", str(weights), "-o", str(tmp_path / "o"))
    assert code == 2 and "transformers checkpoints are folders" in only_error_line(err)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_libs") is None,
                    reason="TensorRT-RTX is not installed (pip install -e '.[dev]')")
def test_llava_features_build_a_tensorrt_rtx_engine_with_either_rule(tmp_path):
    for schedule in ("early50", "degree20@1"):
        result = se.export(tiny_llava(), tmp_path / schedule, se.ExportConfig(
            keep_schedule=schedule, target="trt-rtx", compute_capability="89", plugin_library="none",
            batch=(1, 2, 4), parity_images=2))
        assert result.engine.backend == "tensorrt-rtx" and (tmp_path / schedule / "engine.plan").stat().st_size > 0
        assert result.engine.operator_backend == ("onnx-function" if schedule == "early50" else "none")
        assert result.manifest.output.shape == ["batch", 32 if schedule == "early50" else 20, 64]
