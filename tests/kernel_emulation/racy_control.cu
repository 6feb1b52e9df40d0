// The sanitizer's control: a kernel with a deliberate data race (every thread adds to one shared
// counter without an atomic or a barrier). ThreadSanitizer must report it; if it does not, the
// detector is not working and a clean report on the real kernel proves nothing.
#include <cstdio>
#include <cuda_runtime_api.h>

__global__ void racyCount(int* out)
{
    __shared__ int counter;
    if (threadIdx.x == 0)
    {
        counter = 0;
    }
    __syncthreads();
    counter += 1;  // the race
    __syncthreads();
    if (threadIdx.x == 0)
    {
        *out = counter;
    }
}

int main()
{
    int count = 0;
    racyCount<<<1, 64>>>(&count);
    std::printf("%d\n", count);
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
