"""The TensorRT plugin's CUDA kernel, run unchanged on the CPU (tests/kernel_emulation), against
saint_export.core: the same keep_index and vote_rows on every case, a valid selection whatever the
input bits, refusals instead of out-of-range writes, clean under ThreadSanitizer and
AddressSanitizer + UBSan (with a racy control that TSan must catch), and mutations of the kernel
that these tests must notice. `SAINT_KERNEL_SWEEP=1` adds a larger random sweep."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import kernel_emulation as emulation
from saint_export import core, spec

pytestmark = pytest.mark.skipif(emulation.compiler() is None, reason="needs g++ (C++20) to build the kernel emulation")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sanitizer_works(variant: str) -> bool:
    try:
        emulation.build(variant)
    except subprocess.CalledProcessError:
        return False
    return True


def reference(case: emulation.Case) -> tuple[torch.Tensor, torch.Tensor]:
    return core.similarity_topk(case.keys, case.num_protected, case.drop, case.tau, case.vote_k, case.gamma)


def assert_valid_selection(case: emulation.Case, keep: torch.Tensor) -> None:
    """Every row: in range, no duplicates, the protected tokens first, every B token kept."""
    batch, tokens, _ = case.keys.shape
    assert keep.shape == (batch, tokens - case.drop)
    assert int(keep.min()) >= 0 and int(keep.max()) < tokens, "an index outside the image"
    for row in keep:
        assert row.unique().numel() == row.numel(), "a token kept twice"
        assert row[:case.num_protected].tolist() == list(range(case.num_protected))
        assert set(range(case.num_protected + 1, tokens, 2)) <= set(row.tolist())


def check(binary: Path, cases: list[emulation.Case]) -> None:
    for case, result in zip(cases, emulation.run(binary, cases)):
        described = (f"{case.keys.dtype} {tuple(case.keys.shape)} p={case.num_protected} drop={case.drop} "
                     f"tau={case.tau} vote_k={case.vote_k} gamma={case.gamma}")
        assert result.status == 0, described
        assert_valid_selection(case, result.keep_index)
        keep, votes = reference(case)
        assert torch.equal(result.keep_index, keep), described
        assert torch.equal(result.vote_rows, votes), described


def clustered(batch: int, tokens: int, dim: int, clusters: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, clusters, dim, generator=g)
    pick = torch.randint(0, clusters, (batch, tokens), generator=g)
    return centres.gather(1, pick[..., None].expand(-1, -1, dim)) + noise * torch.randn(batch, tokens, dim, generator=g)


def tau_between_grid_and_fp32(keys: torch.Tensor) -> float:
    """A τ that one A-B cosine of `keys` (one image, no protected token) reaches when rounded to
    fp32 but not on the contract's 2^-24 grid: the vote a kernel that rounds to fp32 would cast."""
    unit = keys[0].double() / keys[0].double().norm(dim=-1, keepdim=True)
    cosines = (unit[0::2] @ unit[1::2].T).flatten()
    for cosine in cosines[(cosines.abs() > 0.25) & (cosines.abs() < 0.5)]:
        as_fp32 = float(cosine.float())
        if float(core.snap_similarity(cosine)) < as_fp32:
            return as_fp32
    raise AssertionError("no cosine rounds down to the grid: use other keys")


def edge_cases() -> list[emulation.Case]:
    """Every kind of key the issue names, at every attribute edge, in the three key types."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for dtype in DTYPES:
        def c(keys, **kw):
            cases.append(emulation.Case(keys.to(dtype), **kw))

        # the two reproductions: exactly orthogonal keys (cosine 0, noise of order 1e-17 before the grid)
        c(torch.tensor([[[2., -3, -3], [3, 2, 0]]]), num_protected=0, drop=0, tau=0.0, vote_k=1)
        c(torch.tensor([[[2., -3, -3], [3, 2, 0], [0, 0, 1]]]), num_protected=0, drop=1)
        # orthogonal subspaces: every A token orthogonal to every B token, τ = 0 and the default
        sub = torch.zeros(1, 16, 8)
        sub[0, 0::2, :4] = torch.randn(8, 4, generator=g)
        sub[0, 1::2, 4:] = torch.randn(8, 4, generator=g)
        for tau in (0.0, 0.75):
            c(sub, num_protected=0, drop=8, tau=tau, vote_k=1)
        # duplicated rows and exact ties, all-zero rows
        dup = torch.randn(1, 3, 12, generator=g).repeat(1, 7, 1)
        c(torch.cat([torch.randn(1, 1, 12, generator=g), dup], 1), drop=5, vote_k=2)
        c(torch.zeros(2, 9, 6), drop=4)
        zero_rows = torch.randn(1, 33, 16, generator=g)
        zero_rows[0, 3::4] = 0
        c(zero_rows, drop=16, vote_k=1)
        # clustered, with the attribute edges: drop 0 and the most, τ exactly a similarity, γ 0 and large
        keys = clustered(3, 65, 24, 5, seed=1)
        for drop in (0, 1, 32):
            for vote_k in (1, 5, 32):
                c(keys, drop=drop, vote_k=vote_k)
        exact_tau = float(core.snap_similarity(torch.tensor(0.8125, dtype=torch.float64)))
        c(keys, drop=10, tau=exact_tau, gamma=0.0)
        c(keys, drop=10, tau=-1.0, gamma=60.0)
        c(keys, num_protected=0, drop=33, tau=1.0)
        off_grid = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(11)).to(dtype)
        c(off_grid, num_protected=0, drop=10, tau=tau_between_grid_and_fp32(off_grid), vote_k=1)
        c(keys, num_protected=5, drop=30, vote_k=3)
        # non-finite and denormal keys: similar to nothing, and the selection stays valid
        bad = clustered(2, 17, 8, 3, seed=2)
        bad[0, 2, 0], bad[0, 5, 3], bad[1, 4, :] = float("nan"), float("inf"), float("-inf")
        c(bad, drop=8, vote_k=1)
        c(torch.full((1, 11, 4), float("nan")), drop=5)
        c(torch.full((1, 7, 3), 1e-40 if dtype == torch.float32 else 1e-7), num_protected=0, drop=3)
    # N from 3 to the TopK limit (⌈n/2⌉ = 3840), fp32 keys, narrow width
    for tokens in (3, 4, 5, 18, 197, 577, 1025):
        keys = clustered(2, tokens, 16, max(tokens // 8, 1), seed=tokens)
        cases.append(emulation.Case(keys, drop=spec.max_drop(tokens - 1) if tokens > 2 else 0))
    cases.append(emulation.Case(clustered(1, 7681, 8, 200, seed=7), drop=3840 - 1))
    return cases


def test_kernel_equals_core_on_every_edge_case():
    check(emulation.build("plain"), edge_cases())


def test_kernel_equals_core_on_random_batches():
    """Images of one batch differ (random, clustered and duplicated), in each key type."""
    sweep = os.environ.get("SAINT_KERNEL_SWEEP") == "1"
    g = torch.Generator().manual_seed(3)
    cases = []
    for trial in range(60 if sweep else 12):
        tokens = int(torch.randint(3, 700 if sweep else 200, (1,), generator=g))
        protected = int(torch.randint(0, 3, (1,), generator=g)) if tokens > 3 else 0
        n = tokens - protected
        keys = clustered(3, tokens, 32, int(torch.randint(1, 12, (1,), generator=g)), seed=trial)
        keys[1] = torch.randn(tokens, 32, generator=g)
        keys[2, 1::3] = keys[2, 0]
        dtype = DTYPES[trial % 3]
        cases.append(emulation.Case(keys.to(dtype), num_protected=protected,
                                    drop=int(torch.randint(0, spec.max_drop(n) + 1, (1,), generator=g)),
                                    tau=float(torch.rand(1, generator=g)) * 2 - 1,
                                    vote_k=int(torch.randint(1, 8, (1,), generator=g)),
                                    gamma=float(torch.rand(1, generator=g)) * 20))
    check(emulation.build("plain"), cases)


@pytest.mark.parametrize("tokens, drop, tau", [
    (9, 5, 0.75),       # n = 8: drop above ⌈n/2⌉ = 4
    (3, 2, 0.75),       # n = 2: one must remain... and ⌈n/2⌉ = 1
    (1, 0, 0.75),       # no patch token at all
    (7683, 0, 0.75),    # ⌈n/2⌉ = 3841, past the TopK limit
    (9, 2, float("nan")),
])
def test_launcher_refuses_what_would_write_out_of_range(tokens, drop, tau):
    case = emulation.Case(torch.randn(2, tokens, 4), drop=drop, tau=tau)
    result, = emulation.run(emulation.build("plain"), [case])
    assert result.status == 1  # cudaErrorInvalidValue, before any launch
    assert (result.keep_index == emulation.UNWRITTEN).all() and (result.vote_rows == emulation.UNWRITTEN).all()


def test_threadsanitizer_catches_the_racy_control_and_passes_the_kernel():
    if not sanitizer_works("tsan"):
        pytest.skip("this g++ cannot build with -fsanitize=thread")
    racy = emulation.build("tsan", source=emulation.HERE / "racy_control.cu", main=emulation.HERE / "racy_control.cu")
    control = subprocess.run([str(racy)], capture_output=True, text=True, timeout=120)
    assert "WARNING: ThreadSanitizer: data race" in control.stderr, "TSan did not see the deliberate race"
    check(emulation.build("tsan"), edge_cases()[:24] + [emulation.Case(clustered(2, 301, 16, 9, seed=5), drop=100)])


def test_address_and_undefined_behaviour_sanitizers_pass_every_edge_case():
    if not sanitizer_works("asan"):
        pytest.skip("this g++ cannot build with -fsanitize=address,undefined")
    binary = emulation.build("asan")
    check(binary, edge_cases())
    refused = emulation.Case(torch.randn(1, 9, 4), drop=5)
    assert emulation.run(binary, [refused])[0].status == 1


MUTATIONS = {
    "tie rule": ("(sj == si && j < i)", "(sj == si && j > i)"),
    "similarity grid": ("return isnan(cosine) ? 0.0 : rint(cosine * 0x1p24) * 0x1p-24;",
                        "return static_cast<float>(cosine);"),
    "rank barrier": ("    __syncthreads();\n\n    // 3. rank", "\n    // 3. rank"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_kernel_is_caught(mutation, tmp_path):
    """Each mutation of the kernel's source must fail the checks above (the barrier's under TSan)."""
    old, new = MUTATIONS[mutation]
    source = emulation.KERNEL.read_text()
    assert source.count(old) == 1, f"the mutation's target moved: {old!r}"
    mutated = tmp_path / emulation.KERNEL.name
    mutated.write_text(source.replace(old, new))
    variant = "tsan" if mutation == "rank barrier" else "plain"
    if variant == "tsan" and not sanitizer_works("tsan"):
        pytest.skip("this g++ cannot build with -fsanitize=thread")
    binary = emulation.build(variant, source=mutated)
    cases = edge_cases()[:24] if variant == "tsan" else edge_cases()
    with pytest.raises((AssertionError, RuntimeError)):
        check(binary, cases)
