/* Decode attention over paged KV: the near-data primitive of every tier (the in-memory fast
 * path, the host tier, the disk worker processes).
 *
 * Slot layout (kv/layout.py): one block of bs tokens for every KV head of one (sequence, layer):
 * K of heads 0..H_kv-1, each channel-pair-major [D/2, bs, 2] (channels 2i, 2i+1 of a token side
 * by side, tokens along a row: 16 tokens' scores are D/2 vector ops with no horizontal sums; in
 * bf16 one VDPBF16PS per channel pair), then V of heads 0..H_kv-1, each token-major [bs, D].
 *
 * Work comes as ITEMS: item i = (q row item_row[i], blocks blk[item_first[i] .. item_first[i+1])
 * in that order, the last holding item_last[i] tokens, the others full). Each item yields a
 * PARTIAL per query head: o normalised over the item's keys, and its lse (o = 0, lse = -inf
 * where a head attends nothing).
 *
 * Bit-identity contract: an item's partial depends only on (its q row, its blocks' contents in
 * the given order, its last_len, its masks; G, D, bs, scale) -- never on the other items of the
 * call, its position, the thread count or buffer addresses: each item is computed whole by one
 * thread, by code chosen from (dtype, G, D, bs) alone, compiled without -ffast-math (nothing
 * reassociated, no alignment-dependent vector reduction), in a fixed FP mode (fp_mode_enter)
 * whatever the calling thread's. Partials are merged by ONE function
 * (merge_head), in the order the caller gives, both inside kvo_paged_attn_* and in
 * kvo_merge_parts.
 *
 * An item is read in address order, slot by slot -- K of every head, then V of every head -- so
 * the hardware prefetcher streams it (software prefetch measured no better). Per slot and query
 * head: the block's scores, one online-softmax step (o and l rescaled only when the block
 * raises the running max), then the V rows times the weights, accumulated with the G x NT
 * accumulators of a pass in registers.
 *
 * Token masks (sparse attention): tmask[b * H_kv + h] (uint64, bit t = token t of block b, so
 * bs <= MASK_BS_MAX) for the block at blk[b]; 0 = head h skips the block (its K/V rows are not
 * read). NULL = every token.
 *
 * The limits (G_MAX, D_MAX, BS_MAX, H_MAX, MASK_BS_MAX) come from kernels/limits.py, passed by
 * build.py as -D flags. Math in fp32. Compiled at first use by kvoffload/kernels/build.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef G_MAX
#error "G_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif
#ifndef D_MAX
#error "D_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif
#ifndef BS_MAX
#error "BS_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif
#ifndef H_MAX
#error "H_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif
#ifndef MASK_BS_MAX
#error "MASK_BS_MAX is defined by kvoffload/kernels/limits.py (passed by build.py)"
#endif
#if MASK_BS_MAX > 64
#error "token masks are one uint64 per (block, head)"
#endif

#include "kvo_hook.h"
#include "kvo_math.h"

/* A fixed floating-point mode while the kernel computes (round to nearest, denormals flushed and
 * treated as zero, exceptions masked), whatever mode the calling thread or an OpenMP worker
 * happens to be in (torch.set_flush_denormal changes it per thread): part of the bit-identity
 * contract. VDPBF16PS flushes denormals whatever the mode. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define KVO_MXCSR 0x9fc0u            /* FTZ | DAZ | all exception masks, round to nearest */
static inline unsigned fp_mode_enter(void) {
    unsigned old = _mm_getcsr();
    _mm_setcsr(KVO_MXCSR);
    return old;
}
static inline void fp_mode_leave(unsigned old) { _mm_setcsr(old); }
#else
static inline unsigned fp_mode_enter(void) { return 0; }
static inline void fp_mode_leave(unsigned old) { (void)old; }
#endif


/* the tokens of a block a head attends: the mask's bits below n (bit t = token t) */
static inline uint64_t live_tokens(const uint64_t *tm, int n) {
    uint64_t mk = tm ? *tm : ~(uint64_t)0;
    return n < 64 ? mk & (((uint64_t)1 << n) - 1) : mk;
}

/* One item: its q row (fp32 [H, D]; KV head h's G query heads at h*G*D), its blocks, and where
 * its partial goes. */
typedef struct {
    const float *q;
    const int64_t *blk;
    const uint64_t *tm;      /* &tmask[first block][0] or NULL (stride H_kv) */
    int nb, n_last;
    int vg;                  /* compressed blocks: channels per value group (kv/layout.py) */
    float *o, *lse;          /* part_o + i*H*D, part_lse + i*H */
} item_job;

typedef void (*item_fn)(const item_job *, int H_kv, int G, int D, int bs, float scale);

/* One head's online softmax, shared by the portable and the compressed paths: a block whose max
 * score bm raises the running max m rescales o (D floats) and l ... */
static inline void rescale_to(float bm, float *m, float *l, float *o, int D) {
    if (bm > *m) {
        float alpha = *m == -INFINITY ? 0.f : exp_nonpos(*m - bm);
        *m = bm;
        *l *= alpha;
        for (int d = 0; d < D; d++) o[d] *= alpha;
    }
}
/* ... then the block's scores P[0..n) (-inf: a dead token) become its weights, summed into l */
static inline void softmax_step(float *P, int n, float *m, float *l, float *o, int D) {
    float bm = -INFINITY;
    for (int t = 0; t < n; t++) bm = P[t] > bm ? P[t] : bm;
    rescale_to(bm, m, l, o, D);
    for (int t = 0; t < n; t++) {
        P[t] = P[t] == -INFINITY ? 0.f : exp_nonpos(P[t] - *m);
        *l += P[t];
    }
}
/* a head's partial from its running (m, l): o /= l, lse = m + log l (nothing attended: 0, -inf) */
static inline void finish_head(float *o, float m, float l, int D, float *lse) {
    if (m == -INFINITY) {
        memset(o, 0, sizeof(float) * D);
        *lse = -INFINITY;
        return;
    }
    for (int d = 0; d < D; d++) o[d] /= l;
    *lse = m + logf(l);
}

/* ---------------------------------------------------------------------------------------------
 * Portable path (any even D, any bs; every shape without AVX-512): the same per-block online
 * softmax, scalar, one head at a time.
 * ------------------------------------------------------------------------------------------- */
#define DEFINE_GENERIC(NAME, KV_T, LOAD)                                                             \
static void NAME##_item_generic(const item_job *J, int H_kv, int G, int D, int bs, float scale) {  \
    float P[G_MAX][BS_MAX];                                                                         \
    for (int h = 0; h < H_kv; h++) {                                                                \
        const float *q = J->q + (size_t)h * G * D;                                                  \
        size_t kofs = (size_t)h * D * bs, vofs = (size_t)(H_kv + h) * D * bs;                       \
        float m[G_MAX], l[G_MAX], *o = J->o + (size_t)h * G * D;                                    \
        for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }                               \
        memset(o, 0, sizeof(float) * G * D);                                                        \
        for (int j = 0; j < J->nb; j++) {                                                           \
            int n = j == J->nb - 1 ? J->n_last : bs;                                                \
            const uint64_t *tm = J->tm ? J->tm + (size_t)j * H_kv + h : NULL;                       \
            uint64_t mk = live_tokens(tm, n);                                                       \
            if (!mk) continue;                    /* head skips the block: nothing read */          \
            const KV_T *K = (const KV_T *)J->blk[j] + kofs, *V = (const KV_T *)J->blk[j] + vofs;    \
            for (int g = 0; g < G; g++) {                                                           \
                for (int t = 0; t < n; t++) {     /* scores */                                      \
                    float a = 0.f;                                                                  \
                    for (int d = 0; d < D; d++)                                                     \
                        a = fmaf(q[g * D + d], LOAD(K[(size_t)(d >> 1) * bs * 2 + 2 * t + (d & 1)]), a); \
                    P[g][t] = !tm || ((mk >> t) & 1) ? a * scale : -INFINITY;                       \
                }                                                                                   \
                softmax_step(P[g], n, m + g, l + g, o + (size_t)g * D, D);                          \
            }                                                                                       \
            for (int t = 0; t < n; t++)           /* weighted V rows */                             \
                for (int g = 0; g < G; g++) {                                                       \
                    float p = P[g][t], *og = o + (size_t)g * D;                                     \
                    for (int d = 0; d < D; d++) og[d] = fmaf(p, LOAD(V[(size_t)t * D + d]), og[d]); \
                }                                                                                   \
        }                                                                                           \
        for (int g = 0; g < G; g++) finish_head(o + (size_t)g * D, m[g], l[g], D, J->lse + h * G + g); \
    }                                                                                               \
}
DEFINE_GENERIC(f32, float, f32_id)
DEFINE_GENERIC(bf16, uint16_t, bf16_to_f32)
DEFINE_GENERIC(f16, uint16_t, f16_to_f32)

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
#define LOAD2_F16(r, k0, k1) (k0 = ld_f16(r), k1 = ld_f16((r) + 16))
#define LOAD2_BF16(r, k0, k1) (k0 = ld_bf16(r), k1 = ld_bf16((r) + 16))
DEFINE_PAIR_SCORE(score16_f32, float, LOAD2_F32)
DEFINE_PAIR_SCORE(score16_f16, uint16_t, LOAD2_F16)
#ifdef __AVX512BF16__
#define HAVE_DPBF16 1
static inline __attribute__((always_inline)) void score16_bf16_pass(const uint16_t *K, int t0, int bs, int D,
        const uint16_t *qbh, int qlo, int G, __m512 *s, const int LO) {
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
            if (LO) {
                memcpy(&p0, qbh + qlo + (size_t)g * D + 2 * dp, 4);
                memcpy(&p1, qbh + qlo + (size_t)g * D + 2 * dp + 2, 4);
                s[g] = _mm512_dpbf16_ps(s[g], (__m512bh)_mm512_set1_epi32((int)p0), k0);
                s2[g] = _mm512_dpbf16_ps(s2[g], (__m512bh)_mm512_set1_epi32((int)p1), k1);
            }
        }
    }
    for (int g = 0; g < G; g++) s[g] = _mm512_add_ps(s[g], s2[g]);
}
/* one VDPBF16PS per channel pair: 16 tokens x 2 channels, products exact, fp32 accumulation;
 * qbh = q in bf16 ([G, D]), and when qlo != 0 its bf16 remainder at qbh + qlo (a second pass:
 * an fp32 query over bf16 keys keeps ~16 bits of its own precision). Two loops, so neither
 * carries the other's registers. */
static inline __attribute__((always_inline)) void score16_bf16(const uint16_t *K, int t0, int bs, int D,
        const float *qh, const uint16_t *qbh, int qlo, int G, __m512 *s) {
    (void)qh;
    if (qlo)
        score16_bf16_pass(K, t0, bs, D, qbh, qlo, G, s, 1);
    else
        score16_bf16_pass(K, t0, bs, D, qbh, 0, G, s, 0);
}
/* q (n fp32, n % 16 == 0) -> qb[0..n) in bf16 and qb[n..2n) its bf16 remainder; returns the
 * remainder's offset n when q is not bf16-exact, else 0 (one VDPBF16PS pass suffices) */
static inline int q_to_bf16(const float *q, int n, uint16_t *qb) {
    __mmask16 inexact = 0;
    for (int e = 0; e < n; e += 16) {
        __m512 x = _mm512_loadu_ps(q + e);
        __m256i hi = (__m256i)_mm512_cvtneps_pbh(x);
        __m512 xh = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, xh));
        _mm256_storeu_si256((__m256i *)(qb + e), hi);
        _mm256_storeu_si256((__m256i *)(qb + n + e), lo);
        inexact |= _mm256_test_epi16_mask(lo, _mm256_set1_epi16(0x7fff));
    }
    return inexact ? n : 0;
}
#else
#define HAVE_DPBF16 0
DEFINE_PAIR_SCORE(score16_bf16, uint16_t, LOAD2_BF16)
static inline int q_to_bf16(const float *q, int n, uint16_t *qb) { (void)q; (void)n; (void)qb; return 0; }
#endif

/* V rows: NT vectors of 16 channels from vr. bf16 (VPERM): 32 channels a load, split into even
 * and odd channels (one shift / and each), so o holds, per 32-channel group, the 16 even
 * channels then the 16 odd ones; the item's epilogue restores the natural order. */
#define VLOAD_f32(vr, vv, NT) for (int k = 0; k < NT; k++) vv[k] = _mm512_loadu_ps((vr) + 16 * k)
#define VLOAD_f16(vr, vv, NT) for (int k = 0; k < NT; k++) vv[k] = ld_f16((vr) + 16 * k)
#define VLOAD_bf16(vr, vv, NT)                                                                       \
    for (int k = 0; k < NT; k += 2) {                                                                \
        __m512i w = _mm512_loadu_si512((vr) + 16 * k);                                               \
        vv[k] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));                                       \
        vv[k + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));  \
    }
#define VPERM_f32 0
#define VPERM_f16 0
#define VPERM_bf16 1
#define QBF16_f32 0
#define QBF16_f16 0
#define QBF16_bf16 HAVE_DPBF16

/* One item, D % 32 == 0 and bs % 16 == 0, slot by slot in address order: 1. the scores of every
 * head (scaled; -inf where not attended), 2. per query head one online-softmax step, 3. the V
 * rows times the weights, accumulated into J->o, NT x 16 channels a pass with the G x NT
 * accumulators in registers (o * alpha on entry: alpha = 1 unless the block raised the max).
 * G_C, NV_C: compile-time G and D/16 in the specialised copies (0 = runtime). */
#define DEFINE_AVX512(NAME, KV_T, SCORE)                                                              \
static inline __attribute__((always_inline)) void NAME##_item_body(const item_job *J, int H_kv, int G, \
        int D, int bs, float scale, const int G_C, const int NV_C, const int NT_C) {               \
    enum { NT_MAX = 8 };                                                                           \
    if (G_C) G = G_C;                                                                              \
    if (NV_C) D = 16 * NV_C;                                                                       \
    const int nv = D / 16, NT = NT_C, H = H_kv * G;                                                \
    const size_t kblock = (size_t)D * bs;                /* elements of one head's K (or V) */      \
    float P[H * bs] __attribute__((aligned(64)));        /* a block's scores, then weights */      \
    float m[H], alpha[H];                                                                          \
    __m512 lsum[H];                                      /* sum of the weights, per lane */        \
    uint64_t live[H_kv];                                                                           \
    int qlo[H_kv];                                                                                 \
    uint16_t qb[QBF16_##NAME ? 2 * H * D : 1] __attribute__((aligned(64)));                       \
    for (int h = 0; h < H_kv; h++)        /* bf16 q (and its remainder) per KV head */             \
        qlo[h] = QBF16_##NAME ? q_to_bf16(J->q + (size_t)h * G * D, G * D, qb + (size_t)2 * h * G * D) : 0; \
    for (int i = 0; i < H; i++) { m[i] = -INFINITY; lsum[i] = _mm512_setzero_ps(); }               \
    memset(J->o, 0, sizeof(float) * H * D);                                                        \
    for (int j = 0; j < J->nb; j++) {                                                              \
        const KV_T *slot = (const KV_T *)J->blk[j];                                                \
        int n = j == J->nb - 1 ? J->n_last : bs;                                                   \
        /* 1. scores of every head, 2. the softmax step */                                        \
        for (int h = 0; h < H_kv; h++) {                                                           \
            const uint64_t *tm = J->tm ? J->tm + (size_t)j * H_kv + h : NULL;                      \
            live[h] = live_tokens(tm, n);                                                          \
            if (!live[h]) continue;               /* head skips the block: nothing read */         \
            const KV_T *K = slot + h * kblock;                                                     \
            float *Ph = P + (size_t)h * G * bs;                                                    \
            __m512 bmx[G_MAX];                                                                     \
            for (int g = 0; g < G; g++) bmx[g] = _mm512_set1_ps(-INFINITY);                        \
            for (int t0 = 0; t0 < n; t0 += 16) {                                                   \
                __mmask16 lm = tm ? (__mmask16)(t0 < 64 ? live[h] >> t0 : 0) : (__mmask16)0xffff;  \
                if (n - t0 < 16) lm &= (__mmask16)((1u << (n - t0)) - 1u);                         \
                __m512 sc[G_MAX];                                                                  \
                if (lm) SCORE(K, t0, bs, D, J->q + (size_t)h * G * D, qb + (size_t)2 * h * G * D, qlo[h], G, sc); \
                for (int g = 0; g < G; g++) {                                                      \
                    __m512 sv = lm ? _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), lm,             \
                                                        _mm512_mul_ps(sc[g], _mm512_set1_ps(scale))) \
                                   : _mm512_set1_ps(-INFINITY);                                    \
                    bmx[g] = _mm512_max_ps(bmx[g], sv);                                            \
                    _mm512_store_ps(Ph + g * bs + t0, sv);                                         \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < G; g++) {                                                          \
                int i = h * G + g;                                                                 \
                float *Pi = Ph + g * bs;                                                           \
                alpha[i] = 1.f;                                                                    \
                if (_mm512_cmp_ps_mask(bmx[g], _mm512_set1_ps(m[i]), _CMP_GT_OQ)) {                \
                    float bm = _mm512_reduce_max_ps(bmx[g]);   /* a new running max: rescale */    \
                    alpha[i] = m[i] == -INFINITY ? 0.f : exp_nonpos(m[i] - bm);                    \
                    m[i] = bm;                                                                     \
                    lsum[i] = _mm512_mul_ps(lsum[i], _mm512_set1_ps(alpha[i]));                    \
                }                                                                                  \
                __m512 mv = _mm512_set1_ps(m[i]);                                                  \
                for (int t = 0; t < n; t += 16) {                                                  \
                    __m512 x = _mm512_load_ps(Pi + t);                                             \
                    __mmask16 fin = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ); \
                    __m512 e = _mm512_maskz_mov_ps(fin, exp512_nonpos(_mm512_sub_ps(x, mv)));      \
                    lsum[i] = _mm512_add_ps(lsum[i], e);                                           \
                    _mm512_store_ps(Pi + t, e);                                                    \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        /* 3. o = o * alpha + sum_t p_t v_t, every head, NT x 16 channels at a time */             \
        for (int h = 0; h < H_kv; h++) {                                                           \
            if (!live[h]) continue;                                                                \
            const KV_T *V = slot + (H_kv + h) * kblock;                                            \
            const float *Ph = P + (size_t)h * G * bs;                                              \
            float *oh = J->o + (size_t)h * G * D;                                                  \
            for (int v0 = 0; v0 < nv; v0 += NT) {                                                  \
                __m512 acc[G_MAX][NT_MAX];                                                         \
                for (int g = 0; g < G; g++) {                                                      \
                    __m512 a = _mm512_set1_ps(alpha[h * G + g]);                                   \
                    for (int k = 0; k < NT; k++)                                                   \
                        acc[g][k] = _mm512_mul_ps(_mm512_loadu_ps(oh + (size_t)g * D + 16 * (v0 + k)), a); \
                }                                                                                  \
                for (int t = 0; t < n; t++) {                                                      \
                    __m512 vv[NT_MAX];                                                             \
                    VLOAD_##NAME(V + (size_t)t * D + 16 * v0, vv, NT);                             \
                    for (int g = 0; g < G; g++) {                                                  \
                        __m512 pg = _mm512_set1_ps(Ph[g * bs + t]);                                \
                        for (int k = 0; k < NT; k++) acc[g][k] = _mm512_fmadd_ps(pg, vv[k], acc[g][k]); \
                    }                                                                              \
                }                                                                                  \
                for (int g = 0; g < G; g++)                                                        \
                    for (int k = 0; k < NT; k++) _mm512_storeu_ps(oh + (size_t)g * D + 16 * (v0 + k), acc[g][k]); \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    /* o / l in natural channel order; lse = m + log l (o = 0, lse = -inf: nothing attended) */    \
    for (int i = 0; i < H; i++) {                                                                  \
        float *o = J->o + (size_t)i * D;                                                           \
        if (m[i] == -INFINITY) {                                                                   \
            memset(o, 0, sizeof(float) * D);                                                       \
            J->lse[i] = -INFINITY;                                                                 \
            continue;                                                                              \
        }                                                                                          \
        float l = _mm512_reduce_add_ps(lsum[i]);                                                   \
        __m512 L = _mm512_set1_ps(l);                                                              \
        if (VPERM_##NAME) {                                                                        \
            const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0); \
            const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8); \
            for (int v = 0; v < nv; v += 2) {                                                      \
                __m512 ev = _mm512_loadu_ps(o + 16 * v), od = _mm512_loadu_ps(o + 16 * v + 16);    \
                _mm512_storeu_ps(o + 16 * v, _mm512_div_ps(_mm512_permutex2var_ps(ev, lo, od), L)); \
                _mm512_storeu_ps(o + 16 * v + 16, _mm512_div_ps(_mm512_permutex2var_ps(ev, hi, od), L)); \
            }                                                                                      \
        } else {                                                                                   \
            for (int v = 0; v < nv; v++)                                                           \
                _mm512_storeu_ps(o + 16 * v, _mm512_div_ps(_mm512_loadu_ps(o + 16 * v), L));       \
        }                                                                                          \
        J->lse[i] = m[i] + logf(l);                                                                \
    }                                                                                              \
}
DEFINE_AVX512(f32, float, score16_f32)
DEFINE_AVX512(bf16, uint16_t, score16_bf16)
DEFINE_AVX512(f16, uint16_t, score16_f16)

/* V channels per pass: as many as keep G x NT accumulators within ~24-28 registers (even: bf16
 * splits 32 channels a load; measured) */
#define NT_FOR(G, NV) ((NV) <= 2 || (G) * 4 > 28 ? 2 : (NV) <= 4 || (G) * 8 > 24 ? 4 : 8)
#define SPEC(NAME, GC, NVC)                                                                          \
static void NAME##_item_g##GC##_nv##NVC(const item_job *J, int H_kv, int G, int D, int bs, float scale) { \
    NAME##_item_body(J, H_kv, G, D, bs, scale, GC, NVC, NT_FOR(GC, NVC));                            \
}
#define SPEC_NV(NAME, GC) SPEC(NAME, GC, 4) SPEC(NAME, GC, 8)
#define SPEC_ALL(NAME)                                                                               \
static void NAME##_item_any(const item_job *J, int H_kv, int G, int D, int bs, float scale) {      \
    NAME##_item_body(J, H_kv, G, D, bs, scale, 0, 0, 2);                                             \
}                                                                                                    \
SPEC_NV(NAME, 1) SPEC_NV(NAME, 2) SPEC_NV(NAME, 3) SPEC_NV(NAME, 4) SPEC_NV(NAME, 5)                 \
SPEC_NV(NAME, 6) SPEC_NV(NAME, 7) SPEC_NV(NAME, 8)                                                   \
/* the code for a geometry: chosen from (G, D, bs) alone, so every call, thread and process      \
   computes an item the same way */                                                                 \
static item_fn NAME##_pick(int G, int D, int bs) {                                                   \
    if (D % 32 || bs % 16) return NAME##_item_generic;                                               \
    static const item_fn tab[8][2] = {                                                               \
        {NAME##_item_g1_nv4, NAME##_item_g1_nv8}, {NAME##_item_g2_nv4, NAME##_item_g2_nv8},          \
        {NAME##_item_g3_nv4, NAME##_item_g3_nv8}, {NAME##_item_g4_nv4, NAME##_item_g4_nv8},          \
        {NAME##_item_g5_nv4, NAME##_item_g5_nv8}, {NAME##_item_g6_nv4, NAME##_item_g6_nv8},          \
        {NAME##_item_g7_nv4, NAME##_item_g7_nv8}, {NAME##_item_g8_nv4, NAME##_item_g8_nv8}};         \
    int c = D == 64 ? 0 : D == 128 ? 1 : -1;                                                         \
    return G <= 8 && c >= 0 ? tab[G - 1][c] : NAME##_item_any;                                       \
}
SPEC_ALL(f32)
SPEC_ALL(bf16)
SPEC_ALL(f16)
#define PICK(NAME) NAME##_pick(G, D, bs)
#elif defined(__AVX2__) && defined(__FMA__)
/* ---------------------------------------------------------------------------------------------
 * AVX2 + FMA (CPUs without AVX-512: most desktop and laptop x86, AMD before Zen 4): the
 * AVX-512 path's algorithm in 8 lanes. Scores 8 tokens a step, a broadcast (q[2i], q[2i+1])
 * pair times 4 tokens x 2 channels per vector, the parities added at the end; the softmax 8
 * tokens a vector; the V rows widened in channel order (no even/odd split), G x NT
 * accumulators of 8 channels in the 16 registers. Same contract: the code for an item is
 * chosen from (dtype, G, D, bs) alone. D % 16 == 0 and bs % 8 == 0, else the portable path.
 * ------------------------------------------------------------------------------------------- */
#include <immintrin.h>

static inline __m256 ld8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256 ld8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 ld8_f32(const float *p) { return _mm256_loadu_ps(p); }
/* lanes t of an 8-token step whose bit t of lm is set */
static inline __m256 lane_mask8(unsigned lm) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)lm), bit), bit));
}

/* Query heads up to which score8 keeps both halves' sums in registers at once (2 G + 3 of the
 * 16); above, it makes two passes over the channels, each half's sums in turn (the same sums in
 * the same order, so the same bits). At G 7 one pass spilled an accumulator, a chain through the
 * stack each channel pair. Kernel alone, Qwen's geometry (2 x 7 x 64, bf16 KV) at 16K, variants
 * alternated in one process (seventeenth session): a dense layer 824 -> 755 us, a Quest 1/16
 * layer 166 -> 166 us (its scattered blocks' loads dominate). */
#define SCORE8_ONE_PASS_G 6
/* Scores of 8 tokens (t0..t0+7 of a block) for G query heads, K channel-pair-major: lanes of lo
 * (tokens t0..t0+3) and hi (t0+4..t0+7) hold (token, parity) sums; the parities are added and
 * the even lanes gathered in token order. */
#define DEFINE_SCORE8(NAME, KV_T, LD8)                                                               \
static inline __attribute__((always_inline)) void NAME(const KV_T *K, int t0, int bs, int D,       \
                                                       const float *qh, int G, __m256 *s) {        \
    __m256 lo[G_MAX], hi[G_MAX];                                                                   \
    for (int g = 0; g < G; g++) lo[g] = hi[g] = _mm256_setzero_ps();                               \
    if (G > SCORE8_ONE_PASS_G) {         /* lo's sums, then hi's: G + 2 registers, not 2 G + 3 */  \
        for (int dp = 0; dp < D / 2; dp++) {                                                       \
            const __m256 k0 = LD8(K + (size_t)dp * bs * 2 + 2 * t0);                               \
            for (int g = 0; g < G; g++)                                                            \
                lo[g] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_broadcast_sd((const double *)(qh + (size_t)g * D + 2 * dp))), k0, lo[g]); \
        }                                                                                          \
        for (int dp = 0; dp < D / 2; dp++) {                                                       \
            const __m256 k1 = LD8(K + (size_t)dp * bs * 2 + 2 * t0 + 8);                           \
            for (int g = 0; g < G; g++)                                                            \
                hi[g] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_broadcast_sd((const double *)(qh + (size_t)g * D + 2 * dp))), k1, hi[g]); \
        }                                                                                          \
    } else                                                                                         \
    for (int dp = 0; dp < D / 2; dp++) {                                                           \
        const KV_T *r = K + (size_t)dp * bs * 2 + 2 * t0;                                          \
        const __m256 k0 = LD8(r), k1 = LD8(r + 8);                                                 \
        for (int g = 0; g < G; g++) {                                                              \
            const __m256 qp = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(qh + (size_t)g * D + 2 * dp))); \
            lo[g] = _mm256_fmadd_ps(qp, k0, lo[g]);                                                \
            hi[g] = _mm256_fmadd_ps(qp, k1, hi[g]);                                                \
        }                                                                                          \
    }                                                                                              \
    for (int g = 0; g < G; g++) {                                                                  \
        __m256 a = _mm256_add_ps(lo[g], _mm256_permute_ps(lo[g], 0xB1));                           \
        __m256 b = _mm256_add_ps(hi[g], _mm256_permute_ps(hi[g], 0xB1));                           \
        /* (t0 t1 t4 t5 | t2 t3 t6 t7) -> tokens in order */                                       \
        s[g] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8)); \
    }                                                                                              \
}
DEFINE_SCORE8(score8_f32, float, ld8_f32)
DEFINE_SCORE8(score8_bf16, uint16_t, ld8_bf16)
DEFINE_SCORE8(score8_f16, uint16_t, ld8_f16)

/* One item, slot by slot in address order, as the AVX-512 body: 1. the scores of every head
 * (scaled; -inf where not attended), 2. per query head one online-softmax step, 3. the V rows
 * times the weights into J->o, NT x 8 channels a pass (o * alpha on entry). G_C, NV_C:
 * compile-time G and D/8 (0 = runtime). */
#define DEFINE_AVX2(NAME, KV_T, SCORE, LD8)                                                          \
static inline __attribute__((always_inline)) void NAME##_item_body(const item_job *J, int H_kv, int G, \
        int D, int bs, float scale, const int G_C, const int NV_C, const int NT_C) {               \
    enum { NT_MAX = 4 };                                                                           \
    if (G_C) G = G_C;                                                                              \
    if (NV_C) D = 8 * NV_C;                                                                        \
    const int nv = D / 8, NT = NT_C, H = H_kv * G;                                                 \
    const size_t kblock = (size_t)D * bs;                                                          \
    float P[H * bs] __attribute__((aligned(32)));         /* a block's scores, then weights */     \
    float m[H], alpha[H];                                                                          \
    __m256 lsum[H];                                                                                \
    uint64_t live[H_kv];                                                                           \
    const __m256 ninf = _mm256_set1_ps(-INFINITY);                                                 \
    for (int i = 0; i < H; i++) { m[i] = -INFINITY; lsum[i] = _mm256_setzero_ps(); }               \
    memset(J->o, 0, sizeof(float) * H * D);                                                        \
    for (int j = 0; j < J->nb; j++) {                                                              \
        const KV_T *slot = (const KV_T *)J->blk[j];                                                \
        int n = j == J->nb - 1 ? J->n_last : bs;                                                   \
        for (int h = 0; h < H_kv; h++) {                                                           \
            const uint64_t *tm = J->tm ? J->tm + (size_t)j * H_kv + h : NULL;                      \
            live[h] = live_tokens(tm, n);                                                          \
            if (!live[h]) continue;                                                                \
            const KV_T *K = slot + h * kblock;                                                     \
            float *Ph = P + (size_t)h * G * bs;                                                    \
            __m256 bmx[G_MAX];                                                                     \
            for (int g = 0; g < G; g++) bmx[g] = ninf;                                             \
            for (int t0 = 0; t0 < n; t0 += 8) {                                                    \
                unsigned lm = tm ? (unsigned)(t0 < 64 ? (live[h] >> t0) & 0xffu : 0u) : 0xffu;     \
                if (n - t0 < 8) lm &= (1u << (n - t0)) - 1u;                                       \
                __m256 sc[G_MAX];                                                                  \
                if (lm) SCORE(K, t0, bs, D, J->q + (size_t)h * G * D, G, sc);                      \
                const __m256 keep = lane_mask8(lm);                                                \
                for (int g = 0; g < G; g++) {                                                      \
                    __m256 sv = lm ? _mm256_blendv_ps(ninf, _mm256_mul_ps(sc[g], _mm256_set1_ps(scale)), keep) : ninf; \
                    bmx[g] = _mm256_max_ps(bmx[g], sv);                                            \
                    _mm256_store_ps(Ph + g * bs + t0, sv);                                         \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < G; g++) {                                                          \
                int i = h * G + g;                                                                 \
                float *Pi = Ph + g * bs;                                                           \
                alpha[i] = 1.f;                                                                    \
                if (_mm256_movemask_ps(_mm256_cmp_ps(bmx[g], _mm256_set1_ps(m[i]), _CMP_GT_OQ))) {  \
                    float bm = hmax256(bmx[g]);                     /* a new running max: rescale */ \
                    alpha[i] = m[i] == -INFINITY ? 0.f : exp_nonpos(m[i] - bm);                    \
                    m[i] = bm;                                                                     \
                    lsum[i] = _mm256_mul_ps(lsum[i], _mm256_set1_ps(alpha[i]));                    \
                }                                                                                  \
                const __m256 mv = _mm256_set1_ps(m[i]);                                            \
                for (int t = 0; t < n; t += 8) {                                                   \
                    __m256 x = _mm256_load_ps(Pi + t);                                             \
                    __m256 fin = _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ);                              \
                    __m256 e = _mm256_and_ps(fin, exp256_nonpos(_mm256_sub_ps(x, mv)));            \
                    lsum[i] = _mm256_add_ps(lsum[i], e);                                           \
                    _mm256_store_ps(Pi + t, e);                                                    \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int h = 0; h < H_kv; h++) {                                                           \
            if (!live[h]) continue;                                                                \
            const KV_T *V = slot + (H_kv + h) * kblock;                                            \
            const float *Ph = P + (size_t)h * G * bs;                                              \
            float *oh = J->o + (size_t)h * G * D;                                                  \
            for (int v0 = 0; v0 < nv; v0 += NT) {                                                  \
                __m256 acc[G_MAX][NT_MAX];                                                         \
                for (int g = 0; g < G; g++) {                                                      \
                    __m256 a = _mm256_set1_ps(alpha[h * G + g]);                                   \
                    for (int k = 0; k < NT; k++)                                                   \
                        acc[g][k] = _mm256_mul_ps(_mm256_loadu_ps(oh + (size_t)g * D + 8 * (v0 + k)), a); \
                }                                                                                  \
                for (int t = 0; t < n; t++) {                                                      \
                    const KV_T *vr = V + (size_t)t * D + 8 * v0;                                   \
                    for (int k = 0; k < NT; k++) {                                                 \
                        const __m256 vv = LD8(vr + 8 * k);                                         \
                        for (int g = 0; g < G; g++)                                                \
                            acc[g][k] = _mm256_fmadd_ps(_mm256_broadcast_ss(Ph + g * bs + t), vv, acc[g][k]); \
                    }                                                                              \
                }                                                                                  \
                for (int g = 0; g < G; g++)                                                        \
                    for (int k = 0; k < NT; k++) _mm256_storeu_ps(oh + (size_t)g * D + 8 * (v0 + k), acc[g][k]); \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < H; i++) {                          /* o / l; lse = m + log l */            \
        float *o = J->o + (size_t)i * D;                                                           \
        if (m[i] == -INFINITY) {                                                                   \
            memset(o, 0, sizeof(float) * D);                                                       \
            J->lse[i] = -INFINITY;                                                                 \
            continue;                                                                              \
        }                                                                                          \
        float l = hsum256(lsum[i]);                                                                 \
        const __m256 L = _mm256_set1_ps(l);                                                        \
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(o + 8 * v, _mm256_div_ps(_mm256_loadu_ps(o + 8 * v), L)); \
        J->lse[i] = m[i] + logf(l);                                                                \
    }                                                                                              \
}
DEFINE_AVX2(f32, float, score8_f32, ld8_f32)
DEFINE_AVX2(bf16, uint16_t, score8_bf16, ld8_bf16)
DEFINE_AVX2(f16, uint16_t, score8_f16, ld8_f16)

/* V channels per pass: G x NT accumulators within 12 of the 16 registers */
#define NT8_FOR(G) ((G) <= 3 ? 4 : (G) <= 6 ? 2 : 1)
#define SPEC8(NAME, GC, NVC)                                                                         \
static void NAME##_item_g##GC##_nv##NVC(const item_job *J, int H_kv, int G, int D, int bs, float scale) { \
    NAME##_item_body(J, H_kv, G, D, bs, scale, GC, NVC, NT8_FOR(GC));                                \
}
#define SPEC8_NV(NAME, GC) SPEC8(NAME, GC, 8) SPEC8(NAME, GC, 16)
#define SPEC8_ALL(NAME)                                                                              \
static void NAME##_item_any(const item_job *J, int H_kv, int G, int D, int bs, float scale) {      \
    NAME##_item_body(J, H_kv, G, D, bs, scale, 0, 0, 1);                                             \
}                                                                                                    \
SPEC8_NV(NAME, 1) SPEC8_NV(NAME, 2) SPEC8_NV(NAME, 3) SPEC8_NV(NAME, 4) SPEC8_NV(NAME, 5)            \
SPEC8_NV(NAME, 6) SPEC8_NV(NAME, 7) SPEC8_NV(NAME, 8)                                                \
static item_fn NAME##_pick(int G, int D, int bs) {                                                   \
    if (D % 16 || bs % 8) return NAME##_item_generic;                                                \
    static const item_fn tab[8][2] = {                                                               \
        {NAME##_item_g1_nv8, NAME##_item_g1_nv16}, {NAME##_item_g2_nv8, NAME##_item_g2_nv16},        \
        {NAME##_item_g3_nv8, NAME##_item_g3_nv16}, {NAME##_item_g4_nv8, NAME##_item_g4_nv16},        \
        {NAME##_item_g5_nv8, NAME##_item_g5_nv16}, {NAME##_item_g6_nv8, NAME##_item_g6_nv16},        \
        {NAME##_item_g7_nv8, NAME##_item_g7_nv16}, {NAME##_item_g8_nv8, NAME##_item_g8_nv16}};       \
    int c = D == 64 ? 0 : D == 128 ? 1 : -1;                                                         \
    return G <= 8 && c >= 0 ? tab[G - 1][c] : NAME##_item_any;                                       \
}
SPEC8_ALL(f32)
SPEC8_ALL(bf16)
SPEC8_ALL(f16)
#define PICK(NAME) NAME##_pick(G, D, bs)
#else
#define PICK(NAME) NAME##_item_generic
#endif

/* ---------------------------------------------------------------------------------------------
 * Compressed blocks (--kv-dtype int8 / int4; the byte layout is kv/layout.py's, its offsets
 * BlockLayout.quant_offsets): per head, K codes channel-major [D, bs] with one (scale, min) per
 * channel, V codes token-major [bs, D] with one (scale, min) per group of vg channels of a
 * token; x = code * scale + min; int4: two codes a byte, the even one in the low nibble.
 * Nothing is dequantised to memory: the key scales fold into the query (score = sum_d
 * (q_d s_d) c_dt + sum_d q_d m_d), the value ones into the weights (o += (p s) c + p m), the
 * codes are widened to fp32 in registers. Loops run along tokens (scores) and channels
 * (values) with independent lanes, so the compiler vectorises them without reassociating
 * anything: the bit-identity contract holds as for the other dtypes.
 * ------------------------------------------------------------------------------------------- */
#if defined(__F16C__)
#include <immintrin.h>
static inline float h2f(uint16_t x) { return _cvtsh_ss(x); }
#else
static inline float h2f(uint16_t x) { return f16_to_f32(x); }
#endif

/* codes [n] of one row (n even for int4) -> fp32 */
static inline void widen_q8(const uint8_t *c, int n, float *out) {
    for (int i = 0; i < n; i++) out[i] = (float)c[i];
}
static inline void widen_q4(const uint8_t *c, int n, float *out) {
    for (int i = 0; i < n / 2; i++) {
        out[2 * i] = (float)(c[i] & 15);
        out[2 * i + 1] = (float)(c[i] >> 4);
    }
}

/* A compressed block's parts (kv/layout.py's BlockLayout.quant_offsets, restated here once for
 * C), each heads 0..H_kv-1 back to back: K codes at 0, V codes at v0, K (scale, min) rows at km,
 * V (scale, min) pairs at vm, the slot's end at end. */
typedef struct { size_t cb, v0, km, vm, end; } qparts;
static inline qparts quant_parts(int H_kv, int D, int bs, int ng, int bits) {
    qparts r;
    r.cb = (size_t)D * bs * bits / 8;                      /* one head's K (or V) codes */
    r.v0 = (size_t)H_kv * r.cb;
    r.km = 2 * r.v0;
    r.vm = r.km + (size_t)H_kv * 4 * D;
    r.end = r.vm + (size_t)H_kv * bs * ng * 4;
    return r;
}
/* One head's parts of a compressed block: its K codes, V codes, K (scale, min) rows and V
 * (scale, min) pairs. */
typedef struct { const uint8_t *kc, *vc; const uint16_t *km, *vm; } qhead;
static inline qhead quant_head(const void *blk, int h, int H_kv, int D, int bs, int ng, int bits) {
    const uint8_t *B = (const uint8_t *)blk;
    const qparts o = quant_parts(H_kv, D, bs, ng, bits);
    qhead r = {B + h * o.cb, B + o.v0 + h * o.cb, (const uint16_t *)(B + o.km) + (size_t)h * 2 * D,
               (const uint16_t *)(B + o.vm) + (size_t)h * bs * ng * 2};
    return r;
}

/* Slots ahead that a compressed body asks the cache for: a slot's four parts per head are short
 * runs in different places, which the hardware prefetchers do not follow (each run's first line
 * was a demand miss, ~half the AVX2 body's time with the KV in DRAM: perf annotate). Tried 1, 2,
 * 4 slots ahead on the AVX2 EPYC; 4 best (int8 KV in DRAM, 2 threads: -8%) while prefetching into
 * L1. Into L2 (below), 2 is best: SmolLM2's 30 layers at 8K, kernel alone, 3 alternations, int8
 * 9.1-9.3 ms (2 ahead) / 10.0-11.0 (4) / 12.0-13.0 (8), int4 11.2-12.3 / 12.1-12.9 (sixteenth
 * session); also prefetching an item's first slots at its start: no better. */
#define QUANT_PREFETCH_SLOTS 2
/* Into L2 (locality 2), not L1 (3): on the same EPYC, int8 / int4 KV alone 17-19 -> 12.5-13.7 ms
 * at 8K (`bench attention --tiers host`, 2 threads, two alternations; benchmarks/avx2/README.md,
 * fifteenth session), as for the one-row int8 GEMV's stream (decode.c's PF_PAIR_HINT). */
#define QUANT_PREFETCH_LOCALITY 2
/* share i of n of a slot of sb bytes at blk, line by line */
static inline void prefetch_share(const void *blk, size_t sb, int i, int n) {
    const size_t a = sb * i / n, b = sb * (i + 1) / n;
    for (size_t x = a; x < b; x += 64) __builtin_prefetch((const char *)blk + x, 0, QUANT_PREFETCH_LOCALITY);
}

#define DEFINE_QUANT(NAME, BITS)                                                                      \
static void NAME##_item_generic(const item_job *J, int H_kv, int G, int D, int bs, float scale) {  \
    float P[G_MAX][BS_MAX], S[G_MAX][BS_MAX], QS[G_MAX][D_MAX], C0[G_MAX], row[D_MAX > BS_MAX ? D_MAX : BS_MAX]; \
    const int vg = J->vg, ng = D / vg;                                                              \
    for (int h = 0; h < H_kv; h++) {                                                                \
        const float *q = J->q + (size_t)h * G * D;                                                  \
        float m[G_MAX], l[G_MAX], *o = J->o + (size_t)h * G * D;                                    \
        for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }                               \
        memset(o, 0, sizeof(float) * G * D);                                                        \
        for (int j = 0; j < J->nb; j++) {                                                           \
            int n = j == J->nb - 1 ? J->n_last : bs;                                                \
            const uint64_t *tm = J->tm ? J->tm + (size_t)j * H_kv + h : NULL;                       \
            uint64_t mk = live_tokens(tm, n);                                                       \
            if (!mk) continue;                    /* head skips the block: nothing read */          \
            const qhead Q = quant_head((const void *)J->blk[j], h, H_kv, D, bs, ng, BITS);          \
            const uint8_t *KC = Q.kc, *VC = Q.vc;                                                   \
            const uint16_t *KM = Q.km, *VM = Q.vm;                                                  \
            for (int g = 0; g < G; g++) C0[g] = 0.f;                                                \
            for (int d = 0; d < D; d++) {         /* the key scales folded into q */                \
                float ks = h2f(KM[d]), kmn = h2f(KM[D + d]);                                        \
                for (int g = 0; g < G; g++) {                                                       \
                    QS[g][d] = q[g * D + d] * ks;                                                   \
                    C0[g] = fmaf(q[g * D + d], kmn, C0[g]);                                         \
                }                                                                                   \
            }                                                                                       \
            for (int g = 0; g < G; g++)                                                             \
                for (int t = 0; t < bs; t++) S[g][t] = 0.f;                                         \
            for (int d = 0; d < D; d++) {         /* scores: one channel's codes x G heads */       \
                widen_##NAME(KC + (size_t)d * bs * BITS / 8, bs, row);                              \
                for (int g = 0; g < G; g++) {                                                       \
                    float qs = QS[g][d], *sg = S[g];                                                \
                    for (int t = 0; t < bs; t++) sg[t] = fmaf(qs, row[t], sg[t]);                   \
                }                                                                                   \
            }                                                                                       \
            for (int g = 0; g < G; g++) {                                                           \
                for (int t = 0; t < n; t++)                                                         \
                    P[g][t] = !tm || ((mk >> t) & 1) ? (S[g][t] + C0[g]) * scale : -INFINITY;       \
                softmax_step(P[g], n, m + g, l + g, o + (size_t)g * D, D);                          \
            }                                                                                       \
            for (int t = 0; t < n; t++) {         /* weighted V rows: the value scales in p */      \
                if (tm && !((mk >> t) & 1)) continue;                                               \
                widen_##NAME(VC + (size_t)t * D * BITS / 8, D, row);                                \
                const uint16_t *vmt = VM + (size_t)t * ng * 2;                                      \
                for (int c = 0; c < ng; c++) {                                                      \
                    float vs = h2f(vmt[2 * c]), vmn = h2f(vmt[2 * c + 1]);                          \
                    const float *rc = row + (size_t)c * vg;                                         \
                    for (int g = 0; g < G; g++) {                                                   \
                        float p = P[g][t], ps = p * vs, pz = p * vmn;                               \
                        float *og = o + (size_t)g * D + (size_t)c * vg;                             \
                        for (int d = 0; d < vg; d++) og[d] = fmaf(ps, rc[d], og[d] + pz);           \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int g = 0; g < G; g++) finish_head(o + (size_t)g * D, m[g], l[g], D, J->lse + h * G + g); \
    }                                                                                               \
}

/* The vector bodies' entry (either ISA): the portable path where the geometry is not the body's
 * (UNFIT), else the body with G, and D where it is 64 or 128, compile-time constants (the loops
 * unroll and the accumulators stay in registers). */
#define DEFINE_QUANT_FAST(NAME, UNFIT)                                                                \
static inline __attribute__((always_inline)) void NAME##_item_g(const item_job *J, int H_kv, const int G, \
                                                                  int D, int bs, float scale) {      \
    if (D == 64 && bs == 16) NAME##_item_v(J, H_kv, G, 64, 16, scale);   /* the shipped models' */   \
    else if (D == 128 && bs == 16) NAME##_item_v(J, H_kv, G, 128, 16, scale);                       \
    else if (D == 64) NAME##_item_v(J, H_kv, G, 64, bs, scale);                                     \
    else if (D == 128) NAME##_item_v(J, H_kv, G, 128, bs, scale);                                   \
    else NAME##_item_v(J, H_kv, G, D, bs, scale);                                                   \
}                                                                                                   \
static void NAME##_item_fast(const item_job *J, int H_kv, int G, int D, int bs, float scale) {      \
    if (UNFIT) { NAME##_item_generic(J, H_kv, G, D, bs, scale); return; }                           \
    switch (G) {                           /* G a constant: the accumulators in registers */        \
    case 1: NAME##_item_g(J, H_kv, 1, D, bs, scale); break;                                         \
    case 2: NAME##_item_g(J, H_kv, 2, D, bs, scale); break;                                         \
    case 3: NAME##_item_g(J, H_kv, 3, D, bs, scale); break;                                         \
    case 4: NAME##_item_g(J, H_kv, 4, D, bs, scale); break;                                         \
    case 5: NAME##_item_g(J, H_kv, 5, D, bs, scale); break;                                         \
    case 6: NAME##_item_g(J, H_kv, 6, D, bs, scale); break;                                         \
    case 7: NAME##_item_g(J, H_kv, 7, D, bs, scale); break;                                         \
    case 8: NAME##_item_g(J, H_kv, 8, D, bs, scale); break;                                         \
    default: NAME##_item_v(J, H_kv, G, D, bs, scale);                                               \
    }                                                                                               \
}

#ifdef __AVX512F__
/* 16 codes (elements e .. e+15 of a row) -> fp32 lanes holding QOFF_x + QMUL_x * code: the bodies
 * fold 1 / QMUL into the scales and take the offset off in the sums' constants (scores: sum (q s
 * / QMUL) f + sum q (m - QOFF / QMUL s); values likewise), so a code costs what the chosen widening
 * costs and nothing more. int8: widened to int32 and converted (QOFF 0, QMUL 1). */
#define QOFF_q8 0.f
#define QMUL_q8 1.f
static inline __m512 w16_q8(const uint8_t *row, int e) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + e))));
}
#if defined(__AVX512VBMI__)
/* int4 with VBMI: the byte of tokens (2k, 2k+1) zero-extended to qword k; a bit-granular shuffle
 * (VPMULTISHIFTQB) puts token 2k's nibble (bits 0-3) and token 2k+1's (bits 4-7) in bits 19-22 of
 * their dwords, and one logic op keeps those bits and sets the rest to 256.0f's (0x43800000): the
 * float 256 + 16 c exactly. Three operations instead of the seven of the widening below. */
#define QOFF_q4 256.f
#define QMUL_q4 16.f
static inline __m512 w16_q4(const uint8_t *row, int e) {
    const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(row + e / 2)));
    const __m512i x = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x00010000003D0000LL), b);  /* byte 2 <- bits 61.., byte 6 <- bits 1.. */
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(x, _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x43800000),
                                                         0xEA));                  /* (x & bits 19-22) | 256.0f */
}
#else
#define QOFF_q4 0.f
#define QMUL_q4 1.f
static inline __m512 w16_q4(const uint8_t *row, int e) {
    __m128i b = _mm_loadl_epi64((const __m128i *)(row + e / 2)), m = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}
#endif
/* V channels per pass (vectors of 16): G x NE accumulators within ~24 registers */
#define QNE512_FOR(G) ((G) <= 3 ? 4 : (G) <= 6 ? 2 : 1)
/* One pass of a block's weighted V rows over NE x 16 channels from vector e0 (within one value
 * group): o = o * alpha + sum_t (p_t s_t) c_t + sum_t p_t min_t, G x NE accumulators in
 * registers, o read and written once. */
#define DEFINE_QUANT_VPASS(NAME, BITS)                                                                \
static inline __attribute__((always_inline)) void NAME##_vpass(const uint8_t *VC, const int G,       \
        const int D, int n, const uint64_t *tm, uint64_t mk, const int NE, int e0, float *o,         \
        const float *alpha, const float *zs, const float PS[][BS_MAX]) {                            \
    __m512 ov[G_MAX][4];                                                                            \
    for (int g = 0; g < G; g++) {                                                                   \
        const __m512 a = _mm512_set1_ps(alpha[g]);                                                  \
        for (int k = 0; k < NE; k++)                                                                \
            ov[g][k] = _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)g * D + (e0 + k) * 16), a);        \
    }                                                                                               \
    for (int t = 0; t < n; t++) {                                                                   \
        if (tm && !((mk >> t) & 1)) continue;                                                       \
        const uint8_t *vr = VC + (size_t)t * D * BITS / 8;                                          \
        for (int k = 0; k < NE; k++) {                                                              \
            const __m512 x = w16_##NAME(vr, (e0 + k) * 16);                                         \
            for (int g = 0; g < G; g++) ov[g][k] = _mm512_fmadd_ps(_mm512_set1_ps(PS[g][t]), x, ov[g][k]); \
        }                                                                                           \
    }                                                                                               \
    for (int g = 0; g < G; g++)                                                                     \
        for (int k = 0; k < NE; k++)                                                                \
            _mm512_storeu_ps(o + (size_t)g * D + (e0 + k) * 16, _mm512_add_ps(ov[g][k], _mm512_set1_ps(zs[g]))); \
}
/* AVX-512 (bs, D and the value group multiples of 16), block by block (a slot's heads in address
 * order, QUANT_PREFETCH_SLOTS slots prefetched ahead, as the AVX2 body): per head, the scores of
 * 16 tokens a step with U chains per query head (one chain waits on the FMA latency); the
 * online softmax as the bf16 body's (the running sum a vector; o rescaled by alpha as the V
 * pass reads it, not in a loop of its own); the weighted values NE x 16 channels a pass, the
 * minima's share summed per group apart. G and D are compile-time constants where they can be
 * (_item_fast's switch), so the loops unroll and the accumulators stay in registers. */
#define DEFINE_QUANT_V(NAME, BITS)                                                                    \
DEFINE_QUANT_VPASS(NAME, BITS)                                                                      \
static inline __attribute__((always_inline)) void NAME##_item_v(const item_job *J, int H_kv, const int G, \
                                                                  const int D, int bs, float scale) { \
    enum { U = 2 };                                                                                 \
    float P[G_MAX][BS_MAX] __attribute__((aligned(64))), QS[G_MAX][D_MAX] __attribute__((aligned(64))); \
    float PS[G_MAX][BS_MAX] __attribute__((aligned(64)));   /* p x the token's value scale */      \
    float C0[G_MAX], alpha[G_MAX];                                                                  \
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30); \
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));                                   \
    const int vg = J->vg, ng = D / vg, per = vg / 16;                                               \
    const __m512 ninf = _mm512_set1_ps(-INFINITY);                                                  \
    float mh[H_MAX];                          /* each head's running max ... */                     \
    __m512 lh[H_MAX];                         /* ... and sum of weights, per lane */                \
    for (int i = 0; i < H_kv * G; i++) { mh[i] = -INFINITY; lh[i] = _mm512_setzero_ps(); }          \
    memset(J->o, 0, sizeof(float) * H_kv * G * D);                                                  \
    const size_t sb = quant_parts(H_kv, D, bs, ng, BITS).end;                                       \
    for (int j = 0; j < J->nb; j++) {                                                               \
        for (int h = 0; h < H_kv; h++) {                                                            \
            if (j + QUANT_PREFETCH_SLOTS < J->nb)   /* a later slot: a head's share per head */     \
                prefetch_share((const void *)J->blk[j + QUANT_PREFETCH_SLOTS], sb, h, H_kv);        \
            const float *q = J->q + (size_t)h * G * D;                                              \
            float *m = mh + h * G, *o = J->o + (size_t)h * G * D;                                   \
            __m512 *ls = lh + h * G;                                                                \
            int n = j == J->nb - 1 ? J->n_last : bs;                                                \
            const uint64_t *tm = J->tm ? J->tm + (size_t)j * H_kv + h : NULL;                       \
            uint64_t mk = live_tokens(tm, n);                                                       \
            if (!mk) continue;                                                                      \
            const qhead Q = quant_head((const void *)J->blk[j], h, H_kv, D, bs, ng, BITS);          \
            const uint8_t *KC = Q.kc, *VC = Q.vc;                                                   \
            const uint16_t *KM = Q.km, *VM = Q.vm;                                                  \
            for (int g = 0; g < G; g++) {         /* the key scales folded into q */                \
                __m512 c = _mm512_setzero_ps();                                                     \
                for (int d = 0; d < D; d += 16) {                                                   \
                    __m512 ks = ld_f16(KM + d), kmn = ld_f16(KM + D + d), qv = _mm512_loadu_ps(q + g * D + d); \
                    const __m512 qs = _mm512_mul_ps(qv, ks);                                        \
                    _mm512_store_ps(QS[g] + d, QMUL_##NAME != 1.f ? _mm512_mul_ps(qs, _mm512_set1_ps(1.f / QMUL_##NAME)) : qs); \
                    c = _mm512_fmadd_ps(qv, kmn, c);                                                \
                    if (QOFF_##NAME != 0.f)               /* the codes' offset */                   \
                        c = _mm512_fnmadd_ps(qs, _mm512_set1_ps(QOFF_##NAME / QMUL_##NAME), c);     \
                }                                                                                   \
                C0[g] = _mm512_reduce_add_ps(c);                                                    \
            }                                                                                       \
            __m512 bmx[G_MAX];                                                                      \
            for (int g = 0; g < G; g++) bmx[g] = ninf;                                              \
            for (int t0 = 0; t0 < n; t0 += 16) {  /* scores of 16 tokens, dead ones -inf */         \
                __m512 acc[G_MAX][U];                                                               \
                for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm512_setzero_ps();           \
                for (int d = 0; d < D; d += U)                                                      \
                    for (int i = 0; i < U; i++) {                                                   \
                        const __m512 k = w16_##NAME(KC + (size_t)(d + i) * bs * BITS / 8, t0);      \
                        for (int g = 0; g < G; g++)                                                 \
                            acc[g][i] = _mm512_fmadd_ps(_mm512_set1_ps(QS[g][d + i]), k, acc[g][i]); \
                    }                                                                               \
                __mmask16 live = tm ? (__mmask16)(mk >> t0)     /* masks: bs <= 64 */             \
                                    : (__mmask16)(n - t0 >= 16 ? 0xFFFF : (1u << (n - t0)) - 1);     \
                for (int g = 0; g < G; g++) {                                                       \
                    __m512 sc = _mm512_add_ps(_mm512_add_ps(acc[g][0], acc[g][1]), _mm512_set1_ps(C0[g])); \
                    sc = _mm512_mask_blend_ps(live, ninf, _mm512_mul_ps(sc, _mm512_set1_ps(scale))); \
                    _mm512_store_ps(P[g] + t0, sc);                                                 \
                    bmx[g] = _mm512_max_ps(bmx[g], sc);                                             \
                }                                                                                   \
            }                                                                                       \
            for (int g = 0; g < G; g++) {         /* the online softmax, 16 weights a vector */    \
                alpha[g] = 1.f;                                                                     \
                if (_mm512_cmp_ps_mask(bmx[g], _mm512_set1_ps(m[g]), _CMP_GT_OQ)) {                 \
                    const float bm = _mm512_reduce_max_ps(bmx[g]);   /* a new running max */       \
                    alpha[g] = m[g] == -INFINITY ? 0.f : exp_nonpos(m[g] - bm);                     \
                    m[g] = bm;                                                                      \
                    ls[g] = _mm512_mul_ps(ls[g], _mm512_set1_ps(alpha[g]));                         \
                }                                                                                   \
                const __m512 mv = _mm512_set1_ps(m[g]);                                             \
                for (int t0 = 0; t0 < n; t0 += 16) {                                                \
                    __m512 sc = _mm512_load_ps(P[g] + t0);                                          \
                    __mmask16 fin = _mm512_cmp_ps_mask(sc, ninf, _CMP_NEQ_OQ);                      \
                    __m512 p = _mm512_maskz_mov_ps(fin, exp512_nonpos(_mm512_sub_ps(sc, mv)));      \
                    _mm512_store_ps(P[g] + t0, p);                                                  \
                    ls[g] = _mm512_add_ps(ls[g], p);                                                \
                }                                                                                   \
            }                                                                                       \
            for (int c = 0; c < ng; c++) {        /* value group c: its scales folded into p */     \
                __m512 za[G_MAX];                                                                   \
                for (int g = 0; g < G; g++) za[g] = _mm512_setzero_ps();                            \
                for (int t0 = 0; t0 < n; t0 += 16) {  /* 16 tokens' (scale, min) of group c */      \
                    __mmask16 in = (__mmask16)(n - t0 >= 16 ? 0xFFFF : (1u << (n - t0)) - 1);       \
                    __m512 vs, vz;                                                                  \
                    if (ng == 1) {                /* the pairs of 16 tokens: 32 halves in a row */  \
                        __m512 a = ld_f16(VM + 2 * t0), b = ld_f16(VM + 2 * t0 + 16);               \
                        vs = _mm512_permutex2var_ps(a, ev, b);                                      \
                        vz = _mm512_permutex2var_ps(a, od, b);                                      \
                    } else {                                                                        \
                        float s16[16] __attribute__((aligned(64))), z16[16] __attribute__((aligned(64))); \
                        for (int i = 0; i < 16; i++) {                                              \
                            const uint16_t *pr = VM + ((size_t)(t0 + i) * ng + c) * 2;              \
                            s16[i] = h2f(pr[0]);                                                    \
                            z16[i] = h2f(pr[1]);                                                    \
                        }                                                                           \
                        vs = _mm512_load_ps(s16);                                                   \
                        vz = _mm512_load_ps(z16);                                                   \
                    }                                                                               \
                    vs = _mm512_maskz_mov_ps(in, vs);                                               \
                    vz = _mm512_maskz_mov_ps(in, vz);                                               \
                    if (QOFF_##NAME != 0.f)               /* the codes' offset and scale */         \
                        vz = _mm512_fnmadd_ps(vs, _mm512_set1_ps(QOFF_##NAME / QMUL_##NAME), vz);   \
                    if (QMUL_##NAME != 1.f) vs = _mm512_mul_ps(vs, _mm512_set1_ps(1.f / QMUL_##NAME)); \
                    for (int g = 0; g < G; g++) {                                                   \
                        __m512 p = _mm512_load_ps(P[g] + t0);                                       \
                        _mm512_store_ps(PS[g] + t0, _mm512_mul_ps(p, vs));                          \
                        za[g] = _mm512_fmadd_ps(p, vz, za[g]);                                      \
                    }                                                                               \
                }                                                                                   \
                float zs[G_MAX];                                                                    \
                for (int g = 0; g < G; g++) zs[g] = _mm512_reduce_add_ps(za[g]);                    \
                const int NE = QNE512_FOR(G);                                                       \
                for (int e0 = c * per; e0 < (c + 1) * per; )   /* NE x 16 channels a pass */        \
                    if (NE == 4 && (c + 1) * per - e0 >= 4) {                                       \
                        NAME##_vpass(VC, G, D, n, tm, mk, 4, e0, o, alpha, zs, PS); e0 += 4;        \
                    } else if (NE >= 2 && (c + 1) * per - e0 >= 2) {                                \
                        NAME##_vpass(VC, G, D, n, tm, mk, 2, e0, o, alpha, zs, PS); e0 += 2;        \
                    } else {                                                                        \
                        NAME##_vpass(VC, G, D, n, tm, mk, 1, e0, o, alpha, zs, PS); e0 += 1;        \
                    }                                                                               \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int i = 0; i < H_kv * G; i++)                                                              \
        finish_head(J->o + (size_t)i * D, mh[i], _mm512_reduce_add_ps(lh[i]), D, J->lse + i);       \
}                                                                                                   \
DEFINE_QUANT_FAST(NAME, bs % 16 || D % 16 || J->vg % 16)
#elif defined(__AVX2__) && defined(__FMA__)
/* 8 codes (elements e .. e+7 of a row) -> fp32 lanes */
static inline __m256 w8_q8(const uint8_t *row, int e) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + e))));
}
static inline __m256 w8_q4(const uint8_t *row, int e) {
    int32_t w;
    memcpy(&w, row + e / 2, 4);
    __m128i b = _mm_cvtsi32_si128(w), m = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}
/* AVX2 (bs, D multiples of 8; the value group of 8 x NE): the AVX-512 body in 8 lanes. Scores 8
 * tokens a step, the channel sum in U chains (U = 2 while 2G accumulators fit the 16
 * registers: a lone chain per head waits on the FMA latency); the weighted values NE x 8
 * channels a pass (G x NE accumulators), the minima's share summed per group apart. Unlike
 * the AVX-512 body it walks block by block (a slot's heads in address order) and prefetches
 * QUANT_PREFETCH_SLOTS ahead; each head's arithmetic, and so its bits, as before. */
#define QNE_FOR(G) ((G) <= 3 ? 4 : (G) <= 6 ? 2 : 1)
#define DEFINE_QUANT_V(NAME, BITS)                                                                    \
static inline __attribute__((always_inline)) void NAME##_item_v(const item_job *J, int H_kv, const int G, \
                                                                  const int D, int bs, float scale) { \
    enum { U = 2, NE_MAX = 4 };                                                                     \
    const int u = G <= 4 ? 2 : 1, NE = QNE_FOR(G);                                                  \
    float P[G_MAX][BS_MAX] __attribute__((aligned(32))), QS[G_MAX][D_MAX] __attribute__((aligned(32))); \
    float PS[G_MAX][BS_MAX] __attribute__((aligned(32)));   /* p x the token's value scale */      \
    float C0[G_MAX];                                                                                \
    const int vg = J->vg, ng = D / vg;                                                              \
    const __m256 ninf = _mm256_set1_ps(-INFINITY);                                                  \
    float mh[H_MAX], lh[H_MAX];            /* each head's running max and sum */                    \
    for (int i = 0; i < H_kv * G; i++) { mh[i] = -INFINITY; lh[i] = 0.f; }                          \
    memset(J->o, 0, sizeof(float) * H_kv * G * D);                                                  \
    const size_t sb = quant_parts(H_kv, D, bs, ng, BITS).end;                                       \
    for (int j = 0; j < J->nb; j++) {         /* block by block: a slot's heads in address order */ \
        for (int h = 0; h < H_kv; h++) {                                                            \
            if (j + QUANT_PREFETCH_SLOTS < J->nb)   /* a later slot: a head's share per head */     \
                prefetch_share((const void *)J->blk[j + QUANT_PREFETCH_SLOTS], sb, h, H_kv);        \
            const float *q = J->q + (size_t)h * G * D;                                              \
            float *m = mh + h * G, *l = lh + h * G, *o = J->o + (size_t)h * G * D;                  \
            int n = j == J->nb - 1 ? J->n_last : bs;                                                \
            const uint64_t *tm = J->tm ? J->tm + (size_t)j * H_kv + h : NULL;                       \
            uint64_t mk = live_tokens(tm, n);                                                       \
            if (!mk) continue;                                                                      \
            const qhead Q = quant_head((const void *)J->blk[j], h, H_kv, D, bs, ng, BITS);          \
            const uint8_t *KC = Q.kc, *VC = Q.vc;                                                   \
            const uint16_t *KM = Q.km, *VM = Q.vm;                                                  \
            for (int g = 0; g < G; g++) {         /* the key scales folded into q */                \
                __m256 c = _mm256_setzero_ps();                                                     \
                for (int d = 0; d < D; d += 8) {                                                    \
                    __m256 ks = ld8_f16(KM + d), kmn = ld8_f16(KM + D + d), qv = _mm256_loadu_ps(q + g * D + d); \
                    _mm256_store_ps(QS[g] + d, _mm256_mul_ps(qv, ks));                              \
                    c = _mm256_fmadd_ps(qv, kmn, c);                                                \
                }                                                                                   \
                C0[g] = hsum256(c);                                                                 \
            }                                                                                       \
            float bm[G_MAX];                                                                        \
            for (int g = 0; g < G; g++) bm[g] = -INFINITY;                                          \
            for (int t0 = 0; t0 < n; t0 += 8) {   /* scores of 8 tokens, dead ones -inf */          \
                __m256 acc[G_MAX][U];                                                               \
                for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();           \
                for (int d = 0; d < D; d += u)                                                      \
                    for (int i = 0; i < u; i++) {                                                   \
                        __m256 k = w8_##NAME(KC + (size_t)(d + i) * bs * BITS / 8, t0);             \
                        for (int g = 0; g < G; g++)                                                 \
                            acc[g][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(QS[g] + d + i), k, acc[g][i]); \
                    }                                                                               \
                unsigned lv = tm ? (unsigned)(mk >> t0) & 0xffu : 0xffu;     /* masks: bs <= 64 */  \
                if (n - t0 < 8) lv &= (1u << (n - t0)) - 1u;                                        \
                const __m256 keep = lane_mask8(lv);                                                 \
                for (int g = 0; g < G; g++) {                                                       \
                    __m256 a = u == 2 ? _mm256_add_ps(acc[g][0], acc[g][1]) : acc[g][0];           \
                    __m256 sc = _mm256_mul_ps(_mm256_add_ps(a, _mm256_set1_ps(C0[g])), _mm256_set1_ps(scale)); \
                    sc = _mm256_blendv_ps(ninf, sc, keep);                                          \
                    _mm256_store_ps(P[g] + t0, sc);                                                 \
                    float x = hmax256(sc);                                                          \
                    bm[g] = x > bm[g] ? x : bm[g];                                                  \
                }                                                                                   \
            }                                                                                       \
            for (int g = 0; g < G; g++) {         /* the online softmax, 8 weights a vector */     \
                rescale_to(bm[g], m + g, l + g, o + (size_t)g * D, D);                              \
                __m256 mv = _mm256_set1_ps(m[g]), ls = _mm256_setzero_ps();                         \
                for (int t0 = 0; t0 < n; t0 += 8) {                                                 \
                    __m256 sc = _mm256_load_ps(P[g] + t0);                                          \
                    __m256 p = _mm256_and_ps(_mm256_cmp_ps(sc, ninf, _CMP_NEQ_OQ), exp256_nonpos(_mm256_sub_ps(sc, mv))); \
                    _mm256_store_ps(P[g] + t0, p);                                                  \
                    ls = _mm256_add_ps(ls, p);                                                      \
                }                                                                                   \
                l[g] += hsum256(ls);                                                                \
            }                                                                                       \
            for (int c = 0; c < ng; c++) {        /* value group c: its scales folded into p */     \
                __m256 za[G_MAX];                                                                   \
                for (int g = 0; g < G; g++) za[g] = _mm256_setzero_ps();                            \
                for (int t0 = 0; t0 < n; t0 += 8) {   /* 8 tokens' (scale, min) of group c */       \
                    const __m256 in = lane_mask8(n - t0 >= 8 ? 0xffu : (1u << (n - t0)) - 1u);     \
                    __m256 vs, vz;                                                                  \
                    if (ng == 1) {                /* the pairs of 8 tokens: 16 halves in a row */   \
                        __m256 a = ld8_f16(VM + 2 * t0), b = ld8_f16(VM + 2 * t0 + 8);              \
                        vs = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8)); \
                        vz = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8)); \
                    } else {                                                                        \
                        float s8[8] __attribute__((aligned(32))), z8[8] __attribute__((aligned(32))); \
                        for (int i = 0; i < 8; i++) {                                               \
                            const uint16_t *pr = VM + ((size_t)(t0 + i) * ng + c) * 2;              \
                            s8[i] = h2f(pr[0]);                                                     \
                            z8[i] = h2f(pr[1]);                                                     \
                        }                                                                           \
                        vs = _mm256_load_ps(s8);                                                    \
                        vz = _mm256_load_ps(z8);                                                    \
                    }                                                                               \
                    vs = _mm256_and_ps(in, vs);                                                     \
                    vz = _mm256_and_ps(in, vz);                                                     \
                    for (int g = 0; g < G; g++) {                                                   \
                        __m256 p = _mm256_load_ps(P[g] + t0);                                       \
                        _mm256_store_ps(PS[g] + t0, _mm256_mul_ps(p, vs));                          \
                        za[g] = _mm256_fmadd_ps(p, vz, za[g]);                                      \
                    }                                                                               \
                }                                                                                   \
                float zs[G_MAX];                                                                    \
                for (int g = 0; g < G; g++) zs[g] = hsum256(za[g]);                                 \
                for (int e0 = c * vg / 8; e0 < (c + 1) * vg / 8; e0 += NE) {  /* NE x 8 channels */ \
                    __m256 ov[G_MAX][NE_MAX];                                                       \
                    for (int g = 0; g < G; g++)                                                     \
                        for (int k = 0; k < NE; k++) ov[g][k] = _mm256_setzero_ps();                \
                    for (int t = 0; t < n; t++) { /* weighted V rows, accumulated in registers */   \
                        if (tm && !((mk >> t) & 1)) continue;                                       \
                        const uint8_t *vr = VC + (size_t)t * D * BITS / 8;                          \
                        for (int k = 0; k < NE; k++) {                                              \
                            __m256 x = w8_##NAME(vr, (e0 + k) * 8);                                 \
                            for (int g = 0; g < G; g++)                                             \
                                ov[g][k] = _mm256_fmadd_ps(_mm256_broadcast_ss(PS[g] + t), x, ov[g][k]); \
                        }                                                                           \
                    }                                                                               \
                    for (int g = 0; g < G; g++)                                                     \
                        for (int k = 0; k < NE; k++) {                                              \
                            float *og = o + (size_t)g * D + (e0 + k) * 8;                           \
                            _mm256_storeu_ps(og, _mm256_add_ps(_mm256_loadu_ps(og), _mm256_add_ps(ov[g][k], _mm256_set1_ps(zs[g])))); \
                        }                                                                           \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int i = 0; i < H_kv * G; i++) finish_head(J->o + (size_t)i * D, mh[i], lh[i], D, J->lse + i);\
}                                                                                                   \
DEFINE_QUANT_FAST(NAME, bs % 8 || D % 8 || G > 8 || J->vg % (8 * QNE_FOR(G)))
#else
#define DEFINE_QUANT_V(NAME, BITS)                                                                    \
static void NAME##_item_fast(const item_job *J, int H_kv, int G, int D, int bs, float scale) {      \
    NAME##_item_generic(J, H_kv, G, D, bs, scale);                                                  \
}
#endif
DEFINE_QUANT(q8, 8)
DEFINE_QUANT(q4, 4)
DEFINE_QUANT_V(q8, 8)
DEFINE_QUANT_V(q4, 4)
static inline item_fn q8_pick(int G, int D, int bs) { (void)G; (void)D; (void)bs; return q8_item_fast; }
static inline item_fn q4_pick(int G, int D, int bs) { (void)G; (void)D; (void)bs; return q4_item_fast; }

/* ---------------------------------------------------------------------------------------------
 * Merge: the one function every merge of partials goes through (inside kvo_paged_attn_* and in
 * kvo_merge_parts). One (row, head): parts order[p0 .. p1) (or p0 .. p1 when order is NULL), in
 * that order. Parts with lse = -inf are skipped; none left: out = 0, lse = -inf.
 * ------------------------------------------------------------------------------------------- */
__attribute__((noinline)) static void merge_head(int64_t p0, int64_t p1, const int64_t *order, int H, int D,
                                                 int hg, const float *part_o, const float *part_lse,
                                                 float *out, float *lse) {
    float M = -INFINITY;
    for (int64_t k = p0; k < p1; k++) {
        float x = part_lse[(order ? order[k] : k) * H + hg];
        if (x > M) M = x;
    }
    for (int d = 0; d < D; d++) out[d] = 0.f;
    if (M == -INFINITY) {
        *lse = -INFINITY;
        return;
    }
    float L = 0.f;
    for (int64_t k = p0; k < p1; k++) {
        int64_t p = order ? order[k] : k;
        float x = part_lse[p * H + hg];
        if (!(x > -INFINITY)) continue;
        float w = expf(x - M);
        const float *o = part_o + (p * H + hg) * D;
        L += w;
        for (int d = 0; d < D; d++) out[d] = fmaf(w, o[d], out[d]);
    }
    for (int d = 0; d < D; d++) out[d] /= L;
    *lse = M + logf(L);
}

/* row_first non-decreasing from 0.., every part index used within [0, n_parts) */
static int parts_ok(int R, const int64_t *row_first, const int64_t *order, int64_t n_parts) {
    if (row_first[0] < 0) return 0;
    for (int r = 0; r < R; r++)
        if (row_first[r + 1] < row_first[r]) return 0;
    if (!order) return row_first[R] <= n_parts;
    for (int64_t k = row_first[0]; k < row_first[R]; k++)
        if (order[k] < 0 || order[k] >= n_parts) return 0;
    return 1;
}

/* every (row, head) of the R rows; called inside a parallel region or alone */
static void merge_rows(int R, int H, int D, const int64_t *row_first, const int64_t *order,
                       const float *part_o, const float *part_lse, float *out, float *lse) {
    _Pragma("omp for schedule(dynamic, 4)")
    for (int64_t u = 0; u < (int64_t)R * H; u++) {
        int64_t r = u / H;
        int hg = (int)(u % H);
        merge_head(row_first[r], row_first[r + 1], order, H, D, hg, part_o, part_lse,
                   out + u * D, lse + u);
    }
}

void kvo_merge_parts(int R, int H, int D, const int64_t *row_first, const int64_t *order,
                     const float *part_o, const float *part_lse, float *out, float *lse, int threads) {
    if (threads < 1) threads = 1;
    _Pragma("omp parallel num_threads(threads) if (threads > 1 && R * H > 8)")
    {
        unsigned csr = fp_mode_enter();
        merge_rows(R, H, D, row_first, order, part_o, part_lse, out, lse);
        fp_mode_leave(csr);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Append (optional), items, merge (optional): one call.
 * ------------------------------------------------------------------------------------------- */
/* The drivers' parameters, k_new / v_new of type KV_T (void: the untyped wrappers below) */
#define DRIVER_PARAMS(KV_T)                                                                           \
        int H_kv, int G, int D, int bs,                                                              \
        int n_app, const KV_T *k_new, int64_t k_bs, const KV_T *v_new, int64_t v_bs,                 \
        const int64_t *app_slot, const int64_t *app_col,                                             \
        int N, const float *q, int64_t q_rs, const int64_t *item_row, const int64_t *item_first,     \
        const int64_t *item_last, const int64_t *blk, const uint64_t *tmask, float scale,            \
        float *part_o, float *part_lse,                                                              \
        int R, const int64_t *row_first, const int64_t *order, float *out, float *lse, int threads,   \
        int vgroup
#define DEFINE_DRIVER(NAME, KV_T, APPEND_OK)                                                          \
int kvo_paged_attn_##NAME(DRIVER_PARAMS(KV_T)) {                                                     \
    if ((!APPEND_OK && n_app) || vgroup < 1 || D % vgroup || H_kv < 1 || G < 1 || G > G_MAX || D < 2 || D % 2 || D > D_MAX || bs < 1 || bs > BS_MAX ||    \
        H_kv * G > H_MAX || (tmask && bs > MASK_BS_MAX) || N < 0 || R < 0 || n_app < 0)              \
        return -1;                                                                                    \
    for (int i = 0; i < N; i++)                                                                      \
        if (item_first[i + 1] < item_first[i] || item_last[i] < 1 || item_last[i] > bs) return -2;   \
    if (R > 0 && !parts_ok(R, row_first, order, N)) return -3;                                       \
    if (threads < 1) threads = 1;                                                                    \
    const int H = H_kv * G;                                                                          \
    const size_t kblock = (size_t)D * bs;              /* elements of one head's K (or V) block */  \
    /* 1. append: token b's k/v into column app_col[b] of the slot at app_slot[b] */                 \
    for (int b = 0; b < n_app; b++) {                                                                \
        KV_T *slot = (KV_T *)app_slot[b];                                                            \
        int64_t t = app_col[b];                                                                      \
        if (!slot || t < 0 || t >= bs) continue;                                                     \
        for (int h = 0; h < H_kv; h++) {                                                             \
            KV_T *kc = slot + h * kblock, *vr = slot + (H_kv + h) * kblock + t * D;                  \
            const KV_T *ks = k_new + b * k_bs + (size_t)h * D, *vs = v_new + b * v_bs + (size_t)h * D; \
            for (int d = 0; d < D; d++) kc[(size_t)(d >> 1) * bs * 2 + 2 * t + (d & 1)] = ks[d];     \
            memcpy(vr, vs, sizeof(KV_T) * D);                                                        \
        }                                                                                            \
    }                                                                                                \
    item_fn fn = PICK(NAME);                            /* chosen from (G, D, bs) alone */          \
    int par = threads > 1 && N > 1;                                                                  \
    _Pragma("omp parallel num_threads(threads) if (par)")                                           \
    {                                                                                                \
        unsigned csr = fp_mode_enter();                                                              \
        /* 2. items, each computed whole by one thread (dynamic: items differ in length) */          \
        _Pragma("omp for schedule(dynamic, 1)")                                                      \
        for (int64_t i = 0; i < N; i++) {                                                            \
            int64_t f = item_first[i];                                                               \
            item_job J = {.q = q + item_row[i] * q_rs, .blk = blk + f,                               \
                          .tm = tmask ? tmask + f * H_kv : NULL,                                     \
                          .nb = (int)(item_first[i + 1] - f), .n_last = (int)item_last[i], .vg = vgroup, \
                          .o = part_o + (size_t)i * H * D, .lse = part_lse + (size_t)i * H};         \
            fn(&J, H_kv, G, D, bs, scale);                                                           \
        }                                                                                            \
        /* 3. merge each row's parts in the given order (after the loop's barrier) */        \
        if (R > 0) merge_rows(R, H, D, row_first, order, part_o, part_lse, out, lse);                \
        fp_mode_leave(csr);                                                                          \
    }                                                                                                \
    return 0;                                                                                        \
}
/* The same driver with untyped k_new / v_new: what select.c's kvo_sparse_step calls through a
 * function pointer (its paged_driver type; the two sources are built apart). */
#define DEFINE_UNTYPED(NAME, KV_T)                                                                    \
int kvo_paged_attn_v_##NAME(DRIVER_PARAMS(void)) {                                                   \
    return kvo_paged_attn_##NAME(H_kv, G, D, bs, n_app, (const KV_T *)k_new, k_bs, (const KV_T *)v_new, \
                                 v_bs, app_slot, app_col, N, q, q_rs, item_row, item_first, item_last,  \
                                 blk, tmask, scale, part_o, part_lse, R, row_first, order, out, lse,    \
                                 threads, vgroup);                                                   \
}
DEFINE_DRIVER(f32, float, 1)
DEFINE_DRIVER(bf16, uint16_t, 1)
DEFINE_DRIVER(f16, uint16_t, 1)
DEFINE_DRIVER(q8, uint8_t, 0)          /* compressed blocks are written whole: no append */
DEFINE_DRIVER(q4, uint8_t, 0)
DEFINE_UNTYPED(f32, float)
DEFINE_UNTYPED(bf16, uint16_t)
DEFINE_UNTYPED(f16, uint16_t)
DEFINE_UNTYPED(q8, uint8_t)            /* (no append: a pair's second call, below) */
DEFINE_UNTYPED(q4, uint8_t)

/* kvo_attn_fn over a prepared call (kvo_hook.h): the new tokens' k/v rows and q, out, lse of
 * this call, the rest as prepared. */
int kvo_paged_hook(const void *ctx, int M, const float *q, int64_t q_rs, const void *k, const void *v,
                   int64_t kv_rs, float *out, float *lse) {
    const kvo_paged_call *c = (const kvo_paged_call *)ctx;
    if (M < c->n_app || (c->R && M < c->R)) return -4;
    return c->driver(c->H_kv, c->G, c->D, c->bs, c->n_app, k, kv_rs, v, kv_rs, c->app_slot, c->app_col, c->N, q,
                     q_rs, c->item_row, c->item_first, c->item_last, c->blk, c->tmask, c->scale, c->part_o,
                     c->part_lse, c->R, c->row_first, c->order, out, lse, c->threads, c->vgroup);
}

/* kvo_attn_fn over a prepared pair (kvo_hook.h's kvo_paged_pair): the first call appends the
 * new tokens and attends their blocks, the second (if any) attends other blocks over the same q,
 * each into its share of one part buffer; then the merge of those parts in the prepared order --
 * the calls and the merge a tiered decode layer over RAM makes one by one, in one native call. */
int kvo_paged_pair_hook(const void *ctx, int M, const float *q, int64_t q_rs, const void *k, const void *v,
                        int64_t kv_rs, float *out, float *lse) {
    const kvo_paged_pair *c = (const kvo_paged_pair *)ctx;
    if (M < c->R) return -4;
    int rc = kvo_paged_hook(c->first, M, q, q_rs, k, v, kv_rs, NULL, NULL);
    if (!rc && c->second) rc = kvo_paged_hook(c->second, M, q, q_rs, NULL, NULL, 0, NULL, NULL);
    if (rc) return rc;
    kvo_merge_parts(c->R, c->H, c->D, c->row_first, c->order, c->part_o, c->part_lse, out, lse, c->threads);
    return 0;
}

/* kvo_cvt_fn between the full-precision dtypes (kvoffload/dtypes.py's kernel suffixes): each
 * element through fp32, rounded to the nearest even as torch rounds (fp32 and bf16 widen exactly). */
static inline float cvt_ld_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline float cvt_ld_bf16(const void *p, int64_t i) { return bf16_to_f32(((const uint16_t *)p)[i]); }
static inline float cvt_ld_f16(const void *p, int64_t i) { return f16_to_f32(((const uint16_t *)p)[i]); }
static inline void cvt_st_f32(void *p, int64_t i, float x) { ((float *)p)[i] = x; }
static inline void cvt_st_bf16(void *p, int64_t i, float x) { ((uint16_t *)p)[i] = f32_to_bf16(x); }
static inline void cvt_st_f16(void *p, int64_t i, float x) { ((uint16_t *)p)[i] = f32_to_f16(x); }
#define DEFINE_CVT(FROM, TO)                                                                          \
void kvo_cvt_##FROM##_##TO(const void *src, int64_t rs, int M, int n, void *dst) {                   \
    for (int m = 0; m < M; m++)                                                                      \
        for (int i = 0; i < n; i++) cvt_st_##TO(dst, (int64_t)m * n + i, cvt_ld_##FROM(src, m * rs + i)); \
}
DEFINE_CVT(f32, bf16)
DEFINE_CVT(f32, f16)
DEFINE_CVT(bf16, f32)
DEFINE_CVT(bf16, f16)
DEFINE_CVT(f16, f32)
DEFINE_CVT(f16, bf16)

/* kvo_attn_fn over a kvo_convert (kvo_hook.h): the new tokens' k / v into the KV dtype, then the
 * inner hook -- what the backends' decode() does with .to(kv_dtype) before appending. */
int kvo_convert_hook(const void *ctx, int M, const float *q, int64_t q_rs, const void *k, const void *v,
                     int64_t kv_rs, float *out, float *lse) {
    const kvo_convert *c = (const kvo_convert *)ctx;
    if (M > c->rows) return -5;
    char *kb = (char *)c->buf, *vb = kb + (size_t)c->rows * c->n * c->itemsize;
    c->cvt(k, kv_rs, M, c->n, kb);
    c->cvt(v, kv_rs, M, c->n, vb);
    return c->inner.fn(c->inner.ctx, M, q, q_rs, kb, vb, c->n, out, lse);
}

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
        // 32 independent sums, which the compiler turns into vector adds (one serial float
        // sum would be bound by the add's latency: ~4 GB/s a core, not the memory's rate)
        float s[32] = {0.f};
        for (int i = 0; i < 4096; i += 32)
            for (int j = 0; j < 32; j++) s[j] += x[i + j];
        for (int j = 0; j < 32; j++) total += s[j];
#endif
    }
    return total;
}
