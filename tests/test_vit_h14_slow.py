"""vit_h14 (632 M parameters): the export that needs external data. Minutes; run with -m slow."""
import json

import pytest

from saint_export.cli import main


@pytest.mark.slow
def test_vit_h14_early50_exports_with_external_data(tmp_path):
    out = tmp_path / "h14"
    assert main(["vit_h14", "-s", "early50", "--weights", "random", "-o", str(out),
                 "--parity-images", "2", "--batch", "2", "--target", "onnx"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["golden_inputs.json", "golden_outputs.json", "manifest.json",
                                                     "model.onnx", "model.onnx.data", "report.json"]
    assert (out / "model.onnx.data").stat().st_size > 2_000_000_000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"] and "model.onnx.data" in manifest["files"]
    assert [b["dropped"] for b in manifest["keep_schedule"]["blocks"]] == [8] * 16 + [0] * 16
