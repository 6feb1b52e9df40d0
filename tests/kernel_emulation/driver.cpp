// Runs the SimilarityTopK kernel source (rewritten only at its launch, see kernel_emulation.py) on
// the host for every case on stdin, through the same launcher the TensorRT plugin calls.
//
// stdin, per case (little-endian): int32 type (0 fp32, 1 fp16, 2 bf16), batch, numTokens, dim,
// numProtected, drop, voteK; float32 tau, gamma; then the keys [batch, numTokens, dim] as raw bits.
// stdout, per case: int32 status (a cudaError_t), then keepIndex [batch, numTokens - drop] and
// voteRows [batch] as int64, pre-filled with kUnwritten so that entries the kernel never wrote show.
#include SAINT_KERNEL_SOURCE

#include <cstdio>
#include <vector>

namespace
{
constexpr int64_t kUnwritten = -7777;

template <typename T>
bool readAll(T* data, size_t count)
{
    return std::fread(data, sizeof(T), count, stdin) == count;
}

template <typename T>
void writeAll(T const* data, size_t count)
{
    std::fwrite(data, sizeof(T), count, stdout);
}
} // namespace

int main()
{
    int32_t header[7];
    float floats[2];
    while (readAll(header, 7) && readAll(floats, 2))
    {
        int32_t const type = header[0], batch = header[1], numTokens = header[2], dim = header[3];
        saint::SimilarityTopKParams const params{header[4], header[5], floats[0], header[6], floats[1]};
        size_t const elementBytes = type == 0 ? 4 : 2;
        std::vector<unsigned char> keys(static_cast<size_t>(batch) * numTokens * dim * elementBytes);
        if (!readAll(keys.data(), keys.size()))
        {
            std::fprintf(stderr, "truncated keys\n");
            return 2;
        }
        size_t const width = numTokens > params.drop ? static_cast<size_t>(numTokens - params.drop) : 0;
        std::vector<int64_t> keepIndex(static_cast<size_t>(batch) * width, kUnwritten);
        std::vector<int64_t> voteRows(static_cast<size_t>(batch), kUnwritten);
        std::vector<unsigned char> workspace(saint::similarityTopKWorkspaceSize(batch, numTokens));
        int32_t const status = saint::launchSimilarityTopK(keys.data(), static_cast<saint::KeyType>(type),
            keepIndex.data(), voteRows.data(), workspace.data(), batch, numTokens, dim, params, nullptr);
        writeAll(&status, 1);
        writeAll(keepIndex.data(), keepIndex.size());
        writeAll(voteRows.data(), voteRows.size());
        std::fflush(stdout);
    }
    return 0;
}
