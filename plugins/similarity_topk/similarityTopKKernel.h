// saint::SimilarityTopK CUDA kernel (docs/operator.md): one thread block per image.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>
#include <string>

namespace saint
{

enum class KeyType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
    kBFLOAT16 = 2
};

struct SimilarityTopKParams
{
    int32_t numProtected;
    int32_t drop;
    float tau;
    int32_t voteK;
    float gamma;
};

//! TensorRT's ITopKLayer limit on the A tokens, kept so that engines with and without the plugin
//! accept the same models (saint_export/spec.py: TOPK_LIMIT).
constexpr int64_t kTopKLimit = 3840;

//! Why `params` break the attribute contract of docs/operator.md; empty when they do not.
std::string similarityTopKParamsProblem(SimilarityTopKParams const& params);

//! Why `numTokens` tokens cannot run under `params` (the attribute and shape contract of
//! docs/operator.md), naming the values; empty when they can. The plugin checks it when it is
//! built and when the shape changes, and the launcher refuses such a launch.
std::string similarityTopKShapeProblem(int64_t numTokens, SimilarityTopKParams const& params);

//! Workspace bytes for `batch` images of `numTokens` tokens.
size_t similarityTopKWorkspaceSize(int32_t batch, int32_t numTokens);

//! keys [batch, numTokens, dim] → keepIndex [batch, numTokens - drop], voteRows [batch] (int64).
cudaError_t launchSimilarityTopK(void const* keys, KeyType type, int64_t* keepIndex, int64_t* voteRows,
    void* workspace, int32_t batch, int32_t numTokens, int32_t dim, SimilarityTopKParams const& params,
    cudaStream_t stream);

} // namespace saint
