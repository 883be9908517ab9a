// Attention of short prompt chunks over a paged KV cache, fused, for the CPU in bfloat16.
//
// With prefix caching a burst of requests puts dozens of chunks of a few dozen tokens into one
// step, each over a cached context of a thousand tokens or more. The torch path
// (`loragate.engine.model.chunk_attention.attend_group`) gathers every context into a padded copy,
// then runs a score matmul, a mask, a softmax and a second matmul, each a pass over a score tensor
// of (tokens x heads x context) elements; profiled on a 2-core AVX-512 host those passes and the
// gather took as long as the two matmuls. Here one pass does it all, flash-attention style: the
// scores of a block of 64 keys are computed, masked, exponentiated against a running maximum and
// multiplied into the output while they are still in registers and the first-level cache, and keys
// and values are read in place through the chunk's slot index.
//
// Work item = (chunk, KV head, up to 96 query rows). The rows are the chunk's (token, query head)
// pairs of that KV head, so the g query heads sharing a KV head share every key and value block
// packed (GQA without repeating keys). Vectors run over keys for the scores and over head dims for
// the output, so the only padding is the last key block's (rows need none: a chunk of 28 tokens and
// 3 query heads per KV head is 84 rows, which lanes over rows would pad to 96). Both products are
// bf16 pair dot products with fp32 accumulation (AVX-512 BF16 `vdpbf16ps`): a key block packed as
// pairs of dims against a query row's broadcast pair for the scores; a value block packed as pairs
// of keys against a row's broadcast pair of probabilities (rounded to bf16, as torch's bf16 softmax
// output is) for the output. Other AVX-512 hosts emulate the pair product with two FMAs; other
// hosts run plain loops over the same arithmetic, so the kernel is tested everywhere. The engine
// uses it by default only where it is fast (see `loragate_chunk_attention_path`).
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

constexpr int64_t kKeyBlock = 64;   // keys per block: 4 vectors of scores per row, kept in registers
constexpr int64_t kItemRows = 96;   // query rows per work item (they share the item's packed blocks)
constexpr int64_t kRowTile = 5;     // rows per micro-tile: 5 x 4 accumulators + 4 key vectors fit the 32 registers
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

// A work item: rows [r0, r1) of chunk c's rows for KV head h.
struct Item {
    int64_t c, h, r0, r1;
};

// What an item's rows need to know, resolved once.
struct Rows {
    const uint16_t* q[kItemRows];  // each row's query (D bf16)
    uint16_t* out[kItemRows];      // where its output goes
    int64_t last[kItemRows];       // the last context position it may attend to
    float m[kItemRows];            // running max (raw score)
    float l[kItemRows];            // sum of exp (the portable path; AVX-512 keeps 16 partial sums in its scratch)
    int64_t count, last_min, last_max;
};

Rows resolve_rows(const Args& a, const Item& it) {
    const int64_t D = a.head_dim, g = a.num_q_heads / a.num_kv_heads;
    const int64_t n = a.lens[it.c], ctx = a.ctxs[it.c];
    Rows r;
    r.count = it.r1 - it.r0;
    r.last_min = INT64_MAX;
    r.last_max = 0;
    for (int64_t i = 0; i < r.count; ++i) {
        const int64_t row = it.r0 + i, t = row / g, head = it.h * g + row % g;
        r.q[i] = a.q + (a.q_start[it.c] + t) * a.q_stride + head * D;
        r.out[i] = a.out + (a.q_start[it.c] + t) * a.out_stride + head * D;
        r.last[i] = ctx - n + t;
        r.last_min = std::min(r.last_min, r.last[i]);
        r.last_max = std::max(r.last_max, r.last[i]);
        r.m[i] = -INFINITY;
        r.l[i] = 0.0f;
    }
    return r;
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

// 2^x for x <= 0 (clamped at -126): degree-5 polynomial on the fraction (relative error ~3e-6, far
// below the bf16 rounding the probabilities get), scaled by the integer part with vscalefps.
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

// 32 bf16 (rounded to nearest even) of two vectors, p0's in the low half: 64 bytes in key order
inline __m512i bf16_two(__m512 p0, __m512 p1) {
#if defined(__AVX512BF16__)
    return (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
#else
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
    auto round = [&](__m512 p) {
        const __m512i u = _mm512_castps_si512(p);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, lsb)), 16);
    };
    const __m512i low = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(round(p0)));
    return _mm512_inserti64x4(low, _mm512_cvtepi32_epi16(round(p1)), 1);
#endif
}

// In-place transpose of a 16 x 16 block of 32-bit elements (rows in r[0..15]).
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4q + k], lane L: column 4L + k of rows 4q .. 4q + 3
    __m512i u[16];
    for (int q = 0; q < 4; ++q) {
        u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    // column 4L + k gathers lane L of u[k], u[4 + k], u[8 + k], u[12 + k]
    for (int k = 0; k < 4; ++k) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xee);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xee);
        r[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        r[8 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

// Per-thread scratch, in the layouts the micro-tiles read.
struct Scratch {
    std::vector<uint32_t> kp;  // [D/2][kKeyBlock] the key block as pairs of dims, lanes over keys
    std::vector<uint32_t> vp;  // [kKeyBlock/2][D] the value block as pairs of keys, lanes over dims
    std::vector<float> o;      // [kItemRows][D] unnormalised outputs
    std::vector<float> lsum;   // [kItemRows][16] each row's sum of exp, as 16 partial sums
    uint32_t p[kRowTile][kKeyBlock / 2];  // a tile's probabilities, bf16 pairs of consecutive keys
};

// kp[p][j] = pair p of key j's dims; keys past kn are zeros (their scores are masked)
inline void pack_keys(Scratch& w, const uint16_t* keys, const int64_t* idx, int64_t kn, int64_t D) {
    const int64_t pairs = D / 2;
    if (pairs % 16 == 0) {
        __m512i r[16];
        for (int64_t kg = 0; kg < kKeyBlock; kg += 16) {
            for (int64_t pg = 0; pg < pairs; pg += 16) {
                for (int i = 0; i < 16; ++i)
                    r[i] = kg + i < kn ? _mm512_loadu_si512(keys + idx[kg + i] * D + 2 * pg) : _mm512_setzero_si512();
                transpose16(r);
                for (int i = 0; i < 16; ++i) _mm512_storeu_si512(w.kp.data() + (pg + i) * kKeyBlock + kg, r[i]);
            }
        }
        return;
    }
    for (int64_t j = 0; j < kKeyBlock; ++j) {
        const uint32_t* k = j < kn ? reinterpret_cast<const uint32_t*>(keys + idx[j] * D) : nullptr;
        for (int64_t p = 0; p < pairs; ++p) w.kp[p * kKeyBlock + j] = k ? k[p] : 0u;
    }
}

// vp[jp][d] = (value[2jp][d], value[2jp + 1][d]) as a bf16 pair; keys past kn are zeros
inline void pack_values(Scratch& w, const uint16_t* values, const int64_t* idx, int64_t kn, int64_t D) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < kKeyBlock; j += 2) {
        uint32_t* vj = w.vp.data() + (j / 2) * D;
        if (j >= kn) {
            std::memset(vj, 0, D * sizeof(uint32_t));
            continue;
        }
        const uint16_t* v0 = values + idx[j] * D;
        const uint16_t* v1 = j + 1 < kn ? values + idx[j + 1] * D : nullptr;
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
            const __m512i a = _mm512_loadu_si512(v0 + d);
            const __m512i b = v1 ? _mm512_loadu_si512(v1 + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(vj + d, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vj + d + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
        for (; d < D; ++d) vj[d] = uint32_t{v0[d]} | (v1 ? uint32_t{v1[d]} << 16 : 0u);
    }
}

// o[i0 + r][d0 : d0 + 16 DV] += w.p[r] . vp[:, d0 : d0 + 16 DV] for the tile's RT rows: the
// accumulators stay in registers over the block's 32 key pairs (both bounds compile-time).
template <int RT, int DV>
inline void add_values(Scratch& w, int64_t i0, int64_t d0, int64_t D) {
    __m512 o[RT][DV];
    for (int r = 0; r < RT; ++r)
        for (int v = 0; v < DV; ++v) o[r][v] = _mm512_loadu_ps(w.o.data() + (i0 + r) * D + d0 + 16 * v);
    for (int64_t jp = 0; jp < kKeyBlock / 2; ++jp) {
        const uint32_t* vj = w.vp.data() + jp * D + d0;
        __m512i vv[DV];
        for (int v = 0; v < DV; ++v) vv[v] = _mm512_loadu_si512(vj + 16 * v);
        for (int r = 0; r < RT; ++r)
            for (int v = 0; v < DV; ++v) o[r][v] = pair_dot(o[r][v], vv[v], w.p[r][jp]);
    }
    for (int r = 0; r < RT; ++r)
        for (int v = 0; v < DV; ++v) _mm512_storeu_ps(w.o.data() + (i0 + r) * D + d0 + 16 * v, o[r][v]);
}

// Rows [i0, i0 + RT) of the item against the packed key block at context position kb: scores,
// mask, online softmax (rescaling the rows' outputs when their max moves), probabilities as bf16
// pairs in w.p, then their product with the packed values added to the rows' outputs.
template <int RT>
void tile(Scratch& w, Rows& rows, int64_t i0, int64_t kb, bool masked, float c, int64_t D) {
    const int64_t pairs = D / 2;
    __m512 acc[RT][4];
    for (int r = 0; r < RT; ++r)
        for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
    const uint32_t* qr[RT];
    for (int r = 0; r < RT; ++r) qr[r] = reinterpret_cast<const uint32_t*>(rows.q[i0 + r]);
    for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t* kp = w.kp.data() + p * kKeyBlock;
        const __m512i k0 = _mm512_loadu_si512(kp), k1 = _mm512_loadu_si512(kp + 16);
        const __m512i k2 = _mm512_loadu_si512(kp + 32), k3 = _mm512_loadu_si512(kp + 48);
        for (int r = 0; r < RT; ++r) {
            const uint32_t b = qr[r][p];
            acc[r][0] = pair_dot(acc[r][0], k0, b);
            acc[r][1] = pair_dot(acc[r][1], k1, b);
            acc[r][2] = pair_dot(acc[r][2], k2, b);
            acc[r][3] = pair_dot(acc[r][3], k3, b);
        }
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), cv = _mm512_set1_ps(c);
    for (int r = 0; r < RT; ++r) {
        const int64_t i = i0 + r;
        __mmask16 keep[4] = {0xffff, 0xffff, 0xffff, 0xffff};
        if (masked) {
            // the row's last position relative to the block (< 2^31: the caller checked ctx)
            const __m512i last = _mm512_set1_epi32(static_cast<int>(rows.last[i] - kb));
            for (int v = 0; v < 4; ++v) {
                keep[v] = _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * v)), last);
                acc[r][v] = _mm512_mask_blend_ps(keep[v], neg_inf, acc[r][v]);
            }
        }
        // the row's running max moves only when some score of the block exceeds it (after the first
        // blocks, rarely): only then the horizontal max and the rescaling
        const __m512 block_max =
            _mm512_max_ps(_mm512_max_ps(acc[r][0], acc[r][1]), _mm512_max_ps(acc[r][2], acc[r][3]));
        const float m_old = rows.m[i];
        float* lsum = w.lsum.data() + i * 16;
        if (_mm512_cmp_ps_mask(block_max, _mm512_set1_ps(m_old), _CMP_GT_OQ)) {
            const float mx = _mm512_reduce_max_ps(block_max);
            if (m_old != -INFINITY) {  // rescale what this row summed so far
                const __m512 alpha = _mm512_set1_ps(std::exp2((m_old - mx) * c));
                _mm512_storeu_ps(lsum, _mm512_mul_ps(_mm512_loadu_ps(lsum), alpha));
                float* o = w.o.data() + i * D;
                for (int64_t d = 0; d < D; d += 16)
                    _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), alpha));
            }
            rows.m[i] = mx;
        }
        const __m512 mc = _mm512_set1_ps(rows.m[i] * c);
        __m512 pv[4];
        for (int v = 0; v < 4; ++v)
            pv[v] = _mm512_maskz_mov_ps(keep[v], exp2_nonpositive(_mm512_fmsub_ps(acc[r][v], cv, mc)));
        // the sum of exp stays a vector of 16 partial sums until the item ends
        _mm512_storeu_ps(lsum, _mm512_add_ps(_mm512_loadu_ps(lsum), _mm512_add_ps(_mm512_add_ps(pv[0], pv[1]),
                                                                                 _mm512_add_ps(pv[2], pv[3]))));
        _mm512_storeu_si512(w.p[r], bf16_two(pv[0], pv[1]));
        _mm512_storeu_si512(w.p[r] + 16, bf16_two(pv[2], pv[3]));
    }
    // outputs += probabilities x values, 64 dims (4 vectors) at a time
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) add_values<RT, 4>(w, i0, d0, D);
    switch ((D - d0) / 16) {
        case 3: add_values<RT, 3>(w, i0, d0, D); break;
        case 2: add_values<RT, 2>(w, i0, d0, D); break;
        case 1: add_values<RT, 1>(w, i0, d0, D); break;
        default: break;
    }
}

void attend_item(const Args& a, const Item& it, Scratch& w) {
    const int64_t D = a.head_dim, Hk = a.num_kv_heads, ctx = a.ctxs[it.c];
    const int64_t* idx = a.kv_index + a.kv_offsets[it.c];
    const uint16_t* keys = a.cache + it.h * a.num_slots * D;
    const uint16_t* values = a.cache + (Hk + it.h) * a.num_slots * D;
    Rows rows = resolve_rows(a, it);
    std::fill(w.o.begin(), w.o.begin() + rows.count * D, 0.0f);
    std::fill(w.lsum.begin(), w.lsum.begin() + rows.count * 16, 0.0f);
    const float c = a.scale * 1.44269504088896341f;  // scores are raw dot products: p = 2^((s - m) * c)
    for (int64_t kb = 0; kb <= rows.last_max; kb += kKeyBlock) {  // blocks past every row's last position: skipped
        const int64_t kn = std::min(kKeyBlock, ctx - kb);
        pack_keys(w, keys, idx + kb, kn, D);
        pack_values(w, values, idx + kb, kn, D);
        const bool masked = kb + kKeyBlock - 1 > rows.last_min;  // the causal corner, the padding keys
        int64_t i = 0;
        for (; i + kRowTile <= rows.count; i += kRowTile) tile<kRowTile>(w, rows, i, kb, masked, c, D);
        switch (rows.count - i) {
            case 4: tile<4>(w, rows, i, kb, masked, c, D); break;
            case 3: tile<3>(w, rows, i, kb, masked, c, D); break;
            case 2: tile<2>(w, rows, i, kb, masked, c, D); break;
            case 1: tile<1>(w, rows, i, kb, masked, c, D); break;
            default: break;
        }
    }
    for (int64_t i = 0; i < rows.count; ++i) {
        const float inv = 1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(w.lsum.data() + i * 16));
        const float* o = w.o.data() + i * D;
        for (int64_t d = 0; d < D; ++d) rows.out[i][d] = BF16::store(o[d] * inv);
    }
}

Scratch make_scratch(int64_t D) {
    Scratch w;
    w.kp.resize(D / 2 * kKeyBlock);
    w.vp.resize(kKeyBlock / 2 * D);
    w.o.resize(kItemRows * D);
    w.lsum.resize(kItemRows * 16);
    return w;
}
#else
// Plain loops over the same arithmetic: bf16 pair products summed in float32, probabilities
// rounded to bf16 pairs, the online softmax over blocks of 64 keys.
struct Scratch {
    std::vector<float> o;  // [kItemRows][D]
    std::vector<float> s;  // [kKeyBlock]
};

void attend_item(const Args& a, const Item& it, Scratch& w) {
    const int64_t D = a.head_dim, Hk = a.num_kv_heads, ctx = a.ctxs[it.c], pairs = D / 2;
    const int64_t* idx = a.kv_index + a.kv_offsets[it.c];
    const uint16_t* keys = a.cache + it.h * a.num_slots * D;
    const uint16_t* values = a.cache + (Hk + it.h) * a.num_slots * D;
    Rows rows = resolve_rows(a, it);
    std::fill(w.o.begin(), w.o.begin() + rows.count * D, 0.0f);
    const float c = a.scale * 1.44269504088896341f;
    for (int64_t kb = 0; kb <= rows.last_max; kb += kKeyBlock) {
        const int64_t kn = std::min(kKeyBlock, ctx - kb);
        for (int64_t i = 0; i < rows.count; ++i) {
            const uint32_t* q = reinterpret_cast<const uint32_t*>(rows.q[i]);
            const int64_t upto = std::min(kn, rows.last[i] - kb + 1);  // keys of this block the row sees
            if (upto <= 0) continue;
            float mx = -INFINITY;
            for (int64_t j = 0; j < upto; ++j) {
                const uint32_t* k = reinterpret_cast<const uint32_t*>(keys + idx[kb + j] * D);
                float s = 0.0f;
                for (int64_t p = 0; p < pairs; ++p)
                    s += bf16_lo(q[p]) * bf16_lo(k[p]) + bf16_hi(q[p]) * bf16_hi(k[p]);
                w.s[j] = s;
                mx = std::max(mx, s);
            }
            float* o = w.o.data() + i * D;
            if (mx > rows.m[i]) {
                if (rows.m[i] != -INFINITY) {
                    const float alpha = std::exp2((rows.m[i] - mx) * c);
                    rows.l[i] *= alpha;
                    for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
                }
                rows.m[i] = mx;
            }
            for (int64_t j = 0; j < upto; ++j) {
                const float p = std::exp2((w.s[j] - rows.m[i]) * c);
                rows.l[i] += p;
                const float pb = BF16::load(static_cast<uint16_t>(bf16_bits(p)));
                const uint16_t* v = values + idx[kb + j] * D;
                for (int64_t d = 0; d < D; ++d) o[d] += pb * BF16::load(v[d]);
            }
        }
    }
    for (int64_t i = 0; i < rows.count; ++i) {
        const float inv = 1.0f / rows.l[i];
        const float* o = w.o.data() + i * D;
        for (int64_t d = 0; d < D; ++d) rows.out[i][d] = BF16::store(o[d] * inv);
    }
}

Scratch make_scratch(int64_t D) {
    Scratch w;
    w.o.resize(kItemRows * D);
    w.s.resize(kKeyBlock);
    return w;
}
#endif

int chunk_attention(const Args& a) {
    const int64_t D = a.head_dim, Hk = a.num_kv_heads;
    if (D <= 0 || D % 16 || D > kMaxHeadDim || Hk <= 0 || a.num_q_heads % Hk) return -3;
    // validate everything that indexes memory before touching any of it
    const int64_t g = a.num_q_heads / Hk;
    std::vector<Item> items;
    for (int64_t c = 0; c < a.num_chunks; ++c) {
        const int64_t n = a.lens[c], ctx = a.ctxs[c], off = a.kv_offsets[c];
        if (n < 1 || ctx < n || ctx > INT32_MAX || a.q_start[c] < 0 || a.q_start[c] + n > a.num_tokens || off < 0 ||
            off + ctx > a.kv_index_len)
            return -2;
        // the chunk's rows in near-equal parts of at most kItemRows
        const int64_t rows = n * g, parts = (rows + kItemRows - 1) / kItemRows, per = (rows + parts - 1) / parts;
        for (int64_t h = 0; h < Hk; ++h)
            for (int64_t r0 = 0; r0 < rows; r0 += per) items.push_back({c, h, r0, std::min(rows, r0 + per)});
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

    const int64_t count = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(a.num_threads)
    {
        Scratch w = make_scratch(D);
        // items ordered (chunk, KV head, rows): a thread's consecutive items reuse the context it just read
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; ++i) attend_item(a, items[i], w);
    }
    return 0;
}

}  // namespace

extern "C" {

// Which path this library runs: "avx512-bf16" (native pair dot products: the fast one),
// "avx512" (emulated with FMAs) or "portable" (plain loops). The engine uses the kernel by default
// only on the first; the others exist so that the algorithm is tested on every host.
const char* loragate_chunk_attention_path() { return LORAGATE_CHUNK_PATH; }

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
