// Decode attention over a paged KV cache, fused, for the CPU.
//
// One query token per sequence attends to its cached context, read in place through its slot
// index: no gathered copy of the context, no padded score matrix, no mask. The torch reference
// (`loragate.engine.model.attention.decode_attention_torch`) gathers the context, runs two batched
// matmuls and a softmax: at decode shapes each of those calls costs more in set-up than its work,
// and the gather copies every cached key and value once more per layer.
//
// Work item = (sequence, KV head): its g = Hq / Hk query heads share every key and value row
// loaded, which is read once for the scores and once for the weighted sum. Math is float32
// whatever the storage type (float32, bfloat16, float16). Items are spread over threads with
// OpenMP; the library is loaded into a process where torch's libgomp is already loaded, so the
// two share one thread pool.
//
// Built on first use by loragate/kernels/native.py (plain C ABI, loaded with ctypes).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "isa.h"

namespace {

using namespace loragate;

// scores[j] = exp(scores[j] - mx) for the row's maximum mx: the softmax's numerators; returns
// their sum, the denominator.
inline float exp_shifted(float* __restrict scores, int64_t n, float mx) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
        scores[j] = exp_nonpositive(scores[j] - mx);
        sum += scores[j];
    }
    return sum;
}

// One query head against n context rows: softmax(q . k_j) weighted sum of v_j into out_row.
// Portable form, vectorised by the compiler over head_dim.
template <class S>
inline void attend_head(const float* __restrict q_scaled, const typename S::T* keys, const typename S::T* values,
                        const int64_t* idx, int64_t n, int64_t D, float* __restrict scores, float* __restrict row,
                        float* __restrict acc, typename S::T* out_row) {
    using T = typename S::T;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        const T* k = keys + idx[j] * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] = S::load(k[d]);
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += q_scaled[d] * row[d];
        scores[j] = s;
        mx = s > mx ? s : mx;
    }
    const float sum = exp_shifted(scores, n, mx);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const T* v = values + idx[j] * D;
        const float p = scores[j];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] = S::load(v[d]);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * row[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; ++d) out_row[d] = S::store(acc[d] * inv);
}

#ifdef LORAGATE_HAS_VEC
// The same for head_dim = VecF::kWidth * kChunks (64 or 128: 4 or 8 AVX-512 registers, 8 or 16
// AVX2 ones), with the query and the accumulator held in registers across the context's rows.
template <class S, int kChunks>
inline void attend_head_vec(const float* __restrict q_scaled, const typename S::T* keys, const typename S::T* values,
                            const int64_t* idx, int64_t n, float* __restrict scores, typename S::T* out_row) {
    constexpr int64_t W = VecF::kWidth, D = W * kChunks;
    VecF qv[kChunks], acc[kChunks];
    for (int c = 0; c < kChunks; ++c) qv[c] = VecF::load(q_scaled + W * c);
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        const typename S::T* k = keys + idx[j] * D;
        VecF s = qv[0] * VecF::load(k);
        for (int c = 1; c < kChunks; ++c) s = fmadd(qv[c], VecF::load(k + W * c), s);
        const float sj = s.sum();
        scores[j] = sj;
        mx = sj > mx ? sj : mx;
    }
    const float sum = exp_shifted(scores, n, mx);
    for (int c = 0; c < kChunks; ++c) acc[c] = VecF::zero();
    for (int64_t j = 0; j < n; ++j) {
        const typename S::T* v = values + idx[j] * D;
        const VecF p = VecF::set1(scores[j]);
        for (int c = 0; c < kChunks; ++c) acc[c] = fmadd(p, VecF::load(v + W * c), acc[c]);
    }
    alignas(64) float tmp[D];
    const VecF inv = VecF::set1(1.0f / sum);
    for (int c = 0; c < kChunks; ++c) (acc[c] * inv).store(tmp + W * c);
    for (int64_t d = 0; d < D; ++d) out_row[d] = S::store(tmp[d]);
}
#endif

// One call's arguments (see loragate_decode_attention).
struct Args {
    const void* q;
    int64_t q_stride;
    void* cache;
    int64_t num_slots;
    const void* new_kv;
    int64_t new_kv_stride;
    const int64_t* slot_mapping;
    int64_t num_new;
    const int64_t* kv_index;
    int64_t index_stride;
    const int64_t* lens;
    void* out;
    int64_t batch, num_q_heads, num_kv_heads, head_dim;
    float scale;
    int num_threads;
};

template <class S, int64_t kHeadDim>
int decode_attention(const Args& a) {
    using T = typename S::T;
    const T* q = static_cast<const T*>(a.q);
    T* cache = static_cast<T*>(a.cache);
    const T* new_kv = static_cast<const T*>(a.new_kv);
    T* out = static_cast<T*>(a.out);
    const int64_t Hk = a.num_kv_heads, Hq = a.num_q_heads, g = Hq / Hk, D = a.head_dim;
    const int64_t items = a.batch * Hk;
    int failed = 0;
#pragma omp parallel num_threads(a.num_threads)
    {
        // this step's keys and values first (the implicit barrier of the loop orders the reads after)
#pragma omp for schedule(static)
        for (int64_t t = 0; t < a.num_new; ++t) {
            const int64_t slot = a.slot_mapping[t];
            if (slot < 0 || slot >= a.num_slots) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            for (int64_t hh = 0; hh < 2 * Hk; ++hh)
                std::memcpy(cache + (hh * a.num_slots + slot) * D, new_kv + t * a.new_kv_stride + hh * D, D * sizeof(T));
        }
        std::vector<float> qf(D), acc(D), row(D), scores;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t b = item / Hk, h = item % Hk;
            const int64_t n = a.lens[b];
            const int64_t* idx = a.kv_index + b * a.index_stride;
            // a bad index would read outside the cache: refuse it (one compare per row, off the math)
            bool valid = n >= 0 && n <= a.index_stride;
            for (int64_t j = 0; valid && j < n; ++j) valid = idx[j] >= 0 && idx[j] < a.num_slots;
            if (!valid) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            T* ob = out + (b * Hq + h * g) * D;
            if (n == 0) {  // nothing to attend to: zeros, not the 0/0 of an empty softmax
                for (int64_t i = 0; i < g * D; ++i) ob[i] = S::store(0.0f);
                continue;
            }
            if (static_cast<int64_t>(scores.size()) < n) scores.resize(n);
            const T* keys = cache + h * a.num_slots * D;
            const T* values = cache + (Hk + h) * a.num_slots * D;
            // the g query heads of a KV head run one after another: the item's rows stay in L1
            for (int64_t i = h * g; i < (h + 1) * g; ++i) {
                const T* qi = q + b * a.q_stride + i * D;
                T* oi = out + (b * Hq + i) * D;
                for (int64_t d = 0; d < D; ++d) qf[d] = S::load(qi[d]) * a.scale;
#ifdef LORAGATE_HAS_VEC
                if constexpr (kHeadDim == 64 || kHeadDim == 128) {
                    attend_head_vec<S, kHeadDim / VecF::kWidth>(qf.data(), keys, values, idx, n, scores.data(), oi);
                    continue;
                }
#endif
                attend_head<S>(qf.data(), keys, values, idx, n, D, scores.data(), row.data(), acc.data(), oi);
            }
        }
    }
    return failed ? -2 : 0;
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16. Shapes: q [batch, num_q_heads, head_dim] with rows
// q_stride elements apart (heads contiguous); cache [2 * num_kv_heads, num_slots, head_dim] (keys,
// then values); new_kv [num_new, 2 * num_kv_heads, head_dim] with rows new_kv_stride elements apart,
// written to cache slots slot_mapping[t] before attending (num_new may be 0); kv_index [batch,
// index_stride] cache slots, of which the first lens[b] are read; out [batch, num_q_heads,
// head_dim] contiguous. Returns 0; -1 for an unknown dtype; -2 when a length exceeds index_stride
// or a slot lies outside the cache (the rows concerned are left unwritten).
int loragate_decode_attention(int dtype, const void* q, int64_t q_stride, void* cache, int64_t num_slots,
                              const void* new_kv, int64_t new_kv_stride, const int64_t* slot_mapping, int64_t num_new,
                              const int64_t* kv_index, int64_t index_stride, const int64_t* lens, void* out,
                              int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                              int num_threads) {
    const Args args{q,        q_stride,     cache, num_slots, new_kv,      new_kv_stride, slot_mapping,
                    num_new,  kv_index,     index_stride, lens, out,       batch,         num_q_heads,
                    num_kv_heads, head_dim, scale, num_threads};
    return with_storage(dtype, [&](auto storage) {
        using S = decltype(storage);
        if (head_dim == 64) return decode_attention<S, 64>(args);
        if (head_dim == 128) return decode_attention<S, 128>(args);
        return decode_attention<S, 0>(args);
    });
}

}  // extern "C"
