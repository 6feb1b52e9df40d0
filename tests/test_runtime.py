"""saint_export.runtime: torch-free, checks folders before running them, numpy in and out."""
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import saint_export.runtime as rt
from saint_export.validate import load_goldens


def test_import_leaves_torch_unimported():
    """The runtime and serving (which runs inside Triton's Python-backend stubs) need no torch."""
    code = ("import sys, saint_export.runtime, saint_export.images, saint_export.manifest, saint_export.serving, "
            "saint_export.serving.repository, saint_export.serving.configs; "
            "print(sorted(m for m in ('torch', 'timm', 'onnxscript', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_open_and_infer_in_a_fresh_interpreter_without_torch(exported, tmp_path):
    """The folder's golden outputs, reproduced by ONNX Runtime CPU in a process that never loads torch
    (the goldens are handed over as .npy: Polygraphy, which reads them, imports torch itself)."""
    inputs, expected = load_goldens(exported.folder, "pixel_values", "logits")
    np.save(tmp_path / "x.npy", inputs[0])
    np.save(tmp_path / "want.npy", expected[0])
    code = f"""
import sys, numpy as np, saint_export.runtime as rt
x, want = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "want.npy")!r})
with rt.open({str(exported.folder)!r}) as runner:
    got = runner.infer(x)
print(runner.backend, float(np.abs(got - want).max()), "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    backend, worst, torch_loaded = result.stdout.split()
    assert backend == "onnxruntime-cpu" and float(worst) <= 1e-5 and torch_loaded == "False"


def test_goldens_replay_through_the_runtime(exported):
    inputs, expected = load_goldens(exported.folder, "pixel_values", "logits")
    with rt.open(exported.folder) as runner:
        for x, want in zip(inputs, expected):
            assert np.abs(runner.infer(x) - want).max() <= 1e-5


def test_sixteen_threads_get_what_one_thread_gets(exported):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1 + i % 3, 3, 160, 160)).astype(np.float32) for i in range(16)]
    with rt.open(exported.folder) as runner:
        alone = [runner.infer(x) for x in batches]
        together = [None] * len(batches)
        start = threading.Barrier(len(batches))

        def work(i):
            start.wait()
            together[i] = runner.infer(batches[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_a_batch_above_the_profile_is_answered_whole(exported, monkeypatch):
    assert exported.manifest.batch[2] == 32
    x = np.random.default_rng(1).standard_normal((48, 3, 160, 160)).astype(np.float32)
    with rt.open(exported.folder) as runner:
        seen = []
        run_one = runner._run
        monkeypatch.setattr(runner, "_run", lambda batch: seen.append(len(batch)) or run_one(batch))
        logits = runner.infer(x)
        assert seen == [32, 16] and logits.shape == (48, 1000)
        assert np.allclose(logits[40:], runner.infer(x[40:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("array,message", [
    (np.zeros((3, 160, 160), np.float32), "pixel_values must have rank 4 [batch, 3, 160, 160], got rank 3"),
    (np.zeros((2, 3, 224, 224), np.float32), "pixel_values must be [batch, 3, 160, 160] with batch ≥ 1, got "
                                              "[2, 3, 224, 224]"),
    (np.zeros((0, 3, 160, 160), np.float32), "with batch ≥ 1, got [0, 3, 160, 160]"),
    (np.zeros((2, 3, 160, 160), np.float64), "pixel_values must be float32, got float64"),
    ([[1.0]], "pixel_values must be a numpy array [batch, 3, 160, 160], got list"),
])
def test_infer_refuses_wrong_inputs(exported, array, message):
    with rt.open(exported.folder) as runner:
        with pytest.raises(rt.InputError) as err:
            runner.infer(array)
    assert message in str(err.value)


def _copy(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported.folder, folder)
    return folder


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes()[:-100]),
     "model.onnx does not match the checksum in its manifest (corrupt, truncated or replaced)"),
    (lambda f: (f / "model.onnx").write_bytes(b"x" + (f / "model.onnx").read_bytes()[1:]),
     "model.onnx does not match the checksum"),
    (lambda f: (f / "model.onnx").unlink(), "model.onnx is missing"),
    (lambda f: _edit_manifest(f, lambda m: m.update(verified=False, verification="skipped")),
     "did not pass a parity gate (skipped); re-export it with verification, or allow unverified folders"),
    (lambda f: _edit_manifest(f, lambda m: m["files"].pop("model.onnx")), "lists no checksum for model.onnx"),
    (lambda f: _edit_manifest(f, lambda m: m.update(format="saint-export/1")), "is not a saint-export manifest"),
    (lambda f: _edit_manifest(f, lambda m: m.pop("preprocess")), "is not a complete saint-export/2 manifest"),
    (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda f: (f / "manifest.json").unlink(), "is not a saint-export output folder (no manifest.json)"),
])
def test_open_refuses_a_damaged_folder(exported, tmp_path, damage, message):
    folder = _copy(exported, tmp_path)
    damage(folder)
    with pytest.raises(rt.InputError) as err:
        rt.open(folder)
    assert message in str(err.value)


def test_unverified_folders_run_only_when_allowed(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    _edit_manifest(folder, lambda m: m.update(verified=False, verification="skipped"))
    with rt.open(folder, allow_unverified=True) as runner:
        assert runner.infer(np.zeros((1, 3, 160, 160), np.float32)).shape == (1, 1000)


def test_backend_choice(exported):
    with pytest.raises(rt.InputError, match="holds no TensorRT engine"):
        rt.open(exported.folder, backend="tensorrt")
    with pytest.raises(rt.InputError, match="backend 'tpu': expected one of"):
        rt.open(exported.folder, backend="tpu")
    with rt.open(exported.folder, backend="onnxruntime-cpu") as runner:
        assert runner.backend == "onnxruntime-cpu"
    runner.close()
    with pytest.raises(rt.InputError, match="this runner is closed"):
        runner.infer(np.zeros((1, 3, 160, 160), np.float32))
    with rt.open(exported.folder) as runner:  # auto, on a folder without an engine
        assert runner.backend in ("onnxruntime-cpu", "onnxruntime-cuda")
        assert runner.notes[0].startswith("TensorRT not used:")


def test_images_are_preprocessed_with_the_manifest(exported, photo_folder):
    images = rt.load_images([photo_folder], exported.manifest.preprocess)
    assert images.pixel_values.shape == (4, 3, 160, 160) and images.pixel_values.dtype == np.float32
    assert [p.name for p, _ in images.unreadable] == ["notes.jpg"]
    with pytest.raises(rt.InputError, match="no readable images"):
        rt.load_images([photo_folder / "notes.jpg"], exported.manifest.preprocess)
