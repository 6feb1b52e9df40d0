// CUDA's execution model on the host, enough to run a kernel's source unchanged (bar the mechanical
// rewrite of its launch and its dynamic shared array, see kernel_emulation.py):
// - a launch runs its blocks one after another; a block is blockDim.x real threads (std::thread), so
//   a missing __syncthreads is a real data race that ThreadSanitizer reports;
// - __syncthreads is a barrier across the block's threads;
// - __shared__ variables are function statics: one copy for the block that runs (blocks never
//   overlap), and dynamic shared memory is one buffer, filled with 0xA5 garbage before every block so
//   that reading what the block did not write shows up as wrong results;
// - atomics are std::atomic_ref operations;
// - the launch checks what CUDA checks: at most 1024 threads a block and 48 KiB of dynamic shared
//   memory without an opt-in (cudaErrorInvalidConfiguration, then nothing runs).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

using std::isinf;
using std::isnan;

struct dim3
{
    unsigned x, y, z;
    dim3(long long x_ = 1, long long y_ = 1, long long z_ = 1)
        : x(static_cast<unsigned>(x_))
        , y(static_cast<unsigned>(y_))
        , z(static_cast<unsigned>(z_))
    {
    }
};

inline thread_local dim3 threadIdx{0};
inline thread_local dim3 blockIdx{0};
inline dim3 blockDim{1};
inline dim3 gridDim{1};

namespace cuda_emulation
{
constexpr size_t kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;
constexpr unsigned char kGarbage = 0xA5;

alignas(16) inline unsigned char dynamicShared[kMaxDynamicSharedBytes];
inline std::barrier<>* blockBarrier = nullptr;

struct Config
{
    dim3 grid;
    dim3 block;
    size_t sharedBytes = 0;
    cudaStream_t stream = nullptr;
};

template <typename... Params, typename... Args>
void launch(Config config, void (*kernel)(Params...), Args... args)
{
    size_t const threads = static_cast<size_t>(config.block.x) * config.block.y * config.block.z;
    size_t const blocks = static_cast<size_t>(config.grid.x) * config.grid.y * config.grid.z;
    if (config.block.y != 1 || config.block.z != 1 || config.grid.y != 1 || config.grid.z != 1)
    {
        lastError = cudaErrorInvalidValue;  // the emulation covers 1-D launches only
        return;
    }
    if (threads == 0 || blocks == 0 || threads > kMaxThreadsPerBlock || config.sharedBytes > kMaxDynamicSharedBytes)
    {
        lastError = cudaErrorInvalidConfiguration;
        return;
    }
    blockDim = config.block;
    gridDim = config.grid;
    std::memset(dynamicShared, kGarbage, sizeof dynamicShared);
    // Between blocks the last thread to arrive refills shared memory, before any thread starts the next.
    auto refill = []() noexcept { std::memset(dynamicShared, kGarbage, sizeof dynamicShared); };
    std::barrier betweenBlocks(static_cast<std::ptrdiff_t>(threads), refill);
    std::barrier<> sync(static_cast<std::ptrdiff_t>(threads));
    blockBarrier = &sync;
    std::vector<std::thread> pool;
    for (size_t t = 0; t < threads; ++t)
    {
        pool.emplace_back([&, t] {
            threadIdx = dim3(static_cast<long long>(t));
            for (size_t b = 0; b < blocks; ++b)
            {
                blockIdx = dim3(static_cast<long long>(b));
                kernel(args...);
                betweenBlocks.arrive_and_wait();
            }
        });
    }
    for (std::thread& thread : pool)
    {
        thread.join();
    }
    blockBarrier = nullptr;
}
} // namespace cuda_emulation

inline void __syncthreads()
{
    cuda_emulation::blockBarrier->arrive_and_wait();
}

inline int atomicAdd(int* address, int value)
{
    return std::atomic_ref<int>(*address).fetch_add(value);
}

inline unsigned atomicAdd(unsigned* address, unsigned value)
{
    return std::atomic_ref<unsigned>(*address).fetch_add(value);
}
