"""`tune` itself: the stages in order, each reading and writing the run's journal.

1. split the images: a tune split for all searching and ranking, a held-out split read only by
   the certification;
2. search on the probe images (search.py);
3. rank the finalists on the whole tune split and fix the test order;
4. time the finalists and fit the latency model (latency.py);
5. certify on the held-out split (certify.py) and choose; write the report (report.py).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import spec
from ..adapters import find_adapter, output_names
from ..config import check_hyperparameters
from ..errors import InputError
from ..schedule import KeepSchedule
from . import certify, latency, report
from .objective import Objective
from .quality import Scores, model_outputs, score
from .search import Candidate, Prober, Search, choose_hyperparameters, hyperparameter_grid, macs, r_form

EXIT_NOT_MET = 4  # the CLI's exit status when no schedule meets the objective
JOURNAL = "journal.jsonl"
METHOD = 2  # in the journal's fingerprint: a journal of another method is refused, not misread


class Journal:
    """Every evaluation and measurement of a run, one JSON line each, read back on restart."""

    def __init__(self, path: Path | None, fingerprint: dict):
        self.path, self.entries = path, {}
        if path is not None and path.is_file():
            lines = path.read_text().splitlines()
            first = json.loads(lines[0]) if lines else {}
            if first.get("fingerprint") != fingerprint:
                raise InputError(f"{path} belongs to another run (model, images, seed or options differ); use "
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


def split(n: int, labels, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tune and held-out indices; stratified by class when there are labels, a class's only image
    staying in the tune split."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    tune_part, held = [], []
    for group in groups:
        group = rng.permutation(group)
        cut = max(1, round(len(group) * holdout)) if len(group) > 1 else 0
        held.append(group[:cut])
        tune_part.append(group[cut:])
    return rng.permutation(np.concatenate(tune_part)), np.sort(np.concatenate(held)).astype(int)


def check_split(goal: Objective, held: np.ndarray, n: int, labels, holdout: float, delta: float) -> None:
    """One line when the held-out split is too small to certify the objective at δ at all."""
    singles = 0 if labels is None else int(sum(np.sum(labels == c) == 1 for c in np.unique(labels)))
    why = (f"; {singles} classes have a single image, which stays in the tune split" if singles else "")
    needed = 1 if goal.on_speed else certify.images_needed(goal.risk_limit, delta)
    if len(held) < needed:
        raise InputError(f"{goal.text} at δ={delta:g} needs at least {needed} held-out images (even with none "
                         f"failing); --holdout {holdout:g} of {n} images holds out {len(held)}{why}: add images or "
                         "raise --holdout")


@dataclass
class Setup:
    """The model and images of a run, as the stages need them."""
    base: torch.nn.Module
    name: str
    adapter: object
    classifier: bool
    pixels: torch.Tensor
    labels: np.ndarray | None
    info: object
    unpruned: KeepSchedule
    tune_idx: np.ndarray
    held_idx: np.ndarray
    probe_idx: np.ndarray
    images_hash: str


def _setup(model, weights, images, goal: Objective, holdout: float, seed: int, probe: int, delta: float) -> Setup:
    from ..evaluate import _base_model, _images

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
    if len(data.pixel_values) < 10:
        raise InputError(f"tune needs at least 10 readable images, got {len(data.pixel_values)}")
    tune_idx, held_idx = split(len(data.pixel_values), labels, holdout, seed)
    check_split(goal, held_idx, len(data.pixel_values), labels, holdout, delta)
    info = adapter.describe(base)
    return Setup(base, name, adapter, classifier, torch.from_numpy(data.pixel_values), labels, info,
                 KeepSchedule.for_model("none", info), tune_idx, held_idx, tune_idx[:probe],
                 hashlib.sha256(data.pixel_values.tobytes()).hexdigest())


def _check_options(batch, step, probe, finalists, rounds, polish, holdout, delta, goal) -> None:
    for name, value, low in (("batch", batch, 1), ("step", step, 1), ("probe", probe, 2), ("finalists", finalists, 2),
                             ("rounds", rounds, 1), ("polish", polish, 0)):
        if not (isinstance(value, int) and value >= low):
            raise InputError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if not 0 < delta < 0.5:
        raise InputError(f"delta must be a probability in (0, 0.5), got {delta!r}")
    if goal.on_speed and certify.median_bounds([1.0] * 3 * rounds, delta).low is None:
        needed = next(r for r in range(1, 100) if certify.median_bounds([1.0] * 3 * r, delta).low is not None)
        raise InputError(f"{goal.text} at δ={delta:g} needs a confidence bound on the median speed, which "
                         f"{3 * rounds} timings per schedule cannot give: use --rounds {needed} or more")


def _search(s: Setup, reference, hp_given, step, polish, seed, finalists, batch, deadline, journal, progress):
    """The finalists and (τ, K, γ), searched on the probe images."""
    tau, K, gamma = hp_given
    prober = Prober(s.adapter.probe_parts(s.base), s.pixels[s.probe_idx], reference[s.probe_idx], s.unpruned,
                    None, batch, s.classifier)
    middle = list(KeepSchedule.for_model("early50", s.info).drops)  # reachable on any model (half its tokens)
    grid = [(t, g) for t, g in hyperparameter_grid(spec.TAU if tau is None else tau,
                                                    spec.GAMMA if gamma is None else gamma)
            if (tau is None or t == tau) and (gamma is None or g == gamma)]
    tau, gamma = choose_hyperparameters(prober, grid, K, middle, journal, progress)
    prober.hp = (tau, K, gamma)
    search = Search(prober, s.unpruned, journal)
    search.greedy_path(step, deadline, progress)
    if polish:
        search.polish(polish, step, seed, deadline, progress)
    search.families(s.info)
    return search.finalists(finalists), (tau, K, gamma), search.sensitivity


def _scores(s: Setup, reference, picks, index, label, batch, hp, journal, progress) -> dict:
    """Every pick's `Scores` on the images `index` (the tune or held-out split), by r: form."""
    labels = None if s.labels is None else s.labels[index]
    found = {}
    with progress.step(label, f"{len(picks)} finalists on {len(index)} {label} images", total=len(picks)) as advance:
        for i, pick in enumerate(picks):
            found[pick.spec] = Scores(**journal.get(f"{label} {pick.spec}", lambda p=pick: asdict(score(
                s.base, s.pixels[index], reference[index], labels, p.spec, batch, hp, s.classifier))))
            advance(i + 1)
    return found


def _point(s: Setup, pick: Candidate, tuned: Scores, held: Scores, unpruned_held: Scores, rounds: dict, fit,
           goal: Objective, batch: int, delta: float) -> report.FrontPoint:
    """One finalist's record: its search, tune-split and held-out measures and its timings."""
    own = rounds[pick.spec]
    speed = certify.median_bounds(certify.paired_speedups(rounds[r_form(s.unpruned.drops)], own), delta)
    ms = certify.median_bounds(own, delta)
    # The failures a quality objective counts; under a speed objective, a classifier's disagreements
    has_failures = s.classifier or goal.kind == "cosine"
    point = report.FrontPoint(
        spec=pick.spec, source=pick.source, drops=list(pick.drops),
        flops_ratio=macs(s.unpruned, pick.drops) / s.unpruned.macs(), probe_loss=pick.probe_loss,
        tune_loss=tuned.loss, tune_failure_rate=tuned.failures(goal) / len(tuned.cosine) if has_failures else None,
        predicted_ms=fit.predict(pick.drops), measured_ms=ms.median, images_per_s=1000 * batch / ms.median,
        speedup=speed.median, speedup_low=speed.low, speedup_high=speed.high, slow_ms=ms.high, loss=held.loss,
        cosine=float(np.mean(held.cosine)), failures=held.failures(goal) if has_failures else None)
    if s.classifier:
        point.kl, point.agreement = held.loss, 1 - float(np.mean(held.disagree))
    if held.correct is not None:
        point.accuracy = float(np.mean(held.correct))
        point.accuracy_drop = float(np.mean(unpruned_held.correct)) - point.accuracy
    return point


def _mark_pareto(points: list) -> None:
    """The finalists no other beats on both measured latency and the tune split's proxy."""
    for p in points:
        p.pareto = not any(q.measured_ms <= p.measured_ms and q.tune_loss <= p.tune_loss
                           and (q.measured_ms < p.measured_ms or q.tune_loss < p.tune_loss) for q in points)


def tune(model, images, objective: str, *, weights: str | None = None, backend: str = "onnxruntime-cpu",
         batch: int = 8, budget_minutes: float | None = None, holdout: float = 0.3, seed: int = 0, step: int = 8,
         probe: int = 64, finalists: int = 8, rounds: int = 3, polish: int = 0, delta: float = certify.DELTA,
         output=None, tau: float | None = None, K: int = spec.VOTE_K, gamma: float | None = None,
         progress=None) -> report.TuneResult:
    """Search, measure and certify static schedules of `model` (a timm ViT, CLIP / SigLIP tower or
    LLaVA-1.5 name with `weights`, or an unpatched module) on `images` (files, flat folders or class
    folders). τ and γ left None are searched; given, they are kept. `output` (a folder) gets the
    front, plots, the chosen schedule, its export command and the journal."""
    from ..pipeline import Progress

    started, progress, goal = time.perf_counter(), progress or Progress(), Objective.parse(objective)
    chosen_backend = latency.check_backend(backend)
    _check_options(batch, step, probe, finalists, rounds, polish, holdout, delta, goal)
    check_hyperparameters(spec.TAU if tau is None else tau, K, spec.GAMMA if gamma is None else gamma)
    s = _setup(model, weights, images, goal, holdout, seed, probe, delta)
    output = Path(output) if output is not None else None
    journal = Journal(output / JOURNAL if output else None, {
        "method": METHOD, "model": s.name, "weights": weights, "images": s.images_hash, "seed": seed,
        "holdout": holdout, "probe": probe, "step": step, "backend": backend, "batch": batch, "saint": [tau, K, gamma]})
    reference = model_outputs(s.base, s.pixels, batch)
    deadline = None if budget_minutes is None else started + 60 * budget_minutes
    picks, hp, sensitivity = _search(s, reference, (tau, K, gamma), step, polish, seed, finalists, batch, deadline,
                                     journal, progress)
    tuned = _scores(s, reference, picks, s.tune_idx, "tune", batch, hp, journal, progress)
    grid = sorted({max(s.unpruned.num_protected + 1, round(n)) for n in np.linspace(
        0.05, 1, 12) * (s.unpruned.num_patches + s.unpruned.num_protected)})
    with progress.step("latency", f"one block's latency on {backend} at {len(grid)} token counts"):
        block_ms = journal.get("block curve", lambda: latency.block_curve(
            s.adapter.probe_parts(s.base), grid, s.info.embed_dim, chosen_backend, batch, rounds))
    rounds_ms = latency.time_finalists(s.base, s.adapter, picks, chosen_backend, batch, rounds, s.info.img_size, hp,
                                       journal, progress)
    fit = latency.LatencyModel(grid, block_ms, s.unpruned)
    latency_fit = fit.fit({p.drops: statistics.median(rounds_ms[p.spec]) for p in picks})
    held = _scores(s, reference, picks, s.held_idx, "held-out", batch, hp, journal, progress)
    unpruned_spec = r_form(s.unpruned.drops)
    points = sorted((_point(s, p, tuned[p.spec], held[p.spec], held[unpruned_spec], rounds_ms, fit, goal, batch, delta)
                     for p in picks), key=lambda p: p.measured_ms)
    _mark_pareto(points)
    noise = certify.relative_spread(rounds_ms[unpruned_spec])
    chosen, closest, reason, guarantee = certify.decide(points, goal, len(s.held_idx), delta, noise)
    if chosen is not None:
        chosen.selected = True
    result = report.TuneResult(
        goal, points, chosen, closest, reason, guarantee, backend,
        {"tune": len(s.tune_idx), "probe": len(s.probe_idx), "held_out": len(s.held_idx)},
        time.perf_counter() - started, delta, noise, tau=hp[0], gamma=hp[2], K=K, classifier=s.classifier,
        weights=weights, latency_fit=latency_fit)
    if output is not None:
        result.files = report.write(output, result, sensitivity, s.name)
    return result
