"""saint-export end to end: artifacts, and one clear line for each kind of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from saint_export.artifacts import StagedOutput
from saint_export.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _only_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("saint-export:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_vit_b16_early50_random_weights(tmp_path, capsys):
    out_dir = tmp_path / "b16"
    code, out, err = run(capsys, "vit_b16", "--keep-schedule", "early50", "--weights", "random",
                         "--output", str(out_dir), "--batch", "3", "--parity-images", "4", "--target", "onnx")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["golden_inputs.json", "golden_outputs.json",
                                                         "manifest.json", "model.onnx", "report.json"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["verified"] is True
    assert manifest["model"]["timm_name"] == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert manifest["keep_schedule"]["blocks"][0] == {"block": 0, "tokens_in": 197, "dropped": 17,
                                                      "tokens_out": 180}
    assert manifest["onnx"]["opset"] == 18 and manifest["saint"] == {"tau": 0.75, "K": 5, "gamma": 10.0}
    assert set(manifest["files"]) == {"model.onnx", "report.json", "golden_inputs.json", "golden_outputs.json"}
    assert manifest["engine"] is None
    assert len(manifest["files"]["model.onnx"]["sha256"]) == 64
    assert {"torch", "timm", "onnx"} <= set(manifest["versions"])
    report = json.loads((out_dir / "report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["batch_sizes"] == [1, 3]
    assert 0.6 < report["flops_ratio"] < 0.62
    assert "exported early50" in out and "parity: passed" in out
    assert "[2/5] exporting ONNX" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_no_verify_is_recorded_and_rerun_replaces(tmp_path, capsys):
    out_dir = tmp_path / "o"
    for _ in range(2):
        code, out, err = run(capsys, "test_vit", "-s", "r:10,5", "--weights", "random", "-o", str(out_dir),
                             "--no-verify", "--target", "onnx")
        assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["verified"] is False and "--no-verify" in manifest["verification"]
    assert "NOT verified" in out


def test_checkpoint_weights(tmp_path, capsys):
    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict": make_model("test_vit", seed=3).state_dict()}, ckpt)
    code, out, err = run(capsys, "test_vit", "--weights", str(ckpt), "-o", str(tmp_path / "o"),
                         "--parity-images", "2", "--batch", "2", "--target", "onnx")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["model"]["weights"]["source"] == "file"


def test_print_schedule_needs_no_weights(capsys):
    code, out, _ = run(capsys, "vit_h14", "--print-schedule")
    assert code == 0
    assert "   15        137        8         129" in out and "FLOPs ratio" in out


def _bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save(make_model("test_vit2").state_dict(), wrong)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return [
        (["test_vit", "-s", "early", "--weights", "random"], "malformed keep schedule 'early'"),
        (["test_vit", "-s", "early1", "--weights", "random"], "cannot reach 1 of 100 patches in 3 blocks"),
        (["test_vit", "-s", "r:51", "--weights", "random"], "block 0 drops 51 but can drop at most"),
        (["test_vit", "-s", "dynamic", "--weights", "random"], "'dynamic' cannot be exported"),
        (["vit_b17", "--weights", "random"], "unknown model 'vit_b17'"),
        (["test_vit", "--weights", str(tmp_path / "missing.pth")], "no such file"),
        (["test_vit", "--weights", str(garbage)], "is not a readable checkpoint"),
        (["test_vit", "--weights", str(wrong)], "does not match the model"),
        (["test_vit", "--weights", "random", "-o", str(a_file / "out")], "cannot write to output folder"),
        (["test_vit", "--weights", "random", "-o", str(foreign)], "is not empty and holds no saint-export manifest"),
        (["test_vit", "--weights", "random", "--img-size", "150"], "--img-size 150 is not a positive multiple"),
        (["test_vit", "--weights", "random", "--batch", "0"], "--batch '0': expected N or min,opt,max"),
        (["test_vit", "--weights", "random", "--batch", "8,4,16"], "with 1 ≤ min ≤ opt ≤ max"),
        (["test_vit", "--weights", "random", "--compute-capability", "x9"], "expected e.g. 89, 8.9 or sm89"),
        (["test_vit", "--weights", "random", "--tau", "2"], "tau must be a cosine similarity"),
        (["test_vit", "--weights", "random", "--opset", "17"], "--opset 17 is not supported"),
        (["calibrate", "test_vit", "--weights", "random", "-o", str(foreign)], "is a folder, not a file"),
    ]


def test_bad_inputs_one_line_no_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = _bad_inputs(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in _only_error_line(err), (argv, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even engines/


def test_pretrained_without_hub_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = run(capsys, "test_vit", "-o", str(tmp_path / "o"))
    assert code == 2
    line = _only_error_line(err)
    assert "need the model hub" in line and "--weights random" in line
    assert not (tmp_path / "o").exists()


def test_console_script_error_exit_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "saint_export.cli", "test_vit", "-s", "r:x"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("saint-export: error: malformed keep schedule 'r:x': expected none, dynamic, "
                                     "early<P>, early<P>@<B>, r:<r0>,<r1>,… or calib:<file.json>")


def test_failed_or_interrupted_run_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(final) as staged:
            (staged.path / "model.onnx").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_gate_failure_exits_3_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import saint_export.validate as validate

    real = validate.check_onnx_parity

    def broken(*args, **kwargs):
        report = real(*args, **kwargs)
        report.max_abs_diff = 1.0
        return report

    monkeypatch.setattr(validate, "check_onnx_parity", broken)
    code, _, err = run(capsys, "test_vit", "--weights", "random", "-o", str(tmp_path / "o"), "--parity-images", "2",
                       "--target", "onnx")
    assert code == 3
    assert "parity gate FAILED" in err and "logits max |Δ|" in err
    assert list(tmp_path.iterdir()) == []


def test_calibrate_then_export(tmp_path, capsys):
    calib = tmp_path / "calib.json"
    code, out, err = run(capsys, "calibrate", "test_vit", "--weights", "random", "-o", str(calib),
                         "--num-images", "4", "--tau", "0.5")
    assert code == 0, err
    data = json.loads(calib.read_text())
    assert len(data["per_image_drops"]) == 4 and len(data["drops"]) == 3 and sum(data["drops"]) > 0
    code, out, err = run(capsys, "test_vit", "-s", f"calib:{calib}", "--weights", "random", "--tau", "0.5",
                         "-o", str(tmp_path / "o"), "--parity-images", "2", "--batch", "2", "--target", "onnx")
    assert code == 0, err
