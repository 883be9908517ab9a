// The vector path a kernel library is compiled for, chosen at build time by the compiler flags
// (loragate/kernels/native.py passes -march=native, so the host's own CPU decides; LORAGATE_CPU_ISA
// forces a lower level for tests and for hosts whose compiler mis-detects):
//   avx512    AVX-512 F/BW/VL: 16 floats a register
//   avx2      AVX2 + FMA + F16C (x86-64-v3): 8 floats a register
//   portable  neither: plain C++ that the compiler vectorises for what it has (SSE2, NEON, ...)
// Kernels with hand-written vector code write it once against `VecF` below (defined for avx512
// and avx2) and keep a plain-loop form for portable; everything else is `omp simd` loops that the
// compiler vectorises at whichever width the flags allow.
//
// Included once per library (each kernel file is its own library): it also defines the two C
// functions native.py calls after loading one, to name its path and to check that this CPU can
// run it before any kernel executes.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LORAGATE_VEC_AVX512 1
#define LORAGATE_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LORAGATE_VEC_AVX2 1
#define LORAGATE_ISA_NAME "avx2"
#else
#define LORAGATE_ISA_NAME "portable"
#endif

#if defined(LORAGATE_VEC_AVX512) || defined(LORAGATE_VEC_AVX2)
#define LORAGATE_HAS_VEC 1
#include <immintrin.h>
#endif

namespace loragate {

#if defined(LORAGATE_VEC_AVX512)
// A register of float32 lanes, loaded from any storage type (converted on load).
struct VecF {
    static constexpr int kWidth = 16;
    __m512 v;
    static inline VecF zero() { return {_mm512_setzero_ps()}; }
    static inline VecF set1(float x) { return {_mm512_set1_ps(x)}; }
    static inline VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
    static inline VecF load(const uint16_t* p) {  // bfloat16: the high half of a float32
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
    }
    static inline VecF load(const _Float16* p) {
        return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
    }
    inline void store(float* p) const { _mm512_storeu_ps(p, v); }
    inline float sum() const { return _mm512_reduce_add_ps(v); }
};
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
#elif defined(LORAGATE_VEC_AVX2)
struct VecF {
    static constexpr int kWidth = 8;
    __m256 v;
    static inline VecF zero() { return {_mm256_setzero_ps()}; }
    static inline VecF set1(float x) { return {_mm256_set1_ps(x)}; }
    static inline VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
    static inline VecF load(const uint16_t* p) {  // bfloat16: the high half of a float32
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
    }
    static inline VecF load(const _Float16* p) {
        return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
    }
    inline void store(float* p) const { _mm256_storeu_ps(p, v); }
    inline float sum() const {
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
    }
};
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
#endif

}  // namespace loragate

extern "C" {

// The path this library was compiled for: "avx512", "avx2" or "portable".
const char* loragate_isa() { return LORAGATE_ISA_NAME; }

// 1 when this CPU has every instruction set the library's path uses, else 0: native.py asks
// before the first kernel call, so a library built for a bigger CPU (a forced LORAGATE_CPU_ISA,
// a cache copied between hosts) is refused instead of dying of an illegal instruction. Compiled
// for the baseline of the architecture, whatever the library's flags, so this function itself
// runs anywhere.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("arch=x86-64")))
#endif
int loragate_cpu_supported() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#if defined(LORAGATE_VEC_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2")
#if defined(__AVX512BF16__)
           && __builtin_cpu_supports("avx512bf16")  // a library that uses bf16 dot products (chunk_attention)
#endif
        ;
#elif defined(LORAGATE_VEC_AVX2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#else
    return 1;
#endif
#else
    return 1;
#endif
}

}  // extern "C"
