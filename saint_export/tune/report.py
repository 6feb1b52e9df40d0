"""What a tune run hands back: the finalists as records, the result, and the files it writes
(front.json, front.png, sensitivity.png, schedule.txt, command.txt).

Which outputs depend on timing: measured and predicted milliseconds, speed-ups and their bounds,
the latency fit, the `pareto` flags and, for every objective, which finalist is chosen (the
fastest certified one, or the best one meeting a speed objective). The finalists themselves, their
proxies and held-out measures, the test order and the certificates are the same for a seed.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

from .. import artifacts, spec
from .objective import Objective
from .search import FAMILIES

FRONT_JSON, FRONT_PNG, SENSITIVITY_PNG, SCHEDULE_TXT, COMMAND_TXT = (
    "front.json", "front.png", "sensitivity.png", "schedule.txt", "command.txt")


@dataclass
class FrontPoint:
    spec: str  # the r: form (what export takes)
    source: str  # "unpruned", "path <step>", "polish <trial>" or the family it came from
    drops: list
    flops_ratio: float
    probe_loss: float  # the search's proxy on the probe images (KL, or 1 − feature cosine)
    tune_loss: float  # the same proxy on the whole tune split (ranks the finalists)
    tune_failure_rate: float | None  # the objective's failures on the tune split (orders the test)
    predicted_ms: float | None = None
    measured_ms: float | None = None  # the median of its interleaved timings (one batch)
    images_per_s: float | None = None  # the batch over measured_ms
    speedup: float | None = None  # the median of paired ratios (unpruned over this, round by round)
    speedup_low: float | None = None  # its lower bound at 1 − δ (order statistics)
    speedup_high: float | None = None  # and its upper bound: [low, high] holds the median at 1 − 2δ
    slow_ms: float | None = None  # the median's upper bound at 1 − δ
    loss: float | None = None  # held-out: the proxy
    kl: float | None = None  # held-out; classifiers only (as are agreement and accuracy)
    agreement: float | None = None
    cosine: float | None = None  # the mean over held-out images (logits, or token-mean features)
    accuracy: float | None = None
    accuracy_drop: float | None = None
    failures: int | None = None  # held-out images failing the quality objective (or disagreeing)
    failure_bound: float | None = None  # their rate's Clopper–Pearson upper bound at 1 − δ
    test_order: int | None = None  # its place in the fixed sequence (quality objectives)
    certified: bool = False
    pareto: bool = False  # on the front of measured latency against the tune split's proxy
    selected: bool = False


@dataclass
class TuneResult:
    objective: Objective
    finalists: list  # FrontPoint, fastest first
    chosen: FrontPoint | None  # None: nothing meets the objective
    closest: FrontPoint  # the chosen one, or the point nearest the objective
    reason: str | None  # why nothing was chosen (one line), else None
    guarantee: str  # what the run claims about the chosen schedule, and under which assumption
    backend: str
    images: dict  # tune / probe / held-out counts
    seconds: float
    delta: float
    noise: float  # the unpruned model's timings: interquartile range over median
    tau: float = spec.TAU  # the τ and γ the front was searched and certified with
    gamma: float = spec.GAMMA
    K: int = spec.VOTE_K
    classifier: bool = True  # False: a tower (features; the proxy is 1 − feature cosine)
    weights: str | None = None  # the model's weights, where it was given by name
    files: list = field(default_factory=list)
    latency_fit: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.chosen is not None

    @property
    def front(self) -> list:
        return [p for p in self.finalists if p.pareto]

    def command(self, model: str = "MODEL") -> str:
        """The export command of the closest point, with the weights, and τ, γ and K where they are
        not the defaults."""
        saint = "".join(f" --{flag} {value:g}" for flag, value, default in (
            ("tau", self.tau, spec.TAU), ("K", self.K, spec.VOTE_K), ("gamma", self.gamma, spec.GAMMA))
            if value != default)
        weights = f" --weights {self.weights}" if self.weights else ""
        return f"saint-export {model} --keep-schedule {self.closest.spec}{weights}{saint}"

    def table(self) -> str:
        proxy = "KL" if self.classifier else "1-cos"
        lines = [f"{'schedule':<34} {'source':<10} {'speed-up':>8} {'≥':>6} {'pred ms':>8} {'meas ms':>8} "
                 f"{'img/s':>7} {'tune ' + proxy:>10} {'fail':>6} {'bound':>7}"]
        for p in self.finalists:
            spec_text = p.spec if len(p.spec) <= 33 else p.spec[:30] + "…"
            low = f"{p.speedup_low:>5.2f}x" if p.speedup_low is not None else f"{'–':>6}"
            bound = f"{p.failure_bound:>7.1%}" if p.failure_bound is not None else f"{'–':>7}"
            fail = f"{p.failures:>6d}" if p.failures is not None else f"{'–':>6}"
            marks = ("  certified" if p.certified else "") + ("  front" if p.pareto else "") + \
                ("  ← chosen" if p.selected else "")
            lines.append(f"{spec_text:<34} {p.source:<10} {p.speedup:>7.2f}x {low} {p.predicted_ms:>8.2f} "
                         f"{p.measured_ms:>8.2f} {p.images_per_s:>7.1f} {p.tune_loss:>10.4f} {fail} {bound}{marks}")
        return "\n".join(lines)


def write(output, result: TuneResult, sensitivity: dict, name: str) -> list:
    files = [artifacts.write_json(output / FRONT_JSON, {
        "model": name, "objective": result.objective.text, "met": result.met, "reason": result.reason,
        "guarantee": result.guarantee, "delta": result.delta, "backend": result.backend, "images": result.images,
        "seconds": round(result.seconds, 1), "noise": result.noise, "latency_fit": result.latency_fit,
        "tau": result.tau, "K": result.K, "gamma": result.gamma,
        "proxy": "kl" if result.classifier else "1 - feature cosine",
        "chosen": result.chosen.spec if result.chosen else None, "closest": result.closest.spec,
        "command": result.command(name), "finalists": [asdict(p) for p in result.finalists]})]
    files.append(artifacts.atomic_write_text(output / SCHEDULE_TXT, result.closest.spec + "\n"))
    files.append(artifacts.atomic_write_text(output / COMMAND_TXT, result.command(name) + "\n"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files

    def save(fig, path) -> None:  # complete or absent, like every other file here
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        files.append(artifacts.atomic_write_bytes(path, buffer.getvalue()))

    save(_front_figure(plt, result), output / FRONT_PNG)
    if sensitivity:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(sensitivity), list(sensitivity.values()))
        ax.set_xlabel("block")
        ax.set_ylabel(f"probe {'KL' if result.classifier else '1 − cosine'} after the first step there")
        save(fig, output / SENSITIVITY_PNG)
    return files


def _front_figure(plt, result: TuneResult):
    """Speed-up (with its lower bound) against the held-out quality, the families labelled."""
    def quality(p):
        return p.agreement if result.classifier else p.cosine

    fig, ax = plt.subplots(figsize=(6, 4))
    front = result.front
    ax.plot([p.speedup for p in front], [quality(p) for p in front], "o-", label="tuned front")
    for p in result.finalists:
        if p.speedup_low is not None:
            ax.plot([p.speedup_low, p.speedup], [quality(p)] * 2, "-", color="grey", lw=1)
    families = [p for p in result.finalists if p.source in FAMILIES]
    ax.plot([p.speedup for p in families], [quality(p) for p in families], "s", label="early75/50/25")
    for p in families:
        ax.annotate(p.source, (p.speedup, quality(p)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("measured speed-up (median; grey: down to its lower bound)")
    ax.set_ylabel("held-out top-1 agreement with unpruned" if result.classifier
                  else "held-out feature cosine with unpruned")
    ax.legend()
    return fig
