"""The export pipeline as a library: saint_export.export / calibrate / resolve_schedule."""
import json

import numpy as np
import pytest
import torch
from conftest import make_model

import saint_export as se
from saint_export.manifest import Manifest
from saint_export.validate import load_goldens


def test_export_by_name_writes_the_folder_the_cli_writes(exported):
    folder = exported.folder
    assert sorted(p.name for p in folder.iterdir()) == ["golden_inputs.json", "golden_outputs.json", "labels.txt",
                                                        "manifest.json", "model.onnx", "report.json"]
    assert exported.files == sorted(p.name for p in folder.iterdir())
    manifest = Manifest.read(folder)
    assert manifest == exported.manifest  # the typed record round-trips through its one reader
    assert manifest.verified and manifest.batch == (1, 4, 32) and manifest.engine is None
    assert manifest.input.name == "pixel_values" and manifest.input.shape == ["batch", 3, 160, 160]
    assert manifest.output.shape == ["batch", 1000] and manifest.labels == "labels.txt"
    assert manifest.preprocess.size == 160 and manifest.preprocess.crop_pct == 0.95
    assert exported.parity.passed and exported.parity.batch_sizes == [1, 4]
    assert exported.schedule.drops[:3] == (17, 17, 16)
    assert set(exported.timings) == {"load", "export", "parity", "manifest"}


def test_goldens_are_eager_outputs_of_the_exported_model(exported):
    inputs, logits = load_goldens(exported.folder, "pixel_values", "logits")
    model = se.apply(_random_test_vit(), "early50")
    with torch.no_grad():
        eager = model(torch.from_numpy(inputs[0])).numpy()
    assert np.array_equal(eager, logits[0])


def _random_test_vit():
    from saint_export import models

    return models.load(models.architecture("test_vit"), "random")


def test_export_of_a_loaded_module(tmp_path):
    model = make_model("test_vit", seed=4)
    result = se.export(model, tmp_path / "module", se.ExportConfig(keep_schedule="r:20,10", target="onnx",
                                                                  parity_images=2, batch=2))
    assert model.saint.schedule.drops[:2] == (20, 10)  # patched in place
    assert result.manifest.model["weights"] == {"source": "loaded module (given to export)"}
    assert result.manifest.keep_schedule["blocks"][1]["dropped"] == 10
    with pytest.raises(se.InputError, match="already has SAINT applied"):
        se.export(model, tmp_path / "again", se.ExportConfig(target="onnx"))
    with pytest.raises(se.InputError, match="weights apply to models given by name"):
        se.export(make_model("test_vit"), tmp_path / "w", se.ExportConfig(target="onnx"), weights="random")
    with pytest.raises(se.InputError, match="unsupported model Linear"):
        se.export(torch.nn.Linear(2, 2), tmp_path / "lin", se.ExportConfig(target="onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["module"]


def test_a_failing_gate_raises_and_writes_nothing(tmp_path, monkeypatch):
    import saint_export.pipeline as pipeline

    real = pipeline.export_onnx

    def export_then_break(model, path, *args, **kwargs):  # the ONNX side votes with another τ
        files = real(model, path, *args, **kwargs)
        import onnx

        from saint_export.onnx_graph import saint_nodes

        graph = onnx.load(str(path))
        for attr in saint_nodes(graph)[0].attribute:
            if attr.name == "tau":
                attr.f = 0.1
        onnx.save(graph, str(path))
        return files

    monkeypatch.setattr(pipeline, "export_onnx", export_then_break)
    with pytest.raises(se.GateFailed) as failure:
        se.export("test_vit", tmp_path / "out", weights="random",
                  config=se.ExportConfig(keep_schedule="early50", tau=0.5, target="onnx", parity_images=8, batch=3))
    assert "block 0 kept tokens" in str(failure.value) and "FAIL" in str(failure.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,value,message", [
    ("keep_schedule", "early", "malformed keep schedule 'early'"),
    ("tau", 1.5, "tau must be a cosine similarity"),
    ("K", 0, "K (votes for a redundant row) must be an integer ≥ 1"),
    ("precision", "int4", "precision 'int4': expected one of fp32, fp16, bf16, int8, fp8"),
    ("target", "tpu", "target 'tpu': expected one of auto, onnx, trt, trt-rtx"),
    ("opset", 17, "opset 17 is not supported"),
    ("batch", (4, 2, 8), "batch profile (4, 2, 8)"),
    ("parity_images", 0, "parity_images must be an integer ≥ 1"),
    ("compute_capability", "x", "compute capability 'x'"),
    ("plugin_library", "/nowhere/lib.so", "plugin library '/nowhere/lib.so': no such file"),
])
def test_config_refuses_bad_values_naming_them(field, value, message):
    with pytest.raises(se.InputError) as err:
        se.ExportConfig(**{field: value})
    assert message in str(err.value) and "--" not in str(err.value)  # library messages name values, not flags


def test_config_normalises(photo_folder):
    config = se.ExportConfig(batch="2,4,8", compute_capability="sm89", images=str(photo_folder))
    assert config.batch == (2, 4, 8) and config.compute_capability == "8.9" and config.images == (photo_folder,)
    assert se.ExportConfig(batch=16).batch == (1, 16, 16)


def test_flops_ratio_is_the_same_everywhere():
    """No schedule carries a default width: the ratio comes from the model, or there is none."""
    by_name = se.resolve_schedule("early50", "vit_h14")
    assert round(by_name.flops_ratio(), 3) == 0.618
    bare = se.KeepSchedule.parse("early50", depth=32, num_patches=256)
    assert bare.drops == by_name.drops
    with pytest.raises(se.ScheduleError, match="needs the model's width"):
        bare.flops_ratio()
    assert "FLOPs ratio: needs the model's width" in bare.table()
    module = se.resolve_schedule("early50", make_model("test_vit"))
    assert module.flops_ratio() == se.resolve_schedule("early50", "test_vit").flops_ratio()


def test_calibration_reproduces_the_dynamic_rule(tmp_path, photo_folder, images160):
    """calibrate() over real photographs: its per-image r is exactly what `dynamic` chooses, and the
    static schedule built from one image's r reproduces that image's dynamic run exactly."""
    calibration = se.calibrate("test_vit", photo_folder, percentile=50, weights="random", tau=0.5)
    assert len(calibration.per_image_drops) == 4  # the unreadable notes.jpg is not an image
    per_image = np.array(calibration.per_image_drops)
    assert calibration.drops == [int(np.percentile(per_image[:, b], 50)) for b in range(3)]
    assert per_image.sum() > 0
    path = calibration.save(tmp_path / "calib.json")
    assert se.Calibration.load(path) == calibration
    static = se.resolve_schedule(f"calib:{path}", "test_vit")
    assert list(static.drops[:3]) == calibration.drops

    from saint_export import models
    from saint_export.images import load_images

    arch = models.architecture("test_vit")
    images = load_images([photo_folder], arch.adapter.preprocess(models.load(arch, "random")))
    for i, drops in enumerate(calibration.per_image_drops):
        dynamic = se.apply(models.load(arch, "random"), "dynamic", tau=0.5)
        one = se.apply(models.load(arch, "random"), "r:" + ",".join(map(str, drops)), tau=0.5)
        x = torch.from_numpy(images.pixel_values[i:i + 1])
        with torch.no_grad(), se.record_kept(dynamic) as dynamic_trace, se.record_kept(one) as static_trace:
            expected, got = dynamic(x), one(x)
        assert [k.dropped for k in dynamic_trace] == drops
        kept_dynamic = [k.keep_index for k in dynamic_trace if k.keep_index is not None]
        kept_static = [k.keep_index for k in static_trace]
        assert all(torch.equal(a, b) for a, b in zip(kept_dynamic, kept_static)) and len(kept_static) == len(kept_dynamic)
        assert torch.equal(got, expected)
