/* Decode attention over paged KV: the near-data primitive every tier worker runs.
 *
 * A slot (kv/layout.py) holds one block of block_size (bs) tokens for every KV head of one
 * (sequence, layer): first K for heads 0..H_kv-1, each channel-pair-major [D/2, bs, 2] (channels
 * 2i and 2i+1 of a token side by side, tokens along a row: the scores of 16 tokens take D/2
 * vector ops and no horizontal sums; with bf16 one VDPBF16PS per channel pair), then V for heads
 * 0..H_kv-1, each token-major [bs, D]. A sequence hands the kernel a list of slot base addresses; every listed block is full
 * except the last, which holds last_len[b] tokens. The order of the blocks does not matter
 * (softmax is permutation invariant), so a worker lists just the blocks it owns.
 *
 * Optional token masks (sparse attention): tmask[j * H_kv + h] (uint64, bit t = token t of the
 * block, so bs <= 64) says which tokens of listed block j head h attends, in the order of the
 * blocks of blk (all sequences back to back); 0 skips that head's K and V of the block
 * entirely, so only chosen heads' rows are read. NULL = every token.
 *
 * Optional append: app_ptr[b] != 0 names the slot whose column app_pos[b] receives the new
 * token's k/v before attention (the write-combining tail lives with the device worker).
 *
 * Output: out [B, H, D] fp32 (normalised within this worker's blocks) and lse [B, H] fp32, so
 * partial results merge exactly: o = sum_i exp(lse_i - lse) o_i. A sequence with no blocks
 * gets out = 0, lse = -inf. Queries in fp32, strided over the batch (heads contiguous).
 * Math in fp32. Compiled at first use by kvoffload/kernels/build.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define G_MAX 32
#define D_MAX 256
#define BS_MAX 256
#define H_MAX 128
#ifndef PF_BLOCKS
#define PF_BLOCKS 4          /* software prefetch distance, in blocks */
#endif
#ifndef CHUNK_BLOCKS
#define CHUNK_BLOCKS 16      /* blocks per work item (split-K granularity) */
#endif

#include "kvo_math.h"

/* where channel d sits in an item's output when its V rows were split even / odd (VPERM) */
static inline int out_index(int d) { return (d & ~31) | ((d & 1) << 4) | ((d & 31) >> 1); }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {                                  /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One work item, portable: blocks blk[0..nb) of one KV head (K at kofs, V at vofs elements
 * from each slot base); the last has n_last tokens. Online softmax per block. */
#define DEFINE_GENERIC(NAME, KV_T, LOAD)                                                             \
static void NAME##_generic(const float *q, const int64_t *blk, const uint64_t *tm, int tstride,   \
                           int nb, int n_last, size_t kofs,                                         \
                           size_t vofs, int G, int D, int bs, float scale, float *m_out,            \
                           float *l_out, float *o_out) {                                            \
    float s[G_MAX][BS_MAX];                                                                         \
    float m[G_MAX], l[G_MAX];                                                                       \
    for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }                                   \
    memset(o_out, 0, sizeof(float) * G * D);                                                        \
    for (int j = 0; j < nb; j++) {                                                                  \
        const KV_T *K = (const KV_T *)blk[j] + kofs, *V = (const KV_T *)blk[j] + vofs;              \
        int n = j == nb - 1 ? n_last : bs;                                                          \
        uint64_t mk = tm ? tm[(size_t)j * tstride] : ~(uint64_t)0;                                  \
        if (n < 64) mk &= ((uint64_t)1 << n) - 1;                                                   \
        if (!mk) continue;                                                                          \
        for (int g = 0; g < G; g++) {                                                               \
            const float *qg = q + (size_t)g * D;                                                    \
            for (int t = 0; t < n; t++) s[g][t] = 0.f;                                              \
            for (int d = 0; d < D; d++) {                                                           \
                const KV_T *kr = K + (size_t)(d >> 1) * bs * 2 + (d & 1);                           \
                for (int t = 0; t < n; t++) s[g][t] += qg[d] * LOAD(kr[2 * t]);                     \
            }                                                                                       \
            float bm = -INFINITY;                                                                   \
            for (int t = 0; t < n; t++) {                                                           \
                s[g][t] = (mk >> t) & 1 ? s[g][t] * scale : -INFINITY;                              \
                bm = s[g][t] > bm ? s[g][t] : bm;                                                   \
            }                                                                                       \
            float mn = bm > m[g] ? bm : m[g];                                                       \
            float alpha = m[g] == -INFINITY ? 0.f : exp_nonpos(m[g] - mn), sum = 0.f;               \
            for (int t = 0; t < n; t++) {                                                           \
                s[g][t] = (mk >> t) & 1 ? exp_nonpos(s[g][t] - mn) : 0.f;                           \
                sum += s[g][t];                                                                     \
            }                                                                                       \
            l[g] = l[g] * alpha + sum;                                                              \
            m[g] = mn;                                                                              \
            float *og = o_out + (size_t)g * D;                                                      \
            for (int d = 0; d < D; d++) og[d] *= alpha;                                             \
        }                                                                                           \
        for (int t = 0; t < n; t++) {                                                               \
            const KV_T *vr = V + (size_t)t * D;                                                     \
            for (int g = 0; g < G; g++) {                                                           \
                float p = s[g][t];                                                                  \
                float *og = o_out + (size_t)g * D;                                                  \
                for (int d = 0; d < D; d++) og[d] += p * LOAD(vr[d]);                               \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int g = 0; g < G; g++) { m_out[g] = m[g]; l_out[g] = l[g]; }                               \
}

DEFINE_GENERIC(f32, float, f32_id)
DEFINE_GENERIC(bf16, uint16_t, bf16_to_f32)
DEFINE_GENERIC(f16, uint16_t, f16_to_f32)

/* all KV heads of a run of slots, one head after the other (portable path) */
#define DEFINE_GENERIC_HEADS(NAME)                                                                  \
static void NAME##_generic_heads(const float *q, const uint16_t *qb, int qlo, const int64_t *blk, const uint64_t *tm, int nb, int n_last, int H_kv, \
                                 int G, int D, int bs, float scale, float *m, float *l, float *o) { \
    size_t kblock = (size_t)D * bs;                                                                \
    (void)qb; (void)qlo;                                                                           \
    for (int h = 0; h < H_kv; h++)                                                                 \
        NAME##_generic(q + (size_t)h * G * D, blk, tm ? tm + h : NULL, H_kv, nb, n_last, h * kblock, (H_kv + h) * kblock, G, D, bs, \
                       scale, m + h * G, l + h * G, o + (size_t)h * G * D);                         \
}
DEFINE_GENERIC_HEADS(f32)
DEFINE_GENERIC_HEADS(bf16)
DEFINE_GENERIC_HEADS(f16)

#ifdef __AVX512F__
#include <immintrin.h>

static inline __m512 ld_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }


/* Scores of 16 tokens (t0..t0+15 of a block) for G query heads, K channel-pair-major. */
static inline __attribute__((always_inline)) void pair_scores_f32(const __m512 *lo, const __m512 *hi,
                                                                  int G, __m512 *s) {
    /* lanes hold (token, channel parity) products: add the two parities, keep the even lanes */
    const __m512i idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    for (int g = 0; g < G; g++) {
        __m512 a = _mm512_add_ps(lo[g], _mm512_permute_ps(lo[g], 0xB1));
        __m512 b = _mm512_add_ps(hi[g], _mm512_permute_ps(hi[g], 0xB1));
        s[g] = _mm512_permutex2var_ps(a, idx, b);
    }
}
/* fp32 / fp16 (and bf16 without VDPBF16PS): a broadcast (q[2i], q[2i+1]) pair times 16 tokens x
 * 2 channels, in two halves of 8 tokens; the parities are added at the end. */
#define DEFINE_PAIR_SCORE(NAME, KV_T, LOAD2)                                                         \
static inline __attribute__((always_inline)) void NAME(const KV_T *K, int t0, int bs, int D,       \
        const float *qh, const uint16_t *qbh, int qlo, int G, __m512 *s) {                         \
    (void)qbh; (void)qlo;                                                                          \
    __m512 lo[G_MAX], hi[G_MAX];                                                                   \
    for (int g = 0; g < G; g++) lo[g] = hi[g] = _mm512_setzero_ps();                               \
    for (int dp = 0; dp < D / 2; dp++) {                                                           \
        const KV_T *r = K + (size_t)dp * bs * 2 + 2 * t0;                                          \
        __m512 k0, k1;                                                                             \
        LOAD2(r, k0, k1);                                                                          \
        for (int g = 0; g < G; g++) {                                                              \
            double pair;                                                                           \
            memcpy(&pair, qh + (size_t)g * D + 2 * dp, 8);                                         \
            __m512 qp = _mm512_castpd_ps(_mm512_set1_pd(pair));                                    \
            lo[g] = _mm512_fmadd_ps(qp, k0, lo[g]);                                                \
            hi[g] = _mm512_fmadd_ps(qp, k1, hi[g]);                                                \
        }                                                                                          \
    }                                                                                              \
    pair_scores_f32(lo, hi, G, s);                                                                 \
}
#define LOAD2_F32(r, k0, k1) (k0 = _mm512_loadu_ps(r), k1 = _mm512_loadu_ps((r) + 16))
#define LOAD2_F16(r, k0, k1) (k0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r))), \
                              k1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((r) + 16))))
#define LOAD2_BF16(r, k0, k1) (k0 = ld_bf16(r), k1 = ld_bf16((r) + 16))
DEFINE_PAIR_SCORE(score16_f32, float, LOAD2_F32)
DEFINE_PAIR_SCORE(score16_f16, uint16_t, LOAD2_F16)
#ifdef __AVX512BF16__
/* one VDPBF16PS per channel pair: 16 tokens x 2 channels, products exact, fp32 accumulation */
static inline __attribute__((always_inline)) void score16_bf16(const uint16_t *K, int t0, int bs, int D,
        const float *qh, const uint16_t *qbh, int qlo, int G, __m512 *s) {
    (void)qh;
    __m512 s2[G_MAX];
    for (int g = 0; g < G; g++) s[g] = s2[g] = _mm512_setzero_ps();
    for (int dp = 0; dp < D / 2; dp += 2) {
        const uint16_t *r = K + (size_t)dp * bs * 2 + 2 * t0;
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(r), k1 = (__m512bh)_mm512_loadu_si512(r + bs * 2);
        for (int g = 0; g < G; g++) {
            uint32_t p0, p1;
            memcpy(&p0, qbh + (size_t)g * D + 2 * dp, 4);
            memcpy(&p1, qbh + (size_t)g * D + 2 * dp + 2, 4);
            s[g] = _mm512_dpbf16_ps(s[g], (__m512bh)_mm512_set1_epi32((int)p0), k0);
            s2[g] = _mm512_dpbf16_ps(s2[g], (__m512bh)_mm512_set1_epi32((int)p1), k1);
            if (qlo) {                        /* fp32 query: add its bf16 remainder (~16-bit q) */
                memcpy(&p0, qbh + qlo + (size_t)g * D + 2 * dp, 4);
                memcpy(&p1, qbh + qlo + (size_t)g * D + 2 * dp + 2, 4);
                s[g] = _mm512_dpbf16_ps(s[g], (__m512bh)_mm512_set1_epi32((int)p0), k0);
                s2[g] = _mm512_dpbf16_ps(s2[g], (__m512bh)_mm512_set1_epi32((int)p1), k1);
            }
        }
    }
    for (int g = 0; g < G; g++) s[g] = _mm512_add_ps(s[g], s2[g]);
}
#else
DEFINE_PAIR_SCORE(score16_bf16, uint16_t, LOAD2_BF16)
#endif

/* bs and D multiples of 16. One work item walks a run of slots in address order, every KV
 * head of a slot in turn (K then V of head 0, then head 1, ...), so a slot is read front to
 * back and consecutive slots form one stream the hardware prefetcher follows. Per 16-token
 * group: scores of the G query heads by D broadcast FMAs over the channel-major K rows (two
 * FMA chains per head), online softmax, then the V rows accumulated; the running output of
 * each query head lives in o_out (L1-resident) between groups. */
/* VPERM (bf16): V rows are read 32 channels at a time and split into even / odd lanes, so
 * within each 32-channel group the output holds the even channels, then the odd ones; the
 * driver undoes that order when it merges the items (see out_index). */
#define DEFINE_AVX512(NAME, KV_T, LOADV, SCORE, VPERM)                                                \
static inline __attribute__((always_inline)) void NAME##_avx512_body(                               \
        const float *q, const uint16_t *qb, int qlo, const int64_t *blk, const uint64_t *tm, int nb, int n_last, int H_kv, int G, int D, int bs, \
        float scale, float *m, float *l, float *o_out, const int G_C, const int NV_C) {             \
    enum { NV_MAX = D_MAX / 16 };                                                                   \
    /* G_C / NV_C: compile-time G and D/16 in the specialised copies (0 = runtime), so the       \
       accumulators live in registers instead of stack arrays */                                   \
    if (G_C) G = G_C;                                                                               \
    if (NV_C) D = 16 * NV_C;                                                                        \
    int nv = D / 16, H = H_kv * G;                                                                  \
    size_t kblock = (size_t)D * bs;                                                                 \
    float sc[G_MAX][16] __attribute__((aligned(64)));                                               \
    for (int hg = 0; hg < H; hg++) { m[hg] = -INFINITY; l[hg] = 0.f; }                              \
    memset(o_out, 0, sizeof(float) * H * D);                                                        \
    for (int j = 0; j < nb; j++) {                                                                  \
        const KV_T *slot = (const KV_T *)blk[j];                                                    \
        int n = j == nb - 1 ? n_last : bs;                                                          \
        for (int h = 0; h < H_kv; h++) {                                                            \
            const KV_T *K = slot + h * kblock, *V = slot + (H_kv + h) * kblock;                     \
            uint64_t mk = tm ? tm[(size_t)j * H_kv + h] : ~(uint64_t)0;                             \
            if (!mk) continue;                                  /* head not chosen: not read */     \
            if (j + PF_BLOCKS < nb) {          /* this head's K and V, PF_BLOCKS slots ahead */     \
                const char *nk = (const char *)((const KV_T *)blk[j + PF_BLOCKS] + h * kblock);     \
                const char *nvp = (const char *)((const KV_T *)blk[j + PF_BLOCKS] + (H_kv + h) * kblock); \
                for (size_t o = 0; o < kblock * sizeof(KV_T); o += 64) {                            \
                    _mm_prefetch(nk + o, _MM_HINT_T0);                                              \
                    _mm_prefetch(nvp + o, _MM_HINT_T0);                                             \
                }                                                                                   \
            }                                                                                       \
            const float *qh = q + (size_t)h * G * D;                                                \
            const uint16_t *qbh = qb + (size_t)h * G * D;                                           \
            float *mh = m + h * G, *lh = l + h * G, *oh = o_out + (size_t)h * G * D;                \
            for (int t0 = 0; t0 < n; t0 += 16) {                                                    \
                int cnt = n - t0 < 16 ? n - t0 : 16;                                                \
                __mmask16 live = (__mmask16)((1u << cnt) - 1u) & (__mmask16)(t0 < 64 ? mk >> t0 : 0); \
                if (!live) continue;                                                                \
                __m512 s[G_MAX];                                                                    \
                SCORE(K, t0, bs, D, qh, qbh, qlo, G, s);                                            \
                __m512 acc[G_MAX][NV_MAX];                                                          \
                for (int g = 0; g < G; g++) {                                                       \
                    __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live,                 \
                                   _mm512_mul_ps(s[g], _mm512_set1_ps(scale)));                     \
                    float bm = _mm512_reduce_max_ps(sv);                                            \
                    float mn = bm > mh[g] ? bm : mh[g];                                             \
                    float alpha = mh[g] == -INFINITY ? 0.f : exp_nonpos(mh[g] - mn);                \
                    __m512 e = _mm512_maskz_mov_ps(live, exp512_nonpos(_mm512_sub_ps(sv, _mm512_set1_ps(mn)))); \
                    lh[g] = lh[g] * alpha + _mm512_reduce_add_ps(e);                                \
                    mh[g] = mn;                                                                     \
                    _mm512_store_ps(sc[g], e);                                                      \
                    __m512 av = _mm512_set1_ps(alpha);                                              \
                    for (int v = 0; v < nv; v++)                                                    \
                        acc[g][v] = _mm512_mul_ps(_mm512_loadu_ps(oh + (size_t)g * D + 16 * v), av); \
                }                                                                                   \
                for (int i = 0; i < cnt; i++) {                                                     \
                    const KV_T *vr = V + (size_t)(t0 + i) * D;                                      \
                    __m512 vv[NV_MAX];                                                              \
                    if (VPERM && nv % 2 == 0) {   /* bf16: 32 channels a load, split even / odd */  \
                        for (int v = 0; v < nv; v += 2) {                                           \
                            __m512i w = _mm512_loadu_si512(vr + 16 * v);                            \
                            vv[v] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));                  \
                            vv[v + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u))); \
                        }                                                                           \
                    } else {                                                                        \
                        for (int v = 0; v < nv; v++) vv[v] = LOADV(vr + 16 * v);                    \
                    }                                                                               \
                    for (int g = 0; g < G; g++) {                                                   \
                        __m512 p = _mm512_set1_ps(sc[g][i]);                                        \
                        for (int v = 0; v < nv; v++) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]); \
                    }                                                                               \
                }                                                                                   \
                for (int g = 0; g < G; g++)                                                         \
                    for (int v = 0; v < nv; v++) _mm512_storeu_ps(oh + (size_t)g * D + 16 * v, acc[g][v]); \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}
DEFINE_AVX512(f32, float, ld_f32, score16_f32, 0)
DEFINE_AVX512(bf16, uint16_t, ld_bf16, score16_bf16, 1)
DEFINE_AVX512(f16, uint16_t, ld_f16, score16_f16, 0)

#define SPEC(NAME, GC, NVC)                                                                          \
static void NAME##_avx512_g##GC##_nv##NVC(const float *q, const uint16_t *qb, int qlo, const int64_t *blk, \
        const uint64_t *tm, int nb, int n_last, int H_kv, int G, int D, int bs, float scale, float *m, float *l, float *o) { \
    NAME##_avx512_body(q, qb, qlo, blk, tm, nb, n_last, H_kv, G, D, bs, scale, m, l, o, GC, NVC);            \
}
#define SPEC_NV(NAME, GC) SPEC(NAME, GC, 1) SPEC(NAME, GC, 4) SPEC(NAME, GC, 8)
#define SPEC_ALL(NAME)                                                                               \
    SPEC(NAME, 0, 0) SPEC_NV(NAME, 1) SPEC_NV(NAME, 2) SPEC_NV(NAME, 3) SPEC_NV(NAME, 4)             \
    SPEC_NV(NAME, 6) SPEC_NV(NAME, 7) SPEC_NV(NAME, 8)                                               \
typedef void (*item_fn)(const float *, const uint16_t *, int, const int64_t *, const uint64_t *, int, int, int, int, int, int, float, float *, float *, float *); \
static item_fn NAME##_pick(int G, int D, int bs) {                                                   \
    if (D % 16 || bs % 16) return NAME##_generic_heads;                                              \
    int nv = D / 16;                                                                                 \
    _Pragma("GCC diagnostic push")                                                                   \
    switch (G * 100 + (nv == 1 || nv == 4 || nv == 8 ? nv : 0)) {                                    \
    case 101: return NAME##_avx512_g1_nv1; case 104: return NAME##_avx512_g1_nv4; case 108: return NAME##_avx512_g1_nv8; \
    case 201: return NAME##_avx512_g2_nv1; case 204: return NAME##_avx512_g2_nv4; case 208: return NAME##_avx512_g2_nv8; \
    case 301: return NAME##_avx512_g3_nv1; case 304: return NAME##_avx512_g3_nv4; case 308: return NAME##_avx512_g3_nv8; \
    case 401: return NAME##_avx512_g4_nv1; case 404: return NAME##_avx512_g4_nv4; case 408: return NAME##_avx512_g4_nv8; \
    case 601: return NAME##_avx512_g6_nv1; case 604: return NAME##_avx512_g6_nv4; case 608: return NAME##_avx512_g6_nv8; \
    case 701: return NAME##_avx512_g7_nv1; case 704: return NAME##_avx512_g7_nv4; case 708: return NAME##_avx512_g7_nv8; \
    case 801: return NAME##_avx512_g8_nv1; case 804: return NAME##_avx512_g8_nv4; case 808: return NAME##_avx512_g8_nv8; \
    default: return NAME##_avx512_g0_nv0;                                                            \
    }                                                                                                \
    _Pragma("GCC diagnostic pop")                                                                    \
}
SPEC_ALL(f32)
SPEC_ALL(bf16)
SPEC_ALL(f16)
#define PICK(NAME) NAME##_pick(G, D, bs)
#define VPERM_f32 0
#define VPERM_f16 0
#define VPERM_bf16 1
#define VPERMUTED(NAME) (VPERM_##NAME && D % 32 == 0 && bs % 16 == 0)
#else
#define VPERMUTED(NAME) 0
typedef void (*item_fn)(const float *, const uint16_t *, int, const int64_t *, const uint64_t *, int, int, int, int, int, int, float, float *, float *, float *);
#define PICK(NAME) NAME##_generic_heads
#endif

#define DEFINE_DRIVER(NAME, KV_T, LOAD)                                                                 \
int kvo_paged_attn_##NAME(int B, int H_kv, int G, int D, int bs, const float *q, int64_t q_bs,        \
                          const int64_t *blk_first, const int64_t *blk, const int64_t *last_len,      \
                          const KV_T *k_new, int64_t k_bs, const KV_T *v_new, int64_t v_bs,           \
                          const int64_t *app_ptr, const int64_t *app_pos, float scale, float *out,    \
                          float *lse, int threads, const uint64_t *tmask) {                           \
    if (G > G_MAX || D > D_MAX || bs > BS_MAX || bs < 1 || H_kv * G > H_MAX || (tmask && bs > 64)) return -1;                                  \
    int H = H_kv * G;                                                                                 \
    size_t kblock = (size_t)D * bs;                         /* elements of one head's K (or V) */    \
    /* 1. append the new token into its tail slot */                                                  \
    if (app_ptr) {                                                                                    \
        for (int b = 0; b < B; b++) {                                                                 \
            if (!app_ptr[b]) continue;                                                                \
            KV_T *slot = (KV_T *)app_ptr[b];                                                          \
            int64_t t = app_pos[b];                                                                   \
            for (int h = 0; h < H_kv; h++) {                                                          \
                KV_T *kc = slot + h * kblock, *vr = slot + (H_kv + h) * kblock + t * D;               \
                const KV_T *ks = k_new + b * k_bs + (size_t)h * D, *vs = v_new + b * v_bs + (size_t)h * D; \
                for (int d = 0; d < D; d++) kc[(size_t)(d >> 1) * bs * 2 + 2 * t + (d & 1)] = ks[d];  \
                memcpy(vr, vs, sizeof(KV_T) * D);                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    /* 2. work items: (b, run of CHUNK_BLOCKS slots), every head */                                 \
    int64_t *first = malloc(sizeof(int64_t) * (B + 1));                                             \
    first[0] = 0;                                                                                     \
    for (int b = 0; b < B; b++) {                                                                     \
        int64_t nb = blk_first[b + 1] - blk_first[b];                                                 \
        first[b + 1] = first[b] + (nb + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;                             \
    }                                                                                                 \
    int64_t N = first[B];                                                                             \
    item_fn item = PICK(NAME);                                  /* chosen once, not per item */      \
    int vperm = VPERMUTED(NAME);                                                                      \
    float *pm = malloc(sizeof(float) * (N * H + 1)), *pl = malloc(sizeof(float) * (N * H + 1));       \
    float *po = malloc(sizeof(float) * (N * H * D + 1));                                              \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                            \
    for (int64_t i = 0; i < N; i++) {                                                                 \
        int b = 0;                                                                                    \
        while (first[b + 1] <= i) b++;                                                                \
        int64_t nb = blk_first[b + 1] - blk_first[b];                                                 \
        int64_t j0 = (i - first[b]) * CHUNK_BLOCKS, j1 = j0 + CHUNK_BLOCKS < nb ? j0 + CHUNK_BLOCKS : nb; \
        int n_last = j1 == nb ? (int)last_len[b] : bs;                                                \
        float qf[H_MAX * D_MAX];                                                                      \
        /* bf16 hi + lo parts of q, for VDPBF16PS: the lo pass runs only if q is not bf16 already */ \
        uint16_t qb[2 * H_MAX * D_MAX];                                                               \
        const float *qs = q + b * q_bs;                                                               \
        int qlo = 0;                                                                                  \
        for (int e = 0; e < H * D; e++) {                                                             \
            qf[e] = qs[e];                                                                            \
            qb[e] = f32_to_bf16(qf[e]);                                                               \
            qb[H * D + e] = f32_to_bf16(qf[e] - bf16_to_f32(qb[e]));                                  \
            if (qb[H * D + e] & 0x7fff) qlo = H * D;                                                  \
        }                                                                                             \
        item(qf, qb, qlo, blk + blk_first[b] + j0, tmask ? tmask + (blk_first[b] + j0) * H_kv : NULL,   \
             (int)(j1 - j0), n_last, H_kv, G, D, bs, scale,                                           \
                   pm + i * H, pl + i * H, po + i * H * D);                                           \
    }                                                                                                 \
    /* 3. merge the runs of each sequence through their log-sum-exp */                                \
    for (int b = 0; b < B; b++) {                                                                     \
        int64_t nch = first[b + 1] - first[b], i0 = first[b];                                         \
        for (int hg = 0; hg < H; hg++) {                                                              \
            float M = -INFINITY, L = 0.f;                                                             \
            for (int64_t c = 0; c < nch; c++) M = pm[(i0 + c) * H + hg] > M ? pm[(i0 + c) * H + hg] : M; \
            float *od = out + ((size_t)b * H + hg) * D;                                               \
            memset(od, 0, sizeof(float) * D);                                                         \
            if (M == -INFINITY) {                                                                     \
                lse[(size_t)b * H + hg] = -INFINITY;                                                  \
                continue;                                                                             \
            }                                                                                         \
            for (int64_t c = 0; c < nch; c++) {                                                       \
                float w = expf(pm[(i0 + c) * H + hg] - M);                                            \
                L += w * pl[(i0 + c) * H + hg];                                                       \
                const float *oc = po + ((i0 + c) * H + hg) * D;                                       \
                for (int d = 0; d < D; d++) od[d] += w * oc[vperm ? out_index(d) : d];                \
            }                                                                                         \
            for (int d = 0; d < D; d++) od[d] /= L;                                                   \
            lse[(size_t)b * H + hg] = M + logf(L);                                                    \
        }                                                                                             \
    }                                                                                                 \
    free(first); free(pm); free(pl); free(po);                                                        \
    return 0;                                                                                         \
}

DEFINE_DRIVER(f32, float, f32_id)
DEFINE_DRIVER(bf16, uint16_t, bf16_to_f32)
DEFINE_DRIVER(f16, uint16_t, f16_to_f32)

/* Memory read bandwidth probe for `kvoffload bench attention`: sums n floats with `threads`
 * threads (AVX-512 where available), so the peak is measured the way the kernel reads. */
double kvo_read_sum(const float *p, int64_t n, int threads) {
    double total = 0.0;
    _Pragma("omp parallel for reduction(+:total) schedule(static) num_threads(threads)")
    for (int64_t c = 0; c < n / 4096; c++) {
        const float *x = p + c * 4096;
#ifdef __AVX512F__
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < 4096; i += 64) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + i));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + i + 16));
            a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + i + 32));
            a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
        float s = 0.f;
        for (int i = 0; i < 4096; i++) s += x[i];
        total += s;
#endif
    }
    return total;
}
