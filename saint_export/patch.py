"""`apply()`: put SAINT into a model, in place, through a framework adapter.

Adapters (saint_export/adapters/) know where a model keeps its blocks and keys; the selection
itself is `TokenDropper`, shared by all of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import core, ops, spec  # noqa: F401  (ops registers torch.ops.saint.similarity_topk)
from .adapters import find_adapter
from .config import check_hyperparameters
from .errors import InputError
from .schedule import NOT_EXPORTABLE, KeepSchedule


class KeptTokens(NamedTuple):
    """One pruning block's selection in one forward (what `record_kept` collects)."""
    block: int
    keep_index: torch.Tensor | None  # [B, N - dropped] int64; None where a dynamic block dropped nothing
    vote_rows: torch.Tensor  # [B] int64: A rows with ≥ K votes (zeros for the degree rule)
    keys: torch.Tensor  # [B, N, d]: the block's head-averaged keys
    dropped: int  # tokens this block dropped


@dataclass
class SaintState:
    """What `apply` attached to a model (as `model.saint`)."""
    schedule: KeepSchedule
    tau: float
    vote_k: int
    gamma: float
    # While recording: one KeptTokens per pruning block and forward.
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
            raise InputError(f"block {self.block} expected {self.tokens_in} tokens but got {keys.shape[1]}: "
                             "the input image size differs from the one the keep schedule was resolved for")
        if s.schedule.rule == "degree":  # plain torch ops: exports without the operator
            keep = core.degree_keep_index(keys, p, keys.shape[1] - p - self.drop, s.schedule.r0)
            vote_rows, r = torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device), self.drop
        elif self.drop is None:
            if torch.compiler.is_compiling():
                raise InputError(NOT_EXPORTABLE)
            keep, vote_rows = torch.ops.saint.similarity_topk(keys, p, 0, s.tau, s.vote_k, s.gamma)
            r = core.dynamic_drop(vote_rows)
            keep = torch.cat([keep[:, :p], keep[:, p + r:]], 1) if r else None
        else:
            r = self.drop
            keep, vote_rows = torch.ops.saint.similarity_topk(keys, p, r, s.tau, s.vote_k, s.gamma)
        if s.trace is not None:
            s.trace.append(KeptTokens(self.block, keep, vote_rows, keys, r))
        return keep


def apply(model: torch.nn.Module, keep_schedule: str | KeepSchedule = "early50", tau: float = core.TAU,
          K: int = core.VOTE_K, gamma: float = core.GAMMA, *, llm_schedule: str | None = None,
          llm_tau: float | None = None, padding_side: str | None = None) -> torch.nn.Module:
    """Apply SAINT to `model` in place and return it.

    `keep_schedule` is a schedule string (docs/keep-schedules.md) or a resolved `KeepSchedule`,
    for the vision blocks (a ViT, or a VLM's vision tower). Blocks that drop nothing keep their
    original forward, so `none` gives the unpatched model's outputs.

    `llm_schedule` (LLaVA only, docs/vlm.md) drops image tokens inside the language model during
    prefill, with τ = `llm_tau` (default: the reference's 0.83) and the same K and γ.

    `padding_side` ("left" or "right"; a processor's `tokenizer.padding_side`) is where a VLM's
    prompt rows are padded again once pruning removes columns; default: the side the prompt is
    padded on, left for unpadded prompts (what `generate` needs).
    """
    if getattr(model, "saint", None) is not None:
        raise InputError("model already has SAINT applied; create a fresh model to change the schedule")
    if padding_side not in (None, "left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    adapter = find_adapter(model)
    info = adapter.describe(model)
    check_hyperparameters(tau, K, gamma)
    schedule = KeepSchedule.for_model(keep_schedule, info)
    if llm_schedule is not None:
        from . import llm

        llm_tau = spec.LLM_TAU if llm_tau is None else llm_tau
        check_hyperparameters(llm_tau, K, gamma)
        resolved_llm = llm.resolve(llm_schedule, model, None if schedule.drops is None else sum(schedule.drops))
    state, droppers = make_droppers(schedule, tau, K, gamma)
    adapter.patch(model, droppers)
    if llm_schedule is not None:
        llm_state = llm.install(model, resolved_llm, llm_tau, K, gamma)
        if hasattr(adapter, "llm_installed"):  # what the family adds inside its LLM (Qwen3-VL's DeepStack)
            adapter.llm_installed(model, llm_state)
    model.saint = state
    if padding_side is not None:
        model.saint_padding_side = padding_side
    return model


def make_droppers(schedule: KeepSchedule, tau: float, K: int, gamma: float) -> tuple[SaintState, dict]:
    """The state and the `TokenDropper` of every pruning block of a resolved schedule (also what
    the vLLM plugin runs inside vLLM's own tower)."""
    state = SaintState(schedule, float(tau), int(K), float(gamma))
    return state, droppers_for(schedule, state)


def droppers_for(schedule: KeepSchedule, state: SaintState) -> dict:
    """The `TokenDropper` of every pruning block of `schedule`, sharing `state` (τ, K, γ, the trace):
    families that resolve the schedule per image size make one set per size."""
    counts = schedule.patch_counts()
    droppers = {}
    for block in schedule.pruning_blocks:
        drop = None if schedule.drops is None else schedule.drops[block]
        tokens_in = None if drop is None else counts[block] + schedule.num_protected
        droppers[block] = TokenDropper(block, drop, tokens_in, state)
    return droppers


@contextlib.contextmanager
def record_kept(model: torch.nn.Module):
    """Collect a `KeptTokens` for every pruning block and forward while the context is open."""
    state = getattr(model, "saint", None)
    if state is None:
        raise InputError("model has no SAINT applied")
    state.trace = []
    try:
        yield state.trace
    finally:
        state.trace = None

