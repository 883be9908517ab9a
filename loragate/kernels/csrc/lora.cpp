// Batched multi-adapter LoRA for the CPU (the SGMV idea: one call for every adapter of the step).
//
// For each token t of each segment (start, length, slot, rank, scale) and each active slice s of
// the projection group:
//   u = x[t] @ A[slot, s, :rank, :]^T        (rounded to the storage type, as PEFT's lora_A output)
//   y[t, off_s:off_s+1] += scale * u @ B[slot, off_s:off_s+1, :rank]^T   (float32 sum, one rounding)
// which is what the torch reference (`loragate.kernels.lora_ref.add_lora_ref`) computes. The torch
// path spends most of a decode step's LoRA time in per-call costs: a gather of each adapter's A
// and B rows, a batched matmul for the shrink and one per slice for the expand, ~10 calls a layer
// whatever the rank. Here a token reads its adapter's rows in place and the work is a few small
// dot products; tokens are spread over OpenMP threads. Long segments (prefill of one adapter)
// stay with the torch path, whose matmuls reuse A and B across rows (the caller decides).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "isa.h"

namespace {

using namespace loragate;

struct Args {
    void* y;
    int64_t y_stride;
    const void* x;
    int64_t x_stride;
    const void* A;  // [num_slots, num_slices, max_rank, in_dim] contiguous
    const void* B;  // [num_slots, max_rank, out_dim] contiguous: B rank-major (see the wrapper)
    int64_t num_slots, num_slices, max_rank, in_dim, out_dim;
    const int64_t* slice_offsets;  // [num_slices + 1]
    const int64_t* active;         // slices to compute
    int64_t num_active;
    const int32_t *seg_start, *seg_len, *seg_slot, *seg_rank;
    const float* seg_scale;
    int64_t num_segments, max_len, num_tokens;
    int num_threads;
};

template <class S>
int add_lora(const Args& a) {
    using T = typename S::T;
    // validate everything that indexes memory before touching any of it
    for (int64_t g = 0; g < a.num_segments; ++g) {
        if (a.seg_slot[g] < 0 || a.seg_slot[g] >= a.num_slots || a.seg_rank[g] < 0 || a.seg_rank[g] > a.max_rank ||
            a.seg_start[g] < 0 || a.seg_len[g] < 0 || int64_t{a.seg_start[g]} + a.seg_len[g] > a.num_tokens)
            return -2;
    }
    for (int64_t j = 0; j < a.num_active; ++j)
        if (a.active[j] < 0 || a.active[j] >= a.num_slices) return -2;
    for (int64_t s = 0; s < a.num_slices; ++s)
        if (a.slice_offsets[s] < 0 || a.slice_offsets[s] > a.slice_offsets[s + 1] || a.slice_offsets[s + 1] > a.out_dim)
            return -2;

    // the tokens this call handles (segments up to max_len), flattened so threads share them evenly
    std::vector<std::pair<int64_t, int64_t>> work;  // (segment, token)
    for (int64_t g = 0; g < a.num_segments; ++g)
        if (a.seg_len[g] <= a.max_len && a.seg_rank[g] > 0)
            for (int64_t t = a.seg_start[g]; t < a.seg_start[g] + a.seg_len[g]; ++t) work.emplace_back(g, t);

    const T* A = static_cast<const T*>(a.A);
    const T* B = static_cast<const T*>(a.B);
    const T* X = static_cast<const T*>(a.x);
    T* Y = static_cast<T*>(a.y);
    const int64_t n_work = static_cast<int64_t>(work.size());
    const int64_t R = a.max_rank, K = a.in_dim, N = a.out_dim;
#pragma omp parallel num_threads(a.num_threads) if (n_work >= 4)
    {
        std::vector<float> acc(N);
#pragma omp for schedule(static)
        for (int64_t w = 0; w < n_work; ++w) {
            const int64_t g = work[w].first, t = work[w].second;
            const int64_t slot = a.seg_slot[g], rank = a.seg_rank[g];
            const float scale = a.seg_scale[g];
            const T* x = X + t * a.x_stride;
            T* y = Y + t * a.y_stride;
            float u[256];  // rank <= max_rank <= 256 (checked at entry)
            for (int64_t j = 0; j < a.num_active; ++j) {
                const int64_t s = a.active[j];
                const int64_t o0 = a.slice_offsets[s], o1 = a.slice_offsets[s + 1];
                if (o1 == o0) continue;
                // shrink: u = x . A rows, a dot product over the input width per rank row
                const T* As = A + ((slot * a.num_slices + s) * R) * K;
                for (int64_t r = 0; r < rank; ++r) {
                    const T* ar = As + r * K;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t k = 0; k < K; ++k) dot += S::load(x[k]) * S::load(ar[k]);
                    u[r] = S::load(S::store(dot));
                }
                // expand: rank-many vector axpys over the slice's outputs (B is rank-major), then
                // one rounding into y
                const T* Bs = B + slot * R * N;
                float* acc_s = acc.data() + o0;
                const int64_t width = o1 - o0;
#pragma omp simd
                for (int64_t n = 0; n < width; ++n) acc_s[n] = 0.0f;
                for (int64_t r = 0; r < rank; ++r) {
                    const T* br = Bs + r * N + o0;
                    const float ur = u[r];
#pragma omp simd
                    for (int64_t n = 0; n < width; ++n) acc_s[n] += ur * S::load(br[n]);
                }
                T* ys = y + o0;
#pragma omp simd
                for (int64_t n = 0; n < width; ++n) ys[n] = S::store(S::load(ys[n]) + scale * acc_s[n]);
            }
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// dtype codes as loragate::with_storage; segment arrays as LoraBatchLayout keeps them (int32,
// scales float32). Segments longer than max_len are skipped (left to the caller). Returns 0; -1
// for an unknown dtype; -2 for a segment, slice or offset outside the buffers (nothing written).
int loragate_add_lora(int dtype, void* y, int64_t y_stride, const void* x, int64_t x_stride, const void* A,
                      const void* B, int64_t num_slots, int64_t num_slices, int64_t max_rank, int64_t in_dim,
                      int64_t out_dim, const int64_t* slice_offsets, const int64_t* active, int64_t num_active,
                      const int32_t* seg_start, const int32_t* seg_len, const int32_t* seg_slot,
                      const int32_t* seg_rank, const float* seg_scale, int64_t num_segments, int64_t max_len,
                      int64_t num_tokens, int num_threads) {
    if (max_rank > 256) return -2;
    const Args args{y,           y_stride,  x,         x_stride,  A,         B,         num_slots,
                    num_slices,  max_rank,  in_dim,    out_dim,   slice_offsets, active, num_active,
                    seg_start,   seg_len,   seg_slot,  seg_rank,  seg_scale, num_segments, max_len,
                    num_tokens,  num_threads};
    return with_storage(dtype, [&](auto storage) { return add_lora<decltype(storage)>(args); });
}

}  // extern "C"
