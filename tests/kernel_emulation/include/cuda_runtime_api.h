// Host stand-in for CUDA's runtime API header: the error codes and the stream handle the kernel's
// launcher uses (saint-export's kernel emulation, docs/operator.md).
#pragma once

#include <cstddef>

enum cudaError_t
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
};

using cudaStream_t = struct CUstream_st*;

namespace cuda_emulation
{
inline cudaError_t lastError = cudaSuccess;
}

//! Returns and clears the last launch error, as CUDA's does.
inline cudaError_t cudaGetLastError()
{
    cudaError_t const error = cuda_emulation::lastError;
    cuda_emulation::lastError = cudaSuccess;
    return error;
}

inline char const* cudaGetErrorString(cudaError_t error)
{
    switch (error)
    {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    }
    return "unknown error";
}

#include "cuda_host.h"
