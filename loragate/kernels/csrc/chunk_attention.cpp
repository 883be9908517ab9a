// Attention of short prompt chunks over a paged KV cache, fused, for the CPU in bfloat16.
//
// With prefix caching a burst of requests puts dozens of chunks of a few dozen tokens into one
// step, each over a cached context of a thousand tokens or more. The torch path
// (`loragate.engine.model.chunk_attention.attend_group`) gathers every context into a padded copy,
// then runs a score matmul, a mask, a softmax and a second matmul, each a pass over a score tensor
// of (tokens x heads x context) elements; profiled on a 2-core AVX-512 host those passes and the
// gather took as long as the two matmuls. Here one pass does it all, flash-attention style: the
// scores of a block of keys are computed, masked, exponentiated against a running maximum and
// multiplied into the output while they are still in the first-level cache, and keys and values are
// read in place through the chunk's slot index.
//
// Work item = (chunk, KV head, block of 32 query rows). The rows are the chunk's (token, query head)
// pairs of that KV head, token-major, so the g query heads sharing a KV head share every key and
// value loaded (GQA without repeating keys). Everything runs "lanes over rows": one vector holds
// one column of 16 rows, so the running max, the sum and the rescaling are plain vertical
// operations and no score is ever transposed. Both products are bf16 pair dot products
// (AVX-512 BF16 `vdpbf16ps`, fp32 accumulation): a query row's pair of dims against a key's
// broadcast pair for the scores, a row's pair of probabilities (rounded to bf16, as torch's bf16
// softmax output is) against a value's broadcast pair of keys for the output. Other AVX-512 hosts
// emulate the pair product with two FMAs, other hosts with plain loops: same algorithm and the
// same rounding, so the kernel is tested everywhere; the engine uses it where it is fast (see
// `loragate_chunk_attention_path`).
//
// Built on first use by loragate/kernels/native.py (plain C ABI, loaded with ctypes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "isa.h"

#if defined(LORAGATE_VEC_AVX512) && defined(__AVX512BF16__)
#define LORAGATE_CHUNK_PATH "avx512-bf16"
#elif defined(LORAGATE_VEC_AVX512)
#define LORAGATE_CHUNK_PATH "avx512"
#else
#define LORAGATE_CHUNK_PATH "portable"
#endif

namespace {

using namespace loragate;

constexpr int64_t kLanes = 16;      // query rows per vector
constexpr int64_t kRowBlock = 32;   // query rows per work item (two vectors)
constexpr int64_t kKeyBlock = 64;   // keys per softmax block: scores stay in L1 between the passes
constexpr int64_t kKeyTile = 8;     // keys per score micro-tile (8 x 2 accumulators)
constexpr int64_t kDimTile = 8;     // head dims per output micro-tile (8 x 2 accumulators)
constexpr int64_t kMaxHeadDim = 256;

// bf16 bits of a float, rounded to nearest even (probabilities: never NaN or inf)
inline uint32_t bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

inline float bf16_lo(uint32_t pair) {
    const uint32_t u = pair << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float bf16_hi(uint32_t pair) {
    const uint32_t u = pair & 0xffff0000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

#if defined(LORAGATE_VEC_AVX512)
// acc[l] += a[l].lo * b.lo + a[l].hi * b.hi, for 16 lanes of bf16 pairs and a broadcast pair b
inline __m512 pair_dot(__m512 acc, __m512i a, uint32_t b) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)_mm512_set1_epi32(static_cast<int>(b)));
#else
    const __m512 alo = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
    const __m512 ahi = _mm512_castsi512_ps(_mm512_and_si512(a, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    return _mm512_fmadd_ps(ahi, _mm512_set1_ps(bf16_hi(b)), _mm512_fmadd_ps(alo, _mm512_set1_ps(bf16_lo(b)), acc));
#endif
}

// s[j][0:32] = sum_p qp[p][0:32] . key_j[p] for kKeyTile keys (s rows kRowBlock apart)
inline void score_tile(const uint32_t* qp, const uint32_t* const* keys, int64_t pairs, float* s) {
    __m512 acc[kKeyTile][2];
    for (int64_t j = 0; j < kKeyTile; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        const __m512i a0 = _mm512_loadu_si512(qp + p * kRowBlock);
        const __m512i a1 = _mm512_loadu_si512(qp + p * kRowBlock + kLanes);
        for (int64_t j = 0; j < kKeyTile; ++j) {
            const uint32_t b = keys[j][p];
            acc[j][0] = pair_dot(acc[j][0], a0, b);
            acc[j][1] = pair_dot(acc[j][1], a1, b);
        }
    }
    for (int64_t j = 0; j < kKeyTile; ++j) {
        _mm512_storeu_ps(s + j * kRowBlock, acc[j][0]);
        _mm512_storeu_ps(s + j * kRowBlock + kLanes, acc[j][1]);
    }
}

// o[d][0:32] += sum_jp pp[jp][0:32] . vp[jp][d] for kDimTile dims d (o rows kRowBlock apart)
inline void output_tile(const uint32_t* pp, const uint32_t* vp, int64_t head_dim, int64_t key_pairs, float* o) {
    __m512 acc[kDimTile][2];
    for (int64_t d = 0; d < kDimTile; ++d) {
        acc[d][0] = _mm512_loadu_ps(o + d * kRowBlock);
        acc[d][1] = _mm512_loadu_ps(o + d * kRowBlock + kLanes);
    }
    for (int64_t jp = 0; jp < key_pairs; ++jp) {
        const __m512i a0 = _mm512_loadu_si512(pp + jp * kRowBlock);
        const __m512i a1 = _mm512_loadu_si512(pp + jp * kRowBlock + kLanes);
        const uint32_t* v = vp + jp * head_dim;
        for (int64_t d = 0; d < kDimTile; ++d) {
            acc[d][0] = pair_dot(acc[d][0], a0, v[d]);
            acc[d][1] = pair_dot(acc[d][1], a1, v[d]);
        }
    }
    for (int64_t d = 0; d < kDimTile; ++d) {
        _mm512_storeu_ps(o + d * kRowBlock, acc[d][0]);
        _mm512_storeu_ps(o + d * kRowBlock + kLanes, acc[d][1]);
    }
}
#else
inline void score_tile(const uint32_t* qp, const uint32_t* const* keys, int64_t pairs, float* s) {
    for (int64_t j = 0; j < kKeyTile; ++j) {
        float acc[kRowBlock] = {};
        for (int64_t p = 0; p < pairs; ++p) {
            const float blo = bf16_lo(keys[j][p]), bhi = bf16_hi(keys[j][p]);
            const uint32_t* a = qp + p * kRowBlock;
#pragma omp simd
            for (int64_t r = 0; r < kRowBlock; ++r) acc[r] += bf16_lo(a[r]) * blo + bf16_hi(a[r]) * bhi;
        }
        std::memcpy(s + j * kRowBlock, acc, sizeof(acc));
    }
}

inline void output_tile(const uint32_t* pp, const uint32_t* vp, int64_t head_dim, int64_t key_pairs, float* o) {
    for (int64_t jp = 0; jp < key_pairs; ++jp) {
        const uint32_t* a = pp + jp * kRowBlock;
        for (int64_t d = 0; d < kDimTile; ++d) {
            const float blo = bf16_lo(vp[jp * head_dim + d]), bhi = bf16_hi(vp[jp * head_dim + d]);
            float* od = o + d * kRowBlock;
#pragma omp simd
            for (int64_t r = 0; r < kRowBlock; ++r) od[r] += bf16_lo(a[r]) * blo + bf16_hi(a[r]) * bhi;
        }
    }
}
#endif

// One call's arguments (see loragate_chunk_attention).
struct Args {
    const uint16_t* q;
    int64_t q_stride;
    const uint16_t* cache;
    int64_t num_slots;
    const int64_t* kv_index;
    int64_t kv_index_len;
    const int64_t *q_start, *lens, *ctxs, *kv_offsets;
    int64_t num_chunks, num_tokens;
    uint16_t* out;
    int64_t out_stride;
    int64_t num_q_heads, num_kv_heads, head_dim;
    float scale;
    int num_threads;
};

// Per-thread scratch, in the layouts the micro-tiles read.
struct Scratch {
    std::vector<uint32_t> qp;    // [D/2][kRowBlock] the rows' query pairs
    std::vector<float> s;        // [kKeyBlock][kRowBlock] scores, then probabilities
    std::vector<uint32_t> pp;    // [kKeyBlock/2][kRowBlock] probability pairs (bf16)
    std::vector<uint32_t> vp;    // [kKeyBlock/2][D] value pairs (two keys' bf16 of one dim)
    std::vector<float> o;        // [D][kRowBlock] unnormalised output
    float m[kRowBlock], l[kRowBlock];
    int64_t last[kRowBlock];     // the last context position each row may attend to
};

// Scores of keys past the chunk's context or past a row's last position: -inf.
inline void mask_block(Scratch& w, int64_t kb, int64_t kn, int64_t kpad) {
    for (int64_t j = 0; j < kpad; ++j) {
        float* sj = w.s.data() + j * kRowBlock;
        const int64_t pos = j < kn ? kb + j : INT64_MAX;
#pragma omp simd
        for (int64_t r = 0; r < kRowBlock; ++r) sj[r] = pos <= w.last[r] ? sj[r] : -INFINITY;
    }
}

#if defined(LORAGATE_VEC_AVX512)
// 2^x for x <= 0 (below -126: 2^-126, which a probability of at least 1 beside it makes nothing):
// degree-5 polynomial on the fraction (relative error ~3e-6, far below the bf16 rounding the
// probabilities get), scaled by the integer part with vscalefps.
inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// Per lane, the bf16 of p0 (low half) and of p1 (high half), rounded to nearest even.
inline __m512i bf16_pairs(__m512 p0, __m512 p1, __m512i interleave) {
#if defined(__AVX512BF16__)
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
#else
    (void)interleave;
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
    const __m512i u0 = _mm512_castps_si512(p0), u1 = _mm512_castps_si512(p1);
    const __m512i b0 = _mm512_srli_epi32(_mm512_add_epi32(u0, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u0, 16), one))), 16);
    const __m512i b1 = _mm512_add_epi32(u1, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u1, 16), one)));
    return _mm512_or_si512(b0, _mm512_and_si512(b1, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
#endif
}

// The block's probabilities against each row's running max (rescaling what was summed before when
// a max moved), summed into l in float32 and stored as bf16 pairs of consecutive keys. Scores are
// raw dot products; the scale rides in the exponent: p = 2^((s - m) * scale * log2 e).
inline void softmax_block(Scratch& w, int64_t kpad, float scale, int64_t D) {
    const __m512 c = _mm512_set1_ps(scale * 1.44269504088896341f);
    // interleave two keys' bf16 vectors (lanes 0-15: key j, 16-31: key j+1) into per-row pairs
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                           6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t v = 0; v < kRowBlock / kLanes; ++v) {
        const int64_t r = v * kLanes;
        __m512 mx = _mm512_loadu_ps(w.m + r);
        for (int64_t j = 0; j < kpad; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(w.s.data() + j * kRowBlock + r));
        const __m512 m_old = _mm512_loadu_ps(w.m + r);
        if (_mm512_cmp_ps_mask(mx, m_old, _CMP_GT_OQ)) {
            // m_old = -inf (first block): alpha is 2^-126, against l = 0 and o = 0
            const __m512 alpha = exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(m_old, mx), c));
            _mm512_storeu_ps(w.l + r, _mm512_mul_ps(_mm512_loadu_ps(w.l + r), alpha));
            for (int64_t d = 0; d < D; ++d) {
                float* od = w.o.data() + d * kRowBlock + r;
                _mm512_storeu_ps(od, _mm512_mul_ps(_mm512_loadu_ps(od), alpha));
            }
            _mm512_storeu_ps(w.m + r, mx);
        }
        const __m512 mc = _mm512_mul_ps(mx, c);
        __m512 l = _mm512_loadu_ps(w.l + r);
        for (int64_t j = 0; j < kpad; j += 2) {
            const __m512 p0 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(w.s.data() + j * kRowBlock + r), c, mc));
            const __m512 p1 =
                exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(w.s.data() + (j + 1) * kRowBlock + r), c, mc));
            l = _mm512_add_ps(l, _mm512_add_ps(p0, p1));
            _mm512_storeu_si512(w.pp.data() + (j / 2) * kRowBlock + r, bf16_pairs(p0, p1, pairs));
        }
        _mm512_storeu_ps(w.l + r, l);
    }
}

// vp[jp][d] = (values[key 2jp][d], values[key 2jp + 1][d]) as a bf16 pair; keys past kn are zeros.
inline void pack_values(Scratch& w, const uint16_t* values, const int64_t* idx, int64_t kn, int64_t kpad, int64_t D,
                        const uint16_t* zero_row) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < kpad; j += 2) {
        const uint16_t* v0 = j < kn ? values + idx[j] * D : zero_row;
        const uint16_t* v1 = j + 1 < kn ? values + idx[j + 1] * D : zero_row;
        uint32_t* vj = w.vp.data() + (j / 2) * D;
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
            const __m512i a = _mm512_loadu_si512(v0 + d), b = _mm512_loadu_si512(v1 + d);
            _mm512_storeu_si512(vj + d, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vj + d + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
        for (; d < D; ++d) vj[d] = uint32_t{v0[d]} | (uint32_t{v1[d]} << 16);
    }
}
#else
inline void softmax_block(Scratch& w, int64_t kpad, float scale, int64_t D) {
    float mx[kRowBlock], alpha[kRowBlock];
    std::copy(w.m, w.m + kRowBlock, mx);
    for (int64_t j = 0; j < kpad; ++j) {
        const float* sj = w.s.data() + j * kRowBlock;
#pragma omp simd
        for (int64_t r = 0; r < kRowBlock; ++r) mx[r] = sj[r] > mx[r] ? sj[r] : mx[r];
    }
    for (int64_t r = 0; r < kRowBlock; ++r) {
        alpha[r] = w.m[r] == -INFINITY ? 0.0f : exp_nonpositive((w.m[r] - mx[r]) * scale);
        w.l[r] *= alpha[r];
        w.m[r] = mx[r];
    }
    for (int64_t d = 0; d < D; ++d) {
        float* od = w.o.data() + d * kRowBlock;
#pragma omp simd
        for (int64_t r = 0; r < kRowBlock; ++r) od[r] *= alpha[r];
    }
    for (int64_t j = 0; j < kpad; j += 2) {
        const float* s0 = w.s.data() + j * kRowBlock;
        const float* s1 = s0 + kRowBlock;
        uint32_t* pj = w.pp.data() + (j / 2) * kRowBlock;
#pragma omp simd
        for (int64_t r = 0; r < kRowBlock; ++r) {
            const float p0 = s0[r] == -INFINITY ? 0.0f : exp_nonpositive((s0[r] - mx[r]) * scale);
            const float p1 = s1[r] == -INFINITY ? 0.0f : exp_nonpositive((s1[r] - mx[r]) * scale);
            w.l[r] += p0 + p1;
            pj[r] = bf16_bits(p0) | (bf16_bits(p1) << 16);
        }
    }
}

inline void pack_values(Scratch& w, const uint16_t* values, const int64_t* idx, int64_t kn, int64_t kpad, int64_t D,
                        const uint16_t* zero_row) {
    for (int64_t j = 0; j < kpad; j += 2) {
        const uint16_t* v0 = j < kn ? values + idx[j] * D : zero_row;
        const uint16_t* v1 = j + 1 < kn ? values + idx[j + 1] * D : zero_row;
        uint32_t* vj = w.vp.data() + (j / 2) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) vj[d] = uint32_t{v0[d]} | (uint32_t{v1[d]} << 16);
    }
}
#endif

// Attend rows [r0, r0 + kRowBlock) of chunk c's rows for KV head h.
void attend_block(const Args& a, int64_t c, int64_t h, int64_t r0, Scratch& w, const uint16_t* zero_row) {
    const int64_t D = a.head_dim, Hk = a.num_kv_heads, g = a.num_q_heads / Hk, pairs = D / 2;
    const int64_t n = a.lens[c], ctx = a.ctxs[c], rows = n * g;
    const int64_t* idx = a.kv_index + a.kv_offsets[c];
    const uint16_t* keys = a.cache + h * a.num_slots * D;
    const uint16_t* values = a.cache + (Hk + h) * a.num_slots * D;

    // pack the rows' queries as pairs, lanes over rows (padding rows: zeros, attending like the last token)
    int64_t last_min = INT64_MAX, last_max = 0;
    for (int64_t r = 0; r < kRowBlock; ++r) {
        const int64_t row = r0 + r, t = std::min(row, rows - 1) / g;
        w.last[r] = ctx - n + t;
        last_min = std::min(last_min, w.last[r]);
        last_max = std::max(last_max, w.last[r]);
        w.m[r] = -INFINITY;
        w.l[r] = 0.0f;
        if (row < rows) {
            const uint32_t* qrow =
                reinterpret_cast<const uint32_t*>(a.q + (a.q_start[c] + t) * a.q_stride + (h * g + row % g) * D);
            for (int64_t p = 0; p < pairs; ++p) w.qp[p * kRowBlock + r] = qrow[p];
        } else {
            for (int64_t p = 0; p < pairs; ++p) w.qp[p * kRowBlock + r] = 0;
        }
    }
    std::fill(w.o.begin(), w.o.end(), 0.0f);

    const uint32_t* krows[kKeyTile];
    for (int64_t kb = 0; kb <= last_max; kb += kKeyBlock) {  // blocks past every row's last position: skipped
        const int64_t kn = std::min(kKeyBlock, ctx - kb);
        const int64_t tiles = (kn + kKeyTile - 1) / kKeyTile, kpad = tiles * kKeyTile;
        for (int64_t t = 0; t < tiles; ++t) {
            for (int64_t j = 0; j < kKeyTile; ++j) {
                const int64_t k = t * kKeyTile + j;
                krows[j] = reinterpret_cast<const uint32_t*>(k < kn ? keys + idx[kb + k] * D : zero_row);
            }
            score_tile(w.qp.data(), krows, pairs, w.s.data() + t * kKeyTile * kRowBlock);
        }
        if (kb + kpad - 1 > last_min) mask_block(w, kb, kn, kpad);  // the causal corner, the padding keys
        softmax_block(w, kpad, a.scale, D);
        pack_values(w, values, idx + kb, kn, kpad, D, zero_row);
        for (int64_t d = 0; d < D; d += kDimTile)
            output_tile(w.pp.data(), w.vp.data() + d, D, kpad / 2, w.o.data() + d * kRowBlock);
    }

    for (int64_t r = 0; r < kRowBlock && r0 + r < rows; ++r) {
        const int64_t row = r0 + r, t = row / g;
        uint16_t* orow = a.out + (a.q_start[c] + t) * a.out_stride + (h * g + row % g) * D;
        const float inv = 1.0f / w.l[r];
        for (int64_t d = 0; d < D; ++d) orow[d] = BF16::store(w.o[d * kRowBlock + r] * inv);
    }
}

int chunk_attention(const Args& a) {
    const int64_t D = a.head_dim, Hk = a.num_kv_heads;
    if (D <= 0 || D % kDimTile || D > kMaxHeadDim || Hk <= 0 || a.num_q_heads % Hk) return -3;
    // validate everything that indexes memory before touching any of it
    std::vector<int64_t> blocks(a.num_chunks + 1, 0);  // work items before each chunk, per KV head
    const int64_t g = a.num_q_heads / Hk;
    for (int64_t c = 0; c < a.num_chunks; ++c) {
        const int64_t n = a.lens[c], ctx = a.ctxs[c], off = a.kv_offsets[c];
        if (n < 1 || ctx < n || a.q_start[c] < 0 || a.q_start[c] + n > a.num_tokens || off < 0 ||
            off + ctx > a.kv_index_len)
            return -2;
        blocks[c + 1] = blocks[c] + (n * g + kRowBlock - 1) / kRowBlock;
    }
    int failed = 0;
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
    for (int64_t i = 0; i < a.kv_index_len; ++i) {
        if (a.kv_index[i] < 0 || a.kv_index[i] >= a.num_slots) {
#pragma omp atomic write
            failed = 1;
        }
    }
    if (failed) return -2;

    const int64_t items = blocks[a.num_chunks] * Hk;
    const std::vector<uint16_t> zero_row(D, 0);
#pragma omp parallel num_threads(a.num_threads)
    {
        Scratch w;
        w.qp.resize(D / 2 * kRowBlock);
        w.s.resize(kKeyBlock * kRowBlock);
        w.pp.resize(kKeyBlock / 2 * kRowBlock);
        w.vp.resize(kKeyBlock / 2 * D);
        w.o.resize(D * kRowBlock);
        // items ordered (chunk, KV head, row block): a thread's consecutive items reuse the context it just read
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t block = item / Hk, h = item % Hk;
            const int64_t c = std::upper_bound(blocks.begin(), blocks.end(), block) - blocks.begin() - 1;
            attend_block(a, c, h, (block - blocks[c]) * kRowBlock, w, zero_row.data());
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// Which path this library runs: "avx512-bf16" (native pair dot products: the fast one),
// "avx512" (emulated with FMAs) or "portable" (plain loops). The engine uses the kernel by default
// only on the first; the others exist so that the algorithm is tested on every host.
const char* loragate_chunk_attention_path() { return LORAGATE_CHUNK_PATH; }

// 1 when this CPU runs the library's path: isa.h's check, plus AVX-512 BF16 where it was compiled in.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("arch=x86-64")))
#endif
int loragate_chunk_attention_cpu_supported() {
#if defined(__AVX512BF16__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && loragate_cpu_supported();
#else
    return loragate_cpu_supported();
#endif
}

// dtype: only 1 (bfloat16). Shapes: q [num_tokens, num_q_heads, head_dim] with rows q_stride
// elements apart (heads contiguous); cache [2 * num_kv_heads, num_slots, head_dim] contiguous (keys,
// then values), this step's keys and values already written; per chunk c: its query rows
// [q_start[c], q_start[c] + lens[c]) and its context of ctxs[c] >= lens[c] slots
// kv_index[kv_offsets[c] ...], the chunk's own tokens last (query token t attends to context
// positions 0 .. ctxs[c] - lens[c] + t). out [num_tokens, num_q_heads, head_dim] with rows
// out_stride elements apart: the chunks' rows are written, the others left as they are.
// Returns 0; -1 for a dtype other than bfloat16; -2 for an index or length out of range (nothing
// written); -3 for a head layout the kernel does not take (head_dim a multiple of 8 up to 256,
// num_q_heads a multiple of num_kv_heads).
int loragate_chunk_attention(int dtype, const void* q, int64_t q_stride, const void* cache, int64_t num_slots,
                             const int64_t* kv_index, int64_t kv_index_len, const int64_t* q_start,
                             const int64_t* lens, const int64_t* ctxs, const int64_t* kv_offsets, int64_t num_chunks,
                             int64_t num_tokens, void* out, int64_t out_stride, int64_t num_q_heads,
                             int64_t num_kv_heads, int64_t head_dim, float scale, int num_threads) {
    if (dtype != 1) return -1;
    const Args args{static_cast<const uint16_t*>(q), q_stride, static_cast<const uint16_t*>(cache), num_slots,
                    kv_index, kv_index_len, q_start, lens, ctxs, kv_offsets, num_chunks, num_tokens,
                    static_cast<uint16_t*>(out), out_stride, num_q_heads, num_kv_heads, head_dim, scale,
                    num_threads};
    return chunk_attention(args);
}

}  // extern "C"
