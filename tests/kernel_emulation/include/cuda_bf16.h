// Host stand-in for cuda_bf16.h: __nv_bfloat16 as its 16 bits, the top half of an fp32.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16
{
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h)
{
    uint32_t const bits = static_cast<uint32_t>(h.bits) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
