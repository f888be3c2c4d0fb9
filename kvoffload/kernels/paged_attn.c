/* Decode attention over paged KV: the near-data primitive every tier worker runs.
 *
 * A slot (kv/layout.py) holds one block of block_size (bs) tokens for every KV head of one
 * (sequence, layer): first K for heads 0..H_kv-1, each channel-major [D, bs] (so the scores of
 * 16 tokens are D vector FMAs, no horizontal sums), then V for heads 0..H_kv-1, each token-major
 * [bs, D]. A sequence hands the kernel a list of slot base addresses; every listed block is full
 * except the last, which holds last_len[b] tokens. The order of the blocks does not matter
 * (softmax is permutation invariant), so a worker lists just the blocks it owns.
 *
 * Optional append: app_ptr[b] != 0 names the slot whose column app_pos[b] receives the new
 * token's k/v before attention (the write-combining tail lives with the device worker).
 *
 * Output: out [B, H, D] fp32 (normalised within this worker's blocks) and lse [B, H] fp32, so
 * partial results merge exactly: o = sum_i exp(lse_i - lse) o_i. A sequence with no blocks
 * gets out = 0, lse = -inf. Queries in the KV dtype, strided over the batch (heads contiguous).
 * Math in fp32. Compiled at first use by kvoffload/kernels/build.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define G_MAX 32
#define D_MAX 256
#define BS_MAX 256
#ifndef CHUNK_BLOCKS
#define CHUNK_BLOCKS 16      /* blocks per work item (split-K granularity) */
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

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

static inline float f32_id(float x) { return x; }

static inline float exp_nonpos(float x) {   /* Cephes expf for x <= 0 (as in decode_attn.c) */
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* One work item, portable: blocks blk[0..nb) of one KV head (K at kofs, V at vofs elements
 * from each slot base); the last has n_last tokens. Online softmax per block. */
#define DEFINE_GENERIC(NAME, KV_T, LOAD)                                                             \
static void NAME##_generic(const float *q, const int64_t *blk, int nb, int n_last, size_t kofs,     \
                           size_t vofs, int G, int D, int bs, float scale, float *m_out,            \
                           float *l_out, float *o_out) {                                            \
    float s[G_MAX][BS_MAX];                                                                         \
    float m[G_MAX], l[G_MAX];                                                                       \
    for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }                                   \
    memset(o_out, 0, sizeof(float) * G * D);                                                        \
    for (int j = 0; j < nb; j++) {                                                                  \
        const KV_T *K = (const KV_T *)blk[j] + kofs, *V = (const KV_T *)blk[j] + vofs;              \
        int n = j == nb - 1 ? n_last : bs;                                                          \
        for (int g = 0; g < G; g++) {                                                               \
            const float *qg = q + (size_t)g * D;                                                    \
            for (int t = 0; t < n; t++) s[g][t] = 0.f;                                              \
            for (int d = 0; d < D; d++) {                                                           \
                const KV_T *kr = K + (size_t)d * bs;                                                \
                for (int t = 0; t < n; t++) s[g][t] += qg[d] * LOAD(kr[t]);                         \
            }                                                                                       \
            float bm = -INFINITY;                                                                   \
            for (int t = 0; t < n; t++) { s[g][t] *= scale; bm = s[g][t] > bm ? s[g][t] : bm; }     \
            float mn = bm > m[g] ? bm : m[g];                                                       \
            float alpha = m[g] == -INFINITY ? 0.f : exp_nonpos(m[g] - mn), sum = 0.f;               \
            for (int t = 0; t < n; t++) { s[g][t] = exp_nonpos(s[g][t] - mn); sum += s[g][t]; }     \
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

#ifdef __AVX512F__
#include <immintrin.h>

static inline __m512 ld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 ld_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline __m512 ld_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

static inline __m512 exp512_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* bs and D multiples of 16. Per 16-token group: scores of all G query heads by D broadcast
 * FMAs over the channel-major K rows, online softmax, then V rows accumulated. The next
 * block's K and V are prefetched while this one is computed. */
#define DEFINE_AVX512(NAME, KV_T, LOADV)                                                              \
static void NAME##_avx512(const float *q, const int64_t *blk, int nb, int n_last, size_t kofs,      \
                          size_t vofs, int G, int D, int bs, float scale, float *m_out,             \
                          float *l_out, float *o_out) {                                             \
    enum { NV_MAX = D_MAX / 16 };                                                                   \
    int nv = D / 16;                                                                                \
    float sc[G_MAX][16] __attribute__((aligned(64)));                                               \
    float m[G_MAX], l[G_MAX];                                                                       \
    __m512 acc[G_MAX][NV_MAX];                                                                      \
    for (int g = 0; g < G; g++) {                                                                   \
        m[g] = -INFINITY;                                                                           \
        l[g] = 0.f;                                                                                 \
        for (int j = 0; j < nv; j++) acc[g][j] = _mm512_setzero_ps();                               \
    }                                                                                               \
    size_t kbytes = (size_t)D * bs * sizeof(KV_T);                                                  \
    for (int j = 0; j < nb; j++) {                                                                  \
        const KV_T *K = (const KV_T *)blk[j] + kofs, *V = (const KV_T *)blk[j] + vofs;              \
        if (j + 1 < nb) {                                                                           \
            const char *nk = (const char *)((const KV_T *)blk[j + 1] + kofs);                       \
            const char *nvp = (const char *)((const KV_T *)blk[j + 1] + vofs);                      \
            for (size_t b = 0; b < kbytes; b += 64) {                                               \
                _mm_prefetch(nk + b, _MM_HINT_T0);                                                  \
                _mm_prefetch(nvp + b, _MM_HINT_T0);                                                 \
            }                                                                                       \
        }                                                                                           \
        int n = j == nb - 1 ? n_last : bs;                                                          \
        for (int t0 = 0; t0 < n; t0 += 16) {                                                        \
            int cnt = n - t0 < 16 ? n - t0 : 16;                                                    \
            __mmask16 live = (__mmask16)((1u << cnt) - 1u);                                         \
            __m512 s[G_MAX];                                                                        \
            for (int g = 0; g < G; g++) s[g] = _mm512_setzero_ps();                                 \
            for (int d = 0; d < D; d++) {                                                           \
                __m512 kv = LOADV(K + (size_t)d * bs + t0);                                         \
                for (int g = 0; g < G; g++)                                                         \
                    s[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)g * D + d]), kv, s[g]);         \
            }                                                                                       \
            for (int g = 0; g < G; g++) {                                                           \
                __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live,                     \
                                               _mm512_mul_ps(s[g], _mm512_set1_ps(scale)));         \
                float bm = _mm512_reduce_max_ps(sv);                                                \
                float mn = bm > m[g] ? bm : m[g];                                                   \
                float alpha = m[g] == -INFINITY ? 0.f : exp_nonpos(m[g] - mn);                      \
                __m512 e = _mm512_maskz_mov_ps(live, exp512_nonpos(_mm512_sub_ps(sv, _mm512_set1_ps(mn)))); \
                l[g] = l[g] * alpha + _mm512_reduce_add_ps(e);                                      \
                m[g] = mn;                                                                          \
                _mm512_store_ps(sc[g], e);                                                          \
                __m512 av = _mm512_set1_ps(alpha);                                                  \
                for (int v = 0; v < nv; v++) acc[g][v] = _mm512_mul_ps(acc[g][v], av);              \
            }                                                                                       \
            for (int i = 0; i < cnt; i++) {                                                         \
                const KV_T *vr = V + (size_t)(t0 + i) * D;                                          \
                __m512 vv[NV_MAX];                                                                  \
                for (int v = 0; v < nv; v++) vv[v] = LOADV(vr + 16 * v);                            \
                for (int g = 0; g < G; g++) {                                                       \
                    __m512 p = _mm512_set1_ps(sc[g][i]);                                            \
                    for (int v = 0; v < nv; v++) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);  \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int g = 0; g < G; g++) {                                                                   \
        m_out[g] = m[g];                                                                            \
        l_out[g] = l[g];                                                                            \
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(o_out + (size_t)g * D + 16 * v, acc[g][v]);  \
    }                                                                                               \
}
DEFINE_AVX512(f32, float, ld_f32)
DEFINE_AVX512(bf16, uint16_t, ld_bf16)
DEFINE_AVX512(f16, uint16_t, ld_f16)
#define ITEM(NAME) ((D % 16 == 0 && bs % 16 == 0) ? NAME##_avx512 : NAME##_generic)
#else
#define ITEM(NAME) NAME##_generic
#endif

#define DEFINE_DRIVER(NAME, KV_T, LOAD)                                                                 \
int kvo_paged_attn_##NAME(int B, int H_kv, int G, int D, int bs, const KV_T *q, int64_t q_bs,         \
                          const int64_t *blk_first, const int64_t *blk, const int64_t *last_len,      \
                          const KV_T *k_new, int64_t k_bs, const KV_T *v_new, int64_t v_bs,           \
                          const int64_t *app_ptr, const int64_t *app_pos, float scale, float *out,    \
                          float *lse, int threads) {                                                  \
    if (G > G_MAX || D > D_MAX || bs > BS_MAX || bs < 1) return -1;                                  \
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
                for (int d = 0; d < D; d++) kc[(size_t)d * bs + t] = ks[d];                           \
                memcpy(vr, vs, sizeof(KV_T) * D);                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    /* 2. work items: (b, h, run of CHUNK_BLOCKS blocks) */                                           \
    int64_t *first = malloc(sizeof(int64_t) * (B + 1));                                             \
    first[0] = 0;                                                                                     \
    for (int b = 0; b < B; b++) {                                                                     \
        int64_t nb = blk_first[b + 1] - blk_first[b];                                                 \
        first[b + 1] = first[b] + H_kv * ((nb + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS);                    \
    }                                                                                                 \
    int64_t N = first[B];                                                                             \
    float *pm = malloc(sizeof(float) * (N * G + 1)), *pl = malloc(sizeof(float) * (N * G + 1));       \
    float *po = malloc(sizeof(float) * (N * G * D + 1));                                              \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                            \
    for (int64_t i = 0; i < N; i++) {                                                                 \
        int b = 0;                                                                                    \
        while (first[b + 1] <= i) b++;                                                                \
        int64_t nb = blk_first[b + 1] - blk_first[b];                                                 \
        int64_t nch = (nb + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS, j = i - first[b];                       \
        int h = (int)(j / nch), c = (int)(j % nch);                                                   \
        int64_t j0 = c * CHUNK_BLOCKS, j1 = j0 + CHUNK_BLOCKS < nb ? j0 + CHUNK_BLOCKS : nb;          \
        int n_last = j1 == nb ? (int)last_len[b] : bs;                                                \
        float qf[G_MAX * D_MAX];                                                                      \
        const KV_T *qs = q + b * q_bs + (size_t)h * G * D;                                            \
        for (int e = 0; e < G * D; e++) qf[e] = LOAD(qs[e]);                                          \
        ITEM(NAME)(qf, blk + blk_first[b] + j0, (int)(j1 - j0), n_last, h * kblock,                   \
                   (H_kv + h) * kblock, G, D, bs, scale, pm + i * G, pl + i * G, po + i * G * D);     \
    }                                                                                                 \
    /* 3. merge the runs of each (b, h) through their log-sum-exp */                                  \
    for (int b = 0; b < B; b++) {                                                                     \
        int64_t nb = blk_first[b + 1] - blk_first[b];                                                 \
        int64_t nch = (nb + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;                                         \
        for (int h = 0; h < H_kv; h++) {                                                              \
            int64_t i0 = first[b] + (int64_t)h * nch;                                                 \
            for (int g = 0; g < G; g++) {                                                             \
                float M = -INFINITY, L = 0.f;                                                         \
                for (int64_t c = 0; c < nch; c++) M = pm[(i0 + c) * G + g] > M ? pm[(i0 + c) * G + g] : M; \
                float *od = out + ((size_t)b * H + (size_t)h * G + g) * D;                            \
                memset(od, 0, sizeof(float) * D);                                                     \
                if (M == -INFINITY) {                                                                 \
                    lse[(size_t)b * H + (size_t)h * G + g] = -INFINITY;                               \
                    continue;                                                                         \
                }                                                                                     \
                for (int64_t c = 0; c < nch; c++) {                                                   \
                    float w = expf(pm[(i0 + c) * G + g] - M);                                         \
                    L += w * pl[(i0 + c) * G + g];                                                    \
                    const float *oc = po + ((i0 + c) * G + g) * D;                                    \
                    for (int d = 0; d < D; d++) od[d] += w * oc[d];                                   \
                }                                                                                     \
                for (int d = 0; d < D; d++) od[d] /= L;                                               \
                lse[(size_t)b * H + (size_t)h * G + g] = M + logf(L);                                 \
            }                                                                                         \
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
