// Shared by the native CPU kernels: storage types (float32, bfloat16, float16) loaded to and
// stored from float32, and a vectorisable exp. Header-only; each kernel file is its own library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace loragate {

// Each storage type also gives the bits of |x| and the value above which those bits are a NaN:
// a NaN test that vectorises as an integer max (float compares of NaN do not reduce).
struct F32 {
    using T = float;
    static constexpr uint32_t kNanAbove = 0x7f800000u;
    static inline float load(T x) { return x; }
    static inline T store(float f) { return f; }
    static inline uint32_t abs_bits(T x) {
        uint32_t u;
        std::memcpy(&u, &x, 4);
        return u & 0x7fffffffu;
    }
};

struct BF16 {
    using T = uint16_t;
    static constexpr uint32_t kNanAbove = 0x7f80u;
    static inline uint32_t abs_bits(T x) { return x & 0x7fffu; }
    static inline float load(T x) {
        uint32_t u = static_cast<uint32_t>(x) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static inline T store(float f) {  // round to nearest even, as torch converts
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<T>((u >> 16) | 0x40u);  // quiet NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return static_cast<T>(u >> 16);
    }
};

struct F16 {
    using T = _Float16;
    static constexpr uint32_t kNanAbove = 0x7c00u;
    static inline uint32_t abs_bits(T x) {
        uint16_t u;
        std::memcpy(&u, &x, 2);
        return u & 0x7fffu;
    }
    static inline float load(T x) { return static_cast<float>(x); }
    static inline T store(float f) { return static_cast<T>(f); }
};

// exp for x <= 0 (scores minus their max), in plain arithmetic so that loops calling it
// vectorise once it is inlined: 2^n * p(r), r in [-ln2/2, ln2/2], degree-6 polynomial (relative
// error ~2e-7, below float32's own rounding of the inputs). n is rounded with the 1.5 * 2^23
// trick rather than nearbyint, which would keep the loop scalar.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
    const float n = (x * 1.44269504088896341f + kRound) - kRound;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

// Calls a functor templated on the storage type named by a dtype code (0 float32, 1 bfloat16,
// 2 float16); -1 for an unknown code.
template <class Fn>
int with_storage(int dtype, Fn&& fn) {
    switch (dtype) {
        case 0: return fn(F32{});
        case 1: return fn(BF16{});
        case 2: return fn(F16{});
        default: return -1;
    }
}

}  // namespace loragate
