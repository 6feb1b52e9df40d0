"""`saint-export tune`: search static keep schedules on the user's images, time them, and certify
the choice.

    result = saint_export.tune("vit_b16", "photos/", "disagreement<=2%", weights="random", output="tune/")

The modules follow the method: objective (the grammar), search (τ and γ, the greedy path, the
families, the polish; on the probe images, costs in MACs), quality (per-image measures against the
unpruned model), latency (the block curve, the fit, paired timings), certify (the testing
procedure: Learn-then-Test with Clopper–Pearson bounds, speed on median bounds), report (records,
front.json, plots) and run (the stages in order, with the journal that resumes them).

What is guaranteed, and what is not: for `disagreement<=P%`, `accuracy-drop<=P%` and `cosine>=X`,
with probability ≥ 1 − δ over the held-out images the chosen schedule's failure rate on images
exchangeable with them is within the objective; the held-out images are read by nothing but that
test. A speed objective is met on a confidence bound of the median paired speed-up on this machine
as loaded during the run; timings on another machine, or under another load, are not covered.
"""
import sys
import types

from .certify import DELTA
from .objective import Objective
from .report import TuneResult
from .run import EXIT_NOT_MET, tune
from .search import FAMILIES, hyperparameter_grid

__all__ = ["tune", "TuneResult", "Objective", "EXIT_NOT_MET", "FAMILIES", "DELTA", "hyperparameter_grid"]


class _CallableModule(types.ModuleType):
    """`saint_export.tune(...)` is the documented call, and this package shares its name: once any
    `saint_export.tune.*` module is imported, `saint_export.tune` is this module, so calling it runs
    `tune`."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
