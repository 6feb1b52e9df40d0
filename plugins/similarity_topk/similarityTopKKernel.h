// saint::SimilarityTopK CUDA kernel (docs/operator.md): one thread block per image.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

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

//! Workspace bytes for `batch` images of `numTokens` tokens.
size_t similarityTopKWorkspaceSize(int32_t batch, int32_t numTokens);

//! keys [batch, numTokens, dim] → keepIndex [batch, numTokens - drop], voteRows [batch] (int64).
cudaError_t launchSimilarityTopK(void const* keys, KeyType type, int64_t* keepIndex, int64_t* voteRows,
    void* workspace, int32_t batch, int32_t numTokens, int32_t dim, SimilarityTopKParams const& params,
    cudaStream_t stream);

} // namespace saint
