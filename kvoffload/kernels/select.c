/* Sparse attention selection: one call per (sparse layer, decode step) for a whole batch.
 *
 * For every sequence b of the batch and KV head h (a "task"):
 *   1. (serial) append the new token's metadata (k_new / v_new at position starts[b]) to the
 *      policy's per-(sequence, layer) state -- fp32 arrays owned by Python (kvoffload/sparse/),
 *      grown there before the call: C never allocates or grows metadata; the budget geometry
 *      (sink blocks, recent window, tail, candidates, k) exactly as SparsePolicy.geometry;
 *   2. (parallel over column chunks of every task) score the candidate units (tokens, chunks or
 *      blocks) against the group's queries;
 *   3. (parallel over tasks) the top k by an O(n) threshold search (bisection on
 *      order-preserving integer keys with vector counting passes, bracketed from a sample;
 *      ties toward the lower index), their bits in a dense [n_full, H_kv] token-mask table of
 *      the sequence (fixed blocks: every token); SparF: alpha (the approximate softmax mass of
 *      the attended tokens, per query head) and vmean (the mean of the values).
 * Then each sequence's dense table is compacted in place into the union form the paged kernel
 * reads: the blocks any head attends (sorted) and their [n, H_kv] uint64 masks (0 where a head
 * skips the block), plus what SparseCounters needs. One thread unless the scoring work is at
 * least cf->par_min_work multiply-adds.
 *
 * State table: one row of ST_COLS int64 per sequence (select.py builds it). Per-token or
 * per-block metadata is TILED CHANNEL-MAJOR: per KV head [cap / TILE, C, TILE] (C channels;
 * column j of channel c at (j / TILE) * C * TILE + c * TILE + j % TILE), so a tile of TILE
 * columns is one contiguous C * TILE block (streamed from memory as a whole) and 16 columns are
 * one vector (16 scores are C multiply-adds, no horizontal sums). cap: columns, a multiple of
 * TILE.
 *   quest            a0 kmin [H_kv, cap/TILE, D, TILE] (columns = blocks)   a1 kmax (same)
 *   sparf            a0 K [H_kv, D, cap] (PLAIN channel-major: each query head reads r whole
 *                    channel rows, best streamed as long runs)               a1 vsum [H_kv, D]
 *                    hdr[0] = tokens appended
 *   double_sparsity  a0 labels [H_kv, cap/TILE, r, TILE] (columns = tokens) hdr[0] = tokens
 *                    (the layer's calibrated channels [H_kv, r] int64: the `channels` argument)
 *   shadowkv,        a0 landmarks [H_kv, cap/TILE, D, TILE] (columns = chunks)
 *   retrieval        a1 mincos [H_kv, cap]   a2 pending keys [H_kv, chunk, D]
 *                    hdr[0] = complete chunks, hdr[1] = keys pending
 *   streaming        (no state)
 *
 * Scores are computed differently from the PyTorch reference (summation order; the softmax
 * policies rank by base-2 log-probability, the same order as the probability, and sum 2^x by a
 * polynomial): equal up to fp32 rounding, so the chosen sets agree except between units whose
 * scores tie within rounding at the cut-off. Ties are broken toward the lower index.
 *
 * The limits G_MAX and D_MAX come from kernels/limits.py (passed by build.py as -D flags).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef G_MAX
#error "G_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif
#ifndef D_MAX
#error "D_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif

#include "kvo_hook.h"
#include "kvo_math.h"

/* CPUs without AVX-512 (most desktop x86): AVX2 + FMA variants of the vector loops, the same
 * algorithms in 8 lanes (the portable loops are for other CPUs: gcc turned cm_dot's into
 * emulated gathers here, ~10x slower). */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SEL_AVX2 1
#include <immintrin.h>
/* lanes below n (n < 8) as a mask for maskload / maskstore */
static inline __m256i lanes_below(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
/* f2key on 8 lanes: negative -> ~u, else u | sign; the all-ones key kept free */
static inline __m256i f2key256(__m256i u) {
    __m256i k = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32((int)0x80000000u)));
    return _mm256_min_epu32(k, _mm256_set1_epi32((int)0xFFFFFFFEu));
}
#endif

enum { SEL_STREAMING = 0, SEL_QUEST = 1, SEL_SPARF = 2, SEL_DOUBLE_SPARSITY = 3, SEL_SHADOWKV = 4,
       SEL_RETRIEVAL = 5 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { ST_A0 = 0, ST_A1 = 1, ST_A2 = 2, ST_HDR = 3, ST_CAP = 4, ST_COLS = 6 };
enum { INFO_NBLOCKS = 0, INFO_READ = 1, INFO_CHOSEN = 2, INFO_COLS = 3 };

#define LOG2E 1.44269504088896341f
#define SMALL_CAP 512            /* keys kept for the last steps of a threshold search */
/* topk_threshold's scratch for n keys: its small set, every 8th key, and the same for those */
#define TOPK_SCRATCH(n) (4 * (SMALL_CAP + 32) + (n) / 4 + 256)
#define OUTLIER_KEY 0xFF800001u  /* above any finite score's key (+inf is 0xFF800000) */

/* A policy's constants (select.py: _Config, the same field order). */
typedef struct {
    int32_t policy, H_kv, G, D, bs, unit;
    int32_t sink_tokens, recent_tokens, budget_is_tokens, r;
    double budget_value, outlier_share;
    int64_t par_min_work;        /* scoring multiply-adds below which one thread is used */
    float *ws;                   /* workspace: slots x ws_stride floats (see kvo_select) */
    int64_t ws_stride;
    int32_t slots, threads;      /* tasks in flight; at most this many OpenMP threads */
} sel_config;

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

/* n values of dtype dt at p -> fp32 */
static inline void load_row(const void *p, int dt, int n, float *out) {
    if (dt == DT_F32) {
        memcpy(out, p, sizeof(float) * (size_t)n);
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)p;
        for (int i = 0; i < n; i++) out[i] = bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)p;
        for (int i = 0; i < n; i++) out[i] = f16_to_f32(s[i]);
    }
}

static inline size_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* Python's // and -(-a // b) */
static inline int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
static inline int64_t ceildiv(int64_t a, int64_t b) { return -floordiv(-a, b); }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/* float -> uint32 with the same order (NaN above +inf; the all-ones key is kept free) */
static inline uint32_t f2key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return u == 0xFFFFFFFFu ? 0xFFFFFFFEu : u;
}

static inline uint64_t full_bits(int n) { return n >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1); }

/* ---------------------------------------------------------------------------------------------
 * Top-k as a threshold: O(n) (a bounded number of vector counting passes).
 * ------------------------------------------------------------------------------------------- */
static inline int64_t count_ge(const uint32_t *key, int64_t n, uint32_t t) {
    int64_t c = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512i tv = _mm512_set1_epi32((int)t);
    for (; i + 64 <= n; i += 64) {
        __mmask16 m0 = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i), tv);
        __mmask16 m1 = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i + 16), tv);
        __mmask16 m2 = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i + 32), tv);
        __mmask16 m3 = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i + 48), tv);
        c += __builtin_popcount(m0) + __builtin_popcount(m1) + __builtin_popcount(m2) + __builtin_popcount(m3);
    }
    for (; i + 16 <= n; i += 16)
        c += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i), tv));
#elif defined(SEL_AVX2)
    const __m256i tv = _mm256_set1_epi32((int)t);
    for (; i + 8 <= n; i += 8) {            /* x >= t <=> max(x, t) == x */
        __m256i x = _mm256_loadu_si256((const __m256i *)(key + i));
        c += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(x, tv), x))));
    }
#endif
    for (; i < n; i++) c += key[i] >= t;
    return c;
}

static inline void key_range(const uint32_t *key, int64_t n, uint32_t *lo, uint32_t *hi) {
    uint32_t a = 0xFFFFFFFFu, b = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    if (n >= 16) {
        __m512i va = _mm512_set1_epi32(-1), vb = _mm512_setzero_si512();
        for (; i + 16 <= n; i += 16) {
            __m512i x = _mm512_loadu_si512(key + i);
            va = _mm512_min_epu32(va, x);
            vb = _mm512_max_epu32(vb, x);
        }
        a = _mm512_reduce_min_epu32(va);
        b = _mm512_reduce_max_epu32(vb);
    }
#elif defined(SEL_AVX2)
    if (n >= 8) {
        __m256i va = _mm256_set1_epi32(-1), vb = _mm256_setzero_si256();
        for (; i + 8 <= n; i += 8) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(key + i));
            va = _mm256_min_epu32(va, x);
            vb = _mm256_max_epu32(vb, x);
        }
        uint32_t la[8], lb[8];
        _mm256_storeu_si256((__m256i *)la, va);
        _mm256_storeu_si256((__m256i *)lb, vb);
        for (int l = 0; l < 8; l++) {
            a = la[l] < a ? la[l] : a;
            b = lb[l] > b ? lb[l] : b;
        }
    }
#endif
    for (; i < n; i++) {
        a = key[i] < a ? key[i] : a;
        b = key[i] > b ? key[i] : b;
    }
    *lo = a;
    *hi = b;
}

/* the keys in [lo, hi) -> out (out has room for their count + 16) */
static inline int64_t keys_between(const uint32_t *key, int64_t n, uint32_t lo, uint32_t hi, uint32_t *out) {
    int64_t m = 0, i = 0;
    const uint32_t w = hi - lo;
#ifdef __AVX512F__
    const __m512i lv = _mm512_set1_epi32((int)lo), wv = _mm512_set1_epi32((int)w);
    for (; i + 16 <= n; i += 16) {
        __m512i x = _mm512_loadu_si512(key + i);
        __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(x, lv), wv);
        if (in) {   /* compress in a register, then a plain store (vpcompressd to memory is slow on Zen 4) */
            _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(in, x));
            m += __builtin_popcount(in);
        }
    }
#endif
    for (; i < n; i++) {
        out[m] = key[i];
        m += (uint32_t)(key[i] - lo) < w;
    }
    return m;
}

/* The k largest of key[0..n) (0 < k < n), ties toward the lower index: every key >= *take,
 * then the first *need keys equal to *eq (in index order). Bisection on the key value with
 * vector counting passes; a bracket from every 8th key first (long arrays), and once few keys
 * are left in the bracket they alone are searched. scratch: TOPK_SCRATCH(n) keys. */
static void topk_threshold(const uint32_t *key, int64_t n, int64_t k, uint32_t *scratch,
                           uint32_t *take, uint32_t *eq, int64_t *need) {
    uint32_t *small = scratch;
    uint32_t lo, hi;                       /* invariant: count(>= lo) = c_lo >= k > c_hi = count(>= hi) */
    int64_t c_lo = n, c_hi = 0;
    if (n >= 2048) {
        /* the sample's ranks k/8 -/+ 3 sigma bracket the threshold (checked by two counts) */
        uint32_t *samp = scratch + SMALL_CAP + 32;
        const int64_t ns = n / 8, ks = k / 8, margin = 3 * (int64_t)sqrt((double)ks + 1) + 4;
        for (int64_t i = 0; i < ns; i++) samp[i] = key[8 * i];
        int64_t r_lo = ks + margin, r_hi = ks - margin;
        uint32_t t, e, v_lo = 0, v_hi = 0xFFFFFFFFu;
        int64_t nd;
        if (r_lo < ns) {
            topk_threshold(samp, ns, r_lo, samp + ns + 32, &t, &e, &nd);
            v_lo = nd ? e : t;
        }
        if (r_hi >= 1) {
            topk_threshold(samp, ns, r_hi, samp + ns + 32, &t, &e, &nd);
            v_hi = nd ? e : t;
        }
        int64_t c1 = v_lo ? count_ge(key, n, v_lo) : n, c2 = v_hi != 0xFFFFFFFFu ? count_ge(key, n, v_hi) : 0;
        lo = 0;
        hi = 0xFFFFFFFFu;                   /* keys are at most 0xFFFFFFFE */
        if (c1 >= k) { lo = v_lo; c_lo = c1; } else { hi = v_lo; c_hi = c1; }
        if (c2 < k) { if (v_hi < hi) { hi = v_hi; c_hi = c2; } } else if (v_hi > lo) { lo = v_hi; c_lo = c2; }
        if (c_lo == k) {                    /* exactly k at or above lo */
            *take = *eq = lo;
            *need = 0;
            return;
        }
    } else {
        uint32_t kmin, kmax;
        key_range(key, n, &kmin, &kmax);
        lo = kmin;
        hi = kmax + 1;                      /* kmax < 2^32 - 1 */
    }
    int64_t m = n, base = 0;
    const uint32_t *a = key;
    while (hi - lo > 1) {
        if (a == key && c_lo - c_hi <= SMALL_CAP) {          /* few keys left in [lo, hi): keep only them */
            m = keys_between(key, n, lo, hi, small);
            a = small;
            base = c_hi;
        }
        uint32_t mid = lo + (hi - lo) / 2;
        int64_t c = base + count_ge(a, m, mid);
        if (c >= k) {
            lo = mid;
            c_lo = c;
            if (c == k) {                                      /* exactly k at or above mid */
                *take = mid;
                *eq = mid;
                *need = 0;
                return;
            }
        } else {
            hi = mid;
            c_hi = c;
        }
    }
    *take = hi;          /* all of those (c_hi < k), then k - c_hi of the keys equal to lo */
    *eq = lo;
    *need = k - c_hi;
}

/* ---------------------------------------------------------------------------------------------
 * Tiled channel-major dot products. A metadata array of C channels is stored [tiles, C, TILE]
 * per KV head: column j of channel c at (j / TILE) * tstride + c * TILE + j % TILE (tstride =
 * C_total * TILE). rows[g*C + c]: the tile-0 address of the row query head g reads as its c-th.
 * out[(g*os) + j - obase] = scale[g] * sum_c w[g*C + c] * row(g, c)[j] for j in [j0, j1) (j0 a
 * multiple of TILE); max_only: out[j - obase] = max over g instead (no scale). A register tile
 * reads VT * 64 contiguous bytes of each row, inside one storage tile.
 * ------------------------------------------------------------------------------------------- */
#define TILE 128
/* AVX2: each row's columns this far ahead are prefetched while a register tile is scored (a
 * register tile reads only 32-128 bytes of each of C rows 512 bytes apart, which the hardware
 * prefetchers follow poorly). 32 columns (128 bytes) measured best of 0 / 16 / 32 / 64 / 128 /
 * 256 with the metadata streaming from DRAM: Quest 8K -12%, Qwen's 16K -11% (`selection.md`). */
#define CM_PF_COLS 32
/* ... into L2 (T1), not L1 (T0): C call per layer, 2 threads, in-process A/B (selection_cost.py
 * --variant): SmolLM2's geometry at 8K Quest 47.1 -> 37.4 us, ShadowKV 71.9 -> 59.8, Double
 * Sparsity 136 -> 123; Qwen's at 16K unchanged (fifteenth session, ../../benchmarks/avx2/README.md). */
#define CM_PF_HINT _MM_HINT_T1
#define TILE_OFS(j, tstride) (((j) >> 7) * (tstride) + ((j) & (TILE - 1)))

#ifdef __AVX512F__
static inline __attribute__((always_inline)) void cm_dot_group(const int GN, const int VT, int C, const float *w,
                                                               const float *const *rows, int64_t tstride, int64_t j0,
                                                               int64_t j1, float *out, int64_t os, const float *scale,
                                                               int max_only, int first) {
    __m512 acc[8][8];
    int64_t j = j0;
    for (; j + 16 * VT <= j1; j += 16 * VT) {     /* whole register tiles (16 * VT divides TILE) */
        const int64_t ofs = TILE_OFS(j, tstride);
        for (int g = 0; g < GN; g++)
            for (int v = 0; v < VT; v++) acc[g][v] = _mm512_setzero_ps();
        for (int c = 0; c < C; c++)
            for (int g = 0; g < GN; g++) {
                const float *p = rows[g * C + c] + ofs;
                const __m512 wv = _mm512_set1_ps(w[g * C + c]);
                for (int v = 0; v < VT; v++) acc[g][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p + 16 * v), acc[g][v]);
            }
        if (max_only) {
            for (int v = 0; v < VT; v++) {
                __m512 b = acc[0][v];
                for (int g = 1; g < GN; g++) b = _mm512_max_ps(b, acc[g][v]);
                if (!first) b = _mm512_max_ps(b, _mm512_loadu_ps(out + j + 16 * v));
                _mm512_storeu_ps(out + j + 16 * v, b);
            }
        } else {
            for (int g = 0; g < GN; g++) {
                const __m512 s = _mm512_set1_ps(scale[g]);
                for (int v = 0; v < VT; v++) _mm512_storeu_ps(out + g * os + j + 16 * v, _mm512_mul_ps(acc[g][v], s));
            }
        }
    }
    for (; j < j1; j += 16) {                     /* the last columns, a vector at a time */
        const __mmask16 mk = j1 - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (j1 - j)) - 1);
        const int64_t ofs = TILE_OFS(j, tstride);
        __m512 a[8];
        for (int g = 0; g < GN; g++) a[g] = _mm512_setzero_ps();
        for (int c = 0; c < C; c++)
            for (int g = 0; g < GN; g++)
                a[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[g * C + c]), _mm512_maskz_loadu_ps(mk, rows[g * C + c] + ofs), a[g]);
        if (max_only) {
            __m512 b = a[0];
            for (int g = 1; g < GN; g++) b = _mm512_max_ps(b, a[g]);
            if (!first) b = _mm512_max_ps(b, _mm512_maskz_loadu_ps(mk, out + j));
            _mm512_mask_storeu_ps(out + j, mk, b);
        } else {
            for (int g = 0; g < GN; g++)
                _mm512_mask_storeu_ps(out + g * os + j, mk, _mm512_mul_ps(a[g], _mm512_set1_ps(scale[g])));
        }
    }
}

/* register tiles per query-head count: GN x CM_VT(GN) accumulators, at most 28 */
#define CM_VT(GN) ((GN) <= 3 ? 8 : (GN) <= 7 ? 4 : 2)
#elif defined(SEL_AVX2)
/* AVX2: the AVX-512 cm_dot in 8 lanes, GN x VT accumulators within 12 of the 16 registers */
static inline __attribute__((always_inline)) void cm_dot_group(const int GN, const int VT, int C, const float *w,
                                                               const float *const *rows, int64_t tstride, int64_t j0,
                                                               int64_t j1, float *out, int64_t os, const float *scale,
                                                               int max_only, int first) {
    __m256 acc[8][8];
    int64_t j = j0;
    for (; j + 8 * VT <= j1; j += 8 * VT) {       /* whole register tiles (8 * VT divides TILE) */
        const int64_t ofs = TILE_OFS(j, tstride);
        const int64_t pf = TILE_OFS(j + CM_PF_COLS, tstride) - ofs;
        for (int g = 0; g < GN; g++)
            for (int v = 0; v < VT; v++) acc[g][v] = _mm256_setzero_ps();
        for (int c = 0; c < C; c++)
            for (int g = 0; g < GN; g++) {
                const float *p = rows[g * C + c] + ofs;
                for (int v = 0; v < (VT + 1) / 2; v++)         /* a line per 16 columns (never faults) */
                    _mm_prefetch((const char *)(p + pf + 16 * v), CM_PF_HINT);
                const __m256 wv = _mm256_broadcast_ss(w + g * C + c);
                for (int v = 0; v < VT; v++) acc[g][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p + 8 * v), acc[g][v]);
            }
        if (max_only) {
            for (int v = 0; v < VT; v++) {
                __m256 b = acc[0][v];
                for (int g = 1; g < GN; g++) b = _mm256_max_ps(b, acc[g][v]);
                if (!first) b = _mm256_max_ps(b, _mm256_loadu_ps(out + j + 8 * v));
                _mm256_storeu_ps(out + j + 8 * v, b);
            }
        } else {
            for (int g = 0; g < GN; g++) {
                const __m256 sv = _mm256_broadcast_ss(scale + g);
                for (int v = 0; v < VT; v++) _mm256_storeu_ps(out + g * os + j + 8 * v, _mm256_mul_ps(acc[g][v], sv));
            }
        }
    }
    for (; j < j1; j += 8) {                      /* the last columns, a vector at a time */
        const __m256i mk = lanes_below(j1 - j >= 8 ? 8 : j1 - j);
        const int64_t ofs = TILE_OFS(j, tstride);
        __m256 a[8];
        for (int g = 0; g < GN; g++) a[g] = _mm256_setzero_ps();
        for (int c = 0; c < C; c++)
            for (int g = 0; g < GN; g++)
                a[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * C + c), _mm256_maskload_ps(rows[g * C + c] + ofs, mk), a[g]);
        if (max_only) {
            __m256 b = a[0];
            for (int g = 1; g < GN; g++) b = _mm256_max_ps(b, a[g]);
            if (!first) b = _mm256_max_ps(b, _mm256_maskload_ps(out + j, mk));
            _mm256_maskstore_ps(out + j, mk, b);
        } else {
            for (int g = 0; g < GN; g++)
                _mm256_maskstore_ps(out + g * os + j, mk, _mm256_mul_ps(a[g], _mm256_broadcast_ss(scale + g)));
        }
    }
}

/* GN x CM_VT(GN) accumulators, at most 12 of the 16 registers */
#define CM_VT(GN) ((GN) == 1 ? 8 : (GN) <= 3 ? 4 : (GN) <= 6 ? 2 : 1)
#else
/* portable: 64-column pieces (half a tile), one query head at a time (the inner loops vectorise) */
static void cm_dot(int G, int C, const float *w, const float *const *rows, int64_t tstride, int64_t j0, int64_t j1,
                   int64_t obase, const float *scale, float *out, int64_t os, int max_only) {
    out -= obase;
    for (int64_t jb = j0; jb < j1; jb += 64) {
        const int m = j1 - jb < 64 ? (int)(j1 - jb) : 64;
        const int64_t ofs = TILE_OFS(jb, tstride);
        for (int g = 0; g < G; g++) {
            float acc[64];
            for (int jj = 0; jj < m; jj++) acc[jj] = 0.f;
            for (int c = 0; c < C; c++) {
                const float *p = rows[g * C + c] + ofs;
                const float wv = w[g * C + c];
                for (int jj = 0; jj < m; jj++) acc[jj] = fmaf(wv, p[jj], acc[jj]);
            }
            if (max_only) {
                float *o = out + jb;
                if (g == 0)
                    for (int jj = 0; jj < m; jj++) o[jj] = acc[jj];
                else
                    for (int jj = 0; jj < m; jj++) o[jj] = acc[jj] > o[jj] ? acc[jj] : o[jj];
            } else {
                float *o = out + (size_t)g * os + jb, sc = scale[g];
                for (int jj = 0; jj < m; jj++) o[jj] = acc[jj] * sc;
            }
        }
    }
}
#endif

#ifdef CM_VT
/* Query heads one cm_dot_group pass takes of the `left` still to score. AVX-512: up to 8 (GN x
 * CM_VT within 28 of its 32 registers). AVX2: balanced passes of at most 4, each with CM_VT(GN) >=
 * 2 register tiles, so a broadcast weight and a prefetched line feed two or more multiply-adds;
 * one pass of G 7 or 8 has one tile (VT 1): every FMA then carries its own broadcast, load and
 * prefetch. The passes re-read a register tile's rows from L1. In-process A/B
 * (benchmarks/sparse/selection_cost.py --variant, 2 threads, 24 layers' metadata in turn;
 * seventeenth session): Qwen's geometry 2x7x64 at 16K, one pass of 7 -> 4 + 3: Quest 81.6 -> 64.6
 * us a layer, ShadowKV 165 -> 119, Double Sparsity 323 -> 239; 4x8x128 at 8K, 8 -> 4 + 4: Quest
 * 269 -> 235, ShadowKV 339 -> 234; 2x6x64 at 8K, 6 (two tiles) -> 3 + 3: Quest 43.8 -> 39.7,
 * ShadowKV 74.6 -> 68.6; 2x5x64, 5 -> 3 + 2: Quest 33.9 -> 32.2. (Passes of 3: the same as 4; of
 * 2: slower for Double Sparsity.) */
static inline int cm_group_size(int left) {
#ifdef __AVX512F__
    return left < 8 ? left : 8;
#else
    const int passes = (left + 3) / 4;
    return (left + passes - 1) / passes;
#endif
}

static void cm_dot(int G, int C, const float *w, const float *const *rows, int64_t tstride, int64_t j0, int64_t j1,
                   int64_t obase, const float *scale, float *out, int64_t os, int max_only) {
    out -= obase;                                  /* indexed by column */
    for (int g0 = 0, gn; g0 < G; g0 += gn) {
        gn = cm_group_size(G - g0);
        const float *wg = w + (size_t)g0 * C;
        const float *const *rg = rows + (size_t)g0 * C;
        const float *sg = scale ? scale + g0 : NULL;
        float *og = max_only ? out : out + (size_t)g0 * os;
        int first = g0 == 0;
        switch (gn) {   /* constant sizes: GN x CM_VT(GN) accumulators stay in registers */
        case 1: cm_dot_group(1, CM_VT(1), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        case 2: cm_dot_group(2, CM_VT(2), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        case 3: cm_dot_group(3, CM_VT(3), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        case 4: cm_dot_group(4, CM_VT(4), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        case 5: cm_dot_group(5, CM_VT(5), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        case 6: cm_dot_group(6, CM_VT(6), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        case 7: cm_dot_group(7, CM_VT(7), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        default: cm_dot_group(8, CM_VT(8), C, wg, rg, tstride, j0, j1, og, os, sg, max_only, first); break;
        }
    }
}
#endif

/* SparF's scores: out[j - obase] = scale * sum_c w[c] * rows[c][j], j in [j0, j1), over C plain
 * channel rows (each read as one long run: 8 rows at a time stream from memory together). */
static void rows_dot(int C, const float *w, const float *const *rows, int64_t j0, int64_t j1, int64_t obase,
                     float scale, float *out) {
    out -= obase;
    for (int c0 = 0; c0 < C; c0 += 8) {
        const int cn = C - c0 < 8 ? C - c0 : 8, first = c0 == 0, last = c0 + cn == C;
        int64_t j = j0;
#ifdef __AVX512F__
        __m512 wv[8];
        for (int c = 0; c < cn; c++) wv[c] = _mm512_set1_ps(w[c0 + c]);
        const __m512 sv = _mm512_set1_ps(last ? scale : 1.0f);
        for (; j + 64 <= j1; j += 64) {
            __m512 a[4];
            for (int v = 0; v < 4; v++) a[v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + j + 16 * v);
            for (int c = 0; c < cn; c++) {
                const float *p = rows[c0 + c] + j;
                for (int v = 0; v < 4; v++) a[v] = _mm512_fmadd_ps(wv[c], _mm512_loadu_ps(p + 16 * v), a[v]);
            }
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(out + j + 16 * v, _mm512_mul_ps(a[v], sv));
        }
        for (; j < j1; j += 16) {
            const __mmask16 mk = j1 - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (j1 - j)) - 1);
            __m512 a = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk, out + j);
            for (int c = 0; c < cn; c++) a = _mm512_fmadd_ps(wv[c], _mm512_maskz_loadu_ps(mk, rows[c0 + c] + j), a);
            _mm512_mask_storeu_ps(out + j, mk, _mm512_mul_ps(a, sv));
        }
#elif defined(SEL_AVX2)
        __m256 wv[8];
        for (int c = 0; c < cn; c++) wv[c] = _mm256_broadcast_ss(w + c0 + c);
        const __m256 sv = _mm256_set1_ps(last ? scale : 1.0f);
        for (; j + 32 <= j1; j += 32) {
            __m256 a[4];
            for (int v = 0; v < 4; v++) a[v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + j + 8 * v);
            for (int c = 0; c < cn; c++) {
                const float *p = rows[c0 + c] + j;
                for (int v = 0; v < 4; v++) a[v] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(p + 8 * v), a[v]);
            }
            for (int v = 0; v < 4; v++) _mm256_storeu_ps(out + j + 8 * v, _mm256_mul_ps(a[v], sv));
        }
        for (; j < j1; j += 8) {
            const __m256i mk = lanes_below(j1 - j >= 8 ? 8 : j1 - j);
            __m256 a = first ? _mm256_setzero_ps() : _mm256_maskload_ps(out + j, mk);
            for (int c = 0; c < cn; c++) a = _mm256_fmadd_ps(wv[c], _mm256_maskload_ps(rows[c0 + c] + j, mk), a);
            _mm256_maskstore_ps(out + j, mk, _mm256_mul_ps(a, sv));
        }
#else
        const float sc = last ? scale : 1.0f;
        for (; j < j1; j++) {
            float a = first ? 0.f : out[j];
            for (int c = 0; c < cn; c++) a = fmaf(w[c0 + c], rows[c0 + c][j], a);
            out[j] = a * sc;
        }
#endif
    }
}

/* max of x[0..n) */
static inline float vmax(const float *x, int64_t n) {
    int64_t j = 0;
    float m = -INFINITY;
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + j));
    m = _mm512_reduce_max_ps(mv);
#elif defined(SEL_AVX2)
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + j));
    m = hmax256(mv);
#endif
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* 2^t for t <= 0 (t may be far below -126: 0), ~1e-7 relative: the softmax policies keep
 * base-2 logits (log2(e) folded into their scale), so one range reduction and a degree-6
 * polynomial on [-1/2, 1/2] do (cheaper than exp's two-constant reduction) */
#define EXP2_C6 1.54697322e-4f
#define EXP2_C5 1.34004327e-3f
#define EXP2_C4 9.61802527e-3f
#define EXP2_C3 5.55032715e-2f
#define EXP2_C2 2.40226507e-1f
#define EXP2_C1 6.93147182e-1f
static inline float exp2_nonpos(float t) {
    t = t < -150.f ? -150.f : t;
    float n = nearbyintf(t), f = t - n;
    float p = EXP2_C6;
    p = p * f + EXP2_C5;
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + 1.0f;
    return ldexpf(p, (int)n);
}
#ifdef __AVX512F__
static inline __m512 exp2_512(__m512 t) {
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_C6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#elif defined(SEL_AVX2)
static inline __m256 exp2_256(__m256 t) {      /* t >= -150 (clamped by the callers' use) */
    t = _mm256_max_ps(t, _mm256_set1_ps(-150.f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_C6);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    /* 2^n in two normal factors (n >= -150, each half >= -75), as ldexpf's denormals */
    __m256i ni = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(ni, 1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

/* sum_j 2^(x[j] - m), j in [0, n) */
static inline float sum_exp2(const float *x, int64_t n, float m) {
    int64_t j = 0;
    float s = 0.f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    for (; j + 32 <= n; j += 32) {
        acc = _mm512_add_ps(acc, exp2_512(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv)));
        acc2 = _mm512_add_ps(acc2, exp2_512(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), mv)));
    }
    for (; j < n; j += 16) {
        __mmask16 mk = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        acc = _mm512_mask_add_ps(acc, mk, acc, exp2_512(_mm512_maskz_sub_ps(mk, _mm512_maskz_loadu_ps(mk, x + j), mv)));
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2));
#elif defined(SEL_AVX2)
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    for (; j + 16 <= n; j += 16) {
        acc = _mm256_add_ps(acc, exp2_256(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv)));
        acc2 = _mm256_add_ps(acc2, exp2_256(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), mv)));
    }
    for (; j < n; j += 8) {
        const __m256i mk = lanes_below(n - j >= 8 ? 8 : n - j);
        __m256 e = exp2_256(_mm256_sub_ps(_mm256_maskload_ps(x + j, mk), mv));
        acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(mk)));
    }
    s = hsum256(_mm256_add_ps(acc, acc2));
#endif
    for (; j < n; j++) s += exp2_nonpos(x[j] - m);
    return s;
}

/* key[j] = f2key(max_g (x[g][j] - lz[g])): the group's best log-probability (x: [G][os]) */
static inline void group_max_keys(const float *x, int64_t os, int G, const float *lz, int64_t n, uint32_t *key) {
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (; j + 16 <= n; j += 16) {
        __m512 b = _mm512_sub_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(lz[0]));
        for (int g = 1; g < G; g++)
            b = _mm512_max_ps(b, _mm512_sub_ps(_mm512_loadu_ps(x + g * os + j), _mm512_set1_ps(lz[g])));
        __m512i u = _mm512_castps_si512(b);
        __mmask16 neg = _mm512_test_epi32_mask(u, sign);
        u = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), neg, u, _mm512_set1_epi32(-1));
        u = _mm512_min_epu32(u, _mm512_set1_epi32((int)0xFFFFFFFEu));
        _mm512_storeu_si512(key + j, u);
    }
#elif defined(SEL_AVX2)
    for (; j + 8 <= n; j += 8) {
        __m256 b = _mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(lz[0]));
        for (int g = 1; g < G; g++)
            b = _mm256_max_ps(b, _mm256_sub_ps(_mm256_loadu_ps(x + g * os + j), _mm256_set1_ps(lz[g])));
        _mm256_storeu_si256((__m256i *)(key + j), f2key256(_mm256_castps_si256(b)));
    }
#endif
    for (; j < n; j++) {
        float b = x[j] - lz[0];
        for (int g = 1; g < G; g++) {
            float c = x[g * os + j] - lz[g];
            b = c > b ? c : b;
        }
        key[j] = f2key(b);
    }
}

static inline void to_keys(const float *x, int64_t n, uint32_t *key) {
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (; j + 16 <= n; j += 16) {
        __m512i u = _mm512_loadu_si512(x + j);
        __mmask16 neg = _mm512_test_epi32_mask(u, sign);
        u = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), neg, u, _mm512_set1_epi32(-1));
        _mm512_storeu_si512(key + j, _mm512_min_epu32(u, _mm512_set1_epi32((int)0xFFFFFFFEu)));
    }
#elif defined(SEL_AVX2)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_si256((__m256i *)(key + j), f2key256(_mm256_loadu_si256((const __m256i *)(x + j))));
#endif
    for (; j < n; j++) key[j] = f2key(x[j]);
}

/* ---------------------------------------------------------------------------------------------
 * One sequence's geometry (SparsePolicy.select) and its counters before this token.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int64_t s, length, n_full, tail, budget, lo, hi, k, ncand, n_out;
    int64_t c0, c1;          /* the state's hdr[0], hdr[1] before the append */
} seq_geom;

/* Whether a sequence's selection scores anything: SparF always (its softmax spans every token);
 * the others unless streaming or the budget takes every candidate or none (prep_task then
 * leaves the task without chunks, and kvo_select counts no work for it). */
static inline int scores_candidates(int pol, const seq_geom *g) {
    return pol == SEL_SPARF || (pol != SEL_STREAMING && g->k > 0 && g->k < g->ncand);
}

static void geometry(const sel_config *cf, int64_t s, seq_geom *g) {
    const int64_t bs = cf->bs, unit = cf->unit, length = s + 1;
    g->s = s;
    g->length = length;
    g->n_full = (length - 1) / bs;
    g->tail = length - g->n_full * bs;
    if (cf->budget_is_tokens) {
        g->budget = (int64_t)cf->budget_value;
    } else {
        g->budget = (int64_t)ceil(cf->budget_value * (double)length);
        if (g->budget < 1) g->budget = 1;
    }
    int64_t sink = imin(ceildiv(cf->sink_tokens, bs), g->n_full);
    int64_t recent = imin(imax(0, ceildiv(cf->recent_tokens - g->tail, bs)), g->n_full - sink);
    recent = imin(recent, imax(0, floordiv(g->budget - g->tail, bs) - sink));
    g->lo = sink;
    g->hi = g->n_full - recent;
    int64_t room = imax(0, g->budget - g->tail - (sink + recent) * bs);
    g->ncand = (g->hi - g->lo) * bs / unit;
    g->k = imin(room / unit, g->ncand);
    g->n_out = 0;
    if (cf->policy == SEL_SHADOWKV) {        /* round(share * budget / unit): half to even, as Python */
        double x = nearbyint(cf->outlier_share * (double)g->budget / (double)unit);
        g->n_out = imin(g->ncand, (int64_t)x);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Tasks: one per (sequence, KV head). Three phases: prep (serial: the append, the query, the
 * scoring's rows), scoring in column chunks (parallel over every chunk of every task: a batch
 * of one sequence still keeps the threads busy), finish (parallel over tasks: top k, masks,
 * SparF's terms); then each sequence's union.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const sel_config *cf;
    const seq_geom *geo;
    const int64_t *table, *channels;
    const void *q, *k, *v;
    int q_dt, kv_dt;
    int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
    int64_t NB;
    int64_t T_pad;           /* columns of a slot's per-g logits */
    uint64_t *masks;         /* [B, NB, H_kv] */
    float *alpha, *vmean;    /* [B, H], [B, H_kv, D] */
} call_ctx;

/* A task's buffers: one workspace slot (floats), for sequences of up to T_pad - 16 tokens. */
typedef struct {
    float *logits;           /* [G, T_pad]: per-g logits (softmax policies) or [T_pad] scores */
    uint32_t *key, *key2;    /* [T_pad] each */
    uint32_t *small;         /* [TOPK_SCRATCH(T_pad)]: top-k scratch */
    float *qf, *w, *scale;   /* [G*D] the group's query (fp32), [G*D] weights, [G] scales */
    float *part;             /* [T_pad / 16 + 1][2G] per chunk: each g's max, sum exp(x - max) */
    const float **rows;      /* [G*D] */
    int *idx;                /* [D] */
} slot_ws;

typedef struct {
    int b, h;
    int C, max_only;         /* rows per g; scores max over the group (else per-g logits) */
    int64_t tstride;         /* floats between two tiles of a row */
    int64_t col0, col1;      /* metadata columns scored, col0 a multiple of TILE (logits[j - col0]) */
    int64_t vstart;          /* the softmax runs over columns [vstart, col1) */
    int64_t cand;            /* column of the first candidate unit */
    int64_t chunk, nchunks;  /* columns per chunk (a multiple of TILE) */
    slot_ws W;
} task_t;

static int64_t ws_floats(const sel_config *cf, int64_t T_pad) {
    int64_t G = cf->G, D = cf->D;
    return G * T_pad + 2 * T_pad + TOPK_SCRATCH(T_pad) + 2 * G * D + G + 2 * G * (T_pad / 16 + 1)
         + 2 * G * D + D + 64;
}

/* logits columns for sequences of up to max_len tokens (scoring starts up to a tile early; at
 * least D: the channel keys use it) */
static int64_t t_pad(const sel_config *cf, int64_t max_len) {
    return imax((max_len + 15) / 16 * 16 + 16 + TILE, ((int64_t)cf->D + 15) / 16 * 16);
}

static slot_ws carve(const sel_config *cf, float *p, int64_t T_pad) {
    slot_ws W;
    int64_t G = cf->G, D = cf->D;
    W.logits = p; p += G * T_pad;
    W.key = (uint32_t *)p; p += T_pad;
    W.key2 = (uint32_t *)p; p += T_pad;
    W.small = (uint32_t *)p; p += TOPK_SCRATCH(T_pad);
    W.qf = p; p += G * D;
    W.w = p; p += G * D;
    W.scale = p; p += G;
    W.part = p; p += 2 * G * (T_pad / 16 + 1);
    p += ((uintptr_t)p & 7) ? 1 : 0;          /* pointer alignment */
    W.rows = (const float **)p; p += 2 * G * D;
    W.idx = (int *)p;
    return W;
}

/* the chosen candidate units -> bits of the dense mask column (dm + block * H_kv) */
static void mark_units(const seq_geom *g, const sel_config *cf, const uint32_t *key, uint32_t take, uint32_t eq,
                       int64_t need, uint64_t *dm, int H_kv) {
    const int64_t n = g->ncand, unit = cf->unit, bs = cf->bs, per = bs / unit;
    const uint64_t ubits = full_bits((int)unit);
    int64_t u = 0;
#ifdef __AVX512F__
    if (unit == 1 && bs % 16 == 0) {          /* 16 tokens: one compare is 16 mask bits */
        const __m512i tv = _mm512_set1_epi32((int)take);
        for (; u + 16 <= n; u += 16) {
            __mmask16 m = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + u), tv);
            if (m) dm[(g->lo + u / bs) * H_kv] |= (uint64_t)m << (u % bs);
        }
    }
#endif
    for (; u < n; u++)
        if (key[u] >= take) dm[(g->lo + u / per) * H_kv] |= ubits << ((u % per) * unit);
    for (u = 0; need > 0 && u < n; u++)
        if (key[u] == eq) {
            dm[(g->lo + u / per) * H_kv] |= ubits << ((u % per) * unit);
            need--;
        }
}

/* the k best of the ncand keys -> mask bits (0 < k < ncand) */
static void choose(const seq_geom *g, const sel_config *cf, const uint32_t *key, uint32_t *small, uint64_t *dm, int H_kv) {
    uint32_t take, eq;
    int64_t need;
    topk_threshold(key, g->ncand, g->k, small, &take, &eq, &need);
    mark_units(g, cf, key, take, eq, need, dm, H_kv);
}

/* the r largest |q| channels (ascending channel order) */
static void top_channels(const float *qg, int D, int r, uint32_t *key, uint32_t *small, int *idx) {
    if (r >= D) {
        for (int d = 0; d < D; d++) idx[d] = d;
        return;
    }
    for (int d = 0; d < D; d++) key[d] = f2key(fabsf(qg[d]));
    uint32_t take, eq;
    int64_t need;
    topk_threshold(key, D, r, small, &take, &eq, &need);
    int m = 0;
    for (int d = 0; d < D; d++)
        if (key[d] >= take || (key[d] == eq && need > 0 && need--)) idx[m++] = d;
}

/* sum over the attended tokens of head h (mask column dm, the tail) of 2^(x[t] - m) for each of
 * the G rows of x (stride os): the attended logits are gathered densely first (buf: T_pad
 * floats), so only they are exponentiated */
static void attended_exp2_sums(const float *x, int64_t os, int G, const float *m, const seq_geom *g, int bs,
                               const uint64_t *dm, int H_kv, float *buf, float *out) {
    for (int gi = 0; gi < G; gi++) {
        const float *xg = x + gi * os;
        int64_t n = 0;
#ifdef __AVX512F__
        if (bs % 16 == 0) {
            for (int64_t i = 0; i < g->n_full; i++) {
                uint64_t mk = dm[i * H_kv];
                for (int p = 0; mk && p < bs; p += 16, mk >>= 16) {
                    __mmask16 m16 = (__mmask16)(mk & 0xFFFF);
                    if (!m16) continue;
                    _mm512_storeu_ps(buf + n, _mm512_maskz_compress_ps(m16, _mm512_loadu_ps(xg + i * bs + p)));
                    n += __builtin_popcount(m16);
                }
            }
        } else
#endif
        {
            for (int64_t i = 0; i < g->n_full; i++) {
                uint64_t mk = dm[i * H_kv];
                while (mk) {
                    int t = __builtin_ctzll(mk);
                    mk &= mk - 1;
                    buf[n++] = xg[i * bs + t];
                }
            }
        }
        out[gi] = sum_exp2(buf, n, m[gi]) + sum_exp2(xg + g->n_full * bs, g->tail, m[gi]);
    }
}

/* Phase 1 (serial): append the new token to head h's metadata; load the group's query; set up
 * the rows the chunks score. */
static void prep_task(const call_ctx *X, task_t *T) {
    const sel_config *cf = X->cf;
    const int b = T->b, h = T->h, G = cf->G, D = cf->D, bs = cf->bs, pol = cf->policy;
    const seq_geom *g = X->geo + b;
    const int64_t *st = X->table + (size_t)b * ST_COLS;
    const int64_t cap = st[ST_CAP];           /* columns (a multiple of TILE for tiled arrays) */
    const int64_t tsD = (int64_t)D * TILE;    /* tile stride of a D-channel array */
    slot_ws *W = &T->W;

    if (X->k) {
        float kf[D_MAX], vf[D_MAX];
        const size_t es = dt_size(X->kv_dt);
        load_row((const char *)X->k + (X->k_sb * b + X->k_sh * h) * es, X->kv_dt, D, kf);
        const int64_t s = g->s;
        if (pol == SEL_QUEST) {
            float *kmin = (float *)st[ST_A0] + (size_t)h * D * cap, *kmax = (float *)st[ST_A1] + (size_t)h * D * cap;
            const int64_t o = TILE_OFS(s / bs, tsD);
            for (int d = 0; d < D; d++) {
                float *lo = kmin + o + d * TILE, *hi = kmax + o + d * TILE;
                *lo = kf[d] < *lo ? kf[d] : *lo;
                *hi = kf[d] > *hi ? kf[d] : *hi;
            }
        } else if (pol == SEL_SPARF) {
            float *K = (float *)st[ST_A0] + (size_t)h * D * cap + s, *vsum = (float *)st[ST_A1] + (size_t)h * D;
            load_row((const char *)X->v + (X->v_sb * b + X->v_sh * h) * es, X->kv_dt, D, vf);
            for (int d = 0; d < D; d++) {
                K[d * cap] = kf[d];
                vsum[d] += vf[d];
            }
        } else if (pol == SEL_DOUBLE_SPARSITY) {
            const int r = cf->r;
            float *L = (float *)st[ST_A0] + (size_t)h * r * cap + TILE_OFS(s, (int64_t)r * TILE);
            const int64_t *ch = X->channels + (size_t)h * r;
            for (int c = 0; c < r; c++) L[c * TILE] = kf[ch[c]];
        } else if (pol == SEL_SHADOWKV || pol == SEL_RETRIEVAL) {
            const int c = cf->unit;
            float *pend = (float *)st[ST_A2] + (size_t)h * c * D;
            memcpy(pend + g->c1 * D, kf, sizeof(float) * D);
            if (g->c1 + 1 == c) {                 /* the chunk is complete: its landmark, min cosine */
                float *land = (float *)st[ST_A0] + (size_t)h * D * cap + TILE_OFS(g->c0, tsD);
                float *mc = (float *)st[ST_A1] + (size_t)h * cap;
                float mean[D_MAX], mn = 0.f;
                for (int d = 0; d < D; d++) {
                    float a = 0.f;
                    for (int i = 0; i < c; i++) a += pend[i * D + d];
                    mean[d] = a / (float)c;
                    mn += mean[d] * mean[d];
                }
                mn = sqrtf(mn);
                mn = mn > 1e-8f ? mn : 1e-8f;     /* as F.cosine_similarity: norms clamped at eps */
                float lowest = INFINITY;
                for (int i = 0; i < c; i++) {
                    float dot = 0.f, kn = 0.f;
                    for (int d = 0; d < D; d++) {
                        dot += pend[i * D + d] * mean[d];
                        kn += pend[i * D + d] * pend[i * D + d];
                    }
                    kn = sqrtf(kn);
                    float cs = dot / ((kn > 1e-8f ? kn : 1e-8f) * mn);
                    lowest = cs < lowest ? cs : lowest;
                }
                for (int d = 0; d < D; d++) land[d * TILE] = mean[d];
                mc[g->c0] = lowest;
            }
        }
    }

    const size_t qes = dt_size(X->q_dt);
    for (int gi = 0; gi < G; gi++)
        load_row((const char *)X->q + (X->q_sb * b + X->q_sh * (h * G + gi)) * qes, X->q_dt, D, W->qf + gi * D);

    /* what phase 2 scores: columns [col0, col1) of the rows, C per query head */
    T->col0 = T->col1 = T->vstart = T->cand = 0;
    T->C = 0;
    T->max_only = 1;
    T->tstride = tsD;
    if (pol == SEL_SPARF) {
        /* SparQ: per query head the r largest |q| channels, every token, temperature
         * sqrt(D * |q[r]|_1 / |q|_1) (applied as a per-g scale of the logits) */
        const int r = cf->r < D ? cf->r : D;
        const float *K = (const float *)st[ST_A0] + (size_t)h * D * cap;
        for (int gi = 0; gi < G; gi++) {
            const float *qg = W->qf + gi * D;
            top_channels(qg, D, r, W->key, W->small, W->idx);
            float sr = 0.f, sa = 0.f;
            for (int d = 0; d < D; d++) sa += fabsf(qg[d]);
            for (int c = 0; c < r; c++) {
                W->w[gi * r + c] = qg[W->idx[c]];
                W->rows[gi * r + c] = K + (size_t)W->idx[c] * cap;
                sr += fabsf(qg[W->idx[c]]);
            }
            float frac = sr / (sa > 1e-30f ? sa : 1e-30f);
            W->scale[gi] = LOG2E / sqrtf((float)D * frac);     /* base-2 logits */
        }
        T->C = r;
        T->max_only = 0;
        T->col1 = g->length;                  /* the softmax is over every token */
        T->cand = g->lo * bs;
    } else if (scores_candidates(pol, g)) {
        if (pol == SEL_QUEST) {               /* upper bound sum_d max(q_d kmax_d, q_d kmin_d) */
            const float *kmin = (const float *)st[ST_A0] + (size_t)h * D * cap, *kmax = (const float *)st[ST_A1] + (size_t)h * D * cap;
            for (int gi = 0; gi < G; gi++)
                for (int d = 0; d < D; d++) {
                    float qd = W->qf[gi * D + d];
                    W->w[gi * D + d] = qd;
                    W->rows[gi * D + d] = (qd >= 0.f ? kmax : kmin) + (size_t)d * TILE;
                }
            T->C = D;
            T->cand = g->lo;
            T->col1 = g->hi;
        } else if (pol == SEL_DOUBLE_SPARSITY) {   /* q[channels] . labels */
            const int r = cf->r;
            const float *L = (const float *)st[ST_A0] + (size_t)h * r * cap;
            const int64_t *ch = X->channels + (size_t)h * r;
            for (int gi = 0; gi < G; gi++)
                for (int c = 0; c < r; c++) {
                    W->w[gi * r + c] = W->qf[gi * D + ch[c]];
                    W->rows[gi * r + c] = L + (size_t)c * TILE;
                }
            T->C = r;
            T->tstride = (int64_t)r * TILE;
            T->cand = g->lo * bs;
            T->col1 = g->hi * bs;
        } else {                              /* shadowkv, retrieval: q . landmark of each chunk */
            const float *land = (const float *)st[ST_A0] + (size_t)h * D * cap;
            const int64_t per = bs / cf->unit;
            for (int gi = 0; gi < G; gi++) {
                for (int d = 0; d < D; d++) {
                    W->w[gi * D + d] = W->qf[gi * D + d];
                    W->rows[gi * D + d] = land + (size_t)d * TILE;
                }
                W->scale[gi] = LOG2E / sqrtf((float)D);      /* base-2 logits */
            }
            T->C = D;
            T->max_only = pol == SEL_RETRIEVAL;   /* shadowkv: softmax over the candidates */
            T->cand = T->vstart = g->lo * per;
            T->col1 = g->hi * per;
        }
        T->col0 = T->cand / TILE * TILE;
    }
    /* chunks of at most about 2^16 multiply-adds (a few microseconds), in whole tiles, of equal
     * size (give or take a tile): unequal ones left a thread idle at the end of a call */
    const int64_t per_col = (int64_t)G * (T->C > 0 ? T->C : 1);
    const int64_t most = imax(1, ceildiv((1 << 16) / per_col, TILE));       /* tiles a chunk */
    const int64_t tiles = ceildiv(T->col1 - T->col0, TILE), parts = ceildiv(tiles, most);
    T->chunk = (parts > 0 ? ceildiv(tiles, parts) : most) * TILE;
    T->nchunks = T->col1 > T->col0 ? (T->col1 - T->col0 + T->chunk - 1) / T->chunk : 0;
}

/* Phase 2: chunk ci of a task's columns (and, softmax policies, each g's max and sum of 2^(x -
 * max) over the chunk's columns in the softmax range) */
static void score_chunk(const call_ctx *X, task_t *T, int64_t ci) {
    const int G = X->cf->G;
    slot_ws *W = &T->W;
    const int64_t j0 = T->col0 + ci * T->chunk, j1 = imin(T->col1, j0 + T->chunk);
    if (X->cf->policy == SEL_SPARF)            /* each query head its own channel rows */
        for (int gi = 0; gi < G; gi++)
            rows_dot(T->C, W->w + gi * T->C, W->rows + gi * T->C, j0, j1, T->col0, W->scale[gi],
                     W->logits + gi * X->T_pad);
    else
        cm_dot(G, T->C, W->w, W->rows, T->tstride, j0, j1, T->col0, W->scale, W->logits, X->T_pad, T->max_only);
    if (T->max_only) return;
    float *pm = W->part + ci * 2 * G, *pz = pm + G;
    const int64_t v0 = imax(j0, T->vstart) - T->col0, n = j1 - T->col0 - v0;
    for (int gi = 0; gi < G; gi++) {
        const float *x = W->logits + gi * X->T_pad + v0;
        pm[gi] = n > 0 ? vmax(x, n) : -INFINITY;
        pz[gi] = n > 0 ? sum_exp2(x, n, pm[gi]) : 0.f;
    }
}

/* each g's max m, sum Z of 2^(x - m) and base-2 log-normaliser lz = m + log2 Z, from the
 * chunks' partials (x: base-2 logits) */
static void softmax_stats(const task_t *T, int G, float *m, float *Z, float *lz) {
    const float *part = T->W.part;
    for (int gi = 0; gi < G; gi++) {
        float mm = -INFINITY, z = 0.f;
        for (int64_t c = 0; c < T->nchunks; c++) mm = part[c * 2 * G + gi] > mm ? part[c * 2 * G + gi] : mm;
        for (int64_t c = 0; c < T->nchunks; c++)
            if (part[c * 2 * G + G + gi] > 0.f) z += part[c * 2 * G + G + gi] * exp2_nonpos(part[c * 2 * G + gi] - mm);
        m[gi] = mm;
        Z[gi] = z;
        lz[gi] = mm + log2f(z);
    }
}

/* Phase 3: fixed blocks, top k, mask bits; SparF's alpha and vmean. */
static void finish_task(const call_ctx *X, task_t *T) {
    const sel_config *cf = X->cf;
    const int b = T->b, h = T->h, H_kv = cf->H_kv, G = cf->G, D = cf->D, bs = cf->bs, pol = cf->policy;
    const seq_geom *g = X->geo + b;
    const int64_t *st = X->table + (size_t)b * ST_COLS;
    const int64_t cap = st[ST_CAP];
    slot_ws *W = &T->W;
    uint64_t *dm = X->masks + (size_t)b * X->NB * H_kv + h;      /* column h of [n_full, H_kv] */
    const uint64_t full = full_bits(bs);
    for (int64_t i = 0; i < g->n_full; i++) dm[i * H_kv] = (i < g->lo || i >= g->hi) ? full : 0;
    const int64_t n = g->ncand;
    const int all = g->k >= n, none = g->k <= 0;
    if (all)
        for (int64_t i = g->lo; i < g->hi; i++) dm[i * H_kv] = full;

    if (pol == SEL_SPARF) {
        /* rank the candidates by the group's best log-probability (the probability's order) */
        float m[G_MAX], Z[G_MAX], lz[G_MAX];
        softmax_stats(T, G, m, Z, lz);
        if (!all && !none) {
            group_max_keys(W->logits + (T->cand - T->col0), X->T_pad, G, lz, n, W->key);
            choose(g, cf, W->key, W->small, dm, H_kv);
        }
        /* alpha: the attended tokens' share of each query head's approximate mass */
        float att[G_MAX];
        attended_exp2_sums(W->logits, X->T_pad, G, m, g, bs, dm, H_kv, (float *)W->key2, att);
        for (int gi = 0; gi < G; gi++) X->alpha[(size_t)b * H_kv * G + h * G + gi] = att[gi] / Z[gi];
        const float *vs = (const float *)st[ST_A1] + (size_t)h * D;
        const int64_t cnt = ((const int64_t *)st[ST_HDR])[0];
        float *vm = X->vmean + ((size_t)b * H_kv + h) * D;
        for (int d = 0; d < D; d++) vm[d] = vs[d] / (float)cnt;
        return;
    }
    if (none || all) return;
    if (pol == SEL_STREAMING) {              /* the newest k candidate blocks */
        for (int64_t i = g->hi - g->k; i < g->hi; i++) dm[i * H_kv] = full;
        return;
    }
    if (pol == SEL_SHADOWKV) {
        float m[G_MAX], Z[G_MAX], lz[G_MAX];
        softmax_stats(T, G, m, Z, lz);
        group_max_keys(W->logits + (T->cand - T->col0), X->T_pad, G, lz, n, W->key);
        if (g->n_out > 0) {                  /* the outliers (lowest min-cosine) above everything */
            const float *mc = (const float *)st[ST_A1] + (size_t)h * cap + g->lo * (bs / cf->unit);
            if (g->n_out >= n) {
                for (int64_t j = 0; j < n; j++) W->key[j] = OUTLIER_KEY;
            } else {
                for (int64_t j = 0; j < n; j++) {     /* lowest first; the all-ones key kept free */
                    uint32_t kk = ~f2key(mc[j]);
                    W->key2[j] = kk == 0xFFFFFFFFu ? 0xFFFFFFFEu : kk;
                }
                uint32_t take, eq;
                int64_t need;
                topk_threshold(W->key2, n, g->n_out, W->small, &take, &eq, &need);
                for (int64_t j = 0; j < n; j++)
                    if (W->key2[j] >= take || (W->key2[j] == eq && need > 0 && need--)) W->key[j] = OUTLIER_KEY;
            }
        }
    } else {                                 /* quest, double_sparsity, retrieval: max over the group */
        to_keys(W->logits + (T->cand - T->col0), n, W->key);
    }
    choose(g, cf, W->key, W->small, dm, H_kv);
}

/* the dense [n_full, H_kv] table of sequence b -> its union (in place), and its counts */
static void compact(const call_ctx *X, int b, int64_t *blocks, int64_t *info) {
    const sel_config *cf = X->cf;
    const seq_geom *g = X->geo + b;
    const int H_kv = cf->H_kv;
    uint64_t *dm = X->masks + (size_t)b * X->NB * H_kv;
    int64_t j = 0, read = 0, chosen = 0;
    for (int64_t i = 0; i < g->n_full; i++) {
        const uint64_t *row = dm + i * H_kv;
        uint64_t any = 0;
        for (int h = 0; h < H_kv; h++) {
            any |= row[h];
            read += row[h] != 0;
            chosen += __builtin_popcountll(row[h]);
        }
        if (!any) continue;
        blocks[j] = i;
        if (j != i) memcpy(dm + j * H_kv, row, sizeof(uint64_t) * H_kv);
        j++;
    }
    if (cf->unit == cf->bs) chosen = read * cf->bs;   /* whole blocks (bs > 64: masks are all ones) */
    info[INFO_NBLOCKS] = j;
    info[INFO_READ] = read;
    info[INFO_CHOSEN] = chosen;
}

/* Columns per tile of the tiled channel-major metadata (select.py checks it). */
int kvo_select_tile(void) { return TILE; }

/* Workspace floats of one slot (one task in flight) for sequences of up to max_len tokens. */
int64_t kvo_select_ws(const sel_config *cf, int64_t max_len) {
    return ws_floats(cf, t_pad(cf, max_len));
}

/* One decode step of a batch at one sparse layer.
 *   starts [B]: position of the new token (the sequence then holds starts[b] + 1 tokens)
 *   q [B, H, D] (q_dt; strides q_sb, q_sh elements, channels contiguous): the queries
 *   k, v [B, H_kv, D] (kv_dt; strides): the new token's key / value, appended first (k NULL:
 *       no append)
 *   table [B, ST_COLS]: each sequence's state (see the top of this file); channels
 *       [H_kv, r] int64: double_sparsity's calibrated channels of this layer
 *   NB >= max(starts) / bs; out: int64 [B * NB * (1 + H_kv) + B * 3]: blocks [B, NB], masks
 *       [B, NB, H_kv] (uint64), info [B, 3]. Row b's first info[b][0] entries of blocks / masks
 *       are its union; info[b] = (union blocks, blocks read summed over heads, tokens chosen
 *       summed over heads)
 *   alpha [B, H], vmean [B, H_kv, D]: SparF only (else unused; may be NULL)
 *   cf->ws: cf->slots x cf->ws_stride floats (ws_stride >= kvo_select_ws(cf, max(starts) + 1));
 *       the tasks (B * H_kv) run in waves of `slots`; cf->threads: at most this many OpenMP
 *       threads (one when the work is small)
 * Returns 0; -1 bad geometry; -2 a state too small for this token (nothing changed); -3
 * workspace too small; -4 NB too small. */
int kvo_select(const sel_config *cf, int B, const int64_t *starts,
               const void *q, int q_dt, int64_t q_sb, int64_t q_sh,
               const void *k, const void *v, int kv_dt, int64_t k_sb, int64_t k_sh, int64_t v_sb, int64_t v_sh,
               const int64_t *table, const int64_t *channels, int64_t NB, int64_t *out,
               float *alpha, float *vmean) {
    const int pol = cf->policy, slots = cf->slots, threads = cf->threads;
    float *const ws = cf->ws;
    const int64_t ws_stride = cf->ws_stride;
    int64_t *out_blocks = out, *out_info = out + (size_t)B * NB * (1 + cf->H_kv);
    uint64_t *out_masks = (uint64_t *)(out + (size_t)B * NB);
    if (B < 0 || cf->H_kv < 1 || cf->G < 1 || cf->G > G_MAX || cf->D < 1 || cf->D > D_MAX || cf->bs < 1 ||
        cf->unit < 1 || cf->bs % cf->unit || pol < 0 || pol > SEL_RETRIEVAL || slots < 1 || !ws ||
        ((pol == SEL_SPARF || pol == SEL_DOUBLE_SPARSITY) && (cf->r < 1 || cf->r > cf->D)) ||
        (pol == SEL_DOUBLE_SPARSITY && !channels) || (pol == SEL_SPARF && (!alpha || !vmean)) ||
        (cf->unit < cf->bs && cf->bs > 64) || q_dt < 0 || q_dt > 2 || kv_dt < 0 || kv_dt > 2)
        return -1;
    if (B == 0) return 0;
    const int ntask = B * cf->H_kv;
    seq_geom *geo = (seq_geom *)malloc(sizeof(seq_geom) * (size_t)B);
    task_t *tasks = (task_t *)malloc(sizeof(task_t) * (size_t)ntask);
    int64_t *cfirst = (int64_t *)malloc(sizeof(int64_t) * ((size_t)slots + 1));
    int rc = 0;
    if (!geo || !tasks || !cfirst) rc = -1;
    int64_t max_len = 0, work = 0;
    /* 1. per sequence: geometry and capacity checks (nothing is written before all pass) */
    for (int b = 0; b < B && !rc; b++) {
        seq_geom *g = geo + b;
        if (starts[b] < 0) { rc = -1; break; }
        geometry(cf, starts[b], g);
        if (g->n_full > NB) { rc = -4; break; }
        max_len = imax(max_len, g->length);
        const int64_t *st = table + (size_t)b * ST_COLS;
        const int64_t cap = st[ST_CAP], s = g->s;
        g->c0 = g->c1 = 0;
        if (pol != SEL_STREAMING && pol != SEL_SPARF && (cap < TILE || cap % TILE)) rc = -2;   /* whole tiles */
        else if (pol == SEL_QUEST) {
            if (!st[ST_A0] || !st[ST_A1] || (k && s / cf->bs >= cap) || g->hi > cap) rc = -2;
        } else if (pol == SEL_SPARF || pol == SEL_DOUBLE_SPARSITY) {
            if (!st[ST_A0] || !st[ST_HDR] || (pol == SEL_SPARF && !st[ST_A1]) || s >= cap) rc = -2;
            else g->c0 = ((const int64_t *)st[ST_HDR])[0];
            if (pol == SEL_SPARF && !k && g->c0 < 1) rc = -2;
        } else if (pol == SEL_SHADOWKV || pol == SEL_RETRIEVAL) {
            if (!st[ST_A0] || !st[ST_A1] || !st[ST_A2] || !st[ST_HDR]) rc = -2;
            else {
                g->c0 = ((const int64_t *)st[ST_HDR])[0];
                g->c1 = ((const int64_t *)st[ST_HDR])[1];
                int64_t chunks = g->c0 + (k && g->c1 + 1 == cf->unit);
                if (g->c1 < 0 || g->c1 >= cf->unit || chunks > cap || g->hi * (cf->bs / cf->unit) > chunks) rc = -2;
            }
        }
        /* multiply-adds of the scoring, over the group's query heads (none where nothing is scored) */
        if (scores_candidates(pol, g))
            work += (int64_t)cf->H_kv * cf->G * (pol == SEL_SPARF ? g->length * cf->r
                                                 : pol == SEL_DOUBLE_SPARSITY ? g->ncand * cf->r : g->ncand * cf->D);
    }
    const int64_t T_pad = t_pad(cf, max_len);
    if (!rc && ws_stride < ws_floats(cf, T_pad)) rc = -3;
    if (rc) {
        free(geo);
        free(tasks);
        free(cfirst);
        return rc;
    }
    /* 2. the counters (the tasks read the values before the append from geo) */
    if (k)
        for (int b = 0; b < B; b++) {
            int64_t *hdr = (int64_t *)table[(size_t)b * ST_COLS + ST_HDR];
            if (pol == SEL_SPARF || pol == SEL_DOUBLE_SPARSITY) {
                hdr[0] = imax(hdr[0], geo[b].s + 1);
            } else if (pol == SEL_SHADOWKV || pol == SEL_RETRIEVAL) {
                int full = geo[b].c1 + 1 == cf->unit;
                hdr[0] = geo[b].c0 + full;
                hdr[1] = full ? 0 : geo[b].c1 + 1;
            }
        }
    call_ctx X = {.cf = cf, .geo = geo, .table = table, .channels = channels, .q = q, .k = k, .v = v,
                  .q_dt = q_dt, .kv_dt = kv_dt, .q_sb = q_sb, .q_sh = q_sh, .k_sb = k_sb, .k_sh = k_sh,
                  .v_sb = v_sb, .v_sh = v_sh, .NB = NB, .T_pad = T_pad, .masks = out_masks,
                  .alpha = alpha, .vmean = vmean};
    int nt = threads < 1 ? 1 : threads;
    if (work < cf->par_min_work) nt = 1;
    /* 3. the tasks, in waves of `slots` */
    for (int t0 = 0; t0 < ntask; t0 += slots) {
        const int nw = ntask - t0 < slots ? ntask - t0 : slots;
        cfirst[0] = 0;
        for (int i = 0; i < nw; i++) {
            task_t *T = tasks + t0 + i;
            T->b = (t0 + i) / cf->H_kv;
            T->h = (t0 + i) % cf->H_kv;
            T->C = 0;
            T->W = carve(cf, ws + (size_t)i * ws_stride, T_pad);
            prep_task(&X, T);
            cfirst[i + 1] = cfirst[i] + T->nchunks;
        }
        const int64_t nchunk = cfirst[nw];
        task_t *wave = tasks + t0;
        if (nt > 1) {
            _Pragma("omp parallel num_threads(nt)")
            {
                _Pragma("omp for schedule(dynamic, 1)")
                for (int64_t c = 0; c < nchunk; c++) {
                    int i = 0;
                    while (cfirst[i + 1] <= c) i++;
                    score_chunk(&X, wave + i, c - cfirst[i]);
                }
                _Pragma("omp for schedule(dynamic, 1)")
                for (int i = 0; i < nw; i++) finish_task(&X, wave + i);
            }
        } else {                               /* no OpenMP team at all: it costs microseconds */
            for (int i = 0; i < nw; i++) {
                for (int64_t c = 0; c < wave[i].nchunks; c++) score_chunk(&X, wave + i, c);
                finish_task(&X, wave + i);
            }
        }
    }
    /* 4. each sequence's union */
    for (int b = 0; b < B; b++) compact(&X, b, out_blocks + (size_t)b * NB, out_info + (size_t)b * INFO_COLS);
    free(geo);
    free(tasks);
    free(cfirst);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * A sparse decode layer in one call (the in-memory backend, attention/dense.py; the tiered one's
 * in-process tiers in two, around the reads of the blocks not in RAM): the
 * selection above, then each sequence's items over its slots -- the runs of its union
 * that lie in one chunk of chunk_blocks blocks, then its tail block, whole (DecodeItems' cut, so
 * the partials and their merge order, hence the bits, are the Python path's) -- then append +
 * attend + merge by the paged kernel's driver for the KV dtype (paged_attn.c's
 * kvo_paged_attn_v_*, passed in as a function pointer: the two sources are built apart).
 * Compressed blocks (int8 / int4) have another format than the full-precision tails: then
 * attn_blocks attends the block items, attn appends to and attends the tails (placed after
 * all block items), and merge (paged_attn.c's kvo_merge_parts) merges each sequence's parts in
 * the same order -- its blocks' items, then its tail -- as the per-tier requests' merge does.
 * ------------------------------------------------------------------------------------------- */
/* What stays between calls (select.py: _StepPlan, the same fields in the same order). The
 * buffers hold cap_b sequences of up to NB full blocks each. */
typedef struct {
    const sel_config *cf;
    void *attn;                          /* a kvo_paged_driver */
    int32_t G, chunk_blocks, threads, vgroup;
    float scale;
    int32_t pad_;
    int64_t slot_bytes, cap_b, NB;
    int64_t *sel_out;                    /* kvo_select's out for cap_b sequences of NB blocks */
    int64_t *row, *first, *last, *ptrs, *row_first, *app_slot, *app_col;   /* items, append */
    uint64_t *masks;                     /* [items' blocks, H_kv] */
    float *part_o, *part_lse;            /* [cap_b * (NB + 1), H, D], [.., H] */
    int64_t *dref, *dslot;               /* [items' blocks]: the read tier's item blocks (index into
                                          * ptrs) and their slots */
    void *attn_blocks;                   /* a kvo_paged_driver for blocks of another format than the
                                          * tails' (NULL: attn attends both) */
    void *merge;                         /* with attn_blocks: paged_attn.c's kvo_merge_parts */
    int64_t *order;                      /* with attn_blocks: [items] the merge order */
    int32_t vgroup_blocks, pad2_;        /* attn_blocks' value group */
} step_plan;

typedef void (*merge_fn)(int R, int H, int D, const int64_t *row_first, const int64_t *order,
                         const float *part_o, const float *part_lse, float *out, float *lse, int threads);

/* One call's arguments (select.py: STEP_CALL): int64 words, addresses as integers.
 * Where the blocks are, one of two ways:
 * - SC_BASE (SC_LOCS 0): [B] each sequence's slot 0, its blocks contiguous (the in-memory
 *   backend); the tail block is slot starts[b] / bs;
 * - SC_LOCS: [B] addresses of each sequence's int64 block locations (the tiered backend's
 *   in-process tiers): loc >= 0 is the block's address; loc < 0 is slot -loc-1 of the read
 *   tier (a disk shard read by this process), whose address is SC_RESIDENT[slot] when it is
 *   held in RAM (0 or slot >= SC_NRES: not held: its ptr is left 0 for the caller to read and
 *   fill, kvo_sparse_attend). SC_TAILS: [B] the tail blocks' addresses. SC_BITEMS (out): the
 *   items before the tails' (with attn_blocks; else all of them). */
enum { SC_B, SC_STARTS, SC_Q, SC_Q_DT, SC_Q_SB, SC_Q_SH, SC_K, SC_V, SC_KV_DT, SC_K_SB, SC_K_SH, SC_V_SB,
       SC_V_SH, SC_TABLE, SC_CHANNELS, SC_ALPHA, SC_VMEAN, SC_BASE, SC_QF, SC_QF_RS, SC_OUT, SC_LSE,
       SC_ITEMS, SC_LOCS, SC_TAILS, SC_RESIDENT, SC_NRES, SC_NREF, SC_BITEMS, SC_WORDS };

int kvo_sparse_step_words(void) { return SC_WORDS; }

/* item N: row b's tail block (at addr, its token s), appended to (column s % bs) and attended
 * whole; its blocks' entry M */
static inline void put_tail(const step_plan *P, int b, int64_t N, int64_t M, int64_t s, int64_t addr,
                            int H_kv, uint64_t full) {
    const int bs = P->cf->bs;
    P->row[N] = b;
    P->last[N] = s % bs + 1;
    P->first[N] = M;
    P->ptrs[M] = P->app_slot[b] = addr;
    P->app_col[b] = s % bs;
    for (int h = 0; h < H_kv; h++) P->masks[(size_t)M * H_kv + h] = full;
}

/* The selection and the items of a step; no attention yet. c[SC_ITEMS] receives the number of
 * items; with SC_LOCS, c[SC_NREF] the number of item blocks of the read tier (their indices into
 * ptrs in dref, their slots in dslot; those not held have ptr 0). With attn_blocks (SC_LOCS
 * only) the tails' items follow all block items, and row_first / order give the merge. 0, or
 * kvo_select's error (-6: k / v heads not contiguous). */
int kvo_sparse_plan(const step_plan *P, int64_t *c) {
    const sel_config *cf = P->cf;
    const int split = P->attn_blocks != NULL;
    const int B = (int)c[SC_B], H_kv = cf->H_kv, bs = cf->bs;
    const int64_t *starts = (const int64_t *)c[SC_STARTS], *base = (const int64_t *)c[SC_BASE];
    const int64_t *const *locs = (const int64_t *const *)c[SC_LOCS];
    const int64_t *tails = (const int64_t *)c[SC_TAILS], *resident = (const int64_t *)c[SC_RESIDENT];
    const int64_t nres = resident ? c[SC_NRES] : 0;
    if (B < 1 || B > P->cap_b || !P->attn || (!locs && !base) || (locs && !tails) ||
        (split && (!locs || !P->merge))) return -1;
    if (c[SC_K_SH] != cf->D || c[SC_V_SH] != cf->D) return -6;
    /* (kvo_select refuses a sequence of more than NB full blocks: the item buffers hold them all) */
    int rc = kvo_select(cf, B, starts, (const void *)c[SC_Q], (int)c[SC_Q_DT], c[SC_Q_SB], c[SC_Q_SH],
                        (const void *)c[SC_K], (const void *)c[SC_V], (int)c[SC_KV_DT], c[SC_K_SB], c[SC_K_SH],
                        c[SC_V_SB], c[SC_V_SH], (const int64_t *)c[SC_TABLE], (const int64_t *)c[SC_CHANNELS],
                        P->NB, P->sel_out, (float *)c[SC_ALPHA], (float *)c[SC_VMEAN]);
    if (rc) return rc;
    const int64_t NB = P->NB, cb = P->chunk_blocks, sb = P->slot_bytes;
    const int64_t *ublk = P->sel_out;                                          /* [B, NB] */
    const uint64_t *umask = (const uint64_t *)(P->sel_out + (size_t)B * NB);  /* [B, NB, H_kv] */
    const int64_t *info = P->sel_out + (size_t)B * NB * (1 + H_kv);           /* [B, INFO_COLS] */
    const uint64_t full = bs >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << bs) - 1);
    int64_t N = 0, M = 0, R = 0;                                     /* items, their blocks, read refs */
    for (int b = 0; b < B; b++) {
        const int64_t s = starts[b], n = info[(size_t)b * INFO_COLS + INFO_NBLOCKS];
        const int64_t *ub = ublk + (size_t)b * NB;
        const uint64_t *um = umask + (size_t)b * NB * H_kv;
        const int64_t *loc = locs ? locs[b] : NULL;
        P->row_first[b] = N;
        for (int64_t i = 0; i < n; i++) {
            if (i == 0 || ub[i] / cb != ub[i - 1] / cb) {                      /* a run starts */
                P->row[N] = b;
                P->last[N] = bs;
                P->first[N++] = M;
            }
            if (!loc) {
                P->ptrs[M] = base[b] + ub[i] * sb;
            } else {
                int64_t a = loc[ub[i]];
                if (a < 0) {                                                   /* the read tier's slot */
                    const int64_t slot = -a - 1;
                    a = slot < nres ? resident[slot] : 0;
                    P->dslot[R] = slot;
                    P->dref[R++] = M;
                }
                P->ptrs[M] = a;
            }
            memcpy(P->masks + (size_t)M * H_kv, um + (size_t)i * H_kv, sizeof(uint64_t) * (size_t)H_kv);
            M++;
        }
        if (!split) put_tail(P, b, N++, M++, s, loc ? tails[b] : base[b] + (s / bs) * sb, H_kv, full);
    }
    const int64_t NBI = N;                                     /* the block items (split: the tails follow) */
    if (split) {
        for (int b = 0; b < B; b++)
            put_tail(P, b, N++, M++, starts[b], tails[b], H_kv, full);
        P->row_first[B] = NBI;
        for (int64_t b = 0, k = 0; b < B; b++) {                  /* row b: its block items, then its tail */
            const int64_t a = P->row_first[b], e = P->row_first[b + 1];
            P->row_first[b] = k;
            for (int64_t i = a; i < e; i++) P->order[k++] = i;
            P->order[k++] = NBI + b;
        }
    }
    P->first[N] = M;
    P->row_first[B] = N;
    c[SC_ITEMS] = N;
    c[SC_NREF] = R;
    c[SC_BITEMS] = NBI;
    return 0;
}

/* Append + attend + merge of the items kvo_sparse_plan made (every ptr filled: -7 if one is
 * still 0), by the paged kernel's driver. 0, or the driver's error. */
int kvo_sparse_attend(const step_plan *P, int64_t *c) {
    const sel_config *cf = P->cf;
    const int B = (int)c[SC_B], H_kv = cf->H_kv, bs = cf->bs;
    const int64_t N = c[SC_ITEMS];
    for (int64_t j = 0; j < c[SC_NREF]; j++)
        if (!P->ptrs[P->dref[j]]) return -7;
    if (P->attn_blocks) {                 /* the tails (appended), then the blocks, then the merge */
        const int64_t NBI = c[SC_BITEMS], H = (int64_t)H_kv * P->G, D = cf->D;
        int rc = ((kvo_paged_driver)P->attn)(H_kv, P->G, cf->D, bs, B, (const void *)c[SC_K], c[SC_K_SB],
                                   (const void *)c[SC_V], c[SC_V_SB], P->app_slot, P->app_col, (int)(N - NBI),
                                   (const float *)c[SC_QF], c[SC_QF_RS], P->row + NBI, P->first + NBI,
                                   P->last + NBI, P->ptrs, P->masks, P->scale, P->part_o + NBI * H * D,
                                   P->part_lse + NBI * H, 0, NULL, NULL, NULL, NULL, P->threads, P->vgroup);
        if (!rc)
            rc = ((kvo_paged_driver)P->attn_blocks)(H_kv, P->G, cf->D, bs, 0, NULL, 0, NULL, 0, NULL, NULL,
                                   (int)NBI, (const float *)c[SC_QF], c[SC_QF_RS], P->row, P->first, P->last,
                                   P->ptrs, P->masks, P->scale, P->part_o, P->part_lse, 0, NULL, NULL, NULL,
                                   NULL, P->threads, P->vgroup_blocks);
        if (rc) return rc;
        ((merge_fn)P->merge)(B, (int)H, (int)D, P->row_first, P->order, P->part_o, P->part_lse,
                             (float *)c[SC_OUT], (float *)c[SC_LSE],
                             B * H >= 64 ? P->threads : 1);      /* (a few rows: no threads to fork) */
        return 0;
    }
    return ((kvo_paged_driver)P->attn)(H_kv, P->G, cf->D, bs, B, (const void *)c[SC_K], c[SC_K_SB],
                                   (const void *)c[SC_V], c[SC_V_SB], P->app_slot, P->app_col, (int)N,
                                   (const float *)c[SC_QF], c[SC_QF_RS], P->row, P->first, P->last, P->ptrs,
                                   P->masks, P->scale, P->part_o, P->part_lse, B, P->row_first, NULL,
                                   (float *)c[SC_OUT], (float *)c[SC_LSE], P->threads, P->vgroup);
}

/* kvo_sparse_plan, then kvo_sparse_attend: a sparse layer in one call (the blocks all held). */
int kvo_sparse_step(const step_plan *P, int64_t *c) {
    int rc = kvo_sparse_plan(P, c);
    return rc ? rc : kvo_sparse_attend(P, c);
}

/* kvo_attn_fn (kvo_hook.h) over a prepared step: a fused decode layer's sparse attention in its
 * own native call (decode.c's kvo_layer_decode). The call words hold all but the per-call
 * pointers, which are set here: q fp32 [M, H, D] is both the selection's query and the
 * attention's (the same values as the model-dtype query the Python path passes), k / v the
 * new tokens' rows. select.py: SparseStep.hook. */
typedef struct {
    const step_plan *P;
    int64_t *c;
} sparse_hook_ctx;

int kvo_sparse_hook(const void *ctx, int M, const float *q, int64_t q_rs, const void *k, const void *v,
                    int64_t kv_rs, float *out, float *lse) {
    const sparse_hook_ctx *h = (const sparse_hook_ctx *)ctx;
    int64_t *c = h->c;
    const int64_t D = h->P->cf->D;
    if (M != c[SC_B]) return -8;
    c[SC_Q] = c[SC_QF] = (int64_t)(intptr_t)q;
    c[SC_Q_DT] = DT_F32;
    c[SC_Q_SB] = c[SC_QF_RS] = q_rs;
    c[SC_Q_SH] = D;
    c[SC_K] = (int64_t)(intptr_t)k;
    c[SC_V] = (int64_t)(intptr_t)v;
    c[SC_K_SB] = c[SC_V_SB] = kv_rs;
    c[SC_K_SH] = c[SC_V_SH] = D;
    c[SC_OUT] = (int64_t)(intptr_t)out;
    c[SC_LSE] = (int64_t)(intptr_t)lse;
    return kvo_sparse_step(h->P, c);
}
