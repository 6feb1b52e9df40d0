"""saint_export.runtime: torch-free, checks folders before running them, numpy in and out."""
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

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


def edited_copy(folder, tmp_path, edit):
    """A copy of `folder` whose manifest.json was changed by `edit(dict)`, checksums untouched."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _set(*path_and_value):
    *path, key, value = path_and_value

    def edit(manifest):
        target = manifest
        for part in path:
            target = target[part]
        target[key] = value
    return edit


@pytest.mark.parametrize("edit, field, said, found", [
    (_set("keep_schedule", "blocks", 2, "dropped", 17), "keep_schedule.blocks[2].dropped", "17", "16"),
    (_set("keep_schedule", "spec", "early25"), "keep_schedule.spec", "early25", "early50"),
    (_set("keep_schedule", "num_protected", 0), "keep_schedule.num_protected", "0", "1"),
    (_set("input", "shape", 2, 224), "input.shape[2]", "224", "160"),
    (_set("input", "dtype", "float16"), "input.dtype", "float16", "float32"),
    (_set("output", "shape", 1, 10), "output.shape[1]", "10", "1000"),
    (_set("output", "name", "probabilities"), "output.name", "probabilities", "logits"),
    (_set("saint", "tau", 0.8), "saint.tau", "0.8", "0.75"),
    (_set("saint", "K", 4), "saint.K", "4", "5"),
    (_set("onnx", "operator", "plugin_version", "1"), "operator_nodes[0].plugin_version", "1", "2"),
])
def test_an_edited_manifest_is_refused_with_the_field_named(exported, tmp_path, edit, field, said, found):
    folder = edited_copy(exported.folder, tmp_path, edit)
    with pytest.raises(rt.InputError) as caught:
        rt.open(folder)
    message = str(caught.value)
    assert f"disagrees with model.onnx on {field} (manifest: {said}, graph: {found})" in message
    assert "\n" not in message


def test_a_graph_without_the_record_is_still_checked_on_its_operator_nodes(exported, tmp_path):
    """Folders exported before the graph carried the schedule: the SimilarityTopK attributes decide."""
    import onnx

    from saint_export.artifacts import sha256

    def strip_record_and_raise_a_drop(manifest):
        manifest["keep_schedule"]["blocks"][0]["dropped"] += 1

    folder = edited_copy(exported.folder, tmp_path, strip_record_and_raise_a_drop)
    model = onnx.load(str(folder / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256(folder / "model.onnx"),
                                       "bytes": (folder / "model.onnx").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(rt.InputError, match=r"on operator_nodes\[0\]\.drop \(manifest: 18, graph: 17\)"):
        rt.open(folder)
    manifest["keep_schedule"]["blocks"][0]["dropped"] -= 1  # the true manifest opens
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rt.open(folder).close()


def test_the_cli_refuses_an_edited_manifest_in_one_line(exported, tmp_path, capsys):
    from conftest import only_error_line, run

    folder = edited_copy(exported.folder, tmp_path, _set("keep_schedule", "blocks", 0, "dropped", 18))
    code, _, err = run(capsys, "infer", str(folder), str(tmp_path / "none.jpg"))
    assert code == 2 and "keep_schedule.blocks[0].dropped (manifest: 18, graph: 17)" in only_error_line(err)


def test_an_edited_degree_schedule_is_refused(tmp_path):
    """The degree rule exports as TopK (no SimilarityTopK node): the graph's own record decides."""
    import saint_export as se

    result = se.export("test_vit", tmp_path / "degree", weights="random",
                       config=se.ExportConfig(keep_schedule="degree50@2", target="onnx", parity_images=2))
    rt.open(result.folder).close()
    for edit, field in [(_set("keep_schedule", "blocks", 2, "dropped", 49), "keep_schedule.blocks[2].dropped"),
                        (_set("keep_schedule", "r0", 3), "keep_schedule.r0")]:
        folder = edited_copy(result.folder, tmp_path / field, edit)
        with pytest.raises(rt.InputError, match=rf"on {re.escape(field)} \(manifest: \d+, graph: \d+\)"):
            rt.open(folder)


class FakeEngine:
    """What TrtRunner reads of a TensorRT engine and its execution context, run with numpy: a
    features engine with an fp16 input, the features (fp32) and their positions (int64)."""
    INPUT, OUTPUTS = "pixel_values", {"image_features": np.float32, "image_positions": np.int64}
    num_io_tensors = 3

    def get_tensor_name(self, index):
        return [self.INPUT, *self.OUTPUTS][index]

    def get_tensor_dtype(self, name):
        return np.float16 if name == self.INPUT else self.OUTPUTS[name]


class FakeContext:
    def __init__(self, memory):
        self.memory, self.addresses = memory, {}

    def set_input_shape(self, name, shape):
        self.batch = shape[0]

    def get_tensor_shape(self, name):
        return (self.batch, 3) if name == "image_features" else (self.batch, 2)

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def execute_async_v3(self, stream):
        if set(self.addresses) != {FakeEngine.INPUT, *FakeEngine.OUTPUTS}:
            return False  # TensorRT runs only with every tensor bound
        x = self.memory[self.addresses[FakeEngine.INPUT]]
        assert x.dtype == np.float16  # cast to the engine's input dtype
        self.memory[self.addresses["image_features"]][...] = x.mean(axis=(2, 3))
        self.memory[self.addresses["image_positions"]][...] = np.arange(2)
        return True


def fake_trt_runner(memory):
    """A TrtRunner over FakeEngine, with device memory as numpy arrays keyed by their 'pointer'."""
    from types import SimpleNamespace

    from saint_export.manifest import TensorRecord

    class DeviceArray:
        def __init__(self, shape, dtype):
            self.ptr = len(memory)
            memory[self.ptr] = np.empty(shape, dtype)

        def copy_from(self, array, stream):
            memory[self.ptr][...] = array

        def copy_to(self, array, stream):
            array[...] = memory[self.ptr]

        def free(self):
            pass

    runner = rt.TrtRunner.__new__(rt.TrtRunner)
    rt.Runner.__init__(runner, Path("model.plan"), TensorRecord("pixel_values", ["batch", 3, 4, 4]),
                       TensorRecord("image_features", ["batch", 3]), max_batch=2)
    runner.backend, runner.engine, runner._cuda = "tensorrt", FakeEngine(), SimpleNamespace(DeviceArray=DeviceArray)
    runner._trt_nptype = lambda dtype: dtype
    runner._outputs = list(FakeEngine.OUTPUTS)
    runner._pool = queue.Queue()
    runner._pool.put((FakeContext(memory), SimpleNamespace(ptr=0, synchronize=lambda: None)))
    return runner


def test_the_tensorrt_runner_binds_every_output_in_the_engines_dtypes():
    """TensorRT runs an engine only with all its outputs bound: `infer` on a features engine binds
    the positions too, and `infer_all` returns them in the engine's dtype (batches split at 2)."""
    runner = fake_trt_runner({})
    x = np.random.default_rng(0).random((3, 3, 4, 4), dtype=np.float32)
    features = runner.infer(x)
    assert features.dtype == np.float32 and np.allclose(features, x.mean(axis=(2, 3)), atol=1e-3)
    runner.extra_output_names = ("image_positions",)
    outputs = runner.infer_all(x)
    assert list(outputs) == ["image_features", "image_positions"]
    assert outputs["image_positions"].dtype == np.int64 and outputs["image_positions"].tolist() == [[0, 1]] * 3
    runner.extra_output_names = ("deepstack_features",)
    with pytest.raises(rt.InputError, match=r"^model.plan has no output deepstack_features \(it has image_features, "
                                            r"image_positions\): the manifest belongs to another engine$"):
        runner.infer_all(x)


