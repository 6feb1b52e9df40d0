"""The export pipeline as a library: model → SAINT → ONNX → parity gate → engine → one folder.

    res = saint_export.export("vit_b16", "engines/vit_b16-early50", weights="random",
                              config=saint_export.ExportConfig(keep_schedule="early50", target="onnx"))

The folder is staged in a hidden sibling and renamed into place only when every step passed: a
failed gate (`GateFailed`), a bad input (`InputError`), a backend failure (`BackendError`) or an
interrupt leaves nothing behind. Progress goes to an optional `progress` object (see `Progress`);
the library itself prints nothing.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import artifacts, spec
from .adapters import find_adapter
from .config import MIN_CALIBRATION_IMAGES, QUANTIZED, ExportConfig
from .errors import GateFailed, InputError
from .onnx_export import export_onnx
from .gpu import cuda_device
from .images import load_images
from .manifest import EngineRecord, Manifest, PluginRecord, TensorRecord
from .models import Architecture, architecture, check_weights, load
from .parity import Verdict, compare_logits
from .patch import apply, record_kept
from .precision import apply_precision
from .schedule import Calibration, KeepSchedule
from .validate import ParityReport, check_onnx_parity, load_goldens, normalise, save_goldens, synthetic_images

ONNX_FILE = "model.onnx"
ENGINE_FILE = "engine.plan"
LABELS_FILE = "labels.txt"


class Progress:
    """What the pipeline reports while it works; the default reports nothing.

    `step(key, label, total)` is a context manager around one step; it yields `advance(done)`,
    to call as the step's `total` items get done (total None: no counter). `note(text)` is a
    remark (what was skipped and why)."""

    @contextlib.contextmanager
    def step(self, key: str, label: str, total: int | None = None):
        yield lambda done: None

    def note(self, text: str) -> None:
        pass


@dataclass
class EngineParity:
    verdict: Verdict
    reason: str | None = None  # why it did not run, or what failed
    closeness: dict | None = None

    def as_dict(self) -> dict:
        return {"verdict": self.verdict.value, "reason": self.reason, "closeness": self.closeness}


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    schedule: KeepSchedule
    parity: ParityReport | None  # None: exported without verification
    engine: EngineRecord | None
    engine_parity: EngineParity | None
    timings: dict = field(default_factory=dict)  # step key → seconds

    @property
    def files(self) -> list[str]:
        return sorted([*self.manifest.files, artifacts.MANIFEST])


def resolve_schedule(keep_schedule, model, img_size: int | None = None) -> KeepSchedule:
    """A schedule resolved for a model (a name, or a module) with its FLOPs ratio; no weights."""
    if isinstance(model, torch.nn.Module):
        return KeepSchedule.for_model(keep_schedule, find_adapter(model).describe(model))
    return KeepSchedule.for_model(keep_schedule, architecture(model, img_size).info)


def resolve_llm_schedule(llm_schedule: str, model, keep_schedule="none"):
    """An LLM schedule resolved for LLaVA `model` (a name, or a module) whose tower runs the
    static `keep_schedule` (docs/vlm.md); None for "none". No weights are loaded."""
    if llm_schedule == "none":
        return None
    # A schedule resolved already (for the image size the caller chose) is taken as it is.
    schedule = keep_schedule if isinstance(keep_schedule, KeepSchedule) else resolve_schedule(keep_schedule, model)
    schedule.require_static()
    return _resolve_llm_schedule(llm_schedule, model, schedule)


def _resolve_llm_schedule(llm_schedule: str, model, schedule: KeepSchedule):
    """`model`: a module, or a name whose shapes are built on the meta device."""
    if llm_schedule == "none":
        return None
    from . import llm
    from .models import resolve

    probe = model
    if not isinstance(model, torch.nn.Module):
        adapter, source_name = resolve(model)
        with torch.device("meta"):
            probe = adapter.create(source_name, pretrained=False, img_size=None)
    return llm.resolve(llm_schedule, probe, sum(schedule.drops), name=model if isinstance(model, str) else None)


def export(model, output, config: ExportConfig = ExportConfig(), weights: str | None = None,
           progress: Progress | None = None) -> ExportResult:
    """Export `model` (a model name or alias, or a loaded `nn.Module`, which is patched in place)
    into the folder `output`. `weights` applies to names only: "pretrained" (default), "random" or
    a checkpoint path."""
    return _Export(config, progress or Progress()).run(model, Path(output), weights)


GATE_CALIBRATION_IMAGES = 32


class _Export:
    def __init__(self, config: ExportConfig, progress: Progress):
        self.config, self.progress, self.timings = config, progress, {}

    @contextlib.contextmanager
    def step(self, key: str, label: str, total: int | None = None):
        t0 = time.perf_counter()
        with self.progress.step(key, label, total) as advance:
            yield advance
        self.timings[key] = round(time.perf_counter() - t0, 3)

    def run(self, model, output: Path, weights: str | None) -> ExportResult:
        config = self.config
        arch, module = self._resolve_model(model, weights)
        schedule = KeepSchedule.for_model(config.keep_schedule, arch.info)
        schedule.require_static()
        llm_schedule = _resolve_llm_schedule(self.config.llm_schedule, model, schedule)
        target, compute_capability = self._resolve_target()
        config = self.config = replace(config, target=target, compute_capability=compute_capability)
        artifacts.check_writable(output)  # every check above needed no weights; nothing is written yet
        with artifacts.StagedOutput(output) as staged:
            result = self._build(arch, module, weights or "pretrained", schedule, llm_schedule, staged.path)
            result.folder = staged.commit()
        return result

    def _resolve_model(self, model, weights):
        if isinstance(model, str):
            check_weights(weights or "pretrained")
            return architecture(model, self.config.img_size), None
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")
        if weights is not None:
            raise InputError("weights apply to models given by name; this model is already loaded")
        if getattr(model, "saint", None) is not None:
            raise InputError("model already has SAINT applied; pass the unpatched model and choose the schedule "
                             "in ExportConfig.keep_schedule")
        adapter = find_adapter(model)
        dynamic = hasattr(adapter, "set_export_size")  # dynamic resolution: the image an export is made for
        if self.config.img_size is not None and dynamic:
            adapter.set_export_size(model, self.config.img_size)
        info = adapter.describe(model)
        if not dynamic and self.config.img_size not in (None, info.img_size):
            raise InputError(f"image size {self.config.img_size} differs from the loaded model's {info.img_size}")
        name = type(model).__name__
        return Architecture(name, name, adapter, info, sum(p.numel() for p in model.parameters())), model

    def _resolve_target(self) -> tuple[str, str | None]:
        """The target to build (before any model work), and what was skipped and why."""
        from .trt.backend import available_target, load_backend

        config = self.config
        target, cc = config.target, config.compute_capability
        if target == "auto":
            target, skipped = available_target()
            self.progress.note(f"target: {target}" + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
        elif target != "onnx":
            load_backend(target)
        if target == "trt-rtx" and cc is None and cuda_device() is None:
            cc = "8.9"
            self.progress.note("no GPU here: TensorRT-RTX builds for compute capability 8.9")
        return target, cc

    def _build(self, arch: Architecture, module, weights: str, schedule: KeepSchedule, llm_schedule,
               folder: Path):
        config = self.config
        info = arch.info
        with self.step("load", f"loading {arch.source_name} ({arch.num_params / 1e6:.1f} M parameters"
                               + (f", {weights} weights)" if module is None else ")")):
            model = module if module is not None else load(arch, weights)
            apply(model, schedule, tau=config.tau, K=config.K, gamma=config.gamma)
            apply_precision(model, config.precision)
            adapter = arch.adapter
            preprocess = adapter.preprocess(model)
            labels = adapter.label_names(model)
            exported = adapter.export_module(model)
        quantized = config.precision in QUANTIZED
        with contextlib.ExitStack() as stack:
            # int8 / fp8: the fp32 graph is exported, gated and quantized outside the folder
            graph_folder = Path(stack.enter_context(tempfile.TemporaryDirectory())) if quantized else folder
            with self.step("export", f"exporting ONNX (torch.export, opset {config.opset})"):
                files = export_onnx(exported, graph_folder / ONNX_FILE, (3, info.img_size, info.img_size), config.opset)
            parity = self._parity(exported, graph_folder / ONNX_FILE, preprocess, info) if config.verify else None
            quantization = None
            if quantized:
                quantization, files = self._quantize(model, exported, graph_folder / ONNX_FILE, folder, preprocess, parity)
            elif parity is not None:
                files += save_goldens(*parity.golden, folder, adapter.INPUT_NAME, adapter.OUTPUT_NAME)
        if labels is not None:
            files.append(artifacts.atomic_write_text(folder / LABELS_FILE, "\n".join(labels) + "\n"))
        engine = engine_parity = None
        if config.target != "onnx":
            engine, engine_parity, engine_files = self._engine(folder, adapter)
            files += engine_files
        with self.step("manifest", "writing manifest and report"):
            features = adapter.features_record(model, sum(schedule.drops))
            if llm_schedule is not None:
                features["llm_schedule"] = _llm_record(llm_schedule, config.llm_tau)
            report = {"parity": parity.as_dict() if parity else None,
                      "engine_parity": engine_parity.as_dict() if engine_parity else None,
                      "quantized_gate": (quantization or {}).get("gate"),
                      "flops_ratio": schedule.flops_ratio(), "timings_seconds": self.timings}
            files.append(artifacts.write_json(folder / artifacts.REPORT, report))
            manifest = Manifest(
                verified=parity is not None,
                verification="parity gate passed" if parity else "skipped: exported without verification",
                model={"name": arch.name, "source_name": arch.source_name, "family": adapter.family,
                       "weights": _weights_record(weights if module is None else "loaded module", arch.source_name),
                       "parameters": arch.num_params},
                input=TensorRecord(adapter.INPUT_NAME, ["batch", 3, info.img_size, info.img_size]),
                output=TensorRecord(adapter.OUTPUT_NAME, ["batch", *_output_shape(exported, info, parity)]),
                preprocess=preprocess,
                keep_schedule=schedule.as_dict(),
                saint={"tau": config.tau, "K": config.K, "gamma": config.gamma},
                precision=config.precision, batch=config.batch,
                onnx={"file": ONNX_FILE, "opset": config.opset, "exporter": "torch.onnx (dynamo)",
                      "operator": {"domain": spec.DOMAIN, "op_type": spec.OP_TYPE,
                                   "plugin_namespace": spec.DOMAIN, "plugin_version": spec.PLUGIN_VERSION,
                                   "local_function": True}},
                engine=engine, labels=LABELS_FILE if labels is not None else None, features=features,
                quantization=quantization,
                gpu=cuda_device().name if cuda_device() else None, versions=artifacts.versions(),
                files=artifacts.checksums(folder, [f.name for f in files]))
            manifest.write(folder)
        return ExportResult(folder, manifest, schedule, parity, engine, engine_parity, self.timings)

    def _parity(self, exported, onnx_path: Path, preprocess, info) -> ParityReport:
        """The gate: eager against ONNX Runtime on synthetic images and the user's (fp32 graphs for
        int8 / fp8, whose quantization has its own gate)."""
        config = self.config
        precision = "fp32" if config.precision in QUANTIZED else config.precision
        images = normalise(synthetic_images(config.parity_images, info.img_size), preprocess)
        if config.images:
            loaded = load_images(config.images, preprocess)
            for path, why in loaded.unreadable:
                self.progress.note(f"skipped unreadable image {path}: {why}")
            images = torch.cat([images, torch.from_numpy(loaded.pixel_values)])
        batches = (1, config.batch[1])
        with self.step("parity", f"parity gate: eager vs ONNX Runtime, batch {batches[0]} and {batches[1]}",
                       total=len(images) * 2) as advance:
            parity = check_onnx_parity(exported, onnx_path, images, batches, lambda done, _: advance(done), precision)
        if not parity.passed:
            raise GateFailed(parity.table())
        return parity

    def _quantize(self, model, exported, fp32_path: Path, folder: Path, preprocess, parity) -> tuple[dict, list[Path]]:
        """The fp32 graph quantized into the folder, calibrated on the user's images, and gated."""
        from . import quantize

        config = self.config
        adapter = find_adapter(model)
        loaded = load_images(config.calibration, preprocess)
        pixels = loaded.pixel_values[:config.calibration_images]
        if len(pixels) < MIN_CALIBRATION_IMAGES:
            raise InputError(f"{config.precision} calibration needs at least {MIN_CALIBRATION_IMAGES} readable images; "
                             f"{', '.join(map(str, config.calibration))} gave {len(pixels)}")
        wanted = set(adapter.low_precision_modules(model))
        modules = {name for name, module in exported.named_modules() if module in wanted}
        with self.step("quantize", f"{config.precision} quantization, calibrated on {len(pixels)} images"):
            record = quantize.quantize(fp32_path, folder / ONNX_FILE, pixels, config.precision, modules,
                                       adapter.INPUT_NAME, config.batch[1], config.float_keys)
        files = [folder / ONNX_FILE]
        if config.verify:
            images = parity.golden[0].numpy() if parity is not None else pixels[:config.batch[1]]
            # the goldens and up to GATE_CALIBRATION_IMAGES of the calibration images: enough that one
            # near-tied logit (random weights) does not decide the agreement
            gate_images = np.concatenate([images, pixels[:GATE_CALIBRATION_IMAGES]])
            with torch.no_grad():
                eager = exported(torch.from_numpy(gate_images))
            eager = (eager[0] if isinstance(eager, tuple) else eager).float().numpy()
            with self.step("quantized gate", f"{config.precision} gate on {len(gate_images)} images"):
                report = quantize.gate(folder / ONNX_FILE, fp32_path, gate_images, eager, config.quantized_agreement,
                                       config.quantized_cosine, config.batch[1])
            record["gate"] = report.as_dict()
            if not report.passed:
                raise GateFailed(f"{config.precision} gate failed at {report.failed_tier}")
            self.progress.note(f"{config.precision} gate: {report.summary()}")
            golden = quantize.run_graph(folder / ONNX_FILE, images, config.batch[1])
            files += save_goldens(torch.from_numpy(images), golden, folder, adapter.INPUT_NAME, adapter.OUTPUT_NAME)
        return record, files

    def _engine(self, folder: Path, adapter) -> tuple[EngineRecord, EngineParity, list[Path]]:
        from .trt import plugin
        from .trt.backend import load_backend
        from .trt.engine import build_engine

        config = self.config
        backend = load_backend(config.target)
        library, files, plugin_record = None, [], None
        if config.plugin_library == "auto":
            try:
                library = plugin.build()
            except InputError:
                raise
            except Exception as err:  # no CUDA toolkit or headers: fall back to the ONNX function, and say so
                self.progress.note(f"plugin library unavailable ({err}); TensorRT will run the ONNX function")
        elif config.plugin_library != "none":
            library = Path(config.plugin_library)
        if library is not None:  # shipped inside the folder: the engine needs exactly this library to load
            library_source = library
            shutil.copy2(library, folder / plugin.LIBRARY)
            library = folder / plugin.LIBRARY
            files.append(library)
            plugin_record = PluginRecord(plugin.LIBRARY, artifacts.sha256(library), spec.OP_TYPE,
                                         spec.PLUGIN_VERSION, spec.DOMAIN)
            static = library_source.with_name(plugin.STATIC_LIBRARY)
            if static.is_file():  # the same plugin, registering itself when loaded: what Triton needs
                shutil.copy2(static, folder / plugin.STATIC_LIBRARY)
                files.append(folder / plugin.STATIC_LIBRARY)
        cache = config.timing_cache or plugin.cache_dir() / f"timing-{backend.name}-{backend.version}.cache"
        implementation = "plugin" if library else "ONNX function"
        with self.step("engine", f"building {backend.name} {backend.version} engine ({spec.OP_TYPE} as "
                                 f"{implementation}, batch {'/'.join(map(str, config.batch))})"):
            built = build_engine(backend, folder / ONNX_FILE, folder / ENGINE_FILE, config.batch, library,
                                 config.compute_capability, cache)
        files.append(folder / ENGINE_FILE)
        parity = self._engine_parity(backend, folder, built.compute_capability, library, adapter)
        engine = EngineRecord(built.file, backend.name, backend.version, built.compute_capability,
                              built.operator_backend, built.plugin_layers, built.strongly_typed, built.build_seconds,
                              plugin_record, parity.verdict is Verdict.PASSED,
                              parity.verdict.value + (f": {parity.reason}" if parity.reason else ""))
        if parity.verdict is Verdict.FAILED:
            raise GateFailed(f"engine vs eager: {parity.reason}")
        return engine, parity, files

    def _engine_parity(self, backend, folder: Path, compute_capability: str, library: Path | None,
                       adapter) -> EngineParity:
        """The engine replays the golden files through the runtime's TensorRT runner. Engines run
        only on a matching GPU; elsewhere the golden files let anyone repeat the check there."""
        from .runtime.runners import TrtRunner

        if not self.config.verify:
            return EngineParity(Verdict.NOT_RUN, "exported without verification")
        device = cuda_device()
        if device is None:
            return EngineParity(Verdict.NOT_RUN, "no CUDA GPU on this machine")
        if device.compute_capability != compute_capability:
            return EngineParity(Verdict.NOT_RUN, f"engine is for compute capability {compute_capability}, this GPU "
                                                 f"is {device.compute_capability}")
        inputs, expected = load_goldens(folder, adapter.INPUT_NAME, adapter.OUTPUT_NAME)
        input_record = TensorRecord(adapter.INPUT_NAME, ["batch", *inputs[0].shape[1:]])
        with TrtRunner(folder / ENGINE_FILE, input_record, TensorRecord(adapter.OUTPUT_NAME, ["batch", None]),
                       self.config.batch[2], backend, library, contexts=1) as runner:
            closeness = compare_logits([runner.infer(x) for x in inputs], expected, self.config.precision)
        verdict = Verdict.PASSED if closeness.passed else Verdict.FAILED
        return EngineParity(verdict, "; ".join(closeness.failures("engine logits")) or None, closeness.as_dict())


def _output_shape(model: torch.nn.Module, info, parity: ParityReport | None) -> list[int]:
    """The output's shape after the batch axis (classes, or tokens and width): from the gate's
    eager outputs when it ran, else one forward of one image."""
    if parity is not None:
        return list(parity.golden[1].shape[1:])
    with torch.no_grad():
        out = model(torch.zeros(1, 3, info.img_size, info.img_size))
    return list((out[0] if isinstance(out, tuple) else out).shape[1:])


def _llm_record(schedule, tau: float) -> dict:
    """The LLM side of a hybrid or LLM-only export: not in the graph, applied in PyTorch."""
    return {"spec": schedule.spec, "tau": tau, "depth": schedule.depth, "image_tokens": schedule.image_tokens,
            "drops": list(schedule.drops) if schedule.drops is not None else None,
            "prefill_flops_ratio": schedule.prefill_flops_ratio() if schedule.drops is not None else None,
            "applies_in": "PyTorch: saint_export.apply(llava, <keep schedule>, llm_schedule=<spec>, llm_tau=<tau>); "
                          "no LLM runtime drops tokens inside prefill (docs/vlm.md)"}


def _weights_record(weights: str, source_name: str) -> dict:
    if weights == "random":
        return {"source": "random", "seed": 0}
    if weights == "pretrained" and Path(source_name).is_dir():
        return {"source": "checkpoint folder", "path": str(Path(source_name).absolute())}
    if weights == "pretrained":
        return {"source": "pretrained (model hub)"}
    if weights == "loaded module":
        return {"source": "loaded module (given to export)"}
    return {"source": "file", "path": str(Path(weights).absolute()), "sha256": artifacts.sha256(Path(weights))}


def calibrate(model, images=None, percentile: float = 50.0, *, weights: str | None = None, tau: float = spec.TAU,
              K: int = spec.VOTE_K, gamma: float = spec.GAMMA, num_images: int = 32, img_size: int | None = None,
              progress: Progress | None = None) -> Calibration:
    """Measure per-block budgets with the dynamic (reference) method, one image at a time.

    `model` is a name (with `weights`) or an unpatched `nn.Module` (patched in place with
    `dynamic`). `images` are image files or folders (default: `num_images` synthetic images).
    Each block's budget is the `percentile` of the per-image r, floored and kept within the
    per-block limits. Save the result with `.save(path)`; `calib:<path>` then reads it."""
    from .config import check_hyperparameters

    progress = progress or Progress()
    if not (isinstance(num_images, int) and num_images >= 1):
        raise InputError(f"num_images must be an integer ≥ 1, got {num_images!r}")
    if not 0 <= percentile <= 100:
        raise InputError(f"percentile must be within [0, 100], got {percentile!r}")
    check_hyperparameters(tau, K, gamma)
    runner = _Export(ExportConfig(tau=tau, K=K, gamma=gamma, img_size=img_size), progress)
    arch, module = runner._resolve_model(model, weights)
    with runner.step("load", f"loading {arch.source_name}" + (f" ({weights or 'pretrained'} weights)"
                                                              if module is None else "")):
        model = module if module is not None else load(arch, weights or "pretrained")
        apply(model, "dynamic", tau=tau, K=K, gamma=gamma)
        preprocess = arch.adapter.preprocess(model)
        if images is None:
            pixels = normalise(synthetic_images(num_images, arch.info.img_size), preprocess)
        else:
            loaded = load_images([images] if isinstance(images, (str, Path)) else images, preprocess)
            for path, why in loaded.unreadable:
                progress.note(f"skipped unreadable image {path}: {why}")
            pixels = torch.from_numpy(loaded.pixel_values)
    schedule = model.saint.schedule
    per_image = []
    with runner.step("calibrate", f"running the dynamic method on {len(pixels)} images, one at a time",
                     total=len(pixels)) as advance:
        for i in range(len(pixels)):
            with torch.no_grad(), record_kept(model) as trace:
                model(pixels[i:i + 1])
            drops = [0] * len(schedule.pruning_blocks)
            for kept in trace:
                drops[kept.block] = kept.dropped
            per_image.append(drops)
            advance(i + 1)
    measured = np.percentile(np.array(per_image), percentile, axis=0)
    drops, n = [], arch.info.num_patches
    for r in measured:  # floor, then keep within the per-block limits
        r = min(int(r), spec.max_drop(n))
        drops.append(r)
        n -= r
    return Calibration(arch.source_name, arch.info.depth, arch.info.num_patches, tau, K, gamma, percentile,
                       per_image, drops)
