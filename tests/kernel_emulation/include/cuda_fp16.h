// Host stand-in for cuda_fp16.h: __half as its 16 bits, widened exactly (denormals, ±Inf and NaN
// included) as the device's __half2float does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half
{
    uint16_t bits;
};

inline float __half2float(__half h)
{
    uint32_t const sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
    uint32_t const exponent = (h.bits >> 10) & 0x1fu;
    uint32_t const mantissa = h.bits & 0x3ffu;
    if (exponent == 0)  // zero or subnormal: mantissa · 2^-24, exact in fp32
    {
        float const magnitude = std::ldexp(static_cast<float>(mantissa), -24);
        return sign ? -magnitude : magnitude;
    }
    uint32_t const bits = exponent == 0x1fu ? sign | 0x7f800000u | (mantissa << 13)
                                            : sign | ((exponent + 112u) << 23) | (mantissa << 13);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
