"""Serving on Triton: `saint-export serve` on the real Triton server bundled in nvidia-pytriton
(loopback, free ports), and the production repositories of `saint-export triton`, checked by
Triton's own protobuf definitions and by the server's own configuration checks."""
import dataclasses
import io
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import PHOTOS, only_error_line, photo_arrays, run
from PIL import Image
from tritonclient.utils import InferenceServerException

import saint_export as se
from saint_export import models, runtime, serving
from saint_export.artifacts import checksums
from saint_export.manifest import EngineRecord, Manifest, PluginRecord
from saint_export.serving import configs
from saint_export.serving.server import BACKEND_MISSING
from saint_export.trt.plugin import LIBRARY, STATIC_LIBRARY

CLIENTS = 8
TOLERANCE = 1e-5


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: the server and its Python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def served(exported):
    """`saint-export serve` on the test_vit early50 export, as a user starts it."""
    ports = {name: serving.free_port() for name in ("http", "grpc", "metrics")}
    command = [sys.executable, "-m", "saint_export.cli", "serve", str(exported.folder),
               "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
               "--metrics-port", str(ports["metrics"]), "--max-queue-delay-us", "20000", "--top", "3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    printed, deadline = [], time.monotonic() + 120
    while not (printed and printed[0].startswith("ready:")):
        try:
            printed.append(lines.get(timeout=1))
        except queue.Empty:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the server was not ready in 120 s"
    time.sleep(0.5)  # the rest of the banner
    while not lines.empty():
        printed.append(lines.get())
    yield process, ports, "".join(printed)
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reference(exported):
    """Eager PyTorch (the pruned model with the export's weights) and the runtime, side by side."""
    model = se.apply(models.load(models.architecture("test_vit"), "random"), "early50")
    runner = runtime.open(exported.folder)

    def outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy(), runner.infer(x)

    yield outputs
    runner.close()


def _pool(images160) -> np.ndarray:
    return images160.numpy().astype(np.float32)


def _infer(protocol: str, url: str, x: np.ndarray, model="saint", name="pixel_values", datatype="FP32"):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(url)
    request = module.InferInput(name, list(x.shape), datatype)
    request.set_data_from_numpy(x)
    return client.infer(model, [request])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_eight_clients_get_the_runtime_and_eager_outputs_and_requests_are_batched(served, reference, images160,
                                                                                  protocol):
    _, ports, _ = served
    url = f"127.0.0.1:{ports[protocol]}"
    pool = _pool(images160)
    stats_client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    before = stats_client.get_inference_statistics("saint", as_json=True)["model_stats"][0]
    requests = [[np.ascontiguousarray(pool[(c + j + np.arange(1 + 2 * (j % 2))) % len(pool)]) for j in range(6)]
                for c in range(CLIENTS)]  # batch 1 and 3 in turn
    served_outputs = [[None] * 6 for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        start.wait()
        for j, x in enumerate(requests[c]):
            served_outputs[c][j] = _infer(protocol, url, x).as_numpy("logits")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in range(CLIENTS):
        for j, x in enumerate(requests[c]):
            eager, direct = reference(x)
            got = served_outputs[c][j]
            assert got.shape == (len(x), 1000) and got.dtype == np.float32
            assert np.abs(got - direct).max() <= TOLERANCE
            assert np.abs(got - eager).max() <= TOLERANCE
    after = stats_client.get_inference_statistics("saint", as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == CLIENTS * (1 + 3 + 1 + 3 + 1 + 3)
    assert executions < CLIENTS * 6  # fewer executions than requests: the dynamic batcher merged them


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def test_image_endpoint_returns_the_runtime_top_k_with_labels(served, exported, tmp_path):
    _, ports, _ = served
    files = []
    for name, array, fmt in zip(PHOTOS, photo_arrays(), ["JPEG", "PNG"] * len(PHOTOS)):
        files.append(tmp_path / f"{name}.{fmt.lower()}")
        files[-1].write_bytes(_encoded(array, fmt))
    manifest = Manifest.read(exported.folder)
    with runtime.open(exported.folder) as runner:
        want_ids, want_scores = runtime.top_k(runner.infer(runtime.load_images(files, manifest.preprocess)
                                                           .pixel_values), 3)
    labels = (exported.folder / "labels.txt").read_text().splitlines()
    blobs = np.array([[f.read_bytes()] for f in files], dtype=np.object_)
    for protocol in ("http", "grpc"):
        result = _infer(protocol, f"127.0.0.1:{ports[protocol]}", blobs, model="saint_images", name="images",
                        datatype="BYTES")
        assert (result.as_numpy("class_ids") == want_ids).all()
        assert np.abs(result.as_numpy("scores") - want_scores).max() <= TOLERANCE
        assert [[b.decode() for b in row] for row in result.as_numpy("labels")] == \
            [[labels[i] for i in row] for row in want_ids]


def test_classification_extension_uses_the_label_file(served, reference, images160, exported):
    """`class_count` on the logits output: Triton's own top-k with the folder's labels.txt."""
    _, ports, _ = served
    x = _pool(images160)[:2]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    request = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    result = client.infer("saint", [request], outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    _, direct = reference(x)
    labels = (exported.folder / "labels.txt").read_text().splitlines()
    for row, logits in zip(result.as_numpy("logits"), direct):
        entries = [entry.decode().split(":", 2) for entry in row]
        assert [int(index) for _, index, _ in entries] == list(np.argsort(-logits)[:3])
        assert [name for _, _, name in entries] == [labels[i] for i in np.argsort(-logits)[:3]]


BAD_REQUESTS = {
    "wrong shape": (dict(x=np.zeros((1, 3, 10, 10), np.float32)), "expected [-1,3,160,160], got [1,3,10,10]"),
    "wrong rank": (dict(x=np.zeros((3, 160, 160), np.float32)), "expected [-1,3,160,160], got [3,160,160]"),
    "fp64": (dict(x=np.zeros((1, 3, 160, 160)), datatype="FP64"), "data-type is 'fp64', but model 'saint' "
             "expects 'fp32'"),
    "unknown input": (dict(x=np.zeros((1, 3, 160, 160), np.float32), name="image"),
                      "unexpected inference input 'image'"),
    "batch over the maximum": (dict(x=np.zeros((33, 3, 160, 160), np.float32)), "batch-size must be <= 32"),
    "not an image": (dict(x=np.array([[_encoded(np.zeros((8, 8, 3), np.uint8), "PNG")], [b"GIF89a-but-not-really"]],
                                     dtype=np.object_), model="saint_images", name="images", datatype="BYTES"),
                     "images[0] is not a readable image"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_request_gets_an_error_naming_it_and_serving_goes_on(served, reference, images160, protocol, case):
    _, ports, _ = served
    url = f"127.0.0.1:{ports[protocol]}"
    arguments, expected = BAD_REQUESTS[case]
    arguments = dict(arguments)
    if case == "not an image":  # the first image is fine, the second is not
        arguments["x"] = arguments["x"][::-1].copy()
    with pytest.raises(InferenceServerException) as error:
        _infer(protocol, url, arguments.pop("x"), **arguments)
    assert expected in str(error.value).lower(), str(error.value)
    x = _pool(images160)[:2]
    _, direct = reference(x)
    assert np.abs(_infer(protocol, url, x).as_numpy("logits") - direct).max() <= TOLERANCE


def test_a_client_killed_mid_request_disturbs_no_other(served, reference, images160):
    _, ports, _ = served
    url = f"127.0.0.1:{ports['http']}"
    flood = ("import numpy as np, tritonclient.http as h\n"
             f"c = h.InferenceServerClient('{url}')\n"
             "x = np.ones((32, 3, 160, 160), np.float32)\n"
             "i = h.InferInput('pixel_values', list(x.shape), 'FP32'); i.set_data_from_numpy(x)\n"
             "print('sending', flush=True)\n"
             "while True: c.infer('saint', [i])\n")
    victim = subprocess.Popen([sys.executable, "-c", flood], stdout=subprocess.PIPE, text=True)
    assert victim.stdout.readline().strip() == "sending"
    x = _pool(images160)[:3]
    _, direct = reference(x)
    results, errors = [], []

    def bystander() -> None:
        for _ in range(4):
            try:
                results.append(np.abs(_infer("grpc", f"127.0.0.1:{ports['grpc']}", x).as_numpy("logits")
                                      - direct).max())
            except Exception as err:  # noqa: BLE001  (any failure of a bystander is the finding)
                errors.append(err)

    threads = [threading.Thread(target=bystander) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    victim.kill()
    victim.wait()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 16 and max(results) <= TOLERANCE
    assert httpclient.InferenceServerClient(url).is_server_ready()


def test_health_metadata_statistics_and_metrics(served):
    _, ports, banner = served
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("saint_images")
    metadata = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}").get_model_metadata("saint",
                                                                                                  as_json=True)
    assert metadata["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": ["-1", "3", "160", "160"]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "1000"]}]
    config = client.get_model_config("saint")
    assert config["max_batch_size"] == 32 and "dynamic_batching" in config
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics") as response:
        metrics = response.read().decode()
    assert 'nv_inference_count{model="saint",version="1"}' in metrics
    assert "nv_inference_queue_summary_us" in metrics
    assert f"http://127.0.0.1:{ports['http']}" in banner and "onnxruntime-cpu" in banner
    assert 'client.infer("saint", [request])' in banner


def test_sigterm_stops_the_server_within_15_s_leaving_no_process(served):
    process, ports, _ = served
    family = _descendants(process.pid)
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in family if _alive(pid)}
    assert "tritonserver" in names and any(name.startswith("triton_python") for name in names), names
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)  # orphaned stubs are reaped by init
    assert [pid for pid in family if _alive(pid)] == []
    assert "stopped" in process.stderr.read()
    with pytest.raises(Exception):
        httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}").is_server_live()


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _rewrite_manifest(folder: Path, extra_files=(), **changes) -> None:
    manifest = dataclasses.replace(Manifest.read(folder), **changes)
    dataclasses.replace(manifest, files=checksums(folder, [*manifest.files, *extra_files])).write(folder)


def test_serve_refuses_corrupt_and_unverified_folders_and_busy_ports(exported, tmp_path, capsys):
    corrupt = _copy(exported.folder, tmp_path, "corrupt")
    with open(corrupt / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    code, _, err = run(capsys, "serve", str(corrupt), "--http-port", str(serving.free_port()))
    assert code == 2 and "model.onnx does not match the checksum" in only_error_line(err)
    unverified = _copy(exported.folder, tmp_path, "unverified")
    _rewrite_manifest(unverified, verified=False, verification="not run")
    code, _, err = run(capsys, "serve", str(unverified))
    assert code == 2 and "did not pass a parity gate" in only_error_line(err)
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(capsys, "serve", str(exported.folder), "--http-port", str(port))
    assert code == 2 and f"HTTP port {port} on 127.0.0.1 is not available" in only_error_line(err)


# --- production repositories -------------------------------------------------------------------


def _parse(path: Path):
    return configs.parse(path.read_text())


def test_production_repository_for_an_onnx_folder(exported, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run(capsys, "triton", str(exported.folder), "--repository", str(repo), "--instances", "2")
    assert code == 0, err
    assert "configuration checks passed for saint_onnx (both config names)" in out
    gpu, cpu = _parse(repo / "saint_onnx" / "config.pbtxt"), _parse(repo / "saint_onnx" / "configs" / "cpu.pbtxt")
    for config, kind in ((gpu, "KIND_GPU"), (cpu, "KIND_CPU")):
        assert config.backend == "onnxruntime" and config.max_batch_size == 32
        assert [(t.name, list(t.dims)) for t in config.input] == [("pixel_values", [3, 160, 160])]
        assert [(t.name, list(t.dims), t.label_filename) for t in config.output] == [("logits", [1000], "labels.txt")]
        assert config.input[0].data_type == config.output[0].data_type == configs._pb().TYPE_FP32
        assert [(g.count, configs._pb().ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == \
            [(2, kind)]
        assert config.dynamic_batching.max_queue_delay_microseconds == configs.DEFAULT_QUEUE_DELAY_US
    assert (repo / "saint_onnx" / "1" / "model.onnx").read_bytes() == (exported.folder / "model.onnx").read_bytes()
    assert not (repo / "saint_trt").exists() and "holds no engine" in out
    for config_name in (None, "cpu"):  # the server's own verdict, asked directly
        outcome = serving.check_repository(repo, config_name)
        assert list(outcome) == ["saint_onnx"] and BACKEND_MISSING in outcome["saint_onnx"]


def test_triton_checks_reject_a_broken_config(exported, tmp_path):
    """The check the writer relies on is not vacuous: Triton refuses a config it should refuse."""
    repo = serving.write_repository(exported.folder, tmp_path / "repo").path
    config = _parse(repo / "saint_onnx" / "config.pbtxt")
    config.dynamic_batching.preferred_batch_size.append(64)  # above max_batch_size 32
    configs.write(config, repo / "saint_onnx" / "config.pbtxt")
    outcome = serving.check_repository(repo)["saint_onnx"]
    assert BACKEND_MISSING not in outcome and "preferred size must be <= max batch size" in outcome


def _with_engine(exported, tmp_path: Path, backend: str, static_library: bool = True) -> Path:
    """The exported folder with a TensorRT engine record, for the repository writer (which copies the
    plan and the plugin and never reads them: no TensorRT 10 builder exists on this machine)."""
    folder = _copy(exported.folder, tmp_path, f"with-{backend}")
    (folder / "engine.plan").write_bytes(b"plan bytes")
    (folder / LIBRARY).write_bytes(b"getCreators library")
    extra = ["engine.plan", LIBRARY]
    if static_library:
        (folder / STATIC_LIBRARY).write_bytes(b"static-registration library")
        extra.append(STATIC_LIBRARY)
    plugin = PluginRecord(LIBRARY, checksums(folder, [LIBRARY])[LIBRARY]["sha256"], "SimilarityTopK", "1", "saint")
    engine = EngineRecord("engine.plan", backend, "10.5.0", "9.0", "plugin", 2, True, 1.0, plugin, True, "passed")
    _rewrite_manifest(folder, engine=engine, extra_files=extra)
    return folder


def test_production_repository_with_a_tensorrt_plan_and_its_plugin(exported, tmp_path):
    folder = _with_engine(exported, tmp_path, "tensorrt")
    repository = serving.write_repository(folder, tmp_path / "repo", "vit")
    repo = repository.path
    assert sorted(repository.models) == ["vit_onnx", "vit_trt"]
    config = _parse(repo / "vit_trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 32
    assert config.default_model_filename == "model.plan"
    assert configs._pb().ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert (repo / "vit_trt" / "1" / "model.plan").read_bytes() == b"plan bytes"
    plugin = repo / "vit_trt" / "plugins" / STATIC_LIBRARY
    assert plugin.read_bytes() == b"static-registration library"  # the static one: Triton only dlopens
    readme = (repo / "README.md").read_text()
    assert f"'--backend-config=tensorrt,plugins=/models/vit_trt/plugins/{STATIC_LIBRARY}'" in readme
    assert f"LD_PRELOAD=/models/vit_trt/plugins/{STATIC_LIBRARY} tritonserver" in readme
    assert "TensorRT is 10.5.0" in readme
    outcome = serving.check_repository(repo)
    assert sorted(outcome) == ["vit_onnx", "vit_trt"] and all(BACKEND_MISSING in o for o in outcome.values())
    assert "'tensorrt'" in outcome["vit_trt"]


def test_production_repository_refusals_and_notes(exported, tmp_path, capsys):
    rtx = serving.write_repository(_with_engine(exported, tmp_path, "tensorrt-rtx"), tmp_path / "rtx")
    assert list(rtx.models) == ["saint_onnx"] and "built with tensorrt-rtx" in rtx.notes[0]
    no_static = _with_engine(exported, tmp_path, "tensorrt", static_library=False)
    code, _, err = run(capsys, "triton", str(no_static), "--repository", str(tmp_path / "none"))
    assert code == 2 and f"static-registration library ({STATIC_LIBRARY})" in only_error_line(err)
    assert not (tmp_path / "none").exists()
    code, _, err = run(capsys, "triton", str(exported.folder), "--repository", str(tmp_path / "bad"),
                       "--model-name", "my model")
    assert code == 2 and "model name 'my model'" in only_error_line(err)
    unverified = _copy(exported.folder, tmp_path, "unverified")
    _rewrite_manifest(unverified, verified=False, verification="not run")
    code, _, err = run(capsys, "triton", str(unverified), "--repository", str(tmp_path / "u"))
    assert code == 2 and "did not pass a parity gate" in only_error_line(err)


def test_top_k_is_sorted_softmax():
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, -1.0, 0.0, 2.0]], np.float32)
    indices, scores = runtime.top_k(logits, 3)
    assert indices.tolist() == [[1, 3, 2], [0, 3, 2]]
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.allclose(scores, np.take_along_axis(expected, indices, -1), atol=1e-7)
    with pytest.raises(se.InputError, match="top-k must be ≥ 1"):
        runtime.top_k(logits, 0)


def test_installed_distribution_has_the_server_and_our_python_stub():
    dist = serving.server.distribution()
    assert dist.binary.is_file() and dist.stub().is_file()


def test_serve_reports_a_model_that_fails_inside_the_server_in_one_line(exported, capsys):
    """ONNX Runtime CUDA on a CPU-only onnxruntime: the served model fails in its initialize, the
    server exits, and serve says why in one line (no Python traceback from the stub)."""
    ports = [str(serving.free_port()) for _ in range(3)]
    code, _, err = run(capsys, "serve", str(exported.folder), "--backend", "onnxruntime-cuda", "--http-port",
                       ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2])
    line = only_error_line(err)
    assert code == 1 and "Triton stopped while starting" in line and "needs onnxruntime-gpu" in line
    assert "At:" not in line
    for argv, message in [(["--backend", "tensorrt"], "holds no TensorRT engine"),
                          (["--backend", "fast"], "backend 'fast': expected one of auto"),
                          (["--top", "0"], "top-k must be ≥ 1, got 0"), (["--instances", "0"], "instances must be ≥ 1")]:
        code, _, err = run(capsys, "serve", str(exported.folder), "--http-port", ports[0], "--grpc-port", ports[1],
                           "--metrics-port", ports[2], *argv)
        assert code == 2 and message in only_error_line(err)
