"""The search, on the probe images of the tune split: τ and γ, a greedy path from the unpruned
model, Optuna's NSGA-II polish, the early<P> families; then the finalists spread along the front.

Costs are MACs here, never timings, so for a seed the searched points are always the same.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import core, spec
from ..errors import InputError
from ..schedule import KeepSchedule, ScheduleError
from .quality import proxy_loss

FAMILIES = ("early75", "early50", "early25")


@dataclass(frozen=True)
class Candidate:
    source: str  # "unpruned", "path <step>", "polish <trial>" or the family
    drops: tuple
    probe_loss: float  # the proxy on the probe images

    @property
    def spec(self) -> str:
        return r_form(self.drops)


def r_form(drops) -> str:
    """The r: schedule that export takes (trailing zeros dropped)."""
    drops = list(drops)
    while len(drops) > 1 and drops[-1] == 0:
        drops.pop()
    return "r:" + ",".join(map(str, drops))


def macs(unpruned: KeepSchedule, drops) -> float:
    return replace(unpruned, drops=tuple(drops)).macs()


def hyperparameter_grid(tau: float = spec.TAU, gamma: float = spec.GAMMA) -> list[tuple[float, float]]:
    """The (τ, γ) pairs tune tries: the defaults first (kept on a tie), τ ± 0.1, γ halved and doubled."""
    taus = [tau] + [t for t in (round(tau - 0.1, 6), round(tau + 0.1, 6)) if -1 <= t <= 1]
    return [(t, g) for t in taus for g in (gamma, gamma / 2, gamma * 2)]


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


def choose_hyperparameters(prober: Prober, grid: list, K: int, middle: list, journal, progress) -> tuple:
    """The (τ, γ) of `grid` with the lowest probe proxy at `middle` (early50); on a tie the earlier."""
    if len(grid) == 1:
        return grid[0]
    with progress.step("hyper-parameters", f"τ and γ at early50 ({len(grid)} pairs)", total=len(grid)) as advance:
        scored = []
        for i, (tau, gamma) in enumerate(grid):
            prober.hp = (tau, K, gamma)
            scored.append((journal.get(f"hp {tau:g},{gamma:g}", lambda: prober.loss(middle)), i))
            advance(i + 1)
    return grid[min(scored)[1]]


class Search:
    """Every candidate the search scored, by r: form, with the probe proxy from the journal."""

    def __init__(self, prober: Prober, unpruned: KeepSchedule, journal):
        self.prober, self.unpruned, self.journal = prober, unpruned, journal
        zero = (0,) * unpruned.depth
        self.candidates = {r_form(zero): Candidate("unpruned", zero, 0.0)}
        self.sensitivity = {}  # block → the probe proxy after the path's first step there

    def loss_of(self, drops) -> float:
        return self.journal.get("loss " + ",".join(map(str, drops)), lambda: self.prober.loss(list(drops)))

    def add(self, source: str, drops, loss: float | None = None) -> None:
        drops = tuple(drops)
        if r_form(drops) not in self.candidates:
            self.candidates[r_form(drops)] = Candidate(source, drops, self.loss_of(drops) if loss is None else loss)

    def greedy_path(self, step: int, deadline, progress) -> None:
        """From the unpruned model, `step` more tokens at a time in the pruning block (SAINT's first
        half) that raises the proxy least per MAC saved; each step's schedule is a candidate."""
        path, steps = [0] * self.unpruned.depth, 0
        with progress.step("search", f"greedy path on {len(self.prober.reference)} probe images "
                                     f"(+{step} tokens a step)") as advance:
            while deadline is None or time.perf_counter() < deadline:
                best = self._best_step(path, step, first=steps == 0)
                if best is None:
                    break
                path = best[1]
                self.prober.commit(path)
                steps += 1
                self.add(f"path {steps}", path, best[2])
                advance(steps)
        self.prober.commit([0] * self.unpruned.depth)  # later trials re-run from their first dropping block

    def _best_step(self, path: list, step: int, first: bool):
        current_loss, current_macs = self.candidates[r_form(path)].probe_loss, macs(self.unpruned, path)
        best = None
        for block in range(self.unpruned.depth // 2):
            trial = repaired(self.unpruned, path, block, step)
            if trial is None or current_macs - macs(self.unpruned, trial) <= 0:
                continue
            loss = self.loss_of(trial)
            score = (loss - current_loss) / (current_macs - macs(self.unpruned, trial))
            if first:
                self.sensitivity[block] = loss
            if best is None or score < best[0]:
                best = (score, trial, loss)
        return best

    def polish(self, trials: int, step: int, seed: int, deadline, progress) -> None:
        """Optuna's NSGA-II over the first half's drops (multiples of `step`, later blocks cut back to
        what they can drop), on (MACs, probe proxy), started from the candidates so far. Deterministic
        for a seed (one worker; every value comes from the journal on a resumed run), unless the
        deadline stops it early."""
        try:
            import optuna
        except ImportError:
            raise InputError("polish needs Optuna (pip install 'saint-export[tune]')") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        unpruned = self.unpruned
        half, depth = unpruned.depth // 2, unpruned.depth
        high = spec.max_drop(unpruned.num_patches) // step * step
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.NSGAIISampler(
            population_size=max(4, min(50, trials // 4)), seed=seed))
        queued = 0
        for c in list(self.candidates.values()):  # those the space holds (path blocks cut back may not be)
            if all(r % step == 0 and r <= high for r in c.drops[:half]) and not any(c.drops[half:]):
                study.enqueue_trial({f"r{b}": c.drops[b] for b in range(half)})
                queued += 1
        found = []

        def objective(trial):
            drops = clamped(unpruned, [trial.suggest_int(f"r{b}", 0, high, step=step) for b in range(half)]
                            + [0] * (depth - half))
            loss = self.loss_of(drops)
            found.append(drops)
            self.add(f"polish {len(found)}", drops, loss)
            return macs(unpruned, drops), loss

        with progress.step("polish", f"NSGA-II, {trials} trials after {queued} from the greedy path",
                           total=queued + trials) as advance:
            def after(study, trial):
                advance(len(found))
                if deadline is not None and time.perf_counter() > deadline:
                    study.stop()
            study.optimize(objective, n_trials=queued + trials, callbacks=[after])

    def families(self, info) -> None:
        for family in FAMILIES:
            try:
                drops = KeepSchedule.for_model(family, info).drops
            except ScheduleError:  # early25 on a shallow model: its first half cannot drop that much
                continue
            self.add(family, drops)

    def finalists(self, count: int) -> list[Candidate]:
        """The probe front (from the cheapest up, each point that lowers the proxy), `count` of it
        spread along it, every family and the unpruned model."""
        ordered = sorted(self.candidates.values(), key=lambda c: (macs(self.unpruned, c.drops), c.probe_loss))
        front, best_loss = [], math.inf
        for candidate in ordered:
            if candidate.probe_loss < best_loss:
                front.append(candidate)
                best_loss = candidate.probe_loss
        if len(front) > count:
            front = [front[i] for i in np.unique(np.round(np.linspace(0, len(front) - 1, count)).astype(int))]
        picks = front + [c for c in self.candidates.values() if c.source in FAMILIES and c not in front]
        unpruned = self.candidates[r_form((0,) * self.unpruned.depth)]
        return picks if unpruned in picks else [unpruned, *picks]


def repaired(unpruned: KeepSchedule, drops, block: int, step: int) -> list | None:
    """`drops` with `step` more at `block`, later blocks cut back to what they can still drop
    (the A half of their fewer tokens); None when `block` itself cannot drop more."""
    trial = list(drops)
    trial[block] += step
    return clamped(unpruned, trial, after=block)


def clamped(unpruned: KeepSchedule, drops, after: int = -1) -> list | None:
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
