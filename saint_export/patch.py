"""`apply()`: put SAINT into a model, in place, through a framework adapter.

Adapters (saint_export/adapters/) know where a model keeps its blocks and keys; the selection
itself is `TokenDropper`, shared by all of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from . import core
from .errors import SaintError
from .schedule import NOT_EXPORTABLE, KeepSchedule


@dataclass
class SaintState:
    """What `apply` attached to a model (as `model.saint`)."""
    schedule: KeepSchedule
    tau: float
    vote_k: int
    gamma: float
    # While recording: one (block, keep_index, vote_rows, keys) per pruning block and forward.
    trace: list | None = field(default=None, repr=False)


@dataclass
class TokenDropper:
    """The selection step of one block: keys in, kept token indices out (None: keep all)."""
    block: int
    drop: int | None  # None: the reference method's dynamic r
    tokens_in: int | None  # static schedules know the token count each block must see
    state: SaintState

    def __call__(self, keys: torch.Tensor) -> torch.Tensor | None:
        s = self.state
        p = s.schedule.num_protected
        if self.tokens_in is not None and keys.shape[1] != self.tokens_in:
            raise SaintError(f"block {self.block} expected {self.tokens_in} tokens but got {keys.shape[1]}: "
                             "the input image size differs from the one the keep schedule was resolved for")
        if self.drop is None:
            if torch.compiler.is_compiling():
                raise SaintError(NOT_EXPORTABLE)
            keep, vote_rows = torch.ops.saint.similarity_topk(keys, p, 0, s.tau, s.vote_k, s.gamma)
            r = core.dynamic_drop(vote_rows)
            keep = torch.cat([keep[:, :p], keep[:, p + r:]], 1) if r else None
        else:
            keep, vote_rows = torch.ops.saint.similarity_topk(keys, p, self.drop, s.tau, s.vote_k, s.gamma)
        if s.trace is not None:
            s.trace.append((self.block, keep, vote_rows, keys))
        return keep


def apply(model: torch.nn.Module, keep_schedule: str | KeepSchedule = "early50", tau: float = core.TAU,
          K: int = core.VOTE_K, gamma: float = core.GAMMA) -> torch.nn.Module:
    """Apply SAINT to `model` in place and return it.

    `keep_schedule` is a schedule string (DESIGN §2) or a resolved `KeepSchedule`. Blocks that
    drop nothing keep their original forward, so `none` gives the unpatched model's outputs.
    """
    from .adapters import find_adapter  # adapters import this module

    if getattr(model, "saint", None) is not None:
        raise SaintError("model already has SAINT applied; create a fresh model to change the schedule")
    adapter = find_adapter(model)
    info = adapter.describe(model)
    check_hyperparameters(tau, K, gamma)
    if isinstance(keep_schedule, KeepSchedule):
        if (keep_schedule.depth, keep_schedule.num_patches) != (info.depth, info.num_patches):
            raise SaintError(f"keep schedule was resolved for depth {keep_schedule.depth} and "
                             f"{keep_schedule.num_patches} patches, but the model has depth {info.depth} and "
                             f"{info.num_patches} patches")
        # The drops only depend on depth and patches; the rest describes this model.
        schedule = dataclasses.replace(keep_schedule, num_protected=info.num_protected, embed_dim=info.embed_dim,
                                       mlp_ratio=info.mlp_ratio)
    else:
        schedule = KeepSchedule.parse(keep_schedule, info.depth, info.num_patches,
                                      num_protected=info.num_protected, embed_dim=info.embed_dim,
                                      mlp_ratio=info.mlp_ratio)
    state = SaintState(schedule, float(tau), int(K), float(gamma))
    counts = schedule.patch_counts()
    droppers = {}
    for block in schedule.pruning_blocks:
        drop = None if schedule.drops is None else schedule.drops[block]
        tokens_in = None if drop is None else counts[block] + info.num_protected
        droppers[block] = TokenDropper(block, drop, tokens_in, state)
    adapter.patch(model, droppers)
    model.saint = state
    return model


@contextlib.contextmanager
def record_kept(model: torch.nn.Module):
    """Collect (block, keep_index, vote_rows, keys) of every pruning block while the context is open.

    keep_index is None where a dynamic block dropped nothing.
    """
    state = getattr(model, "saint", None)
    if state is None:
        raise SaintError("model has no SAINT applied")
    state.trace = []
    try:
        yield state.trace
    finally:
        state.trace = None


def check_hyperparameters(tau, K, gamma):
    if not (isinstance(tau, (int, float)) and -1.0 <= tau <= 1.0):
        raise SaintError(f"tau must be a cosine similarity in [-1, 1], got {tau!r}")
    if not (isinstance(K, int) and K >= 1):
        raise SaintError(f"K (votes for a redundant row) must be an integer ≥ 1, got {K!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise SaintError(f"gamma must be a finite number ≥ 0, got {gamma!r}")
