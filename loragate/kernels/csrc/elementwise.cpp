// The decoder layer's small row-wise ops, one pass each, for the CPU: residual add + RMSNorm,
// SiLU(gate) * up, rotary embedding in place; and the greedy sampler's argmax over the logits.
//
// In torch each of these is several kernels (a decode step of a 30-layer model makes ~400 such
// calls), and at decode shapes a call's fixed cost is larger than its arithmetic. Every op rounds
// where transformers' Llama code rounds (to the storage type after each torch op it makes), so
// bfloat16 results match the torch path except for float32 summation order inside a norm.
//
// Rows are spread over OpenMP threads only when there are enough of them to pay for the fork
// (a few dozen rows of a model's width); a small decode step runs on the calling thread.
#include <cstdint>
#include <cstring>

#include "common.h"
#include "isa.h"

namespace {

using namespace loragate;

constexpr int64_t kParallelElements = 1 << 14;

template <class S>
inline float round_trip(float x) {  // x as the storage type would hold it
    return S::load(S::store(x));
}

// h += delta (when given), then out = weight * (h / sqrt(mean(h^2) + eps)), as transformers'
// LlamaRMSNorm: statistics in float32, the normalised row rounded to the storage type before the
// weight multiplies it.
template <class S>
void add_rms_norm(typename S::T* h, int64_t h_stride, const typename S::T* delta, int64_t delta_stride,
                  const typename S::T* weight, typename S::T* out, int64_t out_stride, int64_t rows, int64_t dim,
                  float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= kParallelElements) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        typename S::T* x = h + r * h_stride;
        if (delta != nullptr) {
            const typename S::T* d = delta + r * delta_stride;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) x[i] = S::store(S::load(x[i]) + S::load(d[i]));
        }
        float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < dim; ++i) sq += S::load(x[i]) * S::load(x[i]);
        const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(dim) + eps);
        typename S::T* o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = S::store(S::load(weight[i]) * round_trip<S>(S::load(x[i]) * rstd));
    }
}

inline float silu(float x) {  // x * sigmoid(x), with exp of a non-positive argument only
    const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|) in (0, 1]
    return x * (x >= 0.0f ? 1.0f : e) / (1.0f + e);  // one division: it, not exp, bounds the loop
}

// out[r, i] = silu(gu[r, i]) * gu[r, dim + i]: gate and up side by side in one projection output.
template <class S>
void silu_mul(const typename S::T* gu, int64_t gu_stride, typename S::T* out, int64_t out_stride, int64_t rows,
              int64_t dim, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= kParallelElements) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const typename S::T* gate = gu + r * gu_stride;
        const typename S::T* up = gate + dim;
        typename S::T* o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = S::store(round_trip<S>(silu(S::load(gate[i]))) * S::load(up[i]));
    }
}

// In place, for every token t and head h of x [rows, heads, head_dim] (token rows x_stride
// apart, heads contiguous): x = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], with
// cos and sin [positions, head_dim / 2] rows of the table (in the storage type, as transformers
// casts them) picked by the token's position.
template <class S>
void rope(typename S::T* x, int64_t x_stride, int64_t rows, int64_t heads, int64_t head_dim,
          const int64_t* positions, const typename S::T* cos, const typename S::T* sin, int64_t max_position,
          int* failed, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (rows * heads * head_dim >= kParallelElements) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = positions[r];
        if (p < 0 || p >= max_position) {
#pragma omp atomic write
            *failed = 1;
            continue;
        }
        const typename S::T* c = cos + p * half;
        const typename S::T* s = sin + p * half;
        for (int64_t h = 0; h < heads; ++h) {
            typename S::T* x1 = x + r * x_stride + h * head_dim;
            typename S::T* x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float a = S::load(x1[i]), b = S::load(x2[i]), ci = S::load(c[i]), si = S::load(s[i]);
                x1[i] = S::store(round_trip<S>(a * ci) + round_trip<S>(-b * si));
                x2[i] = S::store(round_trip<S>(b * ci) + round_trip<S>(a * si));
            }
        }
    }
}

// out[r] = index of the first maximum of row r of x [rows, cols] (rows x_stride apart), as
// torch.argmax answers: the first NaN if the row has one. One pass over the row in chunks of 64:
// a chunk whose maximum beats the best so far is remembered, and only that chunk is scanned for
// the position at the end (a strict > keeps the first chunk that reaches the maximum).
template <class S>
void argmax_rows(const typename S::T* x, int64_t x_stride, int64_t rows, int64_t cols, int64_t* out,
                 int num_threads) {
    constexpr int64_t kChunk = 64;
#pragma omp parallel for num_threads(num_threads) if (rows * cols >= 4 * kParallelElements) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const typename S::T* row = x + r * x_stride;
        float best = -INFINITY;
        int64_t best_chunk = 0;
        bool nan = false;
        int64_t c = 0;
        for (; c + kChunk <= cols; c += kChunk) {
            float m = -INFINITY;
            uint32_t top_bits = 0;
#pragma omp simd reduction(max : m, top_bits)
            for (int64_t i = 0; i < kChunk; ++i) {
                const float v = S::load(row[c + i]);
                m = v > m ? v : m;
                const uint32_t b = S::abs_bits(row[c + i]);
                top_bits = b > top_bits ? b : top_bits;
            }
            if (top_bits > S::kNanAbove) {
                nan = true;
                break;
            }
            if (m > best) {
                best = m;
                best_chunk = c;
            }
        }
        int64_t found = -1;
        if (nan) {  // the first NaN, wherever it is
            for (int64_t i = 0; i < cols && found < 0; ++i)
                if (S::load(row[i]) != S::load(row[i])) found = i;
        } else {
            for (int64_t i = c; i < cols; ++i) {  // the tail past the last whole chunk
                const float v = S::load(row[i]);
                if (v != v) {
                    found = i;
                    break;
                }
                if (v > best) {
                    best = v;
                    best_chunk = i;
                    found = i;
                }
            }
            if (found < 0) {  // the maximum lies in best_chunk: its first occurrence there
                found = best_chunk;
                for (int64_t i = best_chunk; i < best_chunk + kChunk && i < cols; ++i)
                    if (S::load(row[i]) == best) {
                        found = i;
                        break;
                    }
            }
        }
        out[r] = found;
    }
}

}  // namespace

extern "C" {

// dtype codes as loragate::with_storage. Strides are in elements; the last dim is contiguous.
// delta may be null (norm only). Returns 0, or -1 for an unknown dtype.
int loragate_add_rms_norm(int dtype, void* h, int64_t h_stride, const void* delta, int64_t delta_stride,
                          const void* weight, void* out, int64_t out_stride, int64_t rows, int64_t dim, float eps,
                          int num_threads) {
    return with_storage(dtype, [&](auto storage) {
        using S = decltype(storage);
        using T = typename S::T;
        add_rms_norm<S>(static_cast<T*>(h), h_stride, static_cast<const T*>(delta), delta_stride,
                        static_cast<const T*>(weight), static_cast<T*>(out), out_stride, rows, dim, eps, num_threads);
        return 0;
    });
}

int loragate_silu_mul(int dtype, const void* gu, int64_t gu_stride, void* out, int64_t out_stride, int64_t rows,
                      int64_t dim, int num_threads) {
    return with_storage(dtype, [&](auto storage) {
        using S = decltype(storage);
        using T = typename S::T;
        silu_mul<S>(static_cast<const T*>(gu), gu_stride, static_cast<T*>(out), out_stride, rows, dim, num_threads);
        return 0;
    });
}

// Returns 0; -1 for an unknown dtype; -2 when a position lies outside the table (those tokens
// are left as they were).
int loragate_rope(int dtype, void* x, int64_t x_stride, int64_t rows, int64_t heads, int64_t head_dim,
                  const int64_t* positions, const void* cos, const void* sin, int64_t max_position, int num_threads) {
    int failed = 0;
    const int rc = with_storage(dtype, [&](auto storage) {
        using S = decltype(storage);
        using T = typename S::T;
        rope<S>(static_cast<T*>(x), x_stride, rows, heads, head_dim, positions, static_cast<const T*>(cos),
                static_cast<const T*>(sin), max_position, &failed, num_threads);
        return 0;
    });
    return rc != 0 ? rc : (failed ? -2 : 0);
}

// Returns 0, or -1 for an unknown dtype.
int loragate_argmax_rows(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t cols, int64_t* out,
                         int num_threads) {
    return with_storage(dtype, [&](auto storage) {
        using S = decltype(storage);
        argmax_rows<S>(static_cast<const typename S::T*>(x), x_stride, rows, cols, out, num_threads);
        return 0;
    });
}

}  // extern "C"
