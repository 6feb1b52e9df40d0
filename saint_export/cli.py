"""`saint-export`: a shell over the library. Each subcommand maps flags to one library call and prints.

    saint-export vit_b16 --keep-schedule early50 --weights random     (export is the default subcommand)
    saint-export llava-1.5-7b --mode hybrid --keep-schedule degree375@19 --llm-schedule dynamic
    saint-export calibrate vit_b16 --weights random --output calib.json
    saint-export check engines/vit_b16-early50
    saint-export infer engines/vit_b16-early50 photo.jpg photos/
    saint-export triton engines/vit_b16-early50 --repository triton-repo
    saint-export serve engines/vit_b16-early50
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from . import spec
from .config import DEFAULT_OPSET, PRECISIONS, QUANTIZED, TARGETS
from .errors import BackendError, GateFailed, InputError

EXIT_OK, EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
COMMANDS = ("export", "calibrate", "check", "infer", "eval", "tune", "triton", "serve", "vllm")
MODES = ("vit", "llm", "hybrid")


class TqdmProgress:
    """Step lines with timings on stderr, and a tqdm counter on steps that count images."""

    def __init__(self, total_steps: int | None = None):
        self.total, self.index = total_steps, 0

    @contextlib.contextmanager
    def step(self, key: str, label: str, total: int | None = None):
        from tqdm import tqdm

        self.index += 1
        _err(f"[{self.index}{'/' + str(self.total) if self.total else ''}] {label} …")
        t0 = time.perf_counter()
        bar = tqdm(total=total, unit="image", leave=False, file=sys.stderr, disable=None) if total else None

        def advance(done: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        try:
            yield advance
        finally:
            if bar is not None:
                bar.close()
        _err(f"      done in {time.perf_counter() - t0:.1f} s")

    def note(self, text: str) -> None:
        _err(text)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saint-export", description="SAINT token pruning, exported and proven. "
                                     "Without a subcommand, 'export' is meant.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    p = sub.add_parser("export", help="model → SAINT → ONNX (→ engine), proven against eager PyTorch")
    p.add_argument("model", nargs="?", help="alias (vit_b16, llava-1.5-7b, …; see --list-models), a timm model "
                   "name, a transformers hub id or a local checkpoint folder")
    p.add_argument("-s", "--keep-schedule", help="none | early<P>[@<B>] | r:<r0>,<r1>,… | calib:<file.json> | "
                   "degree<N>@<L>[/<r0>] (default: early50; none in --mode llm)")
    p.add_argument("--mode", choices=MODES, default="vit", help="where SAINT prunes a VLM: vit (the vision tower), "
                   "llm (inside the language model during prefill) or hybrid (both); default vit")
    p.add_argument("--llm-schedule", help="none | dynamic[@<a>-<b>] | r:<r0>,… | span<P>@<a>-<b> (LLaVA, --mode llm "
                   "or hybrid; default dynamic). Recorded in the manifest and applied in PyTorch: no LLM runtime "
                   "drops tokens inside prefill")
    p.add_argument("--llm-tau", type=float, default=spec.LLM_TAU,
                   help=f"τ inside the language model (default {spec.LLM_TAU}, the reference's)")
    _model_arguments(p)
    p.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model>-<schedule>)")
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="how far to go (default auto: the furthest this machine can build)")
    p.add_argument("--batch", default="1,8,32", help="batch profile min,opt,max, or N for 1,N,N; the parity gate "
                   "runs batch 1 and opt, the runtime splits batches above max (default 1,8,32)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="precision of the blocks' Linear layers, written into the graph (default fp32; int8 and fp8 "
                   "quantize their inputs with Q/DQ and need --calibration)")
    p.add_argument("--calibration", type=Path, nargs="+", default=[],
                   help="int8 / fp8: image files or folders to calibrate on (the pruned graph runs them)")
    p.add_argument("--calibration-images", type=int, default=128,
                   help="int8 / fp8: how many calibration images to use (default 128, at least 16)")
    p.add_argument("--float-keys", choices=("auto", "yes", "no"), default="auto",
                   help="int8 / fp8: keep the projections of the keys SAINT scores float (default auto: where they "
                   "project the keys alone; a fused qkv is quantized; docs/quantization.md)")
    p.add_argument("--min-agreement", type=float,
                   help="int8 / fp8 gate: top-1 agreement with eager fp32 (default 0.85 for int8, 0.7 for fp8)")
    p.add_argument("--min-cosine", type=float,
                   help="int8 / fp8 gate: the worst image's output cosine with eager fp32 (default 0.95)")
    p.add_argument("--plugin-lib", default="auto", help=f"{spec.OP_TYPE} plugin library for TensorRT: auto (build "
                   "it), none (TensorRT runs the node's ONNX function) or a path")
    p.add_argument("--compute-capability", help="TensorRT-RTX target GPU, e.g. 89 (default: this GPU's)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--parity-images", type=int, default=8, help="synthetic parity images (default 8)")
    p.add_argument("--images", type=Path, nargs="+", default=[], help="image files or folders to add to the gate")
    p.add_argument("--no-verify", action="store_true", help="skip the parity gate (the folder is marked unverified)")
    p.add_argument("--print-schedule", action="store_true", help="print the resolved schedule table and exit")
    p.add_argument("--list-models", action="store_true", help="list the model aliases and exit")

    p = sub.add_parser("calibrate", help="measure per-block budgets with the dynamic method (a calib: schedule)")
    p.add_argument("model")
    _model_arguments(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration JSON to write")
    p.add_argument("--images", type=Path, nargs="+", help="image files or folders (default: synthetic images)")
    p.add_argument("--num-images", type=int, default=32, help="synthetic images when --images is not given")
    p.add_argument("--percentile", type=float, default=50.0, help="per-block percentile of r (default: median)")

    p = sub.add_parser("eval", help="accuracy, agreement and speed of keep schedules on an image folder")
    p.add_argument("model", help="model name or alias, or an exported folder (evaluated through the runtime)")
    _model_arguments(p)
    p.add_argument("--images", type=Path, nargs="+", required=True,
                   help="image files, flat folders or ImageFolder trees (class subfolders: accuracy too)")
    p.add_argument("-s", "--keep-schedule", default="none,early75,early50,early25",
                   help="comma-separated schedules (default none,early75,early50,early25)")
    p.add_argument("--backend", default=None, help="eager | onnxruntime for a model (default eager); "
                   "auto | tensorrt | onnxruntime… for a folder (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward (default 16)")
    p.add_argument("--precision", default="fp32", help="comma-separated precisions, e.g. fp32,int8 (int8 and fp8 "
                   "on --backend onnxruntime, calibrated on --calibration)")
    p.add_argument("--calibration", type=Path, nargs="+", default=[], help="int8 / fp8: images to calibrate on")
    p.add_argument("-o", "--output", type=Path, help="folder for eval.json and eval.png (default "
                   "engines/<model>-eval)")
    p.add_argument("--allow-unverified", action="store_true", help="evaluate a folder that did not pass its gate")

    p = sub.add_parser("tune", help="search the fastest static schedule that meets an objective on your images, "
                                    "and certify the front on held-out images")
    p.add_argument("model")
    _model_arguments(p, searched=True)
    p.add_argument("--images", type=Path, nargs="+", required=True,
                   help="image files, flat folders or ImageFolder trees (class subfolders: accuracy too)")
    p.add_argument("--objective", required=True, help="speedup>=X | latency-ms<=X | disagreement<=P%% | "
                   "accuracy-drop<=P%% | cosine>=X[@Q%%] (quality objectives are certified on held-out images with "
                   "probability 1-delta; speed ones are met on a confidence bound of the median; a tower takes speed, "
                   "latency and cosine)")
    p.add_argument("--delta", type=float, default=0.05, help="the certificate's error probability (default 0.05)")
    p.add_argument("--backend", default="onnxruntime-cpu", help="onnxruntime-cpu (default) | onnxruntime-cuda | eager")
    p.add_argument("--batch", type=int, default=8, help="images per inference, for latency (default 8)")
    p.add_argument("--budget-minutes", type=float, help="stop the search after this long (default: walk the "
                   "whole path)")
    p.add_argument("--holdout", type=float, default=0.3, help="share of images held out for certification "
                   "(default 0.3; a class's only image stays in the tune split)")
    p.add_argument("--seed", type=int, default=0, help="the tune / held-out split's seed")
    p.add_argument("--probe", type=int, default=64, help="tune images the search scores on (default 64)")
    p.add_argument("--step", type=int, default=8, help="tokens added per search step (default 8)")
    p.add_argument("--finalists", type=int, default=8, help="front points exported and measured (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="timings per schedule, in thirds: 3 x ROUNDS interleaved "
                   "rounds (default 3)")
    p.add_argument("--polish", type=int, default=0, help="Optuna NSGA-II trials after the greedy path, started "
                   "from it (default 0; needs the tune extra)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for front.json, front.png, sensitivity.png, schedule.txt, command.txt and "
                        "journal.jsonl (a rerun resumes from its journal)")

    p = sub.add_parser("check", help="check that an exported engine folder matches this machine")
    p.add_argument("folder", type=Path)
    p.add_argument("--plugin-lib", type=Path, help="the plugin library you will load with the engine")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")

    p = sub.add_parser("infer", help="run an exported folder on image files; print the top classes")
    p.add_argument("folder", type=Path)
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--backend", default="auto", help="auto | tensorrt | onnxruntime | onnxruntime-cpu | "
                   "onnxruntime-cuda (default auto)")
    p.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--save", type=Path, help="also write the outputs (logits or image features) to this .npy file")
    p.add_argument("--allow-unverified", action="store_true", help="run a folder that did not pass a parity gate")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")

    p = sub.add_parser("triton", help="write a Triton model repository for production (NGC Triton container)")
    p.add_argument("folder", type=Path)
    p.add_argument("--repository", type=Path, required=True, help="model repository folder to write")
    _served_model_arguments(p)
    p.add_argument("--plugin-lib", type=Path, help="static-registration plugin library, when the folder has none")
    p.add_argument("--no-check", action="store_true", help="skip Triton's own configuration checks")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")

    p = sub.add_parser("serve", help="serve an exported folder on Triton (HTTP, gRPC, metrics) until Ctrl-C")
    p.add_argument("folder", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    _served_model_arguments(p)
    p.add_argument("--backend", default="auto", help="runtime backend inside the server: auto | tensorrt | "
                   "onnxruntime | onnxruntime-cpu | onnxruntime-cuda (default auto)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per instance (default: one per core)")
    p.add_argument("--top", type=int, default=5, help="classes returned by the image model (default 5)")
    p.add_argument("--allow-unverified", action="store_true", help="serve a folder that did not pass a parity gate")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")

    p = sub.add_parser("vllm", help="serve a LLaVA checkpoint on vLLM with SAINT in its vision tower "
                       "(other arguments go to vLLM's server)")
    p.add_argument("checkpoint", help="checkpoint folder or hub id")
    p.add_argument("-s", "--keep-schedule", required=True, help="the tower's static keep schedule, e.g. degree375@19")
    p.add_argument("--tau", type=float, default=spec.TAU, help=f"similarity threshold τ (default {spec.TAU})")
    p.add_argument("--K", type=int, default=spec.VOTE_K, help=f"votes that make a row redundant (default {spec.VOTE_K})")
    p.add_argument("--gamma", type=float, default=spec.GAMMA, help=f"score sharpness γ (default {spec.GAMMA:g})")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def _served_model_arguments(p: argparse.ArgumentParser) -> None:
    from .serving.configs import DEFAULT_QUEUE_DELAY_US

    p.add_argument("--model-name", default="saint", help="Triton model name (default saint)")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"dynamic batching: longest wait for a fuller batch (default {DEFAULT_QUEUE_DELAY_US} µs)")


def _model_arguments(p: argparse.ArgumentParser, searched: bool = False) -> None:
    """The model's arguments; with `searched` (tune) τ and γ default to None: searched."""
    p.add_argument("--weights", default="pretrained",
                   help="pretrained (needs the model hub) | random (seeded) | <checkpoint file> (default pretrained)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    default = "searched around {:g}" if searched else "default {:g}"
    p.add_argument("--tau", type=float, default=None if searched else spec.TAU,
                   help=f"similarity threshold τ ({default.format(spec.TAU)})")
    p.add_argument("--K", type=int, default=spec.VOTE_K,
                   help=f"votes that make a row redundant (the operator's vote_k; default {spec.VOTE_K})")
    p.add_argument("--gamma", type=float, default=None if searched else spec.GAMMA,
                   help=f"score sharpness γ ({default.format(spec.GAMMA)})")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "export")
    if argv[0] == "vllm":  # the arguments saint-export does not know are vLLM's
        args, args.vllm_args = _parser().parse_known_args(argv)
    else:
        args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so staged output is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return {"export": export, "calibrate": calibrate, "check": check, "infer": infer,
                "eval": evaluate, "tune": tune, "triton": triton, "serve": serve, "vllm": vllm}[args.command](args)
    except KeyboardInterrupt:
        _err("saint-export: interrupted; nothing was written")
        return EXIT_INTERRUPTED
    except InputError as err:
        _err(f"saint-export: error: {err}")
        return EXIT_BAD_INPUT
    except GateFailed as failure:
        _err(f"\nparity gate FAILED; nothing was written:\n{failure}")
        return EXIT_GATE_FAILED
    except BackendError as err:
        _err(f"saint-export: backend error: {err}")
        return EXIT_BACKEND
    except Exception as err:  # a bug: one line, and the traceback on request
        if args.debug:
            raise
        _err(f"saint-export: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
             "(rerun with --debug for the traceback)")
        return EXIT_BACKEND


def tune(args) -> int:
    import saint_export as se
    from saint_export.tune import EXIT_NOT_MET

    try:
        result = se.tune(args.model, args.images, args.objective, weights=args.weights, backend=args.backend,
                         batch=args.batch, budget_minutes=args.budget_minutes, holdout=args.holdout, seed=args.seed,
                         probe=args.probe, step=args.step, finalists=args.finalists, rounds=args.rounds,
                         polish=args.polish, delta=args.delta, output=args.output,
                         tau=args.tau, K=args.K, gamma=args.gamma, progress=TqdmProgress())
    except KeyboardInterrupt:
        _err(f"saint-export: interrupted; the same command resumes from {args.output / 'journal.jsonl'}")
        return EXIT_INTERRUPTED
    print(result.table())
    fit = result.latency_fit
    loo = fit["leave_one_out_max_error"]
    print(f"latency model: measured = {fit['a']:.3f} × block sum + {fit['b']:.2f} ms; error out of sample "
          + (f"≤ {loo:.1%} (leave-one-out)" if loo is not None else "not measured (too few finalists)")
          + f"; timings spread {result.noise:.0%}; {result.images['tune']} tune images ({result.images['probe']} "
          f"probed), {result.images['held_out']} held out; τ {result.tau:g}, γ {result.gamma:g}; {result.seconds:.0f} s")
    print("wrote " + ", ".join(str(p) for p in result.files))
    if not result.met:
        _err(f"saint-export: {result.reason}; the closest is {result.closest.spec} (front.json has every finalist)")
        return EXIT_NOT_MET
    print(result.guarantee)
    print(f"export it: {result.command(args.model)}")
    return EXIT_OK


def export(args) -> int:
    import saint_export as se
    from saint_export.adapters import hf_vision
    from saint_export.adapters.timm_vit import ALIASES

    if args.list_models:
        print("\n".join(f"{alias:<20} {name}" for alias, name in ALIASES.items()))
        print("\n".join(f"{alias:<20} {entry['repo']} (transformers)"
                        for alias, entry in hf_vision.checkpoints().items()))
        return EXIT_OK
    if not args.model:
        raise InputError("a model name is required (saint-export MODEL …; see saint-export export --help)")
    args.keep_schedule, args.llm_schedule = _mode_schedules(args.mode, args.keep_schedule, args.llm_schedule)
    config = se.ExportConfig(
        keep_schedule=args.keep_schedule, llm_schedule=args.llm_schedule, llm_tau=args.llm_tau, tau=args.tau, K=args.K,
        gamma=args.gamma, precision=args.precision, opset=args.opset, target=args.target, batch=args.batch, verify=not args.no_verify,
        parity_images=args.parity_images, images=tuple(args.images), plugin_library=args.plugin_lib,
        compute_capability=args.compute_capability, timing_cache=args.timing_cache, img_size=args.img_size,
        calibration=tuple(args.calibration), calibration_images=args.calibration_images, float_keys={"auto": None, "yes": True, "no": False}[args.float_keys],
        quantized_agreement=args.min_agreement, quantized_cosine=args.min_cosine)
    schedule = se.resolve_schedule(args.keep_schedule, args.model, args.img_size)
    llm_schedule = se.resolve_llm_schedule(args.llm_schedule, args.model, schedule)
    if args.print_schedule:
        print(schedule.table() + (f"\n\n{llm_schedule.table()}" if llm_schedule else ""))
        return EXIT_OK
    llm_part = "" if args.llm_schedule == "none" else f"-llm-{_slug(args.llm_schedule)}"
    output = args.output or Path("engines") / f"{_slug(Path(args.model).name)}-{_slug(schedule.spec)}{llm_part}"
    _err(schedule.table() + (f"\n\n{llm_schedule.table()}" if llm_schedule else ""))
    # load, export, [gate], [quantize, [its gate]], [engine], manifest
    steps = 3 + config.verify + (config.target != "onnx") + (config.precision in QUANTIZED) * (1 + config.verify)
    result = se.export(args.model, output, config, weights=args.weights, progress=TqdmProgress(steps))
    _summary(result)
    return EXIT_OK


def _mode_schedules(mode: str, keep_schedule: str | None, llm_schedule: str | None) -> tuple[str, str]:
    """--mode's defaults, and its contradictions refused: vit prunes the tower only, llm the
    language model only, hybrid both."""
    if mode == "vit" and llm_schedule not in (None, "none"):
        raise InputError(f"--mode vit prunes only the vision tower; use --mode llm or hybrid for --llm-schedule "
                         f"{llm_schedule}")
    if mode == "llm" and keep_schedule not in (None, "none"):
        raise InputError(f"--mode llm prunes only inside the language model; use --mode hybrid for --keep-schedule "
                         f"{keep_schedule}")
    keep = keep_schedule or ("none" if mode == "llm" else "early50")
    llm = llm_schedule or ("none" if mode == "vit" else "dynamic")
    return keep, llm


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text.replace("calib:", "calib-"))


def _summary(result) -> None:
    parity, engine, schedule = result.parity, result.engine, result.schedule
    print(f"\nexported {schedule.spec} → {result.folder}")
    print(f"  FLOPs ratio to unpruned: {schedule.flops_ratio():.3f} (ideal speed-up {1 / schedule.flops_ratio():.2f}x)")
    if parity:
        compared = sum(b["compared"] for b in parity.blocks.values())
        exact = sum(b["order_equal"] for b in parity.blocks.values())
        selections = (f"; kept tokens exact in {exact}/{compared} block selections" if compared else
                      "; the degree rule's selections are checked end to end" if schedule.rule == "degree" else "")
        print(f"  parity: passed on {parity.image_runs} image runs (batch {parity.batch_sizes}, {parity.precision}), "
              f"{parity.logits.summary()}{selections}"
              + (f", {len(parity.near_ties)} numerical near-ties (see report.json)" if parity.near_ties else ""))
    else:
        print("  parity: NOT verified (exported with --no-verify)")
    if engine:
        operator = (f"no {spec.OP_TYPE} node" if engine.operator_backend == "none" else
                    f"{spec.OP_TYPE} as {engine.operator_backend} ({engine.plugin_layers} plugin layers)")
        print(f"  engine: {engine.backend} {engine.version} for compute capability {engine.compute_capability}, "
              f"{operator}; engine parity {engine.verification}")
    print("  time: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in result.timings.items()))
    for name in result.files:
        print(f"  {result.folder / name}  ({(result.folder / name).stat().st_size / 1e6:.1f} MB)")
    features = result.manifest.features
    if features:
        extra = "".join(f", with {t['name']} {t['shape']}" for t in features.get("extra_outputs", []))
        print(f"  image features: {features['tokens_per_image']} tokens per image (from "
              f"{features['unpruned_tokens_per_image']}) of width {features['hidden_size']}{extra}; how LLM "
              "runtimes take them: manifest.json, features")
        if "llm_schedule" in features:
            print(f"  LLM schedule {features['llm_schedule']['spec']}: applied in PyTorch (manifest.json: "
                  "features.llm_schedule)")
    print(f"  run it: saint-export infer {result.folder} <images>")


def calibrate(args) -> int:
    import saint_export as se
    from saint_export.artifacts import check_file_writable

    check_file_writable(args.output)
    calibration = se.calibrate(args.model, args.images, args.percentile, weights=args.weights, tau=args.tau,
                               K=args.K, gamma=args.gamma, num_images=args.num_images, img_size=args.img_size,
                               progress=TqdmProgress(2))
    calibration.save(args.output)
    print(se.resolve_schedule(f"calib:{args.output}", args.model, args.img_size).table())
    print(f"wrote {args.output}; use --keep-schedule calib:{args.output}")
    return EXIT_OK


def evaluate(args) -> int:
    import saint_export as se
    from saint_export.artifacts import check_file_writable

    folder = Path(args.model)
    output = args.output or Path("engines") / f"{_slug(folder.name if folder.is_dir() else args.model)}-eval"
    check_file_writable(output / "eval.json")
    progress = TqdmProgress()
    if (folder / "manifest.json").is_file():
        evaluation = se.evaluate_folder(folder, args.images, backend=args.backend or "auto",
                                        allow_unverified=args.allow_unverified, batch_size=args.batch_size)
    else:
        evaluation = se.evaluate(args.model, args.images, args.keep_schedule.split(","), weights=args.weights,
                                 backend=args.backend or "eager", batch_size=args.batch_size, tau=args.tau, K=args.K,
                                 gamma=args.gamma, img_size=args.img_size, precisions=args.precision.split(","),
                                 calibration=tuple(args.calibration), progress=progress)
    for path, why in evaluation.unreadable:
        _err(f"skipped unreadable image {path}: {why}")
    print(evaluation.table())
    try:
        written = evaluation.save(output)
    except InputError as missing_plot:  # eval.json is written before the plot is tried
        _err(f"{missing_plot}; wrote {output / 'eval.json'} only")
        written = [output / "eval.json"]
    print("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def check(args) -> int:
    from .runtime import check_engine

    engine, _, _ = check_engine(args.folder, plugin_library=args.plugin_lib)
    print(f"{args.folder}: {engine.backend} {engine.version} engine for compute capability "
          f"{engine.compute_capability} matches this machine")
    return EXIT_OK


def infer(args) -> int:
    import numpy as np

    from . import artifacts, runtime

    if args.top < 1:
        raise InputError(f"--top must be ≥ 1, got {args.top}")
    if args.save:
        artifacts.check_file_writable(args.save)
    with runtime.open(args.folder, args.backend, allow_unverified=args.allow_unverified) as runner:
        manifest = runner.manifest
        images = runtime.load_images(args.images, manifest.preprocess)
        for path, why in images.unreadable:
            _err(f"skipped unreadable image {path}: {why}")
        labels = (args.folder / manifest.labels).read_text().splitlines() if manifest.labels else None
        runner.infer(images.pixel_values[:1])  # warm-up, not timed
        t0 = time.perf_counter()
        logits = runner.infer(images.pixel_values)
        seconds = time.perf_counter() - t0
    if args.save:
        artifacts.atomic_write_bytes(args.save, _npy(logits))
        print(f"wrote {manifest.output.name} {list(logits.shape)} to {args.save}")
    if logits.ndim > 2:  # image features: no classes to rank
        for path, features in zip(images.paths, logits):
            print(f"{path}: {manifest.output.name} {list(features.shape)}, mean norm "
                  f"{np.linalg.norm(features, axis=-1).mean():.3f}")
        indices = probabilities = []
    else:
        indices, probabilities = runtime.top_k(logits, min(args.top, logits.shape[-1]))
    for path, classes, row in zip(images.paths, indices, probabilities):
        print(path)
        for index, probability in zip(classes, row):
            name = labels[index] if labels else f"class {index}"
            print(f"  {probability:7.2%}  {index:>5}  {name}")
    for note in runner.notes:
        _err(note)
    print(f"{len(images.paths)} images in {seconds:.2f} s ({len(images.paths) / seconds:.1f} images/s) on "
          f"{runner.backend}")
    return EXIT_OK


def _npy(array) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def triton(args) -> int:
    from . import serving

    repository = serving.write_repository(args.folder, args.repository, args.model_name, instances=args.instances,
                                          queue_delay_us=args.max_queue_delay_us, plugin_library=args.plugin_lib,
                                          check=not args.no_check)
    print(f"wrote Triton model repository {repository.path}")
    for name, what in repository.models.items():
        print(f"  {name}: {what}")
    for note in repository.notes:
        print(f"  note: {note}")
    if repository.checked:
        print(f"  {repository.checked}")
    print(f"  run it (see {repository.path / 'README.md'}): {repository.launch}")
    return EXIT_OK


def serve(args) -> int:
    from . import serving

    service = serving.Service(args.folder, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, model_name=args.model_name, instances=args.instances,
                              queue_delay_us=args.max_queue_delay_us, backend=args.backend,
                              allow_unverified=args.allow_unverified, threads=args.threads, top_k=args.top)
    _err(f"starting Triton for {args.folder} …")
    try:
        service.start()
        print(serving.describe(service), flush=True)
        code = service.server.process.wait()
        errors = serving.server.log_errors(service.server.log())
        raise BackendError(f"Triton stopped unexpectedly (exit {code}): {errors[-1] if errors else 'see its log'}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not interrupt the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _err("stopping Triton …")
        service.stop()
        _err("stopped")
        return EXIT_OK
    finally:
        service.stop()


def vllm(args) -> int:
    """Check everything in one line each, then become vLLM's server (so that its signals, exit
    code and shutdown are vLLM's own)."""
    from . import vllm as plugin

    plugin.check_version()
    command, found = plugin.serve_command(args.checkpoint, plugin.overrides(args.keep_schedule, args.tau, args.K,
                                                                            args.gamma), list(args.vllm_args))
    _err(f"{found.summary()}; starting vLLM's OpenAI-compatible server …")
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
