"""Triton model repositories for an exported folder.

- `write_repository`: for production Triton (an NGC container with its TensorRT and ONNX Runtime
  backends): `<name>_trt` (tensorrt_plan) when the folder has a TensorRT engine, and `<name>_onnx`
  (onnxruntime; config.pbtxt for GPU instances, configs/cpu.pbtxt for CPU instances, chosen with
  `--model-config-name=cpu`), plus a README.md with the launch lines.
- `write_serving_repository`: what `saint-export serve` runs on the Triton bundled in
  nvidia-pytriton, which has only the Python backend: `<name>` runs saint_export.runtime on the
  folder, `<name>_images` takes encoded images.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import StagedOutput, atomic_write_text
from ..errors import BackendError, InputError
from ..manifest import Manifest, TensorRecord
from ..runtime import check_folder
from . import configs
from .server import BACKEND_MISSING, BUNDLED_VERSION, check_repository, distribution

PLUGIN_FOLDER = "plugins"  # inside the TensorRT model's folder; Triton ignores non-numeric folders there
CPU_CONFIG = "cpu"  # configs/cpu.pbtxt, selected with tritonserver --model-config-name=cpu
DEFAULT_TOP_K = 5


@dataclass
class Repository:
    path: Path
    models: dict[str, str] = field(default_factory=dict)  # model name → what it serves
    notes: list[str] = field(default_factory=list)  # what was not written, and why
    launch: str = ""  # the tritonserver command line
    checked: str = ""  # what Triton's own configuration checks said


def _place(source: Path, target: Path) -> None:
    """Hard-link where possible (a ViT-H ONNX file is gigabytes), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _onnx_files(folder: Path, manifest: Manifest) -> list[str]:
    """The ONNX file and its external-data files (read from the graph, not guessed from names)."""
    import onnx

    model = onnx.load(str(folder / manifest.onnx["file"]), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return [manifest.onnx["file"], *sorted(locations)]


def _labels(folder: Path, manifest: Manifest, model_folder: Path) -> str | None:
    if manifest.labels:
        _place(folder / manifest.labels, model_folder / manifest.labels)
    return manifest.labels


def write_repository(folder, repository, model_name: str = "saint", *, instances: int = 1,
                     queue_delay_us: int = configs.DEFAULT_QUEUE_DELAY_US, plugin_library=None,
                     check: bool = True) -> Repository:
    """A model repository for production Triton. Refuses a folder that fails `check_folder` (a
    corrupt or unverified folder is not deployed). With `check`, and the serve extra installed,
    Triton's own configuration checks run over the repository before it is moved into place."""
    from ..trt.plugin import STATIC_LIBRARY

    folder = Path(folder)
    manifest = check_folder(folder)
    _check_name(model_name)
    result = Repository(Path(repository))
    max_batch = manifest.batch[2]
    with StagedOutput(result.path) as staged:
        onnx_name = f"{model_name}_onnx"
        onnx_folder = staged.path / onnx_name
        for name in _onnx_files(folder, manifest):
            _place(folder / name, onnx_folder / "1" / name)
        labels = _labels(folder, manifest, onnx_folder)
        common = dict(max_batch_size=max_batch, instances=instances, queue_delay_us=queue_delay_us,
                      backend="onnxruntime", model_filename=manifest.onnx["file"])
        configs.write(configs.model_config(onnx_name, *configs.model_tensors(manifest, labels),
                                           kind="KIND_GPU", **common), onnx_folder / "config.pbtxt")
        configs.write(configs.model_config(onnx_name, *configs.model_tensors(manifest, labels), kind="KIND_CPU",
                                           parameters={"intra_op_thread_count": 0, "inter_op_thread_count": 1},
                                           **common), onnx_folder / "configs" / f"{CPU_CONFIG}.pbtxt")
        result.models[onnx_name] = "ONNX Runtime (GPU instances; CPU instances with --model-config-name=cpu)"

        plugin_path = None
        engine = manifest.engine
        if engine is None:
            result.notes.append("no TensorRT model: the folder holds no engine (exported for ONNX only)")
        elif engine.backend != "tensorrt":
            result.notes.append(f"no TensorRT model: the engine was built with {engine.backend} {engine.version}, "
                                "and Triton's tensorrt backend runs TensorRT engines; re-export with TensorRT "
                                "of your Triton container's version")
        else:
            trt_name = f"{model_name}_trt"
            trt_folder = staged.path / trt_name
            _place(folder / engine.file, trt_folder / "1" / "model.plan")
            if engine.plugin is not None:
                static = Path(plugin_library) if plugin_library else folder / STATIC_LIBRARY
                if not static.is_file():
                    raise InputError(f"the engine needs the {engine.plugin.name} plugin, and Triton loads only its "
                                     f"static-registration library ({STATIC_LIBRARY}), which {folder} does not "
                                     "hold; build it (python -m saint_export.trt.plugin build) and pass its path")
                plugin_path = Path(trt_name) / PLUGIN_FOLDER / STATIC_LIBRARY
                _place(static, staged.path / plugin_path)
            labels = _labels(folder, manifest, trt_folder)
            configs.write(configs.model_config(
                trt_name, *configs.model_tensors(manifest, labels), kind="KIND_GPU", max_batch_size=max_batch,
                instances=instances, queue_delay_us=queue_delay_us, platform="tensorrt_plan",
                model_filename="model.plan"), trt_folder / "config.pbtxt")
            result.models[trt_name] = (f"TensorRT {engine.version} plan for compute capability "
                                       f"{engine.compute_capability}")
        result.launch = launch_command(plugin_path)
        atomic_write_text(staged.path / "README.md", _readme(result, manifest, folder, plugin_path))
        if check:
            result.checked = _triton_check(staged.path, list(result.models))
        result.path = staged.commit()
    return result


def _triton_check(path: Path, models: list[str]) -> str:
    """Run the bundled server's checks with both config names. This server has no onnxruntime or
    tensorrt backend, so a valid config fails exactly at the backend lookup, and nowhere before."""
    try:
        distribution()
    except InputError as missing:
        return f"not checked by Triton ({missing})"
    problems = []
    for config_name in (None, CPU_CONFIG):
        outcomes = check_repository(path, config_name)
        for model in models:
            outcome = outcomes.get(model, "no outcome reported")
            if BACKEND_MISSING not in outcome:
                where = f" with configs/{config_name}.pbtxt" if config_name else ""
                problems.append(f"{model}{where}: {outcome}")
    if problems:
        raise BackendError(f"Triton rejected a generated configuration: {'; '.join(problems)}")
    return (f"Triton {BUNDLED_VERSION}'s configuration checks passed for {', '.join(models)} (both config names), "
            "up to the backend lookup (its onnxruntime and tensorrt backends are not installed here)")


def launch_command(plugin_path: Path | None, mount: str = "/models") -> str:
    command = f"tritonserver --model-repository={mount}"
    if plugin_path is not None:
        command += f" '--backend-config=tensorrt,plugins={mount}/{plugin_path}'"
    return command


def _readme(result: Repository, manifest: Manifest, folder: Path, plugin_path: Path | None) -> str:
    engine = manifest.engine
    lines = [f"# Triton model repository for {manifest.model['name']} ({manifest.keep_schedule['spec']})", "",
             f"Written by saint-export from `{folder}`. Models:", ""]
    lines += [f"- `{name}`: {what}" for name, what in result.models.items()]
    lines += ["", "Each model takes `{0}` FP32 [batch, {1}] and returns `{2}` FP32 [batch, {3}], with dynamic "
              "batching up to {4} (the export's batch profile).".format(
                  manifest.input.name, ", ".join(map(str, manifest.input.shape[1:])), manifest.output.name,
                  ", ".join(map(str, manifest.output.shape[1:])), manifest.batch[2]), ""]
    lines += ["## Run it on an NGC Triton container", "", "```",
              "docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\",
              "  -v $PWD:/models nvcr.io/nvidia/tritonserver:<release>-py3 \\", f"  {result.launch}", "```", ""]
    if engine is not None and plugin_path is not None:
        lines += [f"Use the release whose TensorRT is {engine.version}: a plan runs only on the TensorRT version "
                  "that built it, and the plugin library must come from the same version.", "",
                  f"The TensorRT model needs the `{engine.plugin.name}` plugin. Triton's TensorRT backend only "
                  "`dlopen`s the libraries named in `--backend-config=tensorrt,plugins=…`, so the library here is the "
                  "static-registration build. The alternative is to preload it:", "", "```",
                  f"LD_PRELOAD=/models/{plugin_path} tritonserver --model-repository=/models", "```", ""]
    lines += ["CPU instances for the ONNX model (for example a host without a GPU):", "", "```",
              f"tritonserver --model-repository=/models --model-config-name={CPU_CONFIG}", "```", ""]
    lines += [f"Note: {note}." for note in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_serving_repository(folder, repository: Path, manifest: Manifest, model_name: str = "saint", *,
                             instances: int = 1, queue_delay_us: int = configs.DEFAULT_QUEUE_DELAY_US,
                             backend: str = "auto", allow_unverified: bool = False, threads: int | None = None,
                             top_k: int = DEFAULT_TOP_K) -> Repository:
    """The Python-backend repository that `saint-export serve` runs (written into an empty folder)."""
    _check_name(model_name)
    if len(manifest.output.shape) != 2:
        raise InputError(f"{folder} outputs {manifest.output.name} {manifest.output.shape}, not class logits: serve "
                         "runs classifiers; for image features write a repository with saint-export triton (its "
                         "_onnx model serves them)")
    if top_k < 1:
        raise InputError(f"top-k must be ≥ 1, got {top_k}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be ≥ 1, got {threads}")
    folder = Path(folder).absolute()
    result = Repository(Path(repository))
    labels = str(folder / manifest.labels) if manifest.labels else None
    max_batch = manifest.batch[2]
    classifier = result.path / model_name
    classes = manifest.output.shape[-1]
    _python_model(classifier, "Classifier")
    _labels(folder, manifest, classifier)
    configs.write(configs.model_config(
        model_name, *configs.model_tensors(manifest, manifest.labels), max_batch_size=max_batch,
        instances=instances, queue_delay_us=queue_delay_us, backend="python",
        parameters={"folder": folder, "backend": backend, "allow_unverified": str(allow_unverified).lower(),
                    "threads": threads or 0}), classifier / "config.pbtxt")
    result.models[model_name] = f"{manifest.input.name} → {manifest.output.name}"

    images_name = f"{model_name}_images"
    k = min(top_k, classes)
    outputs = [configs.tensor(TensorRecord(name, ["batch", k], dtype), output=True)
               for name, dtype in (("class_ids", "int64"), ("scores", "float32"), ("labels", "bytes"))]
    _python_model(result.path / images_name, "ImageClassifier")
    configs.write(configs.model_config(
        images_name, [configs.tensor(TensorRecord("images", ["batch", 1], "bytes"))], outputs,
        max_batch_size=max_batch, instances=instances, queue_delay_us=queue_delay_us, backend="python",
        parameters={"folder": folder, "classifier": model_name, "top_k": k, **({"labels": labels} if labels else {})}),
        result.path / images_name / "config.pbtxt")
    result.models[images_name] = f"images (encoded bytes) → top-{k} class_ids, scores, labels"
    return result


def _python_model(model_folder: Path, class_name: str) -> None:
    (model_folder / "1").mkdir(parents=True)
    (model_folder / "1" / "model.py").write_text(
        "# Written by saint-export serve: a Triton Python-backend model running saint_export.runtime.\n"
        f"from saint_export.serving.python_model import {class_name} as TritonPythonModel  # noqa: F401\n")


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise InputError(f"model name {name!r}: use letters, digits, '-' and '_'")
