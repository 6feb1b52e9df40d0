"""The plugin's CUDA kernel against the eager operator: identical keep_index and vote_rows.

Runs only where a CUDA GPU and nvcc are present (a lent GPU machine); skipped elsewhere.
"""
import itertools
import shutil

import pytest
import torch

from saint_export import core

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvcc") is None,
                                reason="needs a CUDA GPU and nvcc (run on a GPU machine)")


@pytest.fixture(scope="module")
def kernel():
    from saint_export.trt.plugin import torch_kernel

    return torch_kernel()


def _keys(generator, batch, tokens, dim, ties):
    if ties:  # few distinct values and repeated rows: exact score ties everywhere
        keys = torch.randint(-1, 2, (batch, tokens, dim), generator=generator).float()
        keys[:, 1::3] = keys[:, 1:2]
        return keys
    return torch.randn(batch, tokens, dim, generator=generator)


CASES = list(itertools.product([5, 17, 197, 257, 577, 1370, 3000], [1, 3, 64], [False, True]))


@pytest.mark.parametrize("tokens,batch,ties", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_eager(kernel, tokens, batch, ties, dtype):
    generator = torch.Generator().manual_seed(tokens * 131 + batch)
    for protected in (0, 1, 5):
        if tokens - protected < 2:
            continue
        n_a = (tokens - protected + 1) // 2
        keys = _keys(generator, batch, tokens, 64, ties).to(dtype)
        for drop, tau, vote_k in ((0, 0.75, 5), (n_a // 2, 0.5, 2), (n_a - 1, 0.2, 1)):
            expected_keep, expected_votes = core.similarity_topk(keys, protected, drop, tau, vote_k, 10.0)
            keep, votes = kernel.similarity_topk(keys.cuda(), protected, drop, tau, vote_k, 10.0)
            assert torch.equal(keep.cpu(), expected_keep), (tokens, batch, ties, dtype, protected, drop)
            assert torch.equal(votes.cpu(), expected_votes)
