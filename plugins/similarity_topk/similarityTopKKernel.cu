// The operator of saint_export/core.py on the GPU, with its precision contract (docs/operator.md):
// similarities are computed in fp64 and snapped to the fixed grid of 2^-24 (a NaN one, from a
// non-finite key, to 0), so any summation order, and dividing by the norms after the dot product
// rather than before, gives the reference's values, near 0 included; scores are rounded to fp32
// where the reference rounds; ties rank the lower index first. Runs unchanged on the host in CI
// (tests/kernel_emulation).
#include "similarityTopKKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <string>

namespace saint
{
namespace
{

constexpr int kThreads = 256;
constexpr double kNormEps = 1e-12;

__device__ inline double toDouble(float v) { return v; }
__device__ inline double toDouble(__half v) { return __half2float(v); }
__device__ inline double toDouble(__nv_bfloat16 v) { return __bfloat162float(v); }

//! The contract's similarity: the cosine on the 2^-24 grid (exact in fp32 for |s| <= 1, and fp64
//! noise of ~1e-16 cannot move it), NaN as 0. Sums of grid values are exact in any order.
__device__ inline double snapSimilarity(double cosine)
{
    return isnan(cosine) ? 0.0 : rint(cosine * 0x1p24) * 0x1p-24;
}

template <typename T>
__global__ void similarityTopKKernel(T const* keys, int64_t* keepIndex, int64_t* voteRows, double* norms,
    int32_t numTokens, int32_t dim, SimilarityTopKParams p)
{
    int32_t const image = blockIdx.x;
    int32_t const n = numTokens - p.numProtected;
    int32_t const nA = (n + 1) / 2;
    int32_t const nB = n / 2;
    T const* x = keys + static_cast<int64_t>(image) * numTokens * dim + static_cast<int64_t>(p.numProtected) * dim;
    double* norm = norms + static_cast<int64_t>(image) * n;

    extern __shared__ unsigned char shared[];
    float* score = reinterpret_cast<float*>(shared);      // [nA]
    int32_t* order = reinterpret_cast<int32_t*>(score + nA); // [nA]: order[rank] = A index
    __shared__ int32_t votedRows;
    if (threadIdx.x == 0)
    {
        votedRows = 0;
    }

    // 1. key norms of the patch tokens
    for (int32_t t = threadIdx.x; t < n; t += blockDim.x)
    {
        double s = 0.0;
        for (int32_t k = 0; k < dim; ++k)
        {
            double const v = toDouble(x[static_cast<int64_t>(t) * dim + k]);
            s += v * v;
        }
        norm[t] = fmax(sqrt(s), kNormEps);
    }
    __syncthreads();

    // 2. per A token: cosine to every B token (fp64, rounded to fp32), votes, score
    double const tau = p.tau;
    double const gamma = p.gamma;
    for (int32_t i = threadIdx.x; i < nA; i += blockDim.x)
    {
        T const* a = x + static_cast<int64_t>(2 * i) * dim;
        double sumAll = 0.0;
        double sumValid = 0.0;
        int32_t votes = 0;
        for (int32_t j = 0; j < nB; ++j)
        {
            T const* b = x + static_cast<int64_t>(2 * j + 1) * dim;
            double dot = 0.0;
            for (int32_t k = 0; k < dim; ++k)
            {
                dot += toDouble(a[k]) * toDouble(b[k]);
            }
            double const s = snapSimilarity(dot / (norm[2 * i] * norm[2 * j + 1]));
            sumAll += s;
            if (s >= tau)
            {
                ++votes;
                sumValid += s;
            }
        }
        score[i] = votes > 0 ? static_cast<float>(votes * exp(gamma * (sumValid / votes - tau)))
                             : static_cast<float>(sumAll / (nB > 0 ? nB : 1));
        if (votes >= p.voteK)
        {
            atomicAdd(&votedRows, 1);
        }
    }
    __syncthreads();

    // 3. rank by descending score, lower index first on ties (a stable order, like ONNX TopK).
    // Scores are never NaN (similarities are finite, the attributes are checked finite), so
    // (score, index) is a strict total order and the ranks are a permutation: order[] is all written.
    for (int32_t i = threadIdx.x; i < nA; i += blockDim.x)
    {
        float const si = score[i];
        int32_t rank = 0;
        for (int32_t j = 0; j < nA; ++j)
        {
            float const sj = score[j];
            rank += (sj > si) || (sj == si && j < i);
        }
        order[rank] = i;
    }
    __syncthreads();

    // 4. keep_index: protected, kept A by descending score, every B in order
    int32_t const keptA = nA - p.drop;
    int32_t const width = numTokens - p.drop;
    int64_t* out = keepIndex + static_cast<int64_t>(image) * width;
    for (int32_t pos = threadIdx.x; pos < width; pos += blockDim.x)
    {
        int64_t token;
        if (pos < p.numProtected)
        {
            token = pos;
        }
        else if (pos < p.numProtected + keptA)
        {
            token = p.numProtected + 2 * static_cast<int64_t>(order[p.drop + pos - p.numProtected]);
        }
        else
        {
            token = p.numProtected + 1 + 2 * static_cast<int64_t>(pos - p.numProtected - keptA);
        }
        out[pos] = token;
    }
    if (threadIdx.x == 0)
    {
        voteRows[image] = votedRows;
    }
}

template <typename T>
cudaError_t launch(void const* keys, int64_t* keepIndex, int64_t* voteRows, void* workspace, int32_t batch,
    int32_t numTokens, int32_t dim, SimilarityTopKParams const& p, cudaStream_t stream)
{
    int32_t const nA = (numTokens - p.numProtected + 1) / 2;
    size_t const sharedBytes = static_cast<size_t>(nA) * (sizeof(float) + sizeof(int32_t));
    similarityTopKKernel<T><<<batch, kThreads, sharedBytes, stream>>>(static_cast<T const*>(keys), keepIndex,
        voteRows, static_cast<double*>(workspace), numTokens, dim, p);
    return cudaGetLastError();
}

} // namespace

std::string similarityTopKParamsProblem(SimilarityTopKParams const& p)
{
    if (!std::isfinite(p.tau) || !std::isfinite(p.gamma) || p.numProtected < 0 || p.drop < 0 || p.voteK < 1)
    {
        return "SimilarityTopK: need num_protected >= 0, drop >= 0, vote_k >= 1 and finite tau and gamma";
    }
    return {};
}

std::string similarityTopKShapeProblem(int64_t numTokens, SimilarityTopKParams const& p)
{
    std::string problem = similarityTopKParamsProblem(p);
    if (!problem.empty())
    {
        return problem;
    }
    int64_t const n = numTokens - p.numProtected;
    int64_t const nA = (n + 1) / 2;
    if (n < 1 || p.drop > nA || n - p.drop < 1 || nA > kTopKLimit)
    {
        return "SimilarityTopK: " + std::to_string(numTokens) + " tokens with num_protected " + std::to_string(p.numProtected)
            + " leave n = " + std::to_string(n) + " patch tokens; drop " + std::to_string(p.drop)
            + " needs 1 <= n, drop <= ceil(n/2), n - drop >= 1 and ceil(n/2) <= " + std::to_string(kTopKLimit);
    }
    return {};
}

size_t similarityTopKWorkspaceSize(int32_t batch, int32_t numTokens)
{
    return static_cast<size_t>(batch) * static_cast<size_t>(numTokens) * sizeof(double);
}

cudaError_t launchSimilarityTopK(void const* keys, KeyType type, int64_t* keepIndex, int64_t* voteRows,
    void* workspace, int32_t batch, int32_t numTokens, int32_t dim, SimilarityTopKParams const& params,
    cudaStream_t stream)
{
    // Checked here too, whatever the caller checked: a drop the tokens cannot give reads order[]
    // past its end and writes indices outside the image.
    if (batch < 0 || dim < 1 || !similarityTopKShapeProblem(numTokens, params).empty())
    {
        return cudaErrorInvalidValue;
    }
    if (batch == 0)
    {
        return cudaSuccess;
    }
    switch (type)
    {
    case KeyType::kFLOAT32:
        return launch<float>(keys, keepIndex, voteRows, workspace, batch, numTokens, dim, params, stream);
    case KeyType::kFLOAT16:
        return launch<__half>(keys, keepIndex, voteRows, workspace, batch, numTokens, dim, params, stream);
    case KeyType::kBFLOAT16:
        return launch<__nv_bfloat16>(keys, keepIndex, voteRows, workspace, batch, numTokens, dim, params, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace saint
