"""vit_h14 (632 M parameters): the export that needs external data. Minutes; run with -m slow."""
import json

import pytest

import saint_export as se


@pytest.mark.slow
def test_vit_h14_early50_exports_with_external_data(tmp_path):
    out = tmp_path / "h14"
    se.export("vit_h14", out, weights="random",
              config=se.ExportConfig(keep_schedule="early50", parity_images=2, batch=2, target="onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["golden_inputs.json", "golden_outputs.json", "labels.txt",
                                                     "manifest.json", "model.onnx", "model.onnx.data", "report.json"]
    assert (out / "model.onnx.data").stat().st_size > 2_000_000_000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"] and "model.onnx.data" in manifest["files"]
    assert [b["dropped"] for b in manifest["keep_schedule"]["blocks"]] == [8] * 16 + [0] * 16
