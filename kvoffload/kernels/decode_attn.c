/* Decode attention on the CPU: append the new token's k/v, then attend one query token per
 * sequence over its whole cache, flash-decoding style (split over heads x token chunks, merged
 * through log-sum-exp). Returns the output and the lse, so partial results from several
 * places (tiers, workers) can be merged exactly.
 *
 * Layout of one sequence's cache (what DenseBackend allocates): [layers, H_kv, cap, D],
 * contiguous; K and V separate. q, k_new, v_new and out have the cache's dtype (fp32 or bf16;
 * math in fp32); q/k_new/v_new may be strided over the batch (heads contiguous, stride D).
 * Compiled at first use by kvoffload/kernels/build.py (gcc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef CHUNK
#define CHUNK 256
#endif
#define G_MAX 32
#define D_MAX 256
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 16     /* software prefetch distance (rows); hardware streams stop at 4 KiB pages */
#endif

#include "kvo_math.h"

/* one work item: kv head h of sequence b, tokens [t0, t1) -> per query head (m, l, o[D]) */
#define DEFINE_ITEM(NAME, KV_T, LOAD)                                                     \
static void NAME##_item(const float *q, const KV_T *K, const KV_T *V, int t0, int t1, int G, int D, \
                        float scale, float *m_out, float *l_out, float *o_out) {                   \
    float s[G_MAX][CHUNK];                                                                         \
    float row[D_MAX];                                                                              \
    int n = t1 - t0;                                                                               \
    for (int t = 0; t < n; t++) {                                                                  \
        const KV_T *kr = K + (size_t)(t0 + t) * D;                                                 \
        _Pragma("omp simd")                                                                        \
        for (int d = 0; d < D; d++) row[d] = LOAD(kr[d]);                                          \
        for (int g = 0; g < G; g++) {                                                              \
            const float *qg = q + (size_t)g * D;                                                   \
            float acc = 0.f;                                                                       \
            _Pragma("omp simd reduction(+:acc)")                                                   \
            for (int d = 0; d < D; d++) acc += qg[d] * row[d];                                     \
            s[g][t] = acc * scale;                                                                 \
        }                                                                                          \
    }                                                                                              \
    for (int g = 0; g < G; g++) {                                                                  \
        float m = -INFINITY, l = 0.f;                                                              \
        _Pragma("omp simd reduction(max:m)")                                                       \
        for (int t = 0; t < n; t++) m = s[g][t] > m ? s[g][t] : m;                                 \
        _Pragma("omp simd reduction(+:l)")                                                         \
        for (int t = 0; t < n; t++) { s[g][t] = exp_nonpos(s[g][t] - m); l += s[g][t]; }           \
        m_out[g] = m;                                                                              \
        l_out[g] = l;                                                                              \
        memset(o_out + (size_t)g * D, 0, sizeof(float) * D);                                       \
    }                                                                                              \
    for (int t = 0; t < n; t++) {                                                                  \
        const KV_T *vr = V + (size_t)(t0 + t) * D;                                                 \
        _Pragma("omp simd")                                                                        \
        for (int d = 0; d < D; d++) row[d] = LOAD(vr[d]);                                          \
        for (int g = 0; g < G; g++) {                                                              \
            float p = s[g][t];                                                                     \
            float *og = o_out + (size_t)g * D;                                                     \
            _Pragma("omp simd")                                                                    \
            for (int d = 0; d < D; d++) og[d] += p * row[d];                                       \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \

DEFINE_ITEM(kvo_decode_attn_f32, float, f32_id)
DEFINE_ITEM(kvo_decode_attn_bf16, uint16_t, bf16_to_f32)

#ifdef __AVX512F__
#include <immintrin.h>

/* D a multiple of 16 (<= D_MAX): rows are NV = D/16 vectors. One pass over the chunk in
 * blocks of 16 tokens (online softmax per block): K and V rows of a block are read back to
 * back, so both streams are in flight together, and software prefetch runs ahead of both. */
#define DEFINE_AVX512_ITEM(NAME, KV_T, LOADV)                                                      \
static void NAME##_avx512(const float *q, const KV_T *K, const KV_T *V, int t0, int t1, int G,     \
                          int D, float scale, float *m_out, float *l_out, float *o_out) {          \
    enum { NV_MAX = D_MAX / 16 };                                                                  \
    int nv = D / 16;                                                                               \
    float sc[G_MAX][16] __attribute__((aligned(64)));                                              \
    float m[G_MAX], l[G_MAX];                                                                      \
    __m512 acc[G_MAX][NV_MAX];                                                                     \
    for (int g = 0; g < G; g++) {                                                                  \
        m[g] = -INFINITY;                                                                          \
        l[g] = 0.f;                                                                                \
        for (int j = 0; j < nv; j++) acc[g][j] = _mm512_setzero_ps();                              \
    }                                                                                              \
    for (int tb = t0; tb < t1; tb += 16) {                                                         \
        int nb = t1 - tb < 16 ? t1 - tb : 16;                                                      \
        __mmask16 live = (__mmask16)((1u << nb) - 1u);                                             \
        for (int i = 0; i < nb; i++) {                                                             \
            const KV_T *kr = K + (size_t)(tb + i) * D;                                             \
            for (int b = 0; b < (int)(D * sizeof(KV_T)); b += 64) {                                \
                _mm_prefetch((const char *)(kr + PREFETCH_ROWS * D) + b, _MM_HINT_T0);             \
                _mm_prefetch((const char *)(V + (size_t)(tb + i + PREFETCH_ROWS) * D) + b, _MM_HINT_T0); \
            }                                                                                      \
            __m512 k[NV_MAX];                                                                      \
            for (int j = 0; j < nv; j++) k[j] = LOADV(kr + 16 * j);                                \
            for (int g = 0; g < G; g++) {                                                          \
                const float *qg = q + (size_t)g * D;                                               \
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);                               \
                for (int j = 1; j < nv; j++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), k[j], a); \
                sc[g][i] = _mm512_reduce_add_ps(a) * scale;                                        \
            }                                                                                      \
        }                                                                                          \
        for (int g = 0; g < G; g++) {                                                              \
            __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, sc[g]);              \
            float bm = _mm512_reduce_max_ps(sv);                                                   \
            float mn = bm > m[g] ? bm : m[g];                                                      \
            float alpha = exp_nonpos(m[g] - mn);          /* m = -inf at start: alpha = 0 */       \
            __m512 e = _mm512_maskz_mov_ps(live, exp512_nonpos(_mm512_sub_ps(sv, _mm512_set1_ps(mn)))); \
            l[g] = l[g] * alpha + _mm512_reduce_add_ps(e);                                         \
            m[g] = mn;                                                                             \
            _mm512_store_ps(sc[g], e);                                                             \
            __m512 av = _mm512_set1_ps(alpha);                                                     \
            for (int j = 0; j < nv; j++) acc[g][j] = _mm512_mul_ps(acc[g][j], av);                \
        }                                                                                          \
        for (int i = 0; i < nb; i++) {                                                             \
            const KV_T *vr = V + (size_t)(tb + i) * D;                                             \
            __m512 v[NV_MAX];                                                                      \
            for (int j = 0; j < nv; j++) v[j] = LOADV(vr + 16 * j);                                \
            for (int g = 0; g < G; g++) {                                                          \
                __m512 p = _mm512_set1_ps(sc[g][i]);                                               \
                for (int j = 0; j < nv; j++) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int g = 0; g < G; g++) {                                                                  \
        m_out[g] = m[g];                                                                           \
        l_out[g] = l[g];                                                                           \
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(o_out + (size_t)g * D + 16 * j, acc[g][j]);  \
    }                                                                                              \
}
DEFINE_AVX512_ITEM(kvo_decode_attn_f32_item, float, ld_f32)
DEFINE_AVX512_ITEM(kvo_decode_attn_bf16_item, uint16_t, ld_bf16)
#define ITEM_FAST(NAME) (D % 16 == 0 ? NAME##_item_avx512 : NAME##_item)
#else
#define ITEM_FAST(NAME) NAME##_item
#endif

#define DEFINE_DRIVER(NAME, KV_T, LOAD, STORE)                                                         \
int NAME(int B, int H_kv, int G, int D, int layer, const KV_T *q, int64_t q_bs, const KV_T *k_new,  \
         int64_t k_bs, const KV_T *v_new, int64_t v_bs, const int64_t *k_base, const int64_t *v_base,  \
         const int64_t *caps, const int64_t *lens, float scale, KV_T *out, float *lse, int threads) {  \
    if (G > G_MAX || D > D_MAX) return -1;                                                         \
    int H = H_kv * G;                                                                              \
    /* 1. append the new token (position lens[b] - 1) */                                           \
    for (int b = 0; b < B; b++) {                                                                  \
        for (int h = 0; h < H_kv; h++) {                                                           \
            size_t off = (((size_t)layer * H_kv + h) * caps[b] + (lens[b] - 1)) * D;               \
            KV_T *kd = (KV_T *)k_base[b] + off, *vd = (KV_T *)v_base[b] + off;                     \
            const KV_T *ks = k_new + b * k_bs + (size_t)h * D, *vs = v_new + b * v_bs + (size_t)h * D; \
            memcpy(kd, ks, sizeof(KV_T) * D);                                                      \
            memcpy(vd, vs, sizeof(KV_T) * D);                                                      \
        }                                                                                          \
    }                                                                                              \
    /* 2. work items: (b, h, chunk) */                                                             \
    int64_t *first = malloc(sizeof(int64_t) * (B + 1));                                            \
    first[0] = 0;                                                                                  \
    for (int b = 0; b < B; b++) first[b + 1] = first[b] + H_kv * ((lens[b] + CHUNK - 1) / CHUNK);  \
    int64_t N = first[B];                                                                          \
    float *pm = malloc(sizeof(float) * N * G), *pl = malloc(sizeof(float) * N * G);               \
    float *po = malloc(sizeof(float) * N * G * D);                                                 \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                          \
    for (int64_t i = 0; i < N; i++) {                                                              \
        int b = 0;                                                                                 \
        while (first[b + 1] <= i) b++;                                                             \
        int64_t nch = (lens[b] + CHUNK - 1) / CHUNK, j = i - first[b];                             \
        int h = (int)(j / nch), c = (int)(j % nch);                                                \
        size_t head = ((size_t)layer * H_kv + h) * caps[b] * D;                                    \
        int t0 = c * CHUNK, t1 = t0 + CHUNK < lens[b] ? t0 + CHUNK : (int)lens[b];                 \
        float qf[G_MAX * D_MAX];                                                                   \
        const KV_T *qs = q + b * q_bs + (size_t)h * G * D;                                         \
        for (int e = 0; e < G * D; e++) qf[e] = LOAD(qs[e]);                                       \
        ITEM_FAST(NAME)(qf, (const KV_T *)k_base[b] + head,                                        \
                    (const KV_T *)v_base[b] + head, t0, t1, G, D, scale,                           \
                    pm + i * G, pl + i * G, po + i * G * D);                                       \
    }                                                                                              \
    /* 3. merge the chunks of each (b, h) through their log-sum-exp */                             \
    for (int b = 0; b < B; b++) {                                                                  \
        int64_t nch = (lens[b] + CHUNK - 1) / CHUNK;                                               \
        for (int h = 0; h < H_kv; h++) {                                                           \
            int64_t i0 = first[b] + (int64_t)h * nch;                                              \
            for (int g = 0; g < G; g++) {                                                          \
                float M = -INFINITY, L = 0.f;                                                      \
                for (int64_t c = 0; c < nch; c++) M = pm[(i0 + c) * G + g] > M ? pm[(i0 + c) * G + g] : M; \
                float o[D_MAX] = {0};                                                              \
                for (int64_t c = 0; c < nch; c++) {                                                \
                    float w = expf(pm[(i0 + c) * G + g] - M);                                      \
                    L += w * pl[(i0 + c) * G + g];                                                 \
                    const float *oc = po + ((i0 + c) * G + g) * D;                                 \
                    for (int d = 0; d < D; d++) o[d] += w * oc[d];                                 \
                }                                                                                  \
                KV_T *od = out + ((size_t)b * H + (size_t)h * G + g) * D;                          \
                for (int d = 0; d < D; d++) od[d] = STORE(o[d] / L);                               \
                lse[(size_t)b * H + (size_t)h * G + g] = M + logf(L);                              \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    free(first); free(pm); free(pl); free(po);                                                     \
    return 0;                                                                                      \
}

DEFINE_DRIVER(kvo_decode_attn_f32, float, f32_id, f32_id)
DEFINE_DRIVER(kvo_decode_attn_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
