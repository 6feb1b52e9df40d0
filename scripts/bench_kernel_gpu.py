"""GPU: the plugin's SimilarityTopK kernel against the eager operator on the same GPU (medians).

    python scripts/bench_kernel_gpu.py       # needs a CUDA GPU, nvcc and a GPU build of torch

Shapes of the first pruning block of vit_b16 (197 tokens, d 64) and vit_h14 (257 tokens, d 80),
batch 1, 8 and 64, each drop = n_A // 2. Checks that both agree before timing them.
"""
import statistics

import torch

from saint_export import core
from saint_export.trt.plugin import torch_kernel


def median_ms(fn, repeats=50):
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main():
    kernel = torch_kernel()
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    print("| shape | batch | kernel ms | eager op ms (same GPU) | eager / kernel |")
    print("|---|---|---|---|---|")
    for name, tokens, dim in (("vit_b16", 197, 64), ("vit_h14", 257, 80)):
        drop = (tokens - 1 + 1) // 2 // 2
        for batch in (1, 8, 64):
            keys = torch.randn(batch, tokens, dim, device="cuda")
            ours = kernel.similarity_topk(keys, 1, drop, 0.75, 5, 10.0)
            eager = core.similarity_topk(keys, 1, drop)
            assert all(torch.equal(a, b) for a, b in zip(ours, eager)), "kernel and eager operator disagree"
            k = median_ms(lambda: kernel.similarity_topk(keys, 1, drop, 0.75, 5, 10.0))
            e = median_ms(lambda: core.similarity_topk(keys, 1, drop))
            print(f"| {name} ({tokens}×{dim}) | {batch} | {k:.3f} | {e:.3f} | {e / k:.1f}x |")


if __name__ == "__main__":
    main()
