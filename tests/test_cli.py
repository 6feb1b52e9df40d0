"""The CLI shell: argv → library calls, artifacts, exit codes, and one clear line per bad input."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import PHOTOS, make_model, only_error_line, run

from saint_export.artifacts import StagedOutput


def test_vit_b16_early50_random_weights(tmp_path, capsys):
    out_dir = tmp_path / "b16"
    code, out, err = run(capsys, "vit_b16", "--keep-schedule", "early50", "--weights", "random",
                         "--output", str(out_dir), "--batch", "3", "--parity-images", "4", "--target", "onnx")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["golden_inputs.json", "golden_outputs.json",
                                                         "labels.txt", "manifest.json", "model.onnx", "report.json"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["format"] == "saint-export/2" and manifest["verified"] is True
    assert manifest["model"]["source_name"] == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert manifest["keep_schedule"]["blocks"][0] == {"block": 0, "tokens_in": 197, "dropped": 17,
                                                      "tokens_out": 180}
    assert manifest["onnx"]["opset"] == 18 and manifest["saint"] == {"tau": 0.75, "K": 5, "gamma": 10.0}
    assert set(manifest["files"]) == {"model.onnx", "report.json", "golden_inputs.json", "golden_outputs.json",
                                      "labels.txt"}
    assert manifest["engine"] is None and manifest["batch"] == {"min": 1, "opt": 3, "max": 3}
    assert manifest["preprocess"]["crop_pct"] == 0.9 and manifest["preprocess"]["interpolation"] == "bicubic"
    assert len(manifest["files"]["model.onnx"]["sha256"]) == 64
    assert {"torch", "timm", "onnx"} <= set(manifest["versions"])
    assert (out_dir / "labels.txt").read_text().splitlines()[1] == "goldfish, Carassius auratus"
    report = json.loads((out_dir / "report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["batch_sizes"] == [1, 3]
    assert 0.6 < report["flops_ratio"] < 0.62
    assert set(report["timings_seconds"]) == {"load", "export", "parity"}  # the steps before the report
    assert "exported early50" in out and "parity: passed" in out
    assert "[2/4] exporting ONNX" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_no_verify_is_recorded_and_rerun_replaces(tmp_path, capsys):
    out_dir = tmp_path / "o"
    for _ in range(2):
        code, out, err = run(capsys, "test_vit", "-s", "r:10,5", "--weights", "random", "-o", str(out_dir),
                             "--no-verify", "--target", "onnx")
        assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["verified"] is False and "without verification" in manifest["verification"]
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
    import saint_export as se

    code, out, _ = run(capsys, "vit_h14", "--print-schedule")
    assert code == 0
    assert "   15        137        8         129" in out
    # the same FLOPs ratio as the library's, computed from vit_h14's own width (1280) and MLP ratio
    assert f"FLOPs ratio to unpruned (transformer blocks): {se.resolve_schedule('early50', 'vit_h14').flops_ratio():.3f}" \
        in out and "0.618" in out


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
        (["resnet50", "--weights", "random"], "unsupported model 'resnet50' (ResNet): SAINT supports timm "
                                              "VisionTransformer-family models"),
        (["test_vit", "--weights", str(tmp_path / "missing.pth")], "no such file"),
        (["test_vit", "--weights", str(garbage)], f"checkpoint file '{garbage}' is not readable"),
        (["test_vit", "--weights", str(wrong)], "does not match the model"),
        (["test_vit", "--weights", "random", "-o", str(a_file / "out")], "cannot write to output folder"),
        (["test_vit", "--weights", "random", "-o", str(foreign)], "is not empty and holds no saint-export manifest"),
        (["test_vit", "--weights", "random", "--img-size", "150"], "image size 150 is not a positive multiple"),
        (["test_vit", "--weights", "random", "--batch", "0"], "batch profile '0': expected N or min,opt,max"),
        (["test_vit", "--weights", "random", "--batch", "8,4,16"], "with 1 ≤ min ≤ opt ≤ max"),
        (["test_vit", "--weights", "random", "--compute-capability", "x9"], "expected e.g. 89, 8.9 or sm89"),
        (["test_vit", "--weights", "random", "--tau", "2"], "tau must be a cosine similarity"),
        (["test_vit", "--weights", "random", "--opset", "17"], "opset 17 is not supported"),
        (["test_vit", "--weights", "random", "--images", str(tmp_path / "nowhere")], "does not exist"),
        (["test_vit", "--weights", "random", "--plugin-lib", str(tmp_path / "lib.so")], "no such file"),
        (["calibrate", "test_vit", "--weights", "random", "-o", str(foreign)], "is a folder, not a file"),
        (["calibrate", "test_vit", "--weights", "random", "-o", str(tmp_path / "c.json"), "--percentile", "101"],
         "percentile must be within [0, 100]"),
        (["infer", str(foreign), str(a_file)], "is not a saint-export output folder"),
    ]


def test_bad_inputs_one_line_no_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = _bad_inputs(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in only_error_line(err), (argv, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even engines/


def test_pretrained_without_hub_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = run(capsys, "test_vit", "-o", str(tmp_path / "o"))
    assert code == 2
    line = only_error_line(err)
    assert "need the model hub" in line and "use random weights or a local checkpoint file" in line
    assert not (tmp_path / "o").exists()


def test_console_script_error_exit_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "saint_export.cli", "test_vit", "-s", "r:x"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("saint-export: error: malformed keep schedule 'r:x': expected none, dynamic, "
                                     "early<P>, early<P>@<B>, r:<r0>,<r1>,…, calib:<file.json> or degree<N>@<L>[/<r0>]")


def test_failed_or_interrupted_run_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(final) as staged:
            (staged.path / "model.onnx").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_gate_failure_exits_3_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import dataclasses

    import saint_export.pipeline as pipeline

    real = pipeline.check_onnx_parity

    def broken(*args, **kwargs):
        report = real(*args, **kwargs)
        report.logits = dataclasses.replace(report.logits, max_abs_diff=1.0)
        return report

    monkeypatch.setattr(pipeline, "check_onnx_parity", broken)
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
    assert f"use --keep-schedule calib:{calib}" in out
    code, out, err = run(capsys, "test_vit", "-s", f"calib:{calib}", "--weights", "random", "--tau", "0.5",
                         "-o", str(tmp_path / "o"), "--parity-images", "2", "--batch", "2", "--target", "onnx")
    assert code == 0, err
    blocks = json.loads((tmp_path / "o" / "manifest.json").read_text())["keep_schedule"]["blocks"]
    assert [b["dropped"] for b in blocks][:3] == data["drops"]


def test_infer_prints_top5_per_photo(exported, photo_folder, capsys):
    code, out, err = run(capsys, "infer", str(exported.folder), str(photo_folder))
    assert code == 0, err
    lines = out.splitlines()
    for name in PHOTOS:
        at = next(i for i, line in enumerate(lines) if line.endswith(name + (".jpg" if name in ("coffee", "rocket")
                                                                               else ".png")))
        top = lines[at + 1:at + 6]
        assert len(top) == 5 and all(line.startswith("  ") and "%" in line for line in top), out
        assert not lines[at + 6].startswith("  ")  # exactly five
        labels = (exported.folder / "labels.txt").read_text().splitlines()
        for line in top:  # "  probability  index  ImageNet-1k class name"
            probability, index, name = line.split(maxsplit=2)
            assert name == labels[int(index)]
    assert "4 images in" in lines[-1] and "images/s) on onnxruntime-cpu" in lines[-1]
    assert "skipped unreadable image" in err and "notes.jpg" in err


def test_infer_refuses_an_unverified_folder_unless_allowed(tmp_path, capsys, photo_folder):
    out_dir = tmp_path / "unverified"
    assert run(capsys, "test_vit", "-s", "r:10", "--weights", "random", "-o", str(out_dir), "--no-verify",
               "--target", "onnx")[0] == 0
    code, _, err = run(capsys, "infer", str(out_dir), str(photo_folder))
    assert code == 2 and "did not pass a parity gate" in only_error_line(err)
    code, out, err = run(capsys, "infer", str(out_dir), str(photo_folder), "--allow-unverified", "--top", "1")
    assert code == 0, err


def test_backend_failure_exits_1_with_the_backends_words(exported, tmp_path, capsys):
    """A model file that ONNX Runtime cannot load, though its checksum matches: a backend failure."""
    from saint_export.artifacts import sha256

    folder = tmp_path / "bad"
    import shutil

    shutil.copytree(exported.folder, folder)
    (folder / "model.onnx").write_bytes(b"not a protobuf at all")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256(folder / "model.onnx"), "bytes": 21}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "infer", str(folder), str(tmp_path))
    assert code == 1
    assert only_error_line(err).startswith("saint-export: backend error: ONNX Runtime could not load model.onnx")


def test_subcommands_and_missing_model(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "a model name is required" in only_error_line(err)
    with pytest.raises(SystemExit) as done:
        run(capsys, "--help")
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in ("export", "calibrate", "check", "infer"))
    code, out, _ = run(capsys, "--list-models")
    assert code == 0 and "vit_h14" in out and "deit3_huge_patch14_224.fb_in22k_ft_in1k" in out


def test_check_on_an_onnx_only_folder(exported, capsys):
    code, _, err = run(capsys, "check", str(exported.folder))
    assert code == 2 and "holds no TensorRT engine (it was exported for ONNX only)" in only_error_line(err)
