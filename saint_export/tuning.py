"""`saint-export tune`: search static keep schedules on the user's images, and certify the front.

    result = saint_export.tune("vit_b16", "photos/", "disagreement<=2%", weights="random", output="tune/")

The model is a timm ViT classifier, or a CLIP / SigLIP tower or LLaVA-1.5's tower, whose exported
output is features: then the search's proxy is 1 − feature cosine (each image's features averaged
over tokens, against the unpruned ones: pruning leaves fewer tokens, and what the dropped tokens
carried must now be carried by the others), and the objectives are speed, latency or `cosine>=X`.

1. The images are split into a tune part and a held-out part (`holdout`, stratified by class when
   the folders are classes), with `seed`.
2. **Search** (tune part, a probe of `probe` images). First τ and γ, unless given: the pairs of
   `hyperparameter_grid` are scored at `early50` and the best is kept (they change which tokens
   go; K does not, for a static schedule). Then a greedy path from the unpruned model. Each
   step tries `step` more dropped tokens in every pruning block (SAINT's first half) and keeps the
   try that raises the proxy (the KL divergence of the logits from the unpruned model's, or
   1 − feature cosine) least per multiply-accumulate saved. Block inputs along the path are
   cached, so a try re-runs only the blocks from its own. Every step is a schedule, so one path
   gives the whole front. With `polish`, Optuna's NSGA-II then tries that many more schedules,
   started from the path. The `early<P>` families are evaluated beside it. Costs are MACs here,
   so the search is deterministic.
3. **Latency**: a per-block cost curve over token counts measured on the backend, with an affine
   correction from whole-model runs (`LatencyModel`); the finalists are exported and measured for
   real, in interleaved rounds (medians), and the front reports predicted against measured.
4. **Certification** (held-out part): top-1 agreement with its Wilson interval, KL and accuracy
   with labels (classifiers); the cosine of the outputs with its lower confidence bound (all).
   The saved front is the non-dominated set of the finalists on measured latency and held-out
   proxy. For `speedup>=` and `latency-ms<=` the chosen schedule is the one with the lowest
   held-out proxy among those that meet the goal on their timings' quartiles (the unpruned
   model's lower quartile over its upper one, or its upper quartile of latency); for
   `disagreement<=` and `accuracy-drop<=` it is the fastest whose upper bound of disagreement meets
   it (that bound also bounds the accuracy drop), for `cosine>=` the fastest whose lower bound of
   cosine does. When none does, `TuneResult.met` is False and `closest` is reported.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import artifacts, core, spec
from .adapters import find_adapter, output_names
from .config import ExportConfig, check_hyperparameters
from .errors import InputError
from .schedule import KeepSchedule, ScheduleError

OBJECTIVES = ("speedup>=X", "latency-ms<=X", "disagreement<=P%", "accuracy-drop<=P", "cosine>=X")
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "eager")
FAMILIES = ("early75", "early50", "early25")
CONFIDENCE = 0.95
EXIT_NOT_MET = 4  # the CLI's exit status when no schedule meets the objective
JOURNAL, FRONT_JSON, FRONT_PNG, SENSITIVITY_PNG, SCHEDULE_TXT, COMMAND_TXT = (
    "journal.jsonl", "front.json", "front.png", "sensitivity.png", "schedule.txt", "command.txt")


def hyperparameter_grid(tau: float = spec.TAU, gamma: float = spec.GAMMA) -> list[tuple[float, float]]:
    """The (τ, γ) pairs tune tries: the defaults first (kept on a tie), τ ± 0.1, γ halved and doubled."""
    taus = [tau] + [t for t in (round(tau - 0.1, 6), round(tau + 0.1, 6)) if -1 <= t <= 1]
    return [(t, g) for t in taus for g in (gamma, gamma / 2, gamma * 2)]


@dataclass(frozen=True)
class Objective:
    kind: str  # speedup | latency-ms | disagreement | accuracy-drop | cosine
    limit: float  # speed-up (x), milliseconds, a fraction (disagreement, accuracy drop) or a cosine
    text: str

    @classmethod
    def parse(cls, text: str) -> "Objective":
        match = re.fullmatch(r"\s*(speedup>=|latency-ms<=|disagreement<=|accuracy-drop<=|cosine>=)\s*([0-9.]+)"
                             r"\s*(%?)\s*", str(text))
        if not match:
            raise InputError(f"objective {text!r}: expected one of {', '.join(OBJECTIVES)} (e.g. speedup>=2, "
                             "disagreement<=1%)")
        kind, value, percent = match[1].rstrip("<=>"), float(match[2]), bool(match[3])
        if kind in ("disagreement", "accuracy-drop"):
            value = value / 100 if percent or kind == "disagreement" else value
            if not 0 <= value < 1:
                raise InputError(f"objective {text!r}: the {kind} must be within [0, 100)%")
        elif kind == "cosine":
            if percent or not 0 < value <= 1:
                raise InputError(f"objective {text!r}: the cosine must be a number in (0, 1]")
        elif percent or value <= 0:
            raise InputError(f"objective {text!r}: the {kind} must be a positive number")
        return cls(kind, value, text.strip())


@dataclass
class FrontPoint:
    spec: str  # the r: form (what export takes)
    source: str  # "path" (step n) or the family it came from
    drops: list
    flops_ratio: float
    loss_tune: float  # the search's proxy on the probe images (KL, or 1 − feature cosine)
    predicted_ms: float | None = None
    measured_ms: float | None = None  # the median of its interleaved timings (one batch)
    images_per_s: float | None = None  # the batch over measured_ms
    speedup: float | None = None  # medians: the unpruned model's over this one's
    speedup_low: float | None = None  # the unpruned model's lower quartile over this one's upper quartile
    slow_ms: float | None = None  # the upper quartile of its timings
    loss: float | None = None  # held-out, the same proxy
    kl: float | None = None  # held-out; classifiers only (as are agreement and accuracy)
    agreement: float | None = None
    agreement_interval: tuple | None = None  # Wilson, CONFIDENCE
    cosine: float | None = None  # the mean over held-out images (logits, or token-mean features)
    cosine_low: float | None = None  # its lower bound at CONFIDENCE (normal approximation)
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
    tau: float = spec.TAU  # the τ and γ the front was searched and certified with
    gamma: float = spec.GAMMA
    K: int = spec.VOTE_K
    classifier: bool = True  # False: a tower (features; the proxy is 1 − feature cosine)
    weights: str | None = None  # the model's weights, where it was given by name
    files: list = field(default_factory=list)
    latency_fit: dict = field(default_factory=dict)

    def command(self, model: str = "MODEL") -> str:
        """The export command of the closest point, with the weights, and τ, γ and K where they are
        not the defaults."""
        saint = "".join(f" --{flag} {value:g}" for flag, value, default in (
            ("tau", self.tau, spec.TAU), ("K", self.K, spec.VOTE_K), ("gamma", self.gamma, spec.GAMMA))
            if value != default)
        weights = f" --weights {self.weights}" if self.weights else ""
        return f"saint-export {model} --keep-schedule {self.closest.spec}{weights}{saint}"

    def table(self) -> str:
        proxy, share = ("KL", "agree") if self.classifier else ("1-cos", "cosine")
        lines = [f"{'schedule':<34} {'source':<10} {'speed-up':>8} {'≥':>6} {'pred ms':>8} {'meas ms':>8} "
                 f"{'img/s':>7} {proxy:>8} {share:>7} {share + ' ≥':>8}"]
        for p in self.front:
            value, low = ((p.agreement, p.agreement_interval[0]) if self.classifier else (p.cosine, p.cosine_low))
            spec_text = p.spec if len(p.spec) <= 33 else p.spec[:30] + "…"
            shown = f"{value:>7.1%} {low:>8.1%}" if self.classifier else f"{value:>7.4f} {low:>8.4f}"
            lines.append(f"{spec_text:<34} {p.source:<10} {p.speedup:>7.2f}x {p.speedup_low:>5.2f}x "
                         f"{p.predicted_ms:>8.2f} {p.measured_ms:>8.2f} {p.images_per_s:>7.1f} {p.loss:>8.4f} {shown}"
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


def feature_cosine(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image: the cosine of the outputs with the unpruned ones, [B, K, D] features averaged
    over their tokens first (a pruned tower has fewer), [B, D] as they are."""
    if outputs.dim() == 3:
        outputs, reference = outputs.mean(1), reference.mean(1)
    return torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=-1)


def kl_divergence(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image: KL(unpruned ‖ pruned) of the class distributions."""
    ref = reference.double().log_softmax(-1)
    return (ref.exp() * (ref - logits.double().log_softmax(-1))).sum(-1)


def proxy_loss(outputs: torch.Tensor, reference: torch.Tensor, classifier: bool) -> float:
    """What the search minimises: the mean KL for a classifier, 1 − the mean feature cosine else."""
    if classifier:
        return float(kl_divergence(outputs, reference).mean())
    return float(1 - feature_cosine(outputs, reference).mean())


class Prober:
    """A model (`ProbeParts`) run block by block with static drops on a fixed set of images, the
    inputs of every block cached along the committed path (so a try re-runs only its own blocks
    onwards)."""

    def __init__(self, parts, pixels: torch.Tensor, reference: torch.Tensor, schedule: KeepSchedule, hp,
                 batch: int, classifier: bool):
        self.parts, self.hp, self.batch, self.classifier = parts, hp, batch, classifier
        self.p, self.depth = schedule.num_protected, schedule.depth
        with torch.no_grad():
            self.inputs = [self._chunks(parts.stem, pixels)]
        self.reference = reference
        self.drops = [0] * self.depth
        for block in range(self.depth):
            self.inputs.append(self._run_block(block, self.inputs[block], 0))

    def _chunks(self, fn, x):
        return torch.cat([fn(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])

    def _run_block(self, block: int, x: torch.Tensor, drop: int) -> torch.Tensor:
        def select(keys):
            return None if drop == 0 else core.similarity_topk(keys, self.p, drop, *self.hp)[0]

        with torch.no_grad():
            return self._chunks(lambda h: self.parts.block_forward(self.parts.blocks[block], h, select), x)

    def _first_change(self, drops) -> int:
        return next((b for b in range(self.depth) if drops[b] != self.drops[b]), self.depth)

    def loss(self, drops: list) -> float:
        """The proxy for `drops` with the prober's (τ, K, γ) `hp`, re-running from the first block
        that differs from the committed path. While that path drops nothing its cached inputs hold
        for any hp, so tune may change `hp` between calls before it commits."""
        first = self._first_change(drops)
        x = self.inputs[first]
        for block in range(first, self.depth):
            x = self._run_block(block, x, drops[block])
        with torch.no_grad():
            outputs = self._chunks(self.parts.head, x).float()
        return proxy_loss(outputs, self.reference, self.classifier)

    def commit(self, drops: list) -> None:
        first = self._first_change(drops)
        self.drops = list(drops)
        for block in range(first, self.depth):
            self.inputs[block + 1] = self._run_block(block, self.inputs[block], drops[block])


class LatencyModel:
    """Milliseconds per batch of a static schedule on one backend: a measured curve t(n) of one
    block over its token count, split into attention (tokens in) and MLP (tokens kept) by their
    MAC shares, summed over the blocks; then T = a · Σ + b fitted on whole-model measurements.

    t(n) is the least-squares quadratic c0 + c1·n + c2·n² through the measured points (weighted by
    1/t: relative error), not their interpolation: linear layers grow with n and attention
    scores with n², and one point's noise on shared cores otherwise goes straight into every
    schedule that runs near it (scripts/bench_tune.py on vit_b16: the worst finalist 10.8% off
    with the interpolated curve, 5.3% with the quadratic; README)."""

    def __init__(self, grid: list[int], block_ms: list[float], schedule: KeepSchedule):
        self.block_ms, self.schedule = block_ms, schedule
        degree = min(2, len(grid) - 1)
        self.curve = np.polyfit(grid, block_ms, degree, w=1 / np.asarray(block_ms))
        self.a, self.b = 1.0, 0.0

    def _t(self, tokens: float) -> float:
        # Never below the cheapest measurement's share of itself: a quadratic may dip under zero
        # below the measured range.
        return max(float(np.polyval(self.curve, tokens)), 0.5 * min(self.block_ms))

    def blocks_ms(self, drops) -> float:
        s = self.schedule
        counts = [n + s.num_protected for n in _with_drops(s, drops).patch_counts()]
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
         probe: int = 64, finalists: int = 8, rounds: int = 3, polish: int = 0, output=None, tau: float | None = None,
         K: int = spec.VOTE_K, gamma: float | None = None, progress=None) -> TuneResult:
    """Search, measure and certify static schedules of `model` (a timm ViT, CLIP / SigLIP tower or
    LLaVA-1.5 name with `weights`, or an unpatched module) on `images` (files, flat folders or class
    folders). τ and γ left None are searched (`hyperparameter_grid`); given, they are kept. See the
    module's docstring; `output` (a folder) gets the front, plots, the chosen schedule, its export
    command and the journal."""
    from .evaluate import _base_model, _images
    from .pipeline import Progress

    started = time.perf_counter()
    progress = progress or Progress()
    goal = Objective.parse(objective)
    _check_backend(backend)
    for name, value, low in (("batch", batch, 1), ("step", step, 1), ("probe", probe, 2), ("finalists", finalists, 2),
                             ("rounds", rounds, 1), ("polish", polish, 0)):
        if not (isinstance(value, int) and value >= low):
            raise InputError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    check_hyperparameters(spec.TAU if tau is None else tau, K, spec.GAMMA if gamma is None else gamma)
    base, name = _base_model(model, weights, None)
    adapter = find_adapter(base)
    if not hasattr(adapter, "probe_parts"):
        raise InputError(f"tune searches timm ViT classifiers, CLIP / SigLIP towers and LLaVA-1.5's tower; "
                         f"{type(base).__name__} is not one")
    classifier = output_names(adapter, base)[0] == "logits"
    if not classifier and goal.kind in ("disagreement", "accuracy-drop"):
        raise InputError(f"the {goal.kind} objective needs a classifier's logits; {type(base).__name__} outputs "
                         "features: use cosine>=X (or a speed or latency objective)")
    data, labels = _images(base, images, labels=classifier)
    if goal.kind == "accuracy-drop" and labels is None:
        raise InputError("the accuracy-drop objective needs labelled images (class subfolders)")
    pixels = torch.from_numpy(data.pixel_values)
    if len(pixels) < 10:
        raise InputError(f"tune needs at least 10 readable images, got {len(pixels)}")
    tune_idx, held_idx = _split(len(pixels), labels, holdout, seed)
    probe_idx = tune_idx[:probe]
    info = adapter.describe(base)
    unpruned = KeepSchedule.for_model("none", info)
    output = Path(output) if output is not None else None
    fingerprint = {"model": name, "weights": weights, "images": hashlib.sha256(data.pixel_values.tobytes()).hexdigest(),
                   "seed": seed, "holdout": holdout, "probe": probe, "step": step, "backend": backend, "batch": batch,
                   "saint": [tau, K, gamma]}
    journal = Journal(output / JOURNAL if output else None, fingerprint)

    reference = _outputs(base, pixels, batch)
    parts = adapter.probe_parts(base)
    prober = Prober(parts, pixels[probe_idx], reference[probe_idx], unpruned, None, batch, classifier)

    # 2. τ and γ (at early50), then the greedy path, and the families beside it
    middle = list(KeepSchedule.for_model("early50", info).drops)  # reachable on any model (half its tokens)
    grid = [(t, g) for t, g in hyperparameter_grid(spec.TAU if tau is None else tau,
                                                    spec.GAMMA if gamma is None else gamma)
            if (tau is None or t == tau) and (gamma is None or g == gamma)]
    if len(grid) > 1:
        with progress.step("hyper-parameters", f"τ and γ at early50 ({len(grid)} pairs)", total=len(grid)) as advance:
            scored = []
            for i, (t, g) in enumerate(grid):
                prober.hp = (t, K, g)
                scored.append((journal.get(f"hp {t:g},{g:g}", lambda: prober.loss(middle)), i))
                advance(i + 1)
        grid = [grid[min(scored)[1]]]  # the lowest; on a tie the earlier pair (the given or default values)
    tau, gamma = grid[0]
    prober.hp = (tau, K, gamma)
    candidates = {}  # r: form → (source, drops, proxy on the probe)

    def loss_of(drops):
        return journal.get("loss " + ",".join(map(str, drops)), lambda: prober.loss(list(drops)))

    path, sensitivity = [0] * info.depth, {}
    candidates[_r(path)] = ("unpruned", tuple(path), 0.0)
    deadline = None if budget_minutes is None else started + 60 * budget_minutes
    with progress.step("search", f"greedy path on {len(probe_idx)} probe images (+{step} tokens a step)") as advance:
        steps = 0
        while deadline is None or time.perf_counter() < deadline:
            current_loss, current_macs = candidates[_r(path)][2], _macs(unpruned, path)
            best = None
            for block in range(info.depth // 2):
                trial = _repaired(unpruned, path, block, step)
                if trial is None:
                    continue
                saved = current_macs - _macs(unpruned, trial)
                if saved <= 0:
                    continue
                loss = loss_of(trial)
                score = (loss - current_loss) / saved
                if steps == 0:
                    sensitivity[block] = loss
                if best is None or score < best[0]:
                    best = (score, trial, loss)
            if best is None:
                break
            path = best[1]
            prober.commit(path)
            steps += 1
            candidates[_r(path)] = (f"path {steps}", tuple(path), best[2])
            advance(steps)
    if polish:
        prober.commit([0] * info.depth)  # trials re-run from their first dropping block
        greedy = [list(c[1]) for c in candidates.values()]
        for i, (drops, loss) in enumerate(_polish(unpruned, greedy, polish, step, seed, loss_of, deadline, progress)):
            candidates.setdefault(_r(drops), (f"polish {i + 1}", drops, loss))
    for family in FAMILIES:
        try:
            drops = KeepSchedule.for_model(family, info).drops
        except ScheduleError:  # early25 on a shallow model: its first half cannot drop that much
            continue
        candidates.setdefault(_r(drops), (family, tuple(drops), loss_of(list(drops))))

    # the front on the probe (MACs, proxy); the finalists spread along it, with every family
    ordered = sorted(candidates.values(), key=lambda c: (_macs(unpruned, c[1]), c[2]))
    front, best_loss = [], math.inf
    for source, drops, loss in ordered:  # from the cheapest up: keep each point that lowers the proxy
        if loss < best_loss:
            front.append((source, drops, loss))
            best_loss = loss
    picks = _spread(front, finalists)
    picks += [c for c in candidates.values() if c[0] in FAMILIES and c not in picks]
    if candidates[_r([0] * info.depth)] not in picks:
        picks.insert(0, candidates[_r([0] * info.depth)])

    # 3. latency: the block curve, whole-model measurements, the fit
    hp = (tau, K, gamma)
    latency, timings = _measure(base, adapter, parts, info, unpruned, picks, backend, batch, rounds, journal,
                                progress, hp)
    measured = {key: statistics.median(samples) for key, samples in timings.items()}
    fit = latency.fit({tuple(p[1]): measured[_r(p[1])] for p in picks})
    quartiles = {key: np.percentile(samples, [25, 75]) for key, samples in timings.items()}
    unpruned_key = _r([0] * info.depth)

    # 4. certification on the held-out images
    points = []
    macs_full = unpruned.macs()
    with progress.step("certify", f"held-out certification on {len(held_idx)} images", total=len(picks)) as advance:
        for i, (source, drops, loss) in enumerate(picks):
            metrics = journal.get("heldout " + _r(drops), lambda d=drops: _certify(
                base, pixels[held_idx], reference[held_idx], None if labels is None else labels[held_idx],
                list(d), batch, hp, classifier))
            points.append(FrontPoint(
                spec=_r(drops), source=source, drops=list(drops), flops_ratio=_macs(unpruned, drops) / macs_full,
                loss_tune=loss, predicted_ms=latency.predict(drops), measured_ms=measured[_r(drops)],
                images_per_s=1000 * batch / measured[_r(drops)],
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
                        time.perf_counter() - started, tau=tau, gamma=gamma, K=K, classifier=classifier,
                        weights=weights, latency_fit=fit)
    if output is not None:
        result.files = _write(output, result, points, sensitivity, name)
    return result


# --- helpers -------------------------------------------------------------------------------------

def _r(drops) -> str:
    drops = list(drops)
    while len(drops) > 1 and drops[-1] == 0:
        drops.pop()
    return "r:" + ",".join(map(str, drops))


def _with_drops(unpruned: KeepSchedule, drops) -> KeepSchedule:
    """The model's schedule with these static drops (for their token counts and MACs)."""
    return replace(unpruned, drops=tuple(drops))


def _macs(unpruned: KeepSchedule, drops) -> float:
    return _with_drops(unpruned, drops).macs()


def _repaired(unpruned: KeepSchedule, drops, block: int, step: int) -> list | None:
    """`drops` with `step` more at `block`, later blocks cut back to what they can still drop
    (the A half of their fewer tokens); None when `block` itself cannot drop more."""
    trial = list(drops)
    trial[block] += step
    return _clamped(unpruned, trial, after=block)


def _clamped(unpruned: KeepSchedule, drops, after: int = -1) -> list | None:
    """`drops` with every block after `after` cut back to what it can still drop; None when a
    block up to `after` cannot drop what it asks (or the TopK limit is passed)."""
    trial, n = list(drops), unpruned.num_patches
    for i, r in enumerate(trial):
        if i > after:
            trial[i] = r = min(r, spec.max_drop(n))
        if spec.drop_problem(n, r):
            return None
        n -= r
    return trial


def _polish(unpruned: KeepSchedule, seeds: list, trials: int, step: int, seed: int, loss_of, deadline,
            progress) -> list:
    """Optuna's NSGA-II over the first half's drops (multiples of `step`, later blocks cut back to
    what they can drop), on (MACs, probe proxy), started from the greedy front `seeds`. Returns
    the (drops, proxy) of every trial. Deterministic for a seed (one worker; every value comes from
    `loss_of`, so a resumed run replays the same trials from the journal), unless the deadline
    stops it early."""
    try:
        import optuna
    except ImportError:
        raise InputError("polish needs Optuna (pip install 'saint-export[tune]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    half, depth = unpruned.depth // 2, unpruned.depth
    high = spec.max_drop(unpruned.num_patches) // step * step
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.NSGAIISampler(
        population_size=max(4, min(50, trials // 4)), seed=seed))
    queued = 0
    for drops in seeds:  # those the space holds (the path's cut-back blocks may not be multiples of step)
        if all(r % step == 0 and r <= high for r in drops[:half]) and not any(drops[half:]):
            study.enqueue_trial({f"r{b}": drops[b] for b in range(half)})
            queued += 1
    found = []

    def objective(trial):
        drops = _clamped(unpruned, [trial.suggest_int(f"r{b}", 0, high, step=step) for b in range(half)]
                         + [0] * (depth - half))
        loss = loss_of(drops)
        found.append((tuple(drops), loss))
        return _macs(unpruned, drops), loss

    with progress.step("polish", f"NSGA-II, {trials} trials after {queued} from the greedy path",
                       total=queued + trials) as advance:
        def after(study, trial):
            advance(len(found))
            if deadline is not None and time.perf_counter() > deadline:
                study.stop()
        study.optimize(objective, n_trials=queued + trials, callbacks=[after])
    return found


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


def _check_backend(backend: str) -> None:
    if backend == "tensorrt":
        raise InputError("backend 'tensorrt': tune does not time TensorRT engines yet (no machine with a GPU has run "
                         "one here); on a GPU use onnxruntime-cuda")
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: tune measures on {', '.join(BACKENDS)}")
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        from .gpu import cuda_device

        if "CUDAExecutionProvider" not in ort.get_available_providers() or cuda_device() is None:
            raise InputError("backend onnxruntime-cuda needs onnxruntime-gpu and a CUDA GPU; this machine has "
                             f"{', '.join(ort.get_available_providers())}")


def _outputs(model, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    """What the exported graph of `model` computes (logits or features), in batches."""
    module = find_adapter(model).export_module(model)
    with torch.no_grad():
        return torch.cat([module(pixels[i:i + batch]).float() for i in range(0, len(pixels), batch)])


def _measure(base, adapter, parts, info, unpruned, picks, backend, batch, rounds, journal, progress, hp):
    """The block curve and every pick's whole-model timings (ms per batch of `batch`, 3 × `rounds`
    interleaved rounds, sorted)."""
    from .manifest import Manifest
    from .pipeline import export
    from .runtime.runners import OrtRunner

    tau, K, gamma = hp
    tokens = unpruned.num_patches + unpruned.num_protected
    grid = sorted({max(unpruned.num_protected + 1, round(tokens * f)) for f in np.linspace(0.05, 1, 12)})
    with progress.step("latency", f"one block's latency on {backend} at {len(grid)} token counts"):
        block_ms = journal.get("block curve", lambda: _block_curve(parts, grid, info.embed_dim, backend, batch,
                                                                   rounds))
    latency = LatencyModel(grid, block_ms, unpruned)
    missing = [p for p in picks if "timings " + _r(p[1]) not in journal.entries]
    runners = {}
    with tempfile.TemporaryDirectory() as tmp, progress.step(
            "measure", f"exporting and timing {len(missing)} schedules on {backend}", total=len(missing)) as advance:
        for i, (source, drops, _) in enumerate(missing):
            spec_text = _r(drops)
            if backend == "eager":
                from .patch import apply

                pruned = adapter.export_module(apply(copy.deepcopy(base), spec_text, tau=tau, K=K, gamma=gamma))
                runners[spec_text] = lambda x, m=pruned: m(torch.from_numpy(x))
            else:
                folder = export(copy.deepcopy(base), Path(tmp) / f"f{i}", ExportConfig(
                    keep_schedule=spec_text, tau=tau, K=K, gamma=gamma, target="onnx", verify=False,
                    batch=(1, batch, batch))).folder
                manifest = Manifest.read(folder)
                runner = OrtRunner(folder / manifest.onnx["file"], manifest.input, manifest.output, batch,
                                   backend.removeprefix("onnxruntime-"))
                runners[spec_text] = runner.infer
            advance(i + 1)
        x = np.random.default_rng(0).standard_normal((batch, 3, info.img_size, info.img_size)).astype(np.float32)
        times = _interleaved({key: (lambda fn=fn: fn(x)) for key, fn in runners.items()}, rounds * 3)
        for key, samples in times.items():
            journal.get("timings " + key, lambda s=samples: sorted(s))
    return latency, {_r(p[1]): journal.entries["timings " + _r(p[1])] for p in picks}


class _Block(torch.nn.Module):
    """One block as the unpruned graph runs it, for the latency curve."""

    def __init__(self, parts, block):
        super().__init__()
        self.block, self.block_forward = block, parts.block_forward

    def forward(self, x):
        return self.block_forward(self.block, x, lambda keys: None)


def _block_curve(parts, grid, width, backend, batch, rounds) -> list[float]:
    """Milliseconds of one unpatched block at each token count of `grid`."""
    block = _Block(parts, copy.deepcopy(parts.blocks[0])).eval()
    if backend == "eager":
        run = {n: (lambda x: block(torch.from_numpy(x))) for n in grid}
    else:
        from .runtime.runners import ort_session

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "block.onnx"
            example = torch.randn(batch, grid[-1], width)
            with torch.no_grad():
                torch.onnx.export(block, (example,), str(path), dynamo=True, verbose=False,
                                  dynamic_shapes=({1: torch.export.Dim("tokens", min=2, max=4096)},))
            cuda = ["CUDAExecutionProvider"] if backend == "onnxruntime-cuda" else []
            session = ort_session(path, [*cuda, "CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        run = {n: (lambda x: session.run(None, {name: x})) for n in grid}
    inputs = {n: np.random.default_rng(n).standard_normal((batch, n, width)).astype(np.float32) for n in grid}
    samples = _interleaved({n: (lambda n=n: run[n](inputs[n])) for n in grid}, rounds * 3)
    return [statistics.median(samples[n]) for n in grid]


def _interleaved(calls: dict, rounds: int) -> dict:
    """Milliseconds of every call in each of `rounds` rounds, one of each per round (after one
    warm-up each): the shared cores' slow spells then fall on all of them alike."""
    samples = {key: [] for key in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(rounds):
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                samples[key].append(1000 * (time.perf_counter() - t0))
    return samples


def _certify(base, pixels, reference, labels, drops, batch, hp, classifier) -> dict:
    """The held-out metrics of `drops`, from the model patched as export patches it (not from the
    prober: the two agreeing is what tests/test_tune.py checks)."""
    from statistics import NormalDist

    from .patch import apply

    tau, K, gamma = hp
    outputs = reference if not any(drops) else _outputs(  # unpruned: the reference is its outputs
        apply(copy.deepcopy(base), _r(drops), tau=tau, K=K, gamma=gamma), pixels, batch)
    cosines = feature_cosine(outputs, reference).numpy()
    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    spread = float(cosines.std(ddof=1)) if len(cosines) > 1 else 0.0
    metrics = {"loss": proxy_loss(outputs, reference, classifier), "cosine": float(cosines.mean()),
               "cosine_low": float(cosines.mean() - z * spread / math.sqrt(len(cosines))), "kl": None,
               "agreement": None, "agreement_interval": None, "accuracy": None, "accuracy_drop": None}
    if classifier:
        agree = (outputs.argmax(-1) == reference.argmax(-1)).numpy()
        metrics.update(kl=metrics["loss"], agreement=float(agree.mean()),
                       agreement_interval=list(wilson_interval(int(agree.sum()), len(agree))))
    if labels is not None:
        accuracy = float((outputs.argmax(-1).numpy() == labels).mean())
        unpruned_accuracy = float((reference.argmax(-1).numpy() == labels).mean())
        metrics.update(accuracy=accuracy, accuracy_drop=unpruned_accuracy - accuracy)
    return metrics


def _non_dominated(points: list) -> list:
    """Points no other point beats on both measured latency and held-out proxy, fastest first."""
    keep = [p for p in points if not any(
        (q.measured_ms <= p.measured_ms and q.loss <= p.loss) and (q.measured_ms < p.measured_ms or q.loss < p.loss)
        for q in points)]
    return sorted(keep, key=lambda p: p.measured_ms)


def _choose(front: list, goal: Objective):
    """(the chosen point or None, the point to report when none meets the goal)."""
    if goal.kind in ("speedup", "latency-ms"):
        # On the timings' quartiles, not their medians: a schedule that meets the goal only by the
        # luck of one run's noise is not chosen.
        meets = [p for p in front if (p.speedup_low >= goal.limit if goal.kind == "speedup"
                                      else p.slow_ms <= goal.limit)]
        chosen = min(meets, key=lambda p: p.loss) if meets else None
        closest = chosen or (max(front, key=lambda p: p.speedup) if goal.kind == "speedup"
                             else min(front, key=lambda p: p.measured_ms))
        return chosen, closest
    if goal.kind == "cosine":
        meets = [p for p in front if p.cosine_low >= goal.limit]
        chosen = min(meets, key=lambda p: p.measured_ms) if meets else None
        return chosen, chosen or max(front, key=lambda p: p.cosine_low)
    # The disagreement's upper bound; it bounds the accuracy drop too (only images whose prediction
    # changes can change correctness), label-free and conservative.
    bound = {id(p): 1 - p.agreement_interval[0] for p in front}
    meets = [p for p in front if bound[id(p)] <= goal.limit]
    chosen = min(meets, key=lambda p: p.measured_ms) if meets else None
    return chosen, chosen or min(front, key=lambda p: bound[id(p)])


def _write(output: Path, result: TuneResult, measured_points: list, sensitivity: dict, name) -> list:
    files = [artifacts.write_json(output / FRONT_JSON, {
        "model": name, "objective": result.objective.text, "met": result.met, "backend": result.backend,
        "images": result.images, "seconds": round(result.seconds, 1), "latency_fit": result.latency_fit,
        "tau": result.tau, "K": result.K, "gamma": result.gamma,
        "proxy": "kl" if result.classifier else "1 - feature cosine",
        "chosen": result.chosen.spec if result.chosen else None, "closest": result.closest.spec,
        "command": result.command(name),
        "front": [asdict(p) for p in result.front],
        "measured": [asdict(p) for p in measured_points]})]
    files.append(artifacts.atomic_write_text(output / SCHEDULE_TXT, result.closest.spec + "\n"))
    files.append(artifacts.atomic_write_text(output / COMMAND_TXT, result.command(name) + "\n"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files

    def save(fig, path: Path) -> None:  # complete or absent, like every other file here
        import io

        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        files.append(artifacts.atomic_write_bytes(path, buffer.getvalue()))

    def quality(p):
        return p.agreement if result.classifier else p.cosine

    fig, ax = plt.subplots(figsize=(6, 4))
    families = [p for p in measured_points if p.source in FAMILIES]
    ax.plot([p.speedup for p in result.front], [quality(p) for p in result.front], "o-", label="tuned front")
    ax.plot([p.speedup for p in families], [quality(p) for p in families], "s", label="early75/50/25")
    for p in families:
        ax.annotate(p.source, (p.speedup, quality(p)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("measured speed-up")
    ax.set_ylabel("held-out top-1 agreement with unpruned" if result.classifier
                  else "held-out feature cosine with unpruned")
    ax.legend()
    save(fig, output / FRONT_PNG)
    if sensitivity:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(sensitivity), list(sensitivity.values()))
        ax.set_xlabel("block")
        ax.set_ylabel(f"probe {'KL' if result.classifier else '1 − cosine'} after the first step there")
        save(fig, output / SENSITIVITY_PNG)
    return files
