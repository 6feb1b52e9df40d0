"""The parity gate (docs/parity.md): an exported graph against eager PyTorch on the same images."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import core
from .adapters import find_adapter, output_names
from .errors import BackendError, InputError
from .onnx_graph import write_audit_model
from .parity import HALF_COSINE, agreeing, compare_logits
from .patch import record_kept
from .runtime.runners import ort_session

# Two backends compute a block's input with different kernels, so tokens whose eager scores are
# closer (relative) than that noise may rank either way: a numerical near-tie, not a bug. Keys
# carry a few units of roundoff ε; the score c·exp(γ(s̄−τ)) turns that into ~γ·few·ε, and a vote
# flipping at S ≈ τ moves it by 1/c (a few %). fp32: ε ≈ 6e-8 → 1e-5; fp16: ε ≈ 4.9e-4 → 5e-2;
# bf16: ε ≈ 3.9e-3 → 2e-1 (measured on vit_b16: fp16 gaps up to 3.6e-2).
NEAR_TIE = {"fp32": 1e-5, "fp16": 5e-2, "bf16": 2e-1}


def synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] images in [0, 1] with the structure of real photos' easy parts.

    Flat regions and repeated patch-aligned blocks make many tokens (near-)identical, so SAINT
    finds high similarity and exact score ties; the smooth fields and noise keep others distinct.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(count):
        kind = i % 8
        colour = rng.uniform(0, 1, (3, 1, 1))
        if kind == 0:  # one flat colour
            img = np.broadcast_to(colour, (3, size, size))
        elif kind == 1:  # sky over ground
            img = np.where(yy < rng.uniform(0.3, 0.7), colour, rng.uniform(0, 1, (3, 1, 1)))
        elif kind == 2:  # flat background with solid shapes
            img = np.broadcast_to(colour, (3, size, size)).copy()
            for _ in range(3):
                cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
                img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, rng.uniform(0, 1, (3, 1, 1)), img)
        elif kind == 3:  # checkerboard of coarse flat blocks
            cells = rng.integers(2, 6)
            img = np.where(((yy * cells).astype(int) + (xx * cells).astype(int)) % 2 == 0,
                           colour, rng.uniform(0, 1, (3, 1, 1)))
        elif kind == 4:  # smooth gradient
            img = colour * (0.3 + 0.7 * (rng.uniform(0, 1) * yy + rng.uniform(0, 1) * xx) / 2)
        elif kind == 5:  # smooth random field, photo-like
            coarse = rng.uniform(0, 1, (3, 4, 4))
            img = np.stack([np.kron(c, np.ones((size // 4 + 1, size // 4 + 1)))[:size, :size] for c in coarse])
        elif kind == 6:  # flat with a noisy patch of texture
            img = np.broadcast_to(colour, (3, size, size)).copy()
            h = size // 3
            img[:, h:2 * h, h:2 * h] = rng.uniform(0, 1, (3, h, h))
        else:  # stripes
            img = np.where((yy * rng.integers(3, 9)).astype(int) % 2 == 0, colour, 1 - colour)
        images.append(np.asarray(img, dtype=np.float32))
    return torch.from_numpy(np.stack(images))


def normalise(images: torch.Tensor, preprocess) -> torch.Tensor:
    """[0, 1] images → model inputs, with an `images.Preprocess`'s mean and std."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass
class ParityReport:
    """Eager vs ONNX Runtime, teacher-forced per block and free-running end to end."""
    batch_sizes: list[int]
    precision: str = "fp32"
    image_runs: int = 0  # images × batch sizes
    logits: Closeness | None = None  # teacher-forced: every block runs on eager's kept tokens
    top1_free_running: float = 1.0  # the deployed graph as is (features: share of images within tolerance)
    # block → {"compared", "order_equal" (exact), "near_tie", "set_equal", "votes_equal"}
    blocks: dict = field(default_factory=dict)
    near_ties: list = field(default_factory=list)  # (image, batch size, block, relative score gap)
    # Outputs beside the main one (positions: equal; DeepStack features: close), teacher-forced: name → counts
    extra_outputs: dict = field(default_factory=dict)
    eager_seconds: float = 0.0
    onnxruntime_seconds: float = 0.0
    # (inputs, eager logits) of the first run at the largest batch size: the golden files
    golden: tuple | None = field(default=None, repr=False)

    @property
    def failures(self) -> list[str]:
        failed = self.logits.failures("logits") if self.logits else ["no images were compared"]
        if self.precision == "fp32" and self.top1_free_running < 1.0:
            failed.append(f"{self._free_label} of the free-running graph {self.top1_free_running:.1%} < 100%")
        for block, stats in self.blocks.items():
            wrong = stats["compared"] - stats["order_equal"] - stats["near_tie"]
            if wrong:
                failed.append(f"block {block}: kept tokens (set or order) differ on {wrong} of "
                              f"{stats['compared']} images beyond float noise")
        for name, stats in self.extra_outputs.items():
            if stats["equal"] < stats["compared"]:
                failed.append(f"{name}: differs on {stats['compared'] - stats['equal']} of {stats['compared']} images")
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def _free_label(self) -> str:
        return "top-1 agreement" if self.logits is None or self.logits.top1_agreement is not None else "features close"

    def table(self) -> str:
        c = self.logits
        if self.precision == "fp32":
            rows = [("logits max |Δ|", f"{c.max_abs_diff:.3g} (≤ {c.tolerance:.3g})", c.logits_close),
                    (f"{self._free_label} (free)", f"{self.top1_free_running:.1%}", self.top1_free_running == 1.0)]
        else:
            rows = [("logits min cosine", f"{c.min_cosine:.5f} (≥ {HALF_COSINE})", c.logits_close),
                    (f"{self._free_label} (free)", f"{self.top1_free_running:.1%} (reported)", True)]
        if c.top1_agreement is not None:
            rows.append(("top-1 agreement", f"{c.top1_agreement:.1%}", c.top1_agreement == 1.0))
        for block, s in self.blocks.items():
            rows.append((f"block {block} kept tokens", f"exact {s['order_equal']}/{s['compared']}, near-tie "
                         f"{s['near_tie']}, same set {s['set_equal']}", s["order_equal"] + s["near_tie"] == s["compared"]))
        for name, s in self.extra_outputs.items():
            rows.append((f"{name} equal", f"{s['equal']}/{s['compared']}", s["equal"] == s["compared"]))
        lines = [f"{'check':<26} {'result':<32} gate"]
        lines += [f"{name:<26} {result:<32} {'pass' if ok else 'FAIL'}" for name, result, ok in rows]
        for image, batch, block, gap in self.near_ties:
            lines.append(f"near-tie: image {image} (batch {batch}) block {block}: eager scores the swapped tokens "
                         f"{gap:.1e} apart (float noise)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "failures": self.failures, "precision": self.precision,
                "image_runs": self.image_runs, "batch_sizes": self.batch_sizes, "logits": self.logits.as_dict(),
                "top1_free_running": self.top1_free_running, "blocks": self.blocks, "extra_outputs": self.extra_outputs,
                "near_ties": [dict(zip(("image", "batch", "block", "score_gap"), t)) for t in self.near_ties],
                "eager_seconds": self.eager_seconds, "onnxruntime_seconds": self.onnxruntime_seconds}


def near_tie_gap(state, keys: torch.Tensor, eager_keep: np.ndarray, other_keep: np.ndarray) -> float | None:
    """Where two selections from the same block input differ: the largest relative gap between
    the eager scores of the tokens each put at a differing position. None if a protected or B
    position differs (not a ranking question at all)."""
    p = state.schedule.num_protected
    differ = np.flatnonzero(eager_keep != other_keep)
    mine, theirs = eager_keep[differ] - p, other_keep[differ] - p
    if (mine < 0).any() or (theirs < 0).any() or (mine % 2).any() or (theirs % 2).any():
        return None
    score = core.redundancy_scores(keys[None], p, state.tau, state.vote_k, state.gamma)[0][0].double().numpy()
    a, b = score[mine // 2], score[theirs // 2]
    return float((np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-30)).max())


def _sessions(onnx_path: Path, precision: str):
    audit_path = onnx_path.with_name(f".audit-{onnx_path.name}")
    try:
        blocks = write_audit_model(onnx_path, audit_path)
        return ort_session(onnx_path), ort_session(audit_path), blocks
    except BackendError as err:
        if "NOT_IMPLEMENTED" not in str(err):
            raise
        import onnxruntime as ort

        raise InputError(f"ONNX Runtime ({', '.join(ort.get_available_providers())}) has no kernel for part of this "
                         f"{precision} graph ({str(err).split(':')[-1].strip()}), so the parity gate cannot run "
                         "here; use onnxruntime-gpu on a GPU, or export without verification") from None
    finally:
        audit_path.unlink(missing_ok=True)


def check_onnx_parity(model: torch.nn.Module, onnx_path: Path, inputs: torch.Tensor,
                      batch_sizes: tuple[int, ...] = (1, 3), progress=None, precision: str = "fp32") -> ParityReport:
    """Run `inputs` through eager `model` and ONNX Runtime at each batch size and compare.

    Teacher-forced (the gate's core): ONNX Runtime runs every block on eager's kept tokens, and
    each block's own selection must equal eager's in set and order, except where eager scores the
    swapped tokens within NEAR_TIE (relative) of each other: float noise in the block's input
    decides those, and they are reported as near-ties. Logits must agree (parity.compare_logits).
    Free-running, the deployed graph must keep eager's top-1 (fp32). `progress(done, total)` is
    called after every batch.
    """
    free, audit, block_names = _sessions(onnx_path, precision)
    state = getattr(model, "saint", None)
    # The degree rule is plain graph operations, with no operator node to teacher-force.
    blocks = state.schedule.pruning_blocks if state and state.schedule.rule == "vote" else []
    if len(blocks) != len(block_names):
        raise BackendError(f"the ONNX graph has {len(block_names)} SimilarityTopK nodes for {len(blocks)} "
                           "pruning blocks")
    adapter = find_adapter(model)
    extra = list(output_names(adapter, model)[1:])  # e.g. Qwen's image_positions
    fetched = [adapter.OUTPUT_NAME, *extra] + [name for _, own, votes in block_names for name in (own, votes)]
    report = ParityReport(list(batch_sizes), precision)
    report.blocks = {b: {"compared": 0, "set_equal": 0, "order_equal": 0, "near_tie": 0, "votes_equal": 0}
                     for b in blocks}
    eager_logits, audit_logits, free_logits = [], [], []
    for bs in batch_sizes:
        for start in range(0, len(inputs), bs):
            x = inputs[start:start + bs]
            t0 = time.perf_counter()
            with torch.no_grad(), (record_kept(model) if blocks else contextlib.nullcontext()) as trace:
                eager = model(x)
            eager, eager_extra = (eager[0], eager[1:]) if isinstance(eager, tuple) else (eager, ())
            eager = eager.float().numpy()
            t1 = time.perf_counter()
            feed = {adapter.INPUT_NAME: x.numpy()}
            feed.update({forced: kept.keep_index.numpy() for (forced, _, _), kept in zip(block_names, trace or [])})
            outputs = audit.run(fetched, feed)
            report.eager_seconds += t1 - t0
            report.onnxruntime_seconds += time.perf_counter() - t1
            if bs == max(batch_sizes) and report.golden is None:
                report.golden = (x, eager)
            free_logits.append(free.run([adapter.OUTPUT_NAME], {adapter.INPUT_NAME: x.numpy()})[0])
            for name, want, got in zip(extra, eager_extra, outputs[1:]):  # teacher-forced, like the features
                want = want.float().numpy() if want.is_floating_point() else want.numpy()
                same = (agreeing([got], [want], precision) if np.issubdtype(got.dtype, np.floating)
                        else np.all(want == got, axis=tuple(range(1, got.ndim))))  # integers: equal
                stats = report.extra_outputs.setdefault(name, {"compared": 0, "equal": 0})
                stats["compared"] += len(x)
                stats["equal"] += int(same.sum())
            first = 1 + len(extra)
            for i, kept in enumerate(trace or []):
                own, own_votes, keep = outputs[first + 2 * i], outputs[first + 1 + 2 * i], kept.keep_index.numpy()
                stats = report.blocks[kept.block]
                for b in range(len(x)):
                    stats["compared"] += 1
                    stats["votes_equal"] += int(own_votes[b] == kept.vote_rows[b])
                    stats["set_equal"] += int((np.sort(own[b]) == np.sort(keep[b])).all())
                    if (own[b] == keep[b]).all():
                        stats["order_equal"] += 1
                        continue
                    gap = near_tie_gap(state, kept.keys[b], keep[b], own[b])
                    if gap is not None and gap <= NEAR_TIE[precision]:  # order or set: decided by float noise
                        stats["near_tie"] += 1
                        report.near_ties.append((start + b, bs, kept.block, gap))
            eager_logits.append(eager)
            audit_logits.append(outputs[0])
            report.image_runs += len(x)
            if progress:
                progress(report.image_runs, len(inputs) * len(batch_sizes))
    report.logits = compare_logits(audit_logits, eager_logits, precision)
    report.top1_free_running = float(agreeing(free_logits, eager_logits, precision).mean()) if eager_logits else 0.0
    return report


GOLDEN_INPUTS = "golden_inputs.json"
GOLDEN_OUTPUTS = "golden_outputs.json"
GOLDEN_RUNNER = "eager-pytorch"


def save_goldens(inputs: torch.Tensor, logits: np.ndarray, folder: Path, input_name: str,
                 output_name: str) -> list[Path]:
    """Eager inputs and outputs as Polygraphy JSON, so that
    `polygraphy run model.onnx --trt --load-inputs golden_inputs.json --load-outputs golden_outputs.json`
    repeats the check anywhere, and `runtime` replays them (tests/test_runtime.py)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy narrates file I/O on stdout
        save_json([{input_name: inputs.numpy()}], folder / GOLDEN_INPUTS, description="golden inputs")
        results = RunResults()
        results.add([IterationResult({output_name: logits}, runner_name=GOLDEN_RUNNER)], runner_name=GOLDEN_RUNNER)
        results.save(str(folder / GOLDEN_OUTPUTS))
    return [folder / GOLDEN_INPUTS, folder / GOLDEN_OUTPUTS]


def load_goldens(folder: Path, input_name: str, output_name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(inputs, eager logits) as saved by `save_goldens`."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        feeds = load_json(Path(folder) / GOLDEN_INPUTS)
        expected = RunResults.load(str(Path(folder) / GOLDEN_OUTPUTS))[0][1]
    return ([np.asarray(feed[input_name], dtype=np.float32) for feed in feeds],
            [np.asarray(result[output_name], dtype=np.float32) for result in expected])
