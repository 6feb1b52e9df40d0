"""Engines: TensorRT-RTX builds on this CPU-only machine (compute capability set explicitly);
running an engine needs a GPU, which tests/gpu covers where one exists."""
import importlib.util
import json
import shutil

import pytest
from conftest import only_error_line, run

import saint_export as se
from saint_export.artifacts import sha256
from saint_export.gpu import cuda_device
from saint_export.runtime import check_engine
from saint_export.trt.backend import load_backend

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_libs") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TOOLKIT = shutil.which("nvcc") is not None and shutil.which("cmake") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def rtx_plugin_engine(tmp_path_factory):
    if not (HAS_RTX and HAS_TOOLKIT):
        pytest.skip("needs TensorRT-RTX and the CUDA toolkit to build the plugin")
    out = tmp_path_factory.mktemp("rtx") / "plugin"
    se.export("test_vit", out, weights="random", config=se.ExportConfig(
        keep_schedule="early50", target="trt-rtx", compute_capability="89", batch=(1, 2, 4), parity_images=2))
    return out


@needs_rtx
def test_rtx_engine_with_plugin(rtx_plugin_engine):
    files = sorted(p.name for p in rtx_plugin_engine.iterdir())
    assert files == ["engine.plan", "golden_inputs.json", "golden_outputs.json", "labels.txt",
                     "libsaint_similarity_topk.so", "libsaint_similarity_topk_static.so", "manifest.json",
                     "model.onnx", "report.json"]
    manifest = json.loads((rtx_plugin_engine / "manifest.json").read_text())
    # the static-registration build of the same plugin (for Triton), under the folder's checksums
    assert "libsaint_similarity_topk_static.so" in manifest["files"]
    engine = manifest["engine"]
    assert engine["backend"] == "tensorrt-rtx" and engine["version"] == load_backend("trt-rtx").version
    assert engine["operator_backend"] == "plugin" and engine["plugin_layers"] == 3  # early50 prunes blocks 0–2
    assert engine["compute_capability"] == "8.9" and manifest["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert engine["strongly_typed"] is True  # read from the network TensorRT-RTX built
    device = cuda_device()
    if device is None:
        assert engine["verified"] is False and engine["verification"] == "not run: no CUDA GPU on this machine"
    elif device.compute_capability != "8.9":
        assert engine["verified"] is False and "this GPU is" in engine["verification"]
    else:  # an SM 8.9 GPU with TensorRT-RTX: the engine replayed the goldens through the runtime
        assert engine["verified"] is True, engine["verification"]
    assert engine["plugin"]["sha256"] == manifest["files"]["libsaint_similarity_topk.so"]["sha256"]
    assert (rtx_plugin_engine / "engine.plan").stat().st_size > 100_000


@needs_rtx
def test_rtx_engine_without_plugin_runs_the_onnx_function(tmp_path, capsys):
    code, out, err = run(capsys, "test_vit", "-s", "early50", "--weights", "random", "-o", str(tmp_path / "f"),
                         "--target", "trt-rtx", "--compute-capability", "8.6", "--plugin-lib", "none",
                         "--batch", "2", "--no-verify")
    assert code == 0, err
    engine = json.loads((tmp_path / "f" / "manifest.json").read_text())["engine"]
    assert engine["operator_backend"] == "onnx-function" and engine["plugin_layers"] == 0
    assert engine["compute_capability"] == "8.6"
    assert not (tmp_path / "f" / "libsaint_similarity_topk.so").exists()


@needs_rtx
def test_rtx_refuses_an_unsupported_compute_capability(tmp_path, capsys):
    code, _, err = run(capsys, "test_vit", "--weights", "random", "-o", str(tmp_path / "x"), "--target", "trt-rtx",
                       "--compute-capability", "90", "--plugin-lib", "none", "--no-verify")
    assert code == 2 and "cannot build for compute capability 9.0" in only_error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_target_trt_without_tensorrt_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "test_vit", "--weights", "random", "--target", "trt")
    assert code == 2
    assert "target 'trt' needs tensorrt, which cannot be imported here" in only_error_line(err)
    assert list(tmp_path.iterdir()) == []


def _doctor(folder, tmp_path, edit):
    copy = tmp_path / "doctored"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _replace_library(manifest, folder):
    (folder / "libsaint_similarity_topk.so").write_bytes(b"another library")
    manifest["files"]["libsaint_similarity_topk.so"] = {"sha256": sha256(folder / "libsaint_similarity_topk.so"),
                                                        "bytes": 15}


@needs_rtx
@pytest.mark.parametrize("edit,message", [
    (lambda m, f: m["engine"].update(version="1.6.0.1"),
     "engine was built with tensorrt-rtx 1.6.0.1, but this machine has tensorrt-rtx 1."),
    (lambda m, f: m["engine"]["plugin"].update(sha256="0" * 64),
     "differs from the one the engine was built with (sha256 000000000000…)"),
    (_replace_library, "differs from the one the engine was built with"),
    (lambda m, f: (f / "engine.plan").write_bytes(b"not an engine"),
     "engine.plan does not match the checksum in its manifest"),
    (lambda m, f: (f / "libsaint_similarity_topk.so").unlink(), "libsaint_similarity_topk.so is missing"),
    (lambda m, f: m.update(engine=None), "holds no TensorRT engine"),
    (lambda m, f: m.update(format="something-else/2"), "is not a saint-export manifest"),
])
def test_doctored_manifest_is_refused_naming_the_difference(rtx_plugin_engine, tmp_path, capsys, edit, message):
    doctored = _doctor(rtx_plugin_engine, tmp_path, edit)
    code, _, err = run(capsys, "check", str(doctored))
    assert code == 2
    assert message in only_error_line(err)


@needs_rtx
def test_engine_for_another_gpu_is_refused(rtx_plugin_engine):
    with pytest.raises(se.InputError, match="built for compute capability 8.9, but this GPU is 9.0"):
        check_engine(rtx_plugin_engine, compute_capability="9.0")
    engine, _, library = check_engine(rtx_plugin_engine, compute_capability="8.9")
    assert engine.operator_backend == "plugin" and library.name == "libsaint_similarity_topk.so"


@needs_rtx
def test_this_machine_without_gpu_is_refused(rtx_plugin_engine, capsys):
    if cuda_device() is not None:
        pytest.skip("this machine has a GPU")
    code, _, err = run(capsys, "check", str(rtx_plugin_engine))
    assert code == 2 and "has no CUDA GPU to run it" in only_error_line(err)


@needs_rtx
def test_runtime_falls_back_to_onnxruntime_and_says_why(rtx_plugin_engine):
    """On a machine that cannot run the engine, auto picks ONNX Runtime and notes why; asking for
    TensorRT explicitly is refused with the same reason."""
    import numpy as np

    import saint_export.runtime as rt

    if cuda_device() is not None:
        pytest.skip("this machine has a GPU")
    with rt.open(rtx_plugin_engine) as runner:
        assert runner.backend == "onnxruntime-cpu"
        assert runner.notes == ["TensorRT not used: engine is for compute capability 8.9, and this machine has no "
                                "CUDA GPU to run it"]
        assert runner.infer(np.zeros((1, 3, 160, 160), np.float32)).shape == (1, 1000)
    with pytest.raises(se.InputError, match="no CUDA GPU to run it"):
        rt.open(rtx_plugin_engine, backend="tensorrt")


@needs_rtx
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_rtx_low_precision_engine(tmp_path, capsys, precision):
    code, _, err = run(capsys, "test_vit", "-s", "early50", "--weights", "random", "-o", str(tmp_path / "e"),
                       "--target", "trt-rtx", "--plugin-lib", "none", "--precision", precision, "--batch", "2",
                       *(["--no-verify"] if precision == "bf16" else ["--parity-images", "4"]))
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["precision"] == precision and manifest["engine"]["strongly_typed"] is True
    assert (tmp_path / "e" / "engine.plan").stat().st_size > 100_000
