"""`saint-export`: model → SAINT → ONNX → parity gate → one output folder.

    saint-export vit_b16 --keep-schedule early50 --weights random
    saint-export calibrate vit_b16 --weights random --output calib.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class Progress:
    """Step lines with timings on stderr; a live counter when stderr is a terminal."""

    def __init__(self, total: int):
        self.total, self.index, self.timings = total, 0, {}

    @contextlib.contextmanager
    def step(self, label: str):
        self.index += 1
        _err(f"[{self.index}/{self.total}] {label} …")
        t0 = time.perf_counter()
        yield
        self.timings[label.split(" ")[0]] = round(time.perf_counter() - t0, 3)
        _err(f"      done in {time.perf_counter() - t0:.1f} s")

    @staticmethod
    def counter(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r      {done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saint-export", description="Export a SAINT-pruned Vision Transformer to ONNX "
                                "and prove it against eager PyTorch. (Also: saint-export calibrate --help)")
    p.add_argument("model", nargs="?", help="alias (vit_b16, vit_h14, …; see --list-models) or any timm model name")
    p.add_argument("-s", "--keep-schedule", default="early50",
                   help="none | early<P>[@<B>] | r:<r0>,<r1>,… | calib:<file.json> (default: early50)")
    _common_arguments(p)
    p.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model>-<schedule>)")
    p.add_argument("--target", choices=["auto", "onnx", "trt", "trt-rtx"], default="auto",
                   help="how far to go: ONNX only, a TensorRT engine, or a TensorRT-RTX engine "
                        "(default auto: the furthest this machine can build)")
    p.add_argument("--batch", default="1,8,32",
                   help="engine batch profile min,opt,max, or one number N for 1,N,N; the parity gate runs "
                        "batch 1 and opt (default 1,8,32)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="precision of the blocks' Linear layers, written into the graph; LayerNorm, softmax and "
                        "SAINT's scoring stay fp32 (default fp32)")
    p.add_argument("--plugin-lib", default="auto",
                   help="SimilarityTopK plugin library for TensorRT: auto (build plugins/similarity_topk), "
                        "none (TensorRT runs the node's ONNX function instead) or a path")
    p.add_argument("--compute-capability", help="TensorRT-RTX target GPU, e.g. 89 (default: this GPU's)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (default: one per backend "
                   "under ~/.cache/saint-export)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, ≥ 18 (default 18)")
    p.add_argument("--parity-images", type=int, default=8, help="synthetic parity images (default 8)")
    p.add_argument("--images", type=Path, help="folder of your own images to add to the parity check")
    p.add_argument("--no-verify", action="store_true", help="skip the parity gate (recorded in the manifest)")
    p.add_argument("--print-schedule", action="store_true", help="print the resolved schedule table and exit")
    p.add_argument("--list-models", action="store_true", help="list the model aliases and exit")
    return p


def _calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saint-export calibrate", description="Measure per-block budgets with the "
                                "dynamic (reference) method, one image at a time; writes a calib:<file> schedule.")
    p.add_argument("model")
    _common_arguments(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration JSON to write")
    p.add_argument("--images", type=Path, help="folder of calibration images (default: synthetic images)")
    p.add_argument("--num-images", type=int, default=32, help="synthetic images when --images is not given")
    p.add_argument("--percentile", type=float, default=50.0, help="per-block percentile of r (default: median)")
    return p


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="pretrained",
                   help="pretrained (needs the model hub) | random (seeded) | <checkpoint file> (default pretrained)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    p.add_argument("--tau", type=float, default=0.75, help="similarity threshold τ (default 0.75)")
    p.add_argument("--K", type=int, default=5, help="votes that make a row redundant (default 5)")
    p.add_argument("--gamma", type=float, default=10.0, help="score sharpness γ (default 10)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saint-export check", description="Check that an exported engine folder "
                                "matches this machine (TensorRT version, GPU, plugin library) before serving it.")
    p.add_argument("folder", type=Path)
    p.add_argument("--plugin-lib", type=Path, help="the plugin library you will load with the engine")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("calibrate", "check") else "export"
    parser = {"calibrate": _calibrate_parser, "check": _check_parser, "export": _export_parser}[command]()
    args = parser.parse_args(argv if command == "export" else argv[1:])
    # SIGTERM unwinds like Ctrl-C, so staged output is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return {"calibrate": calibrate, "check": check, "export": export}[command](args)
    except KeyboardInterrupt:
        _err("saint-export: interrupted; nothing was written")
        return 130
    except Exception as err:  # one line, no traceback, for anything the user can fix
        from .errors import SaintError

        if isinstance(err, SaintError):
            _err(f"saint-export: error: {err}")
            return EXIT_BAD_INPUT
        if args.debug:
            raise
        _err(f"saint-export: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
             "(rerun with --debug for the traceback)")
        return 1


def _resolve(args):
    """Everything that needs no weights: hyper-parameters, weights argument, model name, schedule."""
    from . import KeepSchedule
    from .models import architecture, check_weights_arg
    from .patch import check_hyperparameters
    from .schedule import parse_spec

    spec = getattr(args, "keep_schedule", "dynamic")
    parse_spec(spec)
    check_hyperparameters(args.tau, args.K, args.gamma)
    check_weights_arg(args.weights)
    arch = architecture(args.model, args.img_size)
    schedule = KeepSchedule.parse(spec, arch.depth, arch.num_patches, num_protected=arch.num_protected,
                                  embed_dim=arch.embed_dim, mlp_ratio=arch.mlp_ratio)
    return arch, schedule


def export(args) -> int:
    from .models import ALIASES

    if args.list_models:
        print("\n".join(f"{alias:<20} {name}" for alias, name in ALIASES.items()))
        return 0
    if not args.model:
        _export_parser().error("the model argument is required")
    from .artifacts import StagedOutput, check_writable
    from .errors import SaintError
    from .export import check_opset

    args.batch = _batch_profile(args.batch)
    if args.parity_images < 1:
        raise SaintError(f"--parity-images must be ≥ 1, got {args.parity_images}")
    check_opset(args.opset)
    args.target, engine_notes = _resolve_target(args)
    if args.images is not None and not args.images.is_dir():
        raise SaintError(f"--images {str(args.images)!r} is not a folder")
    arch, schedule = _resolve(args)
    if args.print_schedule:
        print(schedule.table())
        return 0
    schedule.require_static()
    output = args.output or Path("engines") / f"{args.model}-{_slug(schedule.spec)}"
    check_writable(output)
    _err(schedule.table())
    for note in engine_notes:
        _err(note)
    progress = Progress(4 + (not args.no_verify) + (args.target != "onnx"))
    with StagedOutput(output) as staged:
        try:
            result = _build(args, arch, schedule, staged.path, progress)
        except GateFailed as failure:
            _err(f"\nparity gate FAILED; nothing was written:\n{failure}")
            return EXIT_GATE_FAILED
        final = staged.commit()
    _summary(final, schedule, result, progress)
    return 0


def _build(args, arch, schedule, folder: Path, progress: Progress) -> dict:
    import torch

    import saint_export as se

    from . import artifacts
    from .export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx
    from .models import load
    from .ops import DOMAIN, OP_TYPE, PLUGIN_VERSION
    from .precision import apply_precision
    from .validate import check_onnx_parity, normalise, save_goldens, synthetic_images

    with progress.step(f"loading {arch.timm_name} ({arch.num_params / 1e6:.1f} M parameters, {args.weights} weights)"):
        model = load(arch, args.weights)
        se.apply(model, schedule, tau=args.tau, K=args.K, gamma=args.gamma)
        apply_precision(model, args.precision)
    with progress.step(f"exporting ONNX (torch.export, opset {args.opset})"):
        files = export_onnx(model, folder / "model.onnx", (3, arch.img_size, arch.img_size), args.opset)
    parity = None
    if not args.no_verify:
        with progress.step(f"parity gate: eager vs ONNX Runtime, batch 1 and {args.batch[1]}"):
            images = normalise(synthetic_images(args.parity_images, arch.img_size), model)
            if args.images is not None:
                images = torch.cat([images, _load_folder(args.images, model)])
            parity = check_onnx_parity(model, files[0], images, (1, args.batch[1]), Progress.counter,
                                       args.precision)
            if not parity.passed:
                raise GateFailed(parity.table())
            files += save_goldens(*parity.golden, folder)
    engine = engine_parity = plugin_library = None
    if args.target != "onnx":
        engine = _build_engine(args, folder, files, progress)
        engine_parity, plugin_library = engine.pop("parity"), engine.pop("plugin_library")
    with progress.step("writing manifest and report"):
        config = model.pretrained_cfg
        names = [f.name for f in files]
        artifacts.write_json(folder / artifacts.REPORT, {
            "parity": parity.as_dict() if parity else None,
            "engine_parity": engine_parity,
            "flops_ratio": schedule.flops_ratio(),
            "timings_seconds": progress.timings,
        })
        names.append(artifacts.REPORT)
        manifest = {
            "format": "saint-export/1",
            "verified": parity is not None,
            "verification": "parity gate passed" if parity else "skipped (--no-verify)",
            "model": {"name": arch.name, "timm_name": arch.timm_name, "weights": _weights_record(args.weights),
                      "parameters": arch.num_params},
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, arch.img_size, arch.img_size], "dtype": "float32",
                      "mean": list(config.get("mean", ())), "std": list(config.get("std", ()))},
            "output": {"name": OUTPUT_NAME, "dtype": "float32"},
            "keep_schedule": schedule.as_dict(),
            "saint": {"tau": args.tau, "K": args.K, "gamma": args.gamma},
            "onnx": {"opset": args.opset, "default_opset": DEFAULT_OPSET, "exporter": "torch.onnx (dynamo)",
                     "operator": {"domain": DOMAIN, "op_type": OP_TYPE, "plugin_namespace": DOMAIN,
                                  "plugin_version": PLUGIN_VERSION, "local_function": True}},
            "precision": args.precision,
            "engine": engine,
            "tensorrt": None if engine is None else {"backend": engine["backend"], "version": engine["version"]},
            "gpu": _gpu_name(), "compute_capability": None if engine is None else engine["compute_capability"],
            "plugin_library": plugin_library,
            "versions": artifacts.versions(),
            "files": artifacts.checksums(folder, names),
        }
        artifacts.write_json(folder / artifacts.MANIFEST, manifest)
    return {"files": names + [artifacts.MANIFEST], "parity": parity, "engine": engine}


def _batch_profile(text: str) -> tuple[int, int, int]:
    from .errors import SaintError

    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise SaintError(f"--batch {text!r}: expected N or min,opt,max with 1 ≤ min ≤ opt ≤ max")
    return tuple(values)


def _resolve_target(args) -> tuple[str, list[str]]:
    """The target to build and the lines that say what was skipped. Fails before any model work."""
    from .trt.engine import available_target, load_backend, parse_compute_capability

    notes = []
    target = args.target
    if target == "auto":
        target, skipped = available_target()
        notes = [f"target: {target}" + (f" (skipped {'; '.join(skipped)})" if skipped else "")]
    elif target != "onnx":
        load_backend(target)
    if args.compute_capability is not None:
        args.compute_capability = parse_compute_capability(args.compute_capability)
    if target == "trt-rtx" and args.compute_capability is None:
        from .trt.engine import cuda_compute_capability

        if cuda_compute_capability() is None:
            args.compute_capability = "8.9"
            notes.append("no GPU here: TensorRT-RTX builds for compute capability 8.9 (--compute-capability)")
    if target != "onnx" and args.plugin_lib not in ("auto", "none") and not Path(args.plugin_lib).is_file():
        from .errors import SaintError

        raise SaintError(f"--plugin-lib {args.plugin_lib!r}: no such file")
    return target, notes


def _build_engine(args, folder: Path, files: list, progress: Progress) -> dict:
    from .artifacts import sha256
    from .trt import plugin
    from .trt.engine import build_engine, load_backend

    backend = load_backend(args.target)
    library = None
    if args.plugin_lib == "auto":
        try:
            library = plugin.build()
        except Exception as err:  # no CUDA toolkit or headers: fall back to the ONNX function, and say so
            _err(f"      plugin library unavailable ({err}); TensorRT will run the ONNX function instead")
    elif args.plugin_lib != "none":
        library = Path(args.plugin_lib)
    record = None
    if library is not None:  # shipped inside the folder: the engine needs exactly this library to load
        shutil.copy2(library, folder / plugin.LIBRARY)
        files.append(folder / plugin.LIBRARY)
        library = folder / plugin.LIBRARY
        record = {"file": plugin.LIBRARY, "sha256": sha256(library), "name": "SimilarityTopK", "version": "1",
                  "namespace": "saint"}
    cache = args.timing_cache or plugin.cache_dir() / f"timing-{backend.name}-{backend.version}.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    selection = "plugin" if library else "ONNX function"
    with progress.step(f"building {backend.name} {backend.version} engine (SimilarityTopK as {selection}, "
                       f"batch {'/'.join(map(str, args.batch))})"):
        engine = build_engine(backend, files[0], folder / "engine.plan", args.batch, library,
                              args.compute_capability, cache)
    files.append(folder / "engine.plan")
    engine["plugin_library"] = record
    engine["parity"] = _engine_parity(args, backend, folder)
    engine["verified"] = engine["parity"]["status"] == "passed"
    engine["verification"] = engine["parity"]["status"] + (f": {engine['parity']['reason']}"
                                                           if "reason" in engine["parity"] else "")
    result = engine["parity"]
    if result["status"] == "failed":
        raise GateFailed(f"engine vs eager: max |Δ| {result['max_abs_diff']:.3g} (fp32 gate ≤ "
                         f"{result['tolerance']:.3g}), min cosine {result['min_cosine']:.5f} (fp16/bf16 gate "
                         f"≥ 0.999), top-1 agreement {result['top1_agreement']:.1%}")
    return engine


class GateFailed(Exception):
    """A parity gate failed; the message is the table of what failed."""


def _engine_parity(args, backend, folder: Path) -> dict:
    """Engines run only on a GPU; where none is, the golden files let anyone repeat the check there."""
    from .trt.engine import cuda_compute_capability
    from .validate import check_engine_parity

    if args.no_verify:
        return {"status": "not run", "reason": "--no-verify"}
    if cuda_compute_capability() is None:
        return {"status": "not run", "reason": "no CUDA GPU on this machine"}
    if backend.target == "trt-rtx":
        return {"status": "not run", "reason": "Polygraphy runs TensorRT engines, not TensorRT-RTX ones"}
    return check_engine_parity(folder, folder / "engine.plan", args.precision)


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def check(args) -> int:
    from .runtime import check_engine

    engine = check_engine(args.folder, args.plugin_lib)
    print(f"{args.folder}: {engine['backend']} {engine['version']} engine for compute capability "
          f"{engine['compute_capability']} matches this machine")
    return 0


def _load_folder(folder: Path, model):
    """Images from a folder, with the model's own eval transform (timm)."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    from .errors import SaintError

    transform = create_transform(**resolve_data_config({}, model=model))
    tensors = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except (UnidentifiedImageError, OSError):
            continue
    if not tensors:
        raise SaintError(f"--images {str(folder)!r} holds no readable images")
    return torch.stack(tensors)


def _weights_record(weights: str):
    if weights == "random":
        return {"source": "random", "seed": 0}
    if weights == "pretrained":
        return {"source": "pretrained (timm tag, model hub)"}
    from .artifacts import sha256

    return {"source": "file", "path": str(Path(weights).absolute()), "sha256": sha256(Path(weights))}


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in spec.replace("calib:", "calib-"))


def _summary(folder: Path, schedule, result: dict, progress: Progress) -> None:
    parity = result["parity"]
    print(f"\nexported {schedule.spec} → {folder}")
    print(f"  FLOPs ratio to unpruned: {schedule.flops_ratio():.3f} (ideal speed-up {1 / schedule.flops_ratio():.2f}x)")
    if parity:
        closeness = (f"max |Δlogits| {parity.max_abs_diff:.2g}" if parity.precision == "fp32"
                     else f"min cosine {parity.min_cosine:.5f}")
        compared = sum(b["compared"] for b in parity.blocks.values())
        exact = sum(b["order_equal"] for b in parity.blocks.values())
        print(f"  parity: passed on {parity.images} image runs (batch {parity.batch_sizes}, {parity.precision}), "
              f"{closeness}, top-1 agreement {parity.top1_agreement:.0%}; kept tokens exact in {exact}/{compared} "
              f"block selections" + (f", {len(parity.near_ties)} numerical near-ties (see report.json)"
                                     if parity.near_ties else ""))
    else:
        print("  parity: NOT verified (--no-verify)")
    engine = result["engine"]
    if engine:
        print(f"  engine: {engine['backend']} {engine['version']} for compute capability "
              f"{engine['compute_capability']}, SimilarityTopK as {engine['selection']} "
              f"({engine['plugin_layers']} plugin layers); engine parity {engine['verification']}")
    print("  time: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in progress.timings.items()))
    for name in result["files"]:
        print(f"  {folder / name}  ({(folder / name).stat().st_size / 1e6:.1f} MB)")


def calibrate(args) -> int:
    import numpy as np
    import torch

    import saint_export as se

    from . import artifacts
    from .errors import SaintError
    from .models import load
    from .validate import normalise, synthetic_images

    if args.num_images < 1 or not 0 <= args.percentile <= 100:
        raise SaintError("--num-images must be ≥ 1 and --percentile within [0, 100]")
    arch, schedule = _resolve(args)
    artifacts.check_file_writable(args.output)
    progress = Progress(2)
    with progress.step(f"loading {arch.timm_name} ({args.weights} weights)"):
        model = se.apply(load(arch, args.weights), "dynamic", tau=args.tau, K=args.K, gamma=args.gamma)
        images = _load_folder(args.images, model) if args.images else \
            normalise(synthetic_images(args.num_images, arch.img_size), model)
    per_image = []
    with progress.step(f"running the dynamic method on {len(images)} images, one at a time"):
        for i in range(len(images)):
            with torch.no_grad(), se.record_kept(model) as trace:
                model(images[i:i + 1])
            drops = [0] * len(schedule.pruning_blocks)
            for block, keep, *_ in trace:
                drops[block] = 0 if keep is None else (arch.num_patches + arch.num_protected - sum(drops)
                                                       - keep.shape[1])
            per_image.append(drops)
            Progress.counter(i + 1, len(images))
    measured = np.percentile(np.array(per_image), args.percentile, axis=0)
    drops, n = [], arch.num_patches
    for r in measured:  # floor, then keep within the per-block limits of DESIGN §2
        r = min(int(r), (n + 1) // 2, n - 1)
        drops.append(r)
        n -= r
    data = {"format": "saint-export-calibration/1", "model": arch.timm_name, "depth": arch.depth,
            "num_patches": arch.num_patches, "tau": args.tau, "K": args.K, "gamma": args.gamma,
            "images": len(images), "percentile": args.percentile, "per_image_drops": per_image, "drops": drops}
    args.output.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(args.output)
    calibrated = se.KeepSchedule.parse(f"calib:{args.output}", arch.depth, arch.num_patches,
                                       num_protected=arch.num_protected, embed_dim=arch.embed_dim,
                                       mlp_ratio=arch.mlp_ratio)
    print(calibrated.table())
    print(f"wrote {args.output}; use --keep-schedule calib:{args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
