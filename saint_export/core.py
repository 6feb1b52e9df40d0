"""SAINT token selection (arXiv 2503.11549): the whole algorithm in one place.

Inputs are the attention keys of one block averaged over heads, [B, N, d]. The first
`num_protected` tokens (CLS, distillation, registers) never take part. The n patch tokens are
L2-normalised and split alternately into A (even positions) and B (odd positions); S = A·Bᵀ.
An A token gets a vote per B token with S ≥ τ. Its redundancy score is c·exp(γ(mean valid S − τ))
when it has c > 0 votes, else its mean similarity to B. The `drop` highest-scoring A tokens go.

Kept order: protected tokens, kept A tokens by descending score, then every B token in order.
Ties rank the lower index first (ONNX TopK's rule).

Precision: similarities are fp64 cosines rounded to the fixed grid spec.SIMILARITY_GRID (2^-24),
NaN (from a non-finite key) as 0; scores are accumulated in fp64 and rounded to fp32. Float sums
depend on summation order, which differs between libraries and even between rows of one tensor
(ONNX Runtime's ReduceSum, torch's norm, the plugin's kernel): in plain fp32, identical tokens got
scores one ulp apart, so backends broke exact ties differently. fp64 noise (~1e-16) almost never
moves a value across a grid point, and sums of grid values are exact in any order, so identical
tokens stay tied and backends agree bit for bit, orthogonal keys (cosine 0) included. τ and γ are
used at fp32 precision, as ONNX and TensorRT attributes store them.

`saint_export.ops` states the same computation in ONNX operators; keep the two in step.

The released VLM code prunes LLaVA's CLIP tower with a second rule, `iterative_drop_full_graph`;
`degree_keep_index` restates it with its batch-1 limit and unstable sort fixed (docs/vlm.md; its
rounds come from `schedule.degree_steps`).
"""
from __future__ import annotations

import torch

from .schedule import DEGREE_R0, degree_steps
from .spec import GAMMA, SIMILARITY_GRID, TAU, VOTE_K
# Guards the key normalisation against an all-zero key (the reference divides by the norm
# alone and would produce NaN); it changes nothing for any key with a norm above 1e-12.
NORM_EPS = 1e-12


def redundancy_scores(keys: torch.Tensor, num_protected: int, tau: float = TAU,
                      vote_k: int = VOTE_K, gamma: float = GAMMA) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every A token. Returns (score [B, n_A] fp32, vote_rows [B] int64).

    vote_rows counts the A tokens with at least `vote_k` votes: the number the dynamic
    method would drop for this image alone.
    """
    tau, gamma = _as_fp32(tau), _as_fp32(gamma)
    patches = _unit_patches(keys, num_protected)
    sim = snap_similarity(patches[:, 0::2] @ patches[:, 1::2].transpose(1, 2))  # [B, n_A, n_B]
    edges = sim >= tau
    votes = edges.sum(-1).double()
    mean_valid = (sim * edges).sum(-1) / votes.clamp_min(1.0)
    mean_all = sim.sum(-1) / max(sim.shape[-1], 1)
    score = torch.where(votes > 0, votes * torch.exp(gamma * (mean_valid - tau)), mean_all)
    vote_rows = (votes >= vote_k).sum(-1)
    return score.float(), vote_rows


def snap_similarity(cosine: torch.Tensor) -> torch.Tensor:
    """fp64 cosines on the contract's grid, NaN as 0: a cosine of exactly τ, or of 0, compares and
    sums the same whatever the summation order that produced it."""
    snapped = torch.round(cosine / SIMILARITY_GRID) * SIMILARITY_GRID
    return torch.where(cosine.isnan(), torch.zeros_like(snapped), snapped)


def _unit_patches(keys: torch.Tensor, num_protected: int) -> torch.Tensor:
    """The patch tokens' keys, L2-normalised in fp64."""
    patches = keys[:, num_protected:].double()
    return patches / patches.square().sum(-1, keepdim=True).sqrt().clamp_min(NORM_EPS)


def _as_fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def keep_index_from_scores(score: torch.Tensor, num_protected: int, num_tokens: int,
                           drop: int) -> torch.Tensor:
    """Token indices to keep, in SAINT's output order. [B, num_tokens - drop] int64."""
    batch, n_a = score.shape
    n_b = num_tokens - num_protected - n_a
    # A stable sort keeps equal scores in index order: lower index ranks first.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, drop:]
    device = score.device
    protected = torch.arange(num_protected, device=device).expand(batch, -1)
    kept_a = num_protected + 2 * order
    all_b = (num_protected + 1 + 2 * torch.arange(n_b, device=device)).expand(batch, -1)
    return torch.cat([protected, kept_a, all_b], dim=1)


def similarity_topk(keys: torch.Tensor, num_protected: int, drop: int, tau: float = TAU,
                    vote_k: int = VOTE_K, gamma: float = GAMMA) -> tuple[torch.Tensor, torch.Tensor]:
    """The operator (docs/operator.md): (keep_index [B, N - drop], vote_rows [B]), both int64."""
    score, vote_rows = redundancy_scores(keys, num_protected, tau, vote_k, gamma)
    return keep_index_from_scores(score, num_protected, keys.shape[1], drop), vote_rows


def dynamic_drop(vote_rows: torch.Tensor) -> int:
    """The reference method's r: the batch mean of vote_rows, truncated (one r per batch)."""
    return int(vote_rows.sum()) // vote_rows.numel()


def gather_tokens(x: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] -> x[b, keep_index[b]] [B, N', C]."""
    return torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def degree_keep_index(keys: torch.Tensor, num_protected: int, keep: int, r0: int = DEGREE_R0) -> torch.Tensor:
    """The reference's ViT-only rule: over the patch tokens' full cosine graph (self-loops
    included), repeatedly drop the tokens with the highest degree (sum of similarities to the
    tokens still there) until `keep` remain. Every image on its own; ties drop the lower index
    first; degrees are fp32 values summed in fp64 (as `redundancy_scores`).
    Returns [B, num_protected + keep] int64: protected tokens, then survivors in ascending order."""
    batch, tokens, _ = keys.shape
    patches = _unit_patches(keys, num_protected)
    alive = torch.arange(tokens - num_protected, device=keys.device).expand(batch, -1)
    for r in degree_steps(tokens - num_protected, keep, r0):
        rows = gather_tokens(patches, alive)
        degree = (rows @ rows.transpose(1, 2)).float().double().sum(-1).float()  # [B, m]
        # Each token's place in descending degree order, ties by index: counted, not sorted,
        # because a stable sort does not export and TopK's tie order differs between backends.
        m = degree.shape[1]
        position = torch.arange(m, device=keys.device)
        higher = degree[:, None, :] > degree[:, :, None]
        tied_before = (degree[:, None, :] == degree[:, :, None]) & (position[None, :] < position[:, None])
        rank = (higher | tied_before).sum(-1)
        # The survivors' positions in ascending order: the largest of distinct keys m − position
        # (float: exact below 2^24, and a type every backend's TopK takes).
        key = torch.where(rank >= r, m - position, 0).float()
        alive = torch.gather(alive, 1, torch.topk(key, m - r, dim=-1).indices)
    protected = torch.arange(num_protected, device=keys.device).expand(batch, -1)
    return torch.cat([protected, num_protected + alive], dim=1)
