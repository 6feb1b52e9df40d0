"""`saint-export tune`: search static keep schedules on the user's images, and certify the front.

    result = saint_export.tune("vit_b16", "photos/", "disagreement<=2%", weights="random", output="tune/")

1. The images are split into a tune part and a held-out part (`holdout`, stratified by class when
   the folders are classes), with `seed`.
2. **Search** (tune part, a probe of `probe` images): a greedy path from the unpruned model. Each
   step tries `step` more dropped tokens in every pruning block (SAINT's first half) and keeps the
   try that raises the KL divergence of the logits from the unpruned model's least per
   multiply-accumulate saved. Block inputs along the path are cached, so a try re-runs only the
   blocks from its own. Every step is a schedule, so one path gives the whole front. The
   `early<P>` families are evaluated beside it. Costs are MACs here, so the path is deterministic.
3. **Latency**: a per-block cost curve over token counts measured on the backend, with an affine
   correction from whole-model runs (`LatencyModel`); the finalists are exported and measured for
   real, in interleaved rounds (medians), and the front reports predicted against measured.
4. **Certification** (held-out part): top-1 agreement with its Wilson interval, KL, logit cosine,
   accuracy with labels. The saved front is the non-dominated set of the finalists on measured
   latency and held-out KL. For `speedup>=` and `latency-ms<=` the chosen schedule is the one with
   the lowest held-out KL among those that meet the goal on their timings' quartiles (the
   unpruned model's lower quartile over its upper one, or its upper quartile of latency); for
   `disagreement<=` and `accuracy-drop<=` it is the fastest whose upper bound of disagreement meets
   it (that bound also bounds the accuracy drop). When none does, `TuneResult.met` is False and
   `closest` is reported.

Every evaluation and measurement is appended to `journal.jsonl` in the output folder; a run
restarted with the same arguments reads it back and repeats none of them (an interrupted run
resumes where it stopped).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import artifacts, core, spec
from .adapters import find_adapter
from .config import ExportConfig, check_hyperparameters
from .errors import InputError
from .schedule import KeepSchedule

OBJECTIVES = ("speedup>=X", "latency-ms<=X", "disagreement<=P%", "accuracy-drop<=P")
BACKENDS = ("onnxruntime-cpu", "eager")
FAMILIES = ("early75", "early50", "early25")
CONFIDENCE = 0.95
EXIT_NOT_MET = 4  # the CLI's exit status when no schedule meets the objective
JOURNAL, FRONT_JSON, FRONT_PNG, SENSITIVITY_PNG, SCHEDULE_TXT = (
    "journal.jsonl", "front.json", "front.png", "sensitivity.png", "schedule.txt")


@dataclass(frozen=True)
class Objective:
    kind: str  # speedup | latency-ms | disagreement | accuracy-drop
    limit: float  # speed-up (x), milliseconds, or a fraction (disagreement, accuracy drop)
    text: str

    @classmethod
    def parse(cls, text: str) -> "Objective":
        match = re.fullmatch(r"\s*(speedup>=|latency-ms<=|disagreement<=|accuracy-drop<=)\s*([0-9.]+)\s*(%?)\s*",
                             str(text))
        if not match:
            raise InputError(f"objective {text!r}: expected one of {', '.join(OBJECTIVES)} (e.g. speedup>=2, "
                             "disagreement<=1%)")
        kind, value, percent = match[1].rstrip("<=>"), float(match[2]), bool(match[3])
        if kind in ("disagreement", "accuracy-drop"):
            value = value / 100 if percent or kind == "disagreement" else value
            if not 0 <= value < 1:
                raise InputError(f"objective {text!r}: the {kind} must be within [0, 100)%")
        elif percent or value <= 0:
            raise InputError(f"objective {text!r}: the {kind} must be a positive number")
        return cls(kind, value, text.strip())


@dataclass
class FrontPoint:
    spec: str  # the r: form (what export takes)
    source: str  # "path" (step n) or the family it came from
    drops: list
    flops_ratio: float
    kl_tune: float  # on the probe images
    predicted_ms: float | None = None
    measured_ms: float | None = None  # the median of its interleaved timings
    speedup: float | None = None  # medians: the unpruned model's over this one's
    speedup_low: float | None = None  # the unpruned model's lower quartile over this one's upper quartile
    slow_ms: float | None = None  # the upper quartile of its timings
    kl: float | None = None  # held-out
    agreement: float | None = None
    agreement_interval: tuple | None = None  # Wilson, CONFIDENCE
    cosine: float | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    selected: bool = False


@dataclass
class TuneResult:
    objective: Objective
    front: list  # FrontPoint, fastest first
    chosen: FrontPoint | None  # None: nothing meets the objective
    closest: FrontPoint  # the chosen one, or the point nearest the objective
    met: bool
    backend: str
    images: dict  # tune / probe / held-out counts
    seconds: float
    files: list = field(default_factory=list)
    latency_fit: dict = field(default_factory=dict)

    def command(self, model: str = "MODEL") -> str:
        return f"saint-export {model} --keep-schedule {self.closest.spec}"

    def table(self) -> str:
        lines = [f"{'schedule':<34} {'source':<10} {'speed-up':>8} {'≥':>6} {'pred ms':>8} {'meas ms':>8} "
                 f"{'KL':>8} {'agree':>7} {'agree ≥':>7}"]
        for p in self.front:
            low = p.agreement_interval[0] if p.agreement_interval else float("nan")
            spec_text = p.spec if len(p.spec) <= 33 else p.spec[:30] + "…"
            lines.append(f"{spec_text:<34} {p.source:<10} {p.speedup:>7.2f}x {p.speedup_low:>5.2f}x {p.predicted_ms:>8.2f} "
                         f"{p.measured_ms:>8.2f} {p.kl:>8.4f} {p.agreement:>7.1%} {low:>7.1%}"
                         + ("  ← chosen" if p.selected else ""))
        return "\n".join(lines)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (two-sided at `confidence`)."""
    from statistics import NormalDist

    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Journal:
    """Every evaluation and measurement of a run, one JSON line each, read back on restart."""

    def __init__(self, path: Path | None, fingerprint: dict):
        self.path, self.entries = path, {}
        if path is not None and path.is_file():
            lines = path.read_text().splitlines()
            first = json.loads(lines[0]) if lines else {}
            if first.get("fingerprint") != fingerprint:
                raise InputError(f"{path} belongs to another run (model, images, seed or backend differ); use "
                                 "another --output or delete it")
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by an interrupt
                    continue
                self.entries[entry["key"]] = entry["value"]
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    def get(self, key: str, compute):
        if key not in self.entries:
            self.entries[key] = compute()
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "value": self.entries[key]}) + "\n")
        return self.entries[key]


class Prober:
    """A timm ViT run block by block with static drops on a fixed set of images, the inputs of
    every block cached along the committed path (so a try re-runs only its own blocks onwards)."""

    def __init__(self, model, pixels: torch.Tensor, reference: np.ndarray, schedule: KeepSchedule, hp, batch: int):
        from .adapters import timm_vit

        self.model, self.timm, self.hp, self.batch = model, timm_vit, hp, batch
        self.p, self.depth = schedule.num_protected, schedule.depth
        with torch.no_grad():
            self.inputs = [self._chunks(lambda x: timm_vit.stem(model, x), pixels)]
        self.reference = torch.from_numpy(reference).log_softmax(-1)
        self.drops = [0] * self.depth
        for block in range(self.depth):
            self.inputs.append(self._run_block(block, self.inputs[block], 0))

    def _chunks(self, fn, x):
        return torch.cat([fn(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])

    def _run_block(self, block: int, x: torch.Tensor, drop: int) -> torch.Tensor:
        tau, vote_k, gamma = self.hp

        def select(keys):
            return None if drop == 0 else core.similarity_topk(keys, self.p, drop, tau, vote_k, gamma)[0]

        with torch.no_grad():
            return self._chunks(lambda h: self.timm.block_forward(self.model.blocks[block], h, select), x)

    def kl(self, drops: list) -> float:
        """Mean KL(unpruned ‖ pruned) of the logits, re-running from the first block that differs
        from the committed path."""
        first = next((b for b in range(self.depth) if drops[b] != self.drops[b]), self.depth)
        x = self.inputs[first]
        for block in range(first, self.depth):
            x = self._run_block(block, x, drops[block])
        with torch.no_grad():
            logits = self._chunks(lambda h: self.timm.head(self.model, h), x).float().log_softmax(-1)
        return float((self.reference.exp() * (self.reference - logits)).sum(-1).mean())

    def commit(self, drops: list) -> None:
        first = next((b for b in range(self.depth) if drops[b] != self.drops[b]), self.depth)
        self.drops = list(drops)
        for block in range(first, self.depth):
            self.inputs[block + 1] = self._run_block(block, self.inputs[block], drops[block])


class LatencyModel:
    """Milliseconds per batch of a static schedule on one backend: a measured curve t(n) of one
    block over its token count, split into attention (tokens in) and MLP (tokens kept) by their
    MAC shares, summed over the blocks; then T = a · Σ + b fitted on whole-model measurements."""

    def __init__(self, grid: list[int], block_ms: list[float], schedule: KeepSchedule):
        self.grid, self.block_ms, self.schedule = grid, block_ms, schedule
        self.a, self.b = 1.0, 0.0

    def _t(self, tokens: float) -> float:
        return float(np.interp(tokens, self.grid, self.block_ms))

    def blocks_ms(self, drops) -> float:
        s = self.schedule
        counts = [n + s.num_protected for n in KeepSchedule(s.spec, s.depth, s.num_patches, tuple(drops),
                                                             s.num_protected).patch_counts()]
        d, ratio = s.embed_dim, s.mlp_ratio

        def attention_share(n):
            return (4 * d + 2 * n) / (4 * d + 2 * n + 2 * d * ratio)
        return sum(attention_share(counts[i]) * self._t(counts[i]) + (1 - attention_share(counts[i + 1]))
                   * self._t(counts[i + 1]) for i in range(s.depth))

    def fit(self, measured: dict) -> dict:
        """Least squares of the whole-model measurements {drops tuple: ms} on the block sums."""
        x = np.array([self.blocks_ms(d) for d in measured])
        y = np.array(list(measured.values()))
        # Weighted by 1/y: the relative error is what matters, and the fastest schedules have least slack.
        self.a, self.b = (np.polyfit(x, y, 1, w=1 / y) if len(set(x.round(6))) > 1
                          else (float(y.mean() / x.mean()), 0.0))
        return {"a": float(self.a), "b": float(self.b)}

    def predict(self, drops) -> float:
        return float(self.a * self.blocks_ms(drops) + self.b)


def tune(model, images, objective: str, *, weights: str | None = None, backend: str = "onnxruntime-cpu",
         batch: int = 8, budget_minutes: float | None = None, holdout: float = 0.3, seed: int = 0, step: int = 8,
         probe: int = 64, finalists: int = 8, rounds: int = 3, output=None, tau: float = spec.TAU,
         K: int = spec.VOTE_K, gamma: float = spec.GAMMA, progress=None) -> TuneResult:
    """Search, measure and certify static schedules of `model` (a timm ViT name with `weights`, or
    an unpatched module) on `images` (files, flat folders or class folders). See the module's
    docstring; `output` (a folder) gets the front, plots, the chosen schedule and the journal."""
    from .evaluate import _base_model, _images
    from .pipeline import Progress

    started = time.perf_counter()
    progress = progress or Progress()
    goal = Objective.parse(objective)
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: tune measures on {', '.join(BACKENDS)} here (TensorRT and ONNX "
                         "Runtime CUDA need a GPU, which this build does not search on yet)")
    for name, value, low in (("batch", batch, 1), ("step", step, 1), ("probe", probe, 2), ("finalists", finalists, 2),
                             ("rounds", rounds, 1)):
        if not (isinstance(value, int) and value >= low):
            raise InputError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    check_hyperparameters(tau, K, gamma)
    base, name = _base_model(model, weights, None)
    if find_adapter(base).__name__.rsplit(".", 1)[-1] != "timm_vit":
        raise InputError(f"tune searches timm ViT classifiers for now; {type(base).__name__} is not one")
    data, labels = _images(base, images)
    if goal.kind == "accuracy-drop" and labels is None:
        raise InputError("the accuracy-drop objective needs labelled images (class subfolders)")
    pixels = torch.from_numpy(data.pixel_values)
    if len(pixels) < 10:
        raise InputError(f"tune needs at least 10 readable images, got {len(pixels)}")
    tune_idx, held_idx = _split(len(pixels), labels, holdout, seed)
    probe_idx = tune_idx[:probe]
    info = find_adapter(base).describe(base)
    unpruned = KeepSchedule.for_model("none", info)
    output = Path(output) if output is not None else None
    fingerprint = {"model": name, "weights": weights, "images": hashlib.sha256(data.pixel_values.tobytes()).hexdigest(),
                   "seed": seed, "holdout": holdout, "probe": probe, "step": step, "backend": backend, "batch": batch,
                   "saint": [tau, K, gamma]}
    journal = Journal(output / JOURNAL if output else None, fingerprint)

    with torch.no_grad():
        reference = np.concatenate([base(pixels[i:i + batch]).float().numpy() for i in range(0, len(pixels), batch)])
    prober = Prober(base, pixels[probe_idx], reference[probe_idx], unpruned, (tau, K, gamma), batch)

    # 2. the greedy path, and the families beside it
    candidates = {}  # r: form → (source, drops, kl on the probe)

    def kl_of(drops):
        return journal.get("kl " + ",".join(map(str, drops)), lambda: prober.kl(list(drops)))

    counts = unpruned.patch_counts()
    path, sensitivity = [0] * info.depth, {}
    candidates[_r(path)] = ("unpruned", tuple(path), 0.0)
    macs_full = unpruned.macs()
    deadline = None if budget_minutes is None else started + 60 * budget_minutes
    with progress.step("search", f"greedy path on {len(probe_idx)} probe images (+{step} tokens a step)") as advance:
        steps = 0
        while deadline is None or time.perf_counter() < deadline:
            current_kl, current_macs = candidates[_r(path)][2], _macs(unpruned, path)
            best = None
            for block in range(info.depth // 2):
                trial = _repaired(unpruned, path, block, step)
                if trial is None:
                    continue
                saved = current_macs - _macs(unpruned, trial)
                if saved <= 0:
                    continue
                kl = kl_of(trial)
                score = (kl - current_kl) / saved
                if steps == 0:
                    sensitivity[block] = kl
                if best is None or score < best[0]:
                    best = (score, trial, kl)
            if best is None:
                break
            path = best[1]
            prober.commit(path)
            steps += 1
            candidates[_r(path)] = (f"path {steps}", tuple(path), best[2])
            advance(steps)
    for family in FAMILIES:
        drops = KeepSchedule.for_model(family, info).drops
        candidates.setdefault(_r(drops), (family, tuple(drops), kl_of(list(drops))))

    # the front on the probe (MACs, KL); the finalists spread along it, with every family
    ordered = sorted(candidates.values(), key=lambda c: (_macs(unpruned, c[1]), c[2]))
    front, best_kl = [], math.inf
    for source, drops, kl in ordered:  # from the cheapest up: keep each point that lowers the KL
        if kl < best_kl:
            front.append((source, drops, kl))
            best_kl = kl
    picks = _spread(front, finalists)
    picks += [c for c in candidates.values() if c[0] in FAMILIES and c not in picks]
    if candidates[_r([0] * info.depth)] not in picks:
        picks.insert(0, candidates[_r([0] * info.depth)])

    # 3. latency: the block curve, whole-model measurements, the fit
    latency, timings = _measure(base, info, unpruned, picks, backend, batch, rounds, journal, progress, tau, K, gamma)
    measured = {key: statistics.median(samples) for key, samples in timings.items()}
    fit = latency.fit({tuple(p[1]): measured[_r(p[1])] for p in picks})
    quartiles = {key: np.percentile(samples, [25, 75]) for key, samples in timings.items()}
    unpruned_key = _r([0] * info.depth)

    # 4. certification on the held-out images
    points = []
    with progress.step("certify", f"held-out certification on {len(held_idx)} images", total=len(picks)) as advance:
        for i, (source, drops, kl) in enumerate(picks):
            metrics = journal.get("heldout " + _r(drops), lambda d=drops: _certify(
                base, pixels[held_idx], reference[held_idx], None if labels is None else labels[held_idx],
                list(d), info, batch, tau, K, gamma))
            schedule = KeepSchedule.for_model(_r(drops), info)
            points.append(FrontPoint(
                spec=_r(drops), source=source, drops=list(drops), flops_ratio=schedule.macs() / macs_full,
                kl_tune=kl, predicted_ms=latency.predict(drops), measured_ms=measured[_r(drops)],
                speedup=measured[unpruned_key] / measured[_r(drops)],
                speedup_low=float(quartiles[unpruned_key][0] / quartiles[_r(drops)][1]),
                slow_ms=float(quartiles[_r(drops)][1]), **metrics))
            advance(i + 1)
    saved = _non_dominated(points)
    chosen, closest = _choose(saved, goal)
    met = chosen is not None
    if chosen is not None:
        chosen.selected = True
    result = TuneResult(goal, saved, chosen, closest, met, backend,
                        {"tune": len(tune_idx), "probe": len(probe_idx), "held_out": len(held_idx)},
                        time.perf_counter() - started, latency_fit=fit)
    if output is not None:
        result.files = _write(output, result, points, sensitivity, counts, name)
    return result


# --- helpers -------------------------------------------------------------------------------------

def _r(drops) -> str:
    drops = list(drops)
    while len(drops) > 1 and drops[-1] == 0:
        drops.pop()
    return "r:" + ",".join(map(str, drops))


def _macs(unpruned: KeepSchedule, drops) -> float:
    s = unpruned
    return KeepSchedule(s.spec, s.depth, s.num_patches, tuple(drops), s.num_protected, s.embed_dim, s.mlp_ratio).macs()


def _repaired(unpruned: KeepSchedule, drops, block: int, step: int) -> list | None:
    """`drops` with `step` more at `block`, later blocks cut back to what they can still drop
    (the A half of their fewer tokens); None when `block` itself cannot drop more."""
    trial, n = list(drops), unpruned.num_patches
    trial[block] += step
    for i, r in enumerate(trial):
        if i > block:
            trial[i] = r = min(r, spec.max_drop(n))
        if spec.drop_problem(n, r):
            return None
        n -= r
    return trial


def _split(n: int, labels, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tune and held-out indices; stratified by class when there are labels."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    tune_part, held = [], []
    for group in groups:
        group = rng.permutation(group)
        cut = max(1, round(len(group) * holdout)) if len(group) > 1 else 0
        held.append(group[:cut])
        tune_part.append(group[cut:])
    return rng.permutation(np.concatenate(tune_part)), np.sort(np.concatenate(held))


def _spread(front: list, count: int) -> list:
    if len(front) <= count:
        return list(front)
    index = np.unique(np.round(np.linspace(0, len(front) - 1, count)).astype(int))
    return [front[i] for i in index]


def _measure(base, info, unpruned, picks, backend, batch, rounds, journal, progress, tau, K, gamma):
    """The block curve and every pick's whole-model timings (ms per batch of `batch`, 3 × `rounds`
    interleaved rounds, sorted)."""
    from .manifest import Manifest
    from .pipeline import export
    from .runtime.runners import OrtRunner

    tokens = unpruned.num_patches + unpruned.num_protected
    grid = sorted({max(unpruned.num_protected + 1, round(tokens * f)) for f in np.linspace(0.05, 1, 12)})
    width = info.embed_dim
    with progress.step("latency", f"one block's latency on {backend} at {len(grid)} token counts"):
        block_ms = journal.get("block curve", lambda: _block_curve(base, grid, width, backend, batch, rounds))
    latency = LatencyModel(grid, block_ms, unpruned)
    missing = [p for p in picks if "timings " + _r(p[1]) not in journal.entries]
    runners = {}
    with tempfile.TemporaryDirectory() as tmp, progress.step(
            "measure", f"exporting and timing {len(missing)} schedules on {backend}", total=len(missing)) as advance:
        for i, (source, drops, _) in enumerate(missing):
            spec_text = _r(drops)
            if backend == "eager":
                from .patch import apply

                pruned = apply(copy.deepcopy(base), spec_text, tau=tau, K=K, gamma=gamma)
                runners[spec_text] = lambda x, m=pruned: m(torch.from_numpy(x))
            else:
                folder = export(copy.deepcopy(base), Path(tmp) / f"f{i}", ExportConfig(
                    keep_schedule=spec_text, tau=tau, K=K, gamma=gamma, target="onnx", verify=False,
                    batch=(1, batch, batch))).folder
                manifest = Manifest.read(folder)
                runner = OrtRunner(folder / manifest.onnx["file"], manifest.input, manifest.output, batch, "cpu")
                runners[spec_text] = runner.infer
            advance(i + 1)
        x = np.random.default_rng(0).standard_normal((batch, 3, info.img_size, info.img_size)).astype(np.float32)
        times = {key: [] for key in runners}
        with torch.no_grad():
            for fn in runners.values():
                fn(x)  # warm-up
            for _ in range(rounds * 3):
                for key, fn in runners.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[key].append(1000 * (time.perf_counter() - t0))
        for key, samples in times.items():
            journal.get("timings " + key, lambda s=samples: sorted(s))
    return latency, {_r(p[1]): journal.entries["timings " + _r(p[1])] for p in picks}


def _block_curve(model, grid, width, backend, batch, rounds) -> list[float]:
    """Milliseconds of one unpatched block at each token count of `grid`."""
    block = copy.deepcopy(model.blocks[0]).eval()
    if backend == "eager":
        run = {n: (lambda x: block(torch.from_numpy(x))) for n in grid}
    else:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "block.onnx"
            example = torch.randn(batch, grid[-1], width)
            with torch.no_grad():
                torch.onnx.export(block, (example,), str(path), dynamo=True, verbose=False,
                                  dynamic_shapes=({1: torch.export.Dim("tokens", min=2, max=4096)},))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        run = {n: (lambda x: session.run(None, {name: x})) for n in grid}
    inputs = {n: np.random.default_rng(n).standard_normal((batch, n, width)).astype(np.float32) for n in grid}
    samples = {n: [] for n in grid}
    with torch.no_grad():
        for n in grid:
            run[n](inputs[n])  # warm-up
        for _ in range(rounds * 3):
            for n in grid:
                t0 = time.perf_counter()
                run[n](inputs[n])
                samples[n].append(1000 * (time.perf_counter() - t0))
    return [statistics.median(samples[n]) for n in grid]


def _certify(base, pixels, reference, labels, drops, info, batch, tau, K, gamma) -> dict:
    from .patch import apply

    model = base if not any(drops) else apply(copy.deepcopy(base), _r(drops), tau=tau, K=K, gamma=gamma)
    with torch.no_grad():
        logits = np.concatenate([model(pixels[i:i + batch]).float().numpy() for i in range(0, len(pixels), batch)])
    ref = torch.from_numpy(reference).log_softmax(-1)
    kl = float((ref.exp() * (ref - torch.from_numpy(logits).log_softmax(-1))).sum(-1).mean())
    agree = logits.argmax(-1) == reference.argmax(-1)
    from .parity import cosine

    metrics = {"kl": kl, "agreement": float(agree.mean()),
               "agreement_interval": list(wilson_interval(int(agree.sum()), len(agree))),
               "cosine": float(cosine(logits, reference).mean()), "accuracy": None, "accuracy_drop": None}
    if labels is not None:
        accuracy = float((logits.argmax(-1) == labels).mean())
        metrics.update(accuracy=accuracy, accuracy_drop=float((reference.argmax(-1) == labels).mean()) - accuracy)
    return metrics


def _non_dominated(points: list) -> list:
    """Points no other point beats on both measured latency and held-out KL, fastest first."""
    keep = [p for p in points if not any(
        (q.measured_ms <= p.measured_ms and q.kl <= p.kl) and (q.measured_ms < p.measured_ms or q.kl < p.kl)
        for q in points)]
    return sorted(keep, key=lambda p: p.measured_ms)


def _choose(front: list, goal: Objective):
    """(the chosen point or None, the point to report when none meets the goal)."""
    if goal.kind in ("speedup", "latency-ms"):
        # On the timings' quartiles, not their medians: a schedule that meets the goal only by the
        # luck of one run's noise is not chosen.
        meets = [p for p in front if (p.speedup_low >= goal.limit if goal.kind == "speedup"
                                      else p.slow_ms <= goal.limit)]
        chosen = min(meets, key=lambda p: p.kl) if meets else None
        closest = chosen or (max(front, key=lambda p: p.speedup) if goal.kind == "speedup"
                             else min(front, key=lambda p: p.measured_ms))
        return chosen, closest
    # The disagreement's upper bound; it bounds the accuracy drop too (only images whose prediction
    # changes can change correctness), label-free and conservative.
    bound = {id(p): 1 - p.agreement_interval[0] for p in front}
    meets = [p for p in front if bound[id(p)] <= goal.limit]
    chosen = min(meets, key=lambda p: p.measured_ms) if meets else None
    return chosen, chosen or min(front, key=lambda p: bound[id(p)])


def _write(output: Path, result: TuneResult, measured_points: list, sensitivity: dict, counts, name) -> list:
    files = [artifacts.write_json(output / FRONT_JSON, {
        "model": name, "objective": result.objective.text, "met": result.met, "backend": result.backend,
        "images": result.images, "seconds": round(result.seconds, 1), "latency_fit": result.latency_fit,
        "chosen": result.chosen.spec if result.chosen else None, "closest": result.closest.spec,
        "front": [asdict(p) for p in result.front],
        "measured": [asdict(p) for p in measured_points]})]
    files.append(artifacts.atomic_write_text(output / SCHEDULE_TXT, result.closest.spec + "\n"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    fig, ax = plt.subplots(figsize=(6, 4))
    families = [p for p in measured_points if p.source in FAMILIES]
    ax.plot([p.speedup for p in result.front], [p.agreement for p in result.front], "o-", label="tuned front")
    ax.plot([p.speedup for p in families], [p.agreement for p in families], "s", label="early75/50/25")
    for p in families:
        ax.annotate(p.source, (p.speedup, p.agreement), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("measured speed-up")
    ax.set_ylabel("held-out top-1 agreement with unpruned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / FRONT_PNG, dpi=120)
    plt.close(fig)
    files.append(output / FRONT_PNG)
    if sensitivity:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(sensitivity), list(sensitivity.values()))
        ax.set_xlabel("block")
        ax.set_ylabel("probe KL after the first step there")
        fig.tight_layout()
        fig.savefig(output / SENSITIVITY_PNG, dpi=120)
        plt.close(fig)
        files.append(output / SENSITIVITY_PNG)
    return files
