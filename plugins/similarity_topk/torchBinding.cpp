// Development binding: the plugin's CUDA kernel as a torch op (tests/gpu, scripts/bench_kernel_gpu.py).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "similarityTopKKernel.h"

std::vector<torch::Tensor> similarity_topk(
    torch::Tensor keys, int64_t num_protected, int64_t drop, double tau, int64_t vote_k, double gamma)
{
    TORCH_CHECK(keys.is_cuda() && keys.dim() == 3, "keys must be a CUDA tensor [B, N, d]");
    keys = keys.contiguous();
    int64_t const batch = keys.size(0), tokens = keys.size(1), dim = keys.size(2);
    auto options = keys.options().dtype(torch::kInt64);
    auto keep = torch::empty({batch, tokens - drop}, options);
    auto votes = torch::empty({batch}, options);
    auto workspace = torch::empty({static_cast<int64_t>(saint::similarityTopKWorkspaceSize(batch, tokens))},
        keys.options().dtype(torch::kUInt8));
    saint::KeyType type = keys.scalar_type() == torch::kHalf ? saint::KeyType::kFLOAT16
        : keys.scalar_type() == torch::kBFloat16              ? saint::KeyType::kBFLOAT16
                                                              : saint::KeyType::kFLOAT32;
    TORCH_CHECK(type != saint::KeyType::kFLOAT32 || keys.scalar_type() == torch::kFloat, "unsupported dtype");
    saint::SimilarityTopKParams params{static_cast<int32_t>(num_protected), static_cast<int32_t>(drop),
        static_cast<float>(tau), static_cast<int32_t>(vote_k), static_cast<float>(gamma)};
    cudaError_t status = saint::launchSimilarityTopK(keys.data_ptr(), type, keep.data_ptr<int64_t>(),
        votes.data_ptr<int64_t>(), workspace.data_ptr(), batch, tokens, dim, params,
        at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, cudaGetErrorString(status));
    return {keep, votes};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("similarity_topk", &similarity_topk);
}
