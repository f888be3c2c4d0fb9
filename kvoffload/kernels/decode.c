// A decoder layer's work around attention, fused for a few rows (decode at small batch):
//   kvo_attn_in:  x -> RMSNorm -> qkv projection (+ bias) -> RoPE on q and k
//   kvo_attn_out: o -> o projection, + residual -> RMSNorm -> gate/up projection -> SiLU(gate)·up
//                 -> down projection, + residual
// One call and one OpenMP region each, instead of ~10 PyTorch operators each. Activations are
// read and written in the model's dtype (bf16 or fp32) and computed in fp32 in between.
// Weights in the decode formats of kvoffload/model/quant.py:
//   int4: kvoffload.model.quant.int4_pack's layout (packed [N/64, K, 32] bytes, row nb*64+j in
//         the low nibble of byte (nb, k, j), row nb*64+32+j in its high nibble; scale_zero
//         [K/32, N, 2]:
//         w = (q - 8)·scale + zero)
//   int8: codes [N, K], one scale per output row.
//   q5:   GGUF Q5_0's own codes (w = d·(q - 16), q in 0..31, d fp16 per 32 inputs), repacked
//         for bf16 dot products over pairs of inputs: codes [N/32, K/4, 64] bytes and hbits
//         [N/32, K/4, 2] uint64, one (block of 32 rows, quad of inputs) as kvo_q5.h lays it out
//         (unpacked to bf16 128 + q by byte interleaving, no table); scale [K/32, N] fp16.
// Vector code for AVX-512F, or AVX2 + FMA: the int4 / int8 GEMVs have a variant for each (the
// same math; int8's sums in another order under AVX2, so other bits than AVX-512's; q5's fp32
// path the same bits on both, AVX2 also needing F16C); the bf16 dot products need AVX-512 (BW,
// BF16), and without them bf16 activations take the FMAs.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvo_hook.h"
#include "kvo_math.h"
#include "kvo_q5.h"

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
#error "decode.c needs AVX-512F or AVX2 + FMA"
#endif

#define MAX_ROWS 8               // rows whose accumulators one pass keeps in registers
#define MAX_CALL_ROWS 32         // rows one call takes (in passes of MAX_ROWS over each weight tile)
#define PF_ROWS 32              // int8: rows ahead whose first line is prefetched
#define PF_BYTES 4096            // every stream: bytes ahead of the current line prefetched (this
                                 // Xeon's hardware prefetcher alone left the int4 / q5 / int8 GEMVs at
                                 // ~13 GB/s of its 26: 1.3-1.6x slower, benchmarks/README.md)
#define PF_PAIR_HINT _MM_HINT_T1 // AVX2 one-row int8 (int8_row_pair): that stream prefetched into L2, not
                                 // L1 (AMD EPYC, AVX2 only: Qwen's int8 head 7.3 -> 5.0 ms on 2 threads,
                                 // int8 layers 1.4x; int4 / q5 / int8 at more rows no better or slower;
                                 // benchmarks/avx2/README.md, fifteenth session)

typedef struct {
    int kind;                 // 0 int4, 1 int8, 2 q5
    int N, K;
    const void *w;            // packed bytes / int8 codes / q5 codes
    const void *scale;        // int4: scale_zero [K/32, N, 2]; int8: [N]; q5: [K/32, N] fp16
    int scale_f32;            // int4 / int8 scales stored as fp32 (else bf16)
    const void *bias;         // [N] in the activation dtype, or NULL
    const uint64_t *hbits;    // q5: the codes' fifth bits, else NULL
} Linear;

typedef struct {
    int d, H, H_kv, D;        // hidden size, heads, KV heads, head dim
    int ffn;
    float eps1, eps2;
    const void *norm1, *norm2;  // [d] in the activation dtype
    Linear qkv, o, gate_up, down;
} Layer;

static inline float ld(const void *p, int64_t i, int f32) {
    return f32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline void st(void *p, int64_t i, float v, int f32) {
    if (f32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}

// The reference rounds every operator's output to the activation dtype; so do we at the
// same points (a no-op in fp32), so that bf16 results stay close to the PyTorch path.
static inline float rnd(float v, int f32) { return f32 ? v : bf16_to_f32(f32_to_bf16(v)); }

#if defined(__AVX512F__)
static inline __m512 load_s16(const void *scale, int64_t at, int f32, __m512 *z) {
    // 16 (scale, zero) pairs from [.., 2] -> scales and zeros of 16 rows
    if (f32) {
        __m512 a = _mm512_loadu_ps((const float *)scale + at), b = _mm512_loadu_ps((const float *)scale + at + 16);
        __m512i is = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        __m512i iz = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        *z = _mm512_permutex2var_ps(a, iz, b);
        return _mm512_permutex2var_ps(a, is, b);
    }
    __m512i u = _mm512_loadu_si512((const uint16_t *)scale + at);        // 16 x (s | z << 16)
    *z = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

// One int4 block of 64 output channels: y[m, nb*64 .. +64] = x[m] · W[block]. Inlined with a
// constant M so that the accumulators live in registers. xsum[m * G + g]: the sum of x[m]
// over group g (the same for every block, so computed once a call by gemv_rows).
// A code becomes a float by a table lookup: vpermps reads the low 4 bits of each dword, so
// one zero-extension serves both nibbles (the high one after a shift), 2 operations fewer per
// 32 codes than mask + widen + convert twice; the values, hence the bits, are the same.
static inline __attribute__((always_inline)) void int4_block(const Linear *L, const float *x, const float *xsum,
                                                             const int M, float *y, int64_t nb) {
    int64_t K = L->K, N = L->N, G = K / 32;
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[MAX_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
    const uint8_t *p = (const uint8_t *)L->w + nb * K * 32;
    for (int64_t g = 0; g < G; g++) {
        __m512 gs[MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int i = 0; i < 4; i++) gs[m][i] = _mm512_setzero_ps();
        for (int64_t k = g * 32; k < g * 32 + 32; k++) {
            if (!(k & 1)) _mm_prefetch((const char *)(p + k * 32 + PF_BYTES), _MM_HINT_T0);
            __m256i b = _mm256_loadu_si256((const __m256i *)(p + k * 32));
            __m512i e0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(b));
            __m512i e1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1));
            __m512 w0 = _mm512_permutexvar_ps(e0, table);                             // rows 0..15
            __m512 w1 = _mm512_permutexvar_ps(e1, table);                             // rows 16..31
            __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(e0, 4), table);       // rows 32..47
            __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(e1, 4), table);       // rows 48..63
            for (int m = 0; m < M; m++) {
                __m512 xb = _mm512_set1_ps(x[m * K + k]);
                gs[m][0] = _mm512_fmadd_ps(w0, xb, gs[m][0]);
                gs[m][1] = _mm512_fmadd_ps(w1, xb, gs[m][1]);
                gs[m][2] = _mm512_fmadd_ps(w2, xb, gs[m][2]);
                gs[m][3] = _mm512_fmadd_ps(w3, xb, gs[m][3]);
            }
        }
        // sum_k w x = scale · sum_k q x + (zero - 8 scale) · sum_k x
        for (int i = 0; i < 4; i++) {
            __m512 z, s = load_s16(L->scale, (g * N + nb * 64 + i * 16) * 2, L->scale_f32, &z);
            __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);
            for (int m = 0; m < M; m++) {
                acc[m][i] = _mm512_fmadd_ps(s, gs[m][i], acc[m][i]);
                acc[m][i] = _mm512_fmadd_ps(c, _mm512_set1_ps(xsum[m * G + g]), acc[m][i]);
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + m * N + nb * 64 + i * 16, acc[m][i]);
}
#else
static inline __m256 load_s8(const void *scale, int64_t at, int f32, __m256 *z) {
    // 8 (scale, zero) pairs from [.., 2] -> scales and zeros of 8 rows
    if (f32) {
        __m256 a = _mm256_loadu_ps((const float *)scale + at), b = _mm256_loadu_ps((const float *)scale + at + 8);
        // in-lane picks give rows (0, 1, 4, 5 | 2, 3, 6, 7); a permute of 64-bit pairs orders them
        *z = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
        return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    }
    __m256i u = _mm256_loadu_si256((const __m256i *)((const uint16_t *)scale + at));    // 8 x (s | z << 16)
    *z = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// Vector u (0..7) of an int4 block at one input (p: its 32 code bytes) as 8 floats: the low
// (u even) or high (u odd) nibbles of bytes 8(u / 2) ..: rows int4_row(u) .. +8. So a pass over
// an even count of vectors loads each byte once.
static inline int int4_row(int u) { return 8 * (u / 2) + 32 * (u % 2); }

static inline __m256 int4_w8(const uint8_t *p, int u) {
    __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * (u / 2))));
    e = u % 2 ? _mm256_srli_epi32(e, 4) : _mm256_and_si256(e, _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(e);
}

// One int4 block of 64 output channels (AVX2): y[m, nb*64 .. +64] = x[m] · W[block], the same
// math as the AVX-512 version, each row's sums in its order. 16 registers hold M·C group sums of
// 8 rows, so the block is taken in passes over C of its 8 vectors (C = 4 for up to two rows, 2
// for three or four, 1 for more; later passes read its K·32 bytes from L1 / L2), the passes
// outermost so that no row's sum of x stays in a register across them; the running sums live
// in y.
static inline __attribute__((always_inline)) void int4_block(const Linear *L, const float *x, const float *xsum,
                                                             const int M, float *y, int64_t nb) {
    const int64_t K = L->K, N = L->N, G = K / 32;
    const int C = M <= 2 ? 4 : M <= 4 ? 2 : 1;
    const uint8_t *p = (const uint8_t *)L->w + nb * K * 32;
#pragma GCC unroll 8
    for (int v0 = 0; v0 < 8; v0 += C)
        for (int64_t g = 0; g < G; g++) {
            __m256 gs[MAX_ROWS][4];
            for (int m = 0; m < M; m++)
                for (int c = 0; c < C; c++) gs[m][c] = _mm256_setzero_ps();
            for (int64_t k = g * 32; k < g * 32 + 32; k++) {
                if (!v0 && !(k & 1)) _mm_prefetch((const char *)(p + k * 32 + PF_BYTES), _MM_HINT_T0);
                __m256 w[4];
                for (int c = 0; c < C; c++) w[c] = int4_w8(p + k * 32, v0 + c);
                for (int m = 0; m < M; m++) {
                    const __m256 xb = _mm256_set1_ps(x[m * K + k]);
                    for (int c = 0; c < C; c++) gs[m][c] = _mm256_fmadd_ps(w[c], xb, gs[m][c]);
                }
            }
            // sum_k w x = scale · sum_k q x + (zero - 8 scale) · sum_k x, added to y's running sums
            for (int c = 0; c < C; c++) {
                __m256 z, s = load_s8(L->scale, (g * N + nb * 64 + int4_row(v0 + c)) * 2, L->scale_f32, &z);
                __m256 zc = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);
                for (int m = 0; m < M; m++) {
                    float *ym = y + m * N + nb * 64 + int4_row(v0 + c);
                    __m256 a = _mm256_fmadd_ps(s, gs[m][c], g ? _mm256_loadu_ps(ym) : _mm256_setzero_ps());
                    _mm256_storeu_ps(ym, _mm256_fmadd_ps(zc, _mm256_set1_ps(xsum[m * G + g]), a));
                }
            }
        }
}
#endif

// int8 output channel n: its codes, and its scale in *s. A row (K bytes, often under a page) is
// too short for the hardware prefetcher to ramp up on its own; touching the start of the row
// PF_ROWS ahead keeps the stream going (SmolLM2 / Qwen shapes, cold weights on huge pages:
// 23 -> 38-40 GB/s, benchmarks/README.md).
static inline const int8_t *int8_row_start(const Linear *L, int64_t n, float *s) {
    const int8_t *row = (const int8_t *)L->w + n * L->K;
    if (n + PF_ROWS < L->N) _mm_prefetch((const char *)(row + PF_ROWS * L->K), _MM_HINT_T0);
    *s = ld(L->scale, n, L->scale_f32);
    return row;
}

#if defined(__AVX512F__)
// 32 int8 codes -> two vectors of fp32 (elements 0..15 and 16..31)
static inline void int8_widen32(const int8_t *p, __m512 *lo, __m512 *hi) {
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
}

// One int8 output channel for M rows.
static inline __attribute__((always_inline)) void int8_row(const Linear *L, const float *x, const int M,
                                                           float *y, int64_t n) {
    int64_t K = L->K;
    float s;
    const int8_t *row = int8_row_start(L, n, &s);
    __m512 a0[MAX_ROWS], a1[MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 v0, v1;
        if (!(k & 63)) _mm_prefetch((const char *)(row + k + PF_BYTES), _MM_HINT_T0);
        int8_widen32(row + k, &v0, &v1);
        for (int m = 0; m < M; m++) {
            a0[m] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + m * K + k), a0[m]);
            a1[m] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + m * K + k + 16), a1[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        float t = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
        for (int64_t j = k; j < K; j++) t += (float)row[j] * x[m * K + j];
        y[m * L->N + n] = t * s;
    }
}

// Two int8 output channels n, n+1 for one row of x: each channel's sums in exactly int8_row's
// order (the same bits), the two channels' FMA chains interleaved so that one's latency hides
// behind the other's (one row alone is latency-bound: two chains of K/32 dependent FMAs).
static inline void int8_row_pair(const Linear *L, const float *x, float *y, int64_t n) {
    int64_t K = L->K;
    float s0, s1;
    const int8_t *r0 = int8_row_start(L, n, &s0), *r1 = int8_row_start(L, n + 1, &s1);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 v0, v1, w0, w1;
        if (!(k & 63)) {
            _mm_prefetch((const char *)(r0 + k + PF_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + k + PF_BYTES), _MM_HINT_T0);
        }
        int8_widen32(r0 + k, &v0, &v1);
        int8_widen32(r1 + k, &w0, &w1);
        const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        a0 = _mm512_fmadd_ps(v0, x0, a0);
        a1 = _mm512_fmadd_ps(v1, x1, a1);
        b0 = _mm512_fmadd_ps(w0, x0, b0);
        b1 = _mm512_fmadd_ps(w1, x1, b1);
    }
    float t0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), t1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    for (int64_t j = k; j < K; j++) {
        t0 += (float)r0[j] * x[j];
        t1 += (float)r1[j] * x[j];
    }
    y[n] = t0 * s0;
    y[n + 1] = t1 * s1;
}
#else
// 8 int8 codes -> 8 fp32
static inline __m256 int8_widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

// An int8 channel's four partial sums (of its inputs k % 32 in [0, 8), [8, 16), [16, 24),
// [24, 32)) -> their total, always in this order
static inline float int8_sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// One int8 output channel for M rows (AVX2). A row's sum is four partial sums in k order,
// totalled by int8_sum4: the same bits for every M and in int8_row_pair. They are taken JP at a
// time over the whole row (the next pass reads it from L1), so that the M·JP accumulators stay
// in registers.
static inline __attribute__((always_inline)) void int8_row(const Linear *L, const float *x, const int M,
                                                           float *y, int64_t n) {
    const int64_t K = L->K, K32 = K / 32 * 32;
    const int JP = M <= 2 ? 4 : M <= 4 ? 2 : 1;
    float s;
    const int8_t *row = int8_row_start(L, n, &s);
    __m256 part[4][MAX_ROWS];
#pragma GCC unroll 4
    for (int j0 = 0; j0 < 4; j0 += JP) {
        __m256 a[4][MAX_ROWS];
        for (int j = 0; j < JP; j++)
            for (int m = 0; m < M; m++) a[j][m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K32; k += 32) {
            if (!j0 && !(k & 63)) _mm_prefetch((const char *)(row + k + PF_BYTES), _MM_HINT_T0);
            for (int j = 0; j < JP; j++) {
                const __m256 w = int8_widen8(row + k + 8 * (j0 + j));
                for (int m = 0; m < M; m++)
                    a[j][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + 8 * (j0 + j)), a[j][m]);
            }
        }
        for (int j = 0; j < JP; j++)
            for (int m = 0; m < M; m++) part[j0 + j][m] = a[j][m];
    }
    for (int m = 0; m < M; m++) {
        float t = int8_sum4(part[0][m], part[1][m], part[2][m], part[3][m]);
        for (int64_t j = K32; j < K; j++) t += (float)row[j] * x[m * K + j];
        y[m * L->N + n] = t * s;
    }
}

// Two int8 output channels n, n+1 for one row of x (AVX2): each channel's sums in exactly
// int8_row's order (the same bits), the eight FMA chains interleaved to hide their latency.
static inline void int8_row_pair(const Linear *L, const float *x, float *y, int64_t n) {
    const int64_t K = L->K, K32 = K / 32 * 32;
    float s0, s1;
    const int8_t *r0 = int8_row_start(L, n, &s0), *r1 = int8_row_start(L, n + 1, &s1);
    __m256 a[4], b[4];
    for (int j = 0; j < 4; j++) a[j] = b[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
        if (!(k & 63)) {
            _mm_prefetch((const char *)(r0 + k + PF_BYTES), PF_PAIR_HINT);
            _mm_prefetch((const char *)(r1 + k + PF_BYTES), PF_PAIR_HINT);
        }
        for (int j = 0; j < 4; j++) {
            const __m256 xj = _mm256_loadu_ps(x + k + 8 * j);
            a[j] = _mm256_fmadd_ps(int8_widen8(r0 + k + 8 * j), xj, a[j]);
            b[j] = _mm256_fmadd_ps(int8_widen8(r1 + k + 8 * j), xj, b[j]);
        }
    }
    float t0 = int8_sum4(a[0], a[1], a[2], a[3]), t1 = int8_sum4(b[0], b[1], b[2], b[3]);
    for (int64_t j = K32; j < K; j++) {
        t0 += (float)r0[j] * x[j];
        t1 += (float)r1[j] * x[j];
    }
    y[n] = t0 * s0;
    y[n + 1] = t1 * s1;
}
#endif

#if defined(__AVX512BF16__)
#define BF16_ROWS 16             // rows one bf16-dot pass keeps in registers
// x [n] fp32 whose values are bf16 numbers (the fused layers round every activation to bf16)
// -> bf16, in a buffer of this thread's (exact: only zero bits are dropped).
static const uint16_t *bf16_rows(const float *x, int64_t n) {
    static __thread uint16_t *buf;
    static __thread int64_t cap;
    if (cap < n) {
        free(buf);
        cap = (n + 31) / 32 * 32;
        buf = aligned_alloc(64, cap * 2);
    }
    for (int64_t i = 0; i < n; i++) buf[i] = f32_to_bf16(x[i]);
    return buf;
}

// One int8 output channel for M rows of bf16 x by bf16 dot products (vdpbf16ps: 32 products a
// row a step, against 2 FMAs of 16 in int8_row): the codes are widened once per 32 and shared
// by the M rows. Products are exact in fp32 (8-bit x 8-bit significands); the sums round in
// another order than int8_row's, so this serves only calls of more than MAX_ROWS rows (prefill
// of a short prompt), not decode.
static inline __attribute__((always_inline)) void int8_row_bf16(const Linear *L, const uint16_t *xb, const int M,
                                                                float *y, int64_t n) {
    int64_t K = L->K;
    float s;
    const int8_t *row = int8_row_start(L, n, &s);
    __m512 acc[BF16_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 lo, hi;
        if (!(k & 63)) _mm_prefetch((const char *)(row + k + PF_BYTES), _MM_HINT_T0);
        int8_widen32(row + k, &lo, &hi);
        __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);          // elements k .. k+31 in order
        for (int m = 0; m < M; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_loadu_si512((const void *)(xb + m * K + k)));
    }
    for (int m = 0; m < M; m++) {
        float t = _mm512_reduce_add_ps(acc[m]);
        for (int64_t j = k; j < K; j++) t += (float)row[j] * bf16_to_f32(xb[m * K + j]);
        y[m * L->N + n] = t * s;
    }
}

static void int8_rows_bf16(const Linear *L, const float *x, int M, float *y, int64_t n0, int64_t n1) {
    const int64_t K = L->K, N = L->N;
    const uint16_t *xb = bf16_rows(x, (int64_t)M * K);
    for (int64_t n = n0; n < n1; n++)
        for (int m0 = 0; m0 < M; m0 += BF16_ROWS) {
            if (M - m0 >= BF16_ROWS) int8_row_bf16(L, xb + m0 * K, BF16_ROWS, y + m0 * N, n);
            else int8_row_bf16(L, xb + m0 * K, M - m0, y + m0 * N, n);
        }
}

#if defined(__AVX512BW__)
// int4_block with bf16 activations (xp: x[m] as bf16 pairs [M, K/2]): the 32 code bytes of
// inputs k and k+1 are interleaved byte by byte (two in-lane unpacks of the broadcast rows), the
// nibbles split, and each nibble interleaved with 0x43, which makes it bf16 128 + q exactly (no
// table, no widening): a vdpbf16ps then takes 32 products (each exact in fp32), ~13 vector
// operations per 128 weights against ~24 by FMAs. The unpacks work within 128-bit lanes, so
// accumulator i holds the rows ROWS_A (i even) or ROWS_B (i odd) of its half (+32 for i >= 2):
// the scales are permuted to it per group, the sums back at the end. The 128 per code is taken
// off with the zero term: sum_k w x = scale · sum_k (128 + q) x + (zero - 136 scale) · sum_k x.
static inline __attribute__((always_inline)) void int4_block_bf16(const Linear *L, const uint32_t *xp,
                                                                  const float *xsum, const int M, float *y,
                                                                  int64_t nb) {
    const int64_t K = L->K, N = L->N, G = K / 32, K2 = K / 2;
    // ROWS_A: rows {0..3, 16..19, 8..11, 24..27} of 32 in the lanes of an even accumulator,
    // ROWS_B: {4..7, 20..23, 12..15, 28..31}; as indices into (rows 0..15 | rows 16..31)
    const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i ib = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    const __m512i lo4 = _mm512_set1_epi8(15), e43 = _mm512_set1_epi8(0x43);
    const __mmask64 upper = 0xFFFFFFFF00000000ull;
    __m512 acc[MAX_ROWS][4];                   // ROWS_A, ROWS_B, 32 + ROWS_A, 32 + ROWS_B
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
    const uint8_t *pk = (const uint8_t *)L->w + nb * K * 32;
    for (int64_t g = 0; g < G; g++) {
        __m512 gs[MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int i = 0; i < 4; i++) gs[m][i] = _mm512_setzero_ps();
        for (int64_t p = g * 16; p < g * 16 + 16; p++) {
            _mm_prefetch((const char *)(pk + 2 * p * 32 + PF_BYTES), _MM_HINT_T0);
            // lanes of u: byte pairs (input 2p, 2p+1) of rows 0..7 | 16..23 | 8..15 | 24..31 (low
            // nibbles; the high nibbles are rows 32 + those)
            const __m512i a = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(pk + 2 * p * 32)));
            const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(pk + (2 * p + 1) * 32)));
            const __m512i u = _mm512_mask_unpackhi_epi8(_mm512_unpacklo_epi8(a, b), upper, a, b);
            const __m512i lo = _mm512_and_si512(u, lo4), hi = _mm512_srli_epi16(_mm512_xor_si512(u, lo), 4);
            const __m512i w[4] = {_mm512_unpacklo_epi8(lo, e43), _mm512_unpackhi_epi8(lo, e43),
                                  _mm512_unpacklo_epi8(hi, e43), _mm512_unpackhi_epi8(hi, e43)};
            for (int m = 0; m < M; m++) {
                __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[m * K2 + p]);
                for (int i = 0; i < 4; i++) gs[m][i] = _mm512_dpbf16_ps(gs[m][i], (__m512bh)w[i], xb);
            }
        }
        __m512 sv[4], cv[4];                   // rows 0..15, 16..31, 32..47, 48..63 in order
        for (int i = 0; i < 4; i++) {
            __m512 z, s = load_s16(L->scale, (g * N + nb * 64 + i * 16) * 2, L->scale_f32, &z);
            sv[i] = s;
            cv[i] = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), s, z);
        }
        const __m512 s4[4] = {_mm512_permutex2var_ps(sv[0], ia, sv[1]), _mm512_permutex2var_ps(sv[0], ib, sv[1]),
                              _mm512_permutex2var_ps(sv[2], ia, sv[3]), _mm512_permutex2var_ps(sv[2], ib, sv[3])};
        const __m512 c4[4] = {_mm512_permutex2var_ps(cv[0], ia, cv[1]), _mm512_permutex2var_ps(cv[0], ib, cv[1]),
                              _mm512_permutex2var_ps(cv[2], ia, cv[3]), _mm512_permutex2var_ps(cv[2], ib, cv[3])};
        for (int m = 0; m < M; m++) {
            const __m512 xs = _mm512_set1_ps(xsum[m * G + g]);
            for (int i = 0; i < 4; i++) {
                acc[m][i] = _mm512_fmadd_ps(s4[i], gs[m][i], acc[m][i]);
                acc[m][i] = _mm512_fmadd_ps(c4[i], xs, acc[m][i]);
            }
        }
    }
    // back to row order: rows 0..15 = (A lanes 0..3, B lanes 0..3, A lanes 8..11, B lanes 8..11)
    // = permute(A, ia, B), rows 16..31 = permute(A, ib, B); rows 32..63 the same from acc 2 / 3
    for (int m = 0; m < M; m++) {
        float *ym = y + m * N + nb * 64;
        for (int h = 0; h < 2; h++) {
            _mm512_storeu_ps(ym + 32 * h, _mm512_permutex2var_ps(acc[m][2 * h], ia, acc[m][2 * h + 1]));
            _mm512_storeu_ps(ym + 32 * h + 16, _mm512_permutex2var_ps(acc[m][2 * h], ib, acc[m][2 * h + 1]));
        }
    }
}
#endif
#endif

#if defined(__AVX512BW__)
// One q5 block of 32 output channels: y[m, nb*32 .. +32] = x[m] · W[block]. The unpacked weights
// are bf16 (128 + q), exact (kvo_q5.h), so with bf16 activations (xp: x[m] as bf16 pairs, [M,
// K/2] uint32) a vdpbf16ps takes 32 products (each exact in fp32); with fp32 activations (x) the
// pair is split and multiplied by fmas. A group's 32 inputs are summed per row, less Q5_OFFSET
// times the group's sum of x (xsum[m * G + g]), then scaled by its d.
static inline __attribute__((always_inline)) void q5_block(const Linear *L, const float *x, const uint32_t *xp,
                                                           const float *xsum, const int M, float *y, int64_t nb) {
    const int64_t K = L->K, N = L->N, K2 = K / 2, G = K / 32;
    const __m512i odd = _mm512_set1_epi32((int)0xffff0000u);
    const uint8_t *c = (const uint8_t *)L->w + nb * K * 16;          // K/4 quads of 64 bytes
    const uint64_t *hb = L->hbits + nb * (K / 2);                      // two words a quad
    const uint16_t *sc = (const uint16_t *)L->scale + nb * 32;
    // the running sums live in y: a group's one load and store a vector are few against its 32
    // dot products a row (measured the same as keeping them in registers)
    for (int64_t g = 0; g < G; g++) {
        __m512 gs[MAX_ROWS][2];
        for (int m = 0; m < M; m++) gs[m][0] = gs[m][1] = _mm512_setzero_ps();
        for (int64_t t = g * 8; t < g * 8 + 8; t++) {
            __m512i w[4];
            _mm_prefetch((const char *)(c + t * 64 + PF_BYTES), _MM_HINT_T0);
            if (!(t & 3)) _mm_prefetch((const char *)(hb + 2 * t) + PF_BYTES / 4, _MM_HINT_T0);   // 16 B a quad
            q5_quad(c + t * 64, hb + 2 * t, w);
#if defined(__AVX512BF16__)
            if (xp) {
                for (int m = 0; m < M; m++) {
                    __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)xp[m * K2 + 2 * t]);
                    __m512bh x1 = (__m512bh)_mm512_set1_epi32((int)xp[m * K2 + 2 * t + 1]);
                    gs[m][0] = _mm512_dpbf16_ps(gs[m][0], (__m512bh)w[0], x0);
                    gs[m][1] = _mm512_dpbf16_ps(gs[m][1], (__m512bh)w[1], x0);
                    gs[m][0] = _mm512_dpbf16_ps(gs[m][0], (__m512bh)w[2], x1);
                    gs[m][1] = _mm512_dpbf16_ps(gs[m][1], (__m512bh)w[3], x1);
                }
                continue;
            }
#endif
            for (int i = 0; i < 4; i++) {
                const int64_t k = 4 * t + 2 * (i / 2);
                __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w[i], 16)), wo = _mm512_castsi512_ps(_mm512_and_si512(w[i], odd));
                for (int m = 0; m < M; m++) {
                    gs[m][i % 2] = _mm512_fmadd_ps(we, _mm512_set1_ps(x[m * K + k]), gs[m][i % 2]);
                    gs[m][i % 2] = _mm512_fmadd_ps(wo, _mm512_set1_ps(x[m * K + k + 1]), gs[m][i % 2]);
                }
            }
        }
        for (int i = 0; i < 2; i++) {
            __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * N + i * 16)));
            for (int m = 0; m < M; m++) {
                __m512 q = _mm512_fnmadd_ps(_mm512_set1_ps(Q5_OFFSET), _mm512_set1_ps(xsum[m * G + g]), gs[m][i]);
                float *ym = y + m * N + nb * 32 + i * 16;
                _mm512_storeu_ps(ym, g ? _mm512_fmadd_ps(s, q, _mm512_loadu_ps(ym)) : _mm512_mul_ps(s, q));
            }
        }
    }
}

#endif

#if defined(KVO_Q5_AVX2)
// One q5 block of 32 output channels under AVX2 + F16C: the AVX-512 version's fp32 path (FMAs
// over the unpacked pairs, each row's sums in the same order: the same bits), 8 rows a vector.
// 16 registers hold M·C row-vector sums, so the block goes in passes over C of its 4 vectors (4
// for up to two rows, 2 for up to four, each pass then one half of every quad, 1 for more; later
// passes read the block from L1 / L2), as int4_block does. No bf16 dot products here (xp unused).
static inline __attribute__((always_inline)) void q5_block(const Linear *L, const float *x, const uint32_t *xp,
                                                           const float *xsum, const int M, float *y, int64_t nb) {
    (void)xp;
    const int64_t K = L->K, N = L->N, G = K / 32;
    const int C = M <= 2 ? 4 : M <= 4 ? 2 : 1, S = 4 / C;        // vectors a pass; pass p takes p, p + S, ..
    const uint8_t *c = (const uint8_t *)L->w + nb * K * 16;          // K/4 quads of 64 bytes
    const uint64_t *hb = L->hbits + nb * (K / 2);                      // two words a quad
    const uint16_t *sc = (const uint16_t *)L->scale + nb * 32;
#pragma GCC unroll 4
    for (int p = 0; p < S; p++)
        for (int64_t g = 0; g < G; g++) {
            __m256 gs[MAX_ROWS][4];
            for (int m = 0; m < M; m++)
                for (int j = 0; j < C; j++) gs[m][j] = _mm256_setzero_ps();
            for (int64_t t = g * 8; t < g * 8 + 8; t++) {
                if (!p) {
                    _mm_prefetch((const char *)(c + t * 64 + PF_BYTES), _MM_HINT_T0);
                    if (!(t & 3)) _mm_prefetch((const char *)(hb + 2 * t) + PF_BYTES / 4, _MM_HINT_T0);
                }
                __m256i q[2][2];                                       // [half][low / high nibbles]
                if (C == 4 || p % 2 == 0) q5_half(c + t * 64, hb + 2 * t, 0, q[0]);
                if (C == 4 || p % 2 == 1) q5_half(c + t * 64, hb + 2 * t, 1, q[1]);
                for (int j = 0; j < C; j++) {
                    const int v = p + j * S;
                    for (int e = 0; e < 2; e++) {                      // inputs 4t + 2e, 4t + 2e + 1
                        __m256 we, wo;
                        q5_rows8(q[v % 2][e], v, &we, &wo);
                        for (int m = 0; m < M; m++) {
                            gs[m][j] = _mm256_fmadd_ps(we, _mm256_set1_ps(x[m * K + 4 * t + 2 * e]), gs[m][j]);
                            gs[m][j] = _mm256_fmadd_ps(wo, _mm256_set1_ps(x[m * K + 4 * t + 2 * e + 1]), gs[m][j]);
                        }
                    }
                }
            }
            for (int j = 0; j < C; j++) {
                const int v = p + j * S;
                __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * N + 8 * v)));
                for (int m = 0; m < M; m++) {
                    __m256 qs = _mm256_fnmadd_ps(_mm256_set1_ps(Q5_OFFSET), _mm256_set1_ps(xsum[m * G + g]), gs[m][j]);
                    float *ym = y + m * N + nb * 32 + 8 * v;
                    _mm256_storeu_ps(ym, g ? _mm256_fmadd_ps(s, qs, _mm256_loadu_ps(ym)) : _mm256_mul_ps(s, qs));
                }
            }
        }
}
#endif

#define FOR_M(M, CALL) switch (M) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; }

// y[m, n0:n1] = x[m] · W[n0:n1]  (x fp32 [M, K]; y fp32 [M, N]); n0, n1 multiples of 64 for int4.
// More than MAX_ROWS rows go in passes of MAX_ROWS over each weight tile (an int4 block of 64
// output channels, an int8 row) while it is in L1, so the weights are read from memory once;
// each row's result is the same bits as in a call of its own.
static void gemv_rows(const Linear *L, const float *x, int M, float *y, int64_t n0, int64_t n1, int xbf) {
    const int64_t K = L->K, N = L->N, G = K / 32;
    float xsum[L->kind == 1 ? 1 : M * G];          // int4 / q5: each group's sum of x
    if (L->kind != 1)
        for (int m = 0; m < M; m++)
            for (int64_t g = 0; g < G; g++) {
                float t = 0;                         // in k order, as a running vector sum would
                for (int64_t k = g * 32; k < g * 32 + 32; k++) t += x[m * K + k];
                xsum[m * G + g] = t;
            }
#if defined(__AVX512BW__) || defined(KVO_Q5_AVX2)
    if (L->kind == 2) {
        const uint32_t *xp = NULL;
#if defined(__AVX512BF16__)
        if (xbf) xp = (const uint32_t *)bf16_rows(x, (int64_t)M * K);
#endif
        for (int64_t nb = n0 / 32; nb < n1 / 32; nb++)
            for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
                const float *xm = x + m0 * K;
                const uint32_t *pm = xp ? xp + m0 * K / 2 : NULL;
                const float *sm = xsum + m0 * G;
                float *ym = y + m0 * N;
#define Q5(MM) q5_block(L, xm, pm, sm, MM, ym, nb)
                FOR_M(M - m0, Q5)
#undef Q5
            }
        return;
    }
#endif
    if (L->kind == 0) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
        if (xbf) {                                 // bf16 activations: pair dot products
            const uint32_t *xp = (const uint32_t *)bf16_rows(x, (int64_t)M * K);
            for (int64_t nb = n0 / 64; nb < n1 / 64; nb++)
                for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
                    const uint32_t *pm = xp + m0 * K / 2;
                    const float *sm = xsum + m0 * G;
                    float *ym = y + m0 * N;
#define INT4B(MM) int4_block_bf16(L, pm, sm, MM, ym, nb)
                    FOR_M(M - m0, INT4B)
#undef INT4B
                }
            return;
        }
#endif
        for (int64_t nb = n0 / 64; nb < n1 / 64; nb++)
            for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
                const float *xm = x + m0 * K, *sm = xsum + m0 * G;
                float *ym = y + m0 * N;
#define INT4(MM) int4_block(L, xm, sm, MM, ym, nb)
                FOR_M(M - m0, INT4)
#undef INT4
            }
    } else if (M == 1) {                       // decode of one sequence: channels in pairs
        int64_t n = n0;
        for (; n + 1 < n1; n += 2) int8_row_pair(L, x, y, n);
        if (n < n1) int8_row(L, x, 1, y, n);
    } else if (M <= MAX_ROWS) {                // the row count's switch outside the loop
#define INT8(MM) for (int64_t n = n0; n < n1; n++) int8_row(L, x, MM, y, n)
        FOR_M(M, INT8)
#undef INT8
    } else {
#if defined(__AVX512BF16__)
        if (xbf) {                                 // bf16 activations: one widening, M dot products
            int8_rows_bf16(L, x, M, y, n0, n1);
            return;
        }
#endif
        for (int64_t n = n0; n < n1; n++)
            for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
                const float *xm = x + m0 * K;
                float *ym = y + m0 * N;
#define INT8(MM) int8_row(L, xm, MM, ym, n)
                FOR_M(M - m0, INT8)
#undef INT8
            }
    }
}

// Work split of a GEMV over the team: output channels in units of 64 (int4 blocks, two q5 blocks).
static void thread_rows(const Linear *L, int tid, int nth, int64_t *n0, int64_t *n1) {
    int64_t units = (L->N + 63) / 64;
    int64_t u0 = units * tid / nth, u1 = units * (tid + 1) / nth;
    *n0 = u0 * 64;
    *n1 = u1 * 64 < L->N ? u1 * 64 : L->N;
}

// The start of this thread's rows of the projection that follows, prefetched before the
// barrier between the two: the stream of the next one starts warm instead of from DRAM latency.
static void prefetch_next(const Linear *next, int tid, int nth) {
    if (!next) return;
    int64_t n0, n1;
    thread_rows(next, tid, nth, &n0, &n1);
    if (n0 >= n1) return;
    if (next->kind != 1) {                         // int4 / q5: the first 2 KiB of its first block
        const char *p = (const char *)next->w + (next->kind == 0 ? (n0 / 64) * next->K * 32 : (n0 / 32) * next->K * 16);
        for (int i = 0; i < 2048; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
    } else {                                       // int8: the first line of its first PF_ROWS rows
        for (int64_t n = n0; n < n1 && n < n0 + PF_ROWS; n++)
            _mm_prefetch((const char *)next->w + n * next->K, _MM_HINT_T0);
    }
}

static void gemv(const Linear *L, const float *x, int M, float *y, int tid, int nth, int xbf, const Linear *next) {
    int64_t n0, n1;
    thread_rows(L, tid, nth, &n0, &n1);
    if (n0 < n1) gemv_rows(L, x, M, y, n0, n1, xbf);
    prefetch_next(next, tid, nth);
}

static inline float x_cos_plus(float x, float c, float sw, float s, int f32) {
    return rnd(x * c, f32) + sw * s;
}

static void rmsnorm(const float *x, const void *w, float eps, int d, int f32, float *out) {
    float ss = 0;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) out[i] = rnd(x[i] * r * ld(w, i, f32), f32);
}

// The most rows one call takes (kvoffload/model/fused.py reads it).
int kvo_decode_max_rows(void) { return MAX_CALL_ROWS; }

// Whether a projection / a layer's projections fit this kernel (int4 needs N a multiple of 64,
// q5 of 32, both K of 32; q5 needs AVX512BW, or AVX2 + F16C).
int kvo_linear_supported(const Linear *L) {
    if (L->kind == 0) return L->N % 64 == 0 && L->K % 32 == 0;
#if defined(__AVX512BW__) || defined(KVO_Q5_AVX2)
    if (L->kind == 2) return L->N % 32 == 0 && L->K % 32 == 0 && L->hbits != NULL;
#endif
    return L->kind == 1;
}

int kvo_decode_supported(const Layer *Ly) {
    const Linear *ls[4] = {&Ly->qkv, &Ly->o, &Ly->gate_up, &Ly->down};
    for (int i = 0; i < 4; i++)
        if (!kvo_linear_supported(ls[i])) return 0;
    return 1;
}

// x [M, d] -> qkv [M, (H + 2 H_kv) D] with RoPE applied to q and k (cos, sin_signed [M, D],
// rotate-half convention: out = x·cos + swap_halves(x)·sin_signed). ws: fp32 workspace of
// M·(d + (H + 2 H_kv)·D) floats.
void kvo_attn_in(const Layer *Ly, const void *x, int M, const void *cos, const void *sin, void *qkv, int f32,
                 float *ws, int threads) {
    int d = Ly->d, D = Ly->D, nq = (Ly->H + 2 * Ly->H_kv) * D, nr = (Ly->H + Ly->H_kv);
    float *xn = ws, *y = ws + M * d;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for
        for (int m = 0; m < M; m++) {
            float row[d];
            for (int i = 0; i < d; i++) row[i] = ld(x, (int64_t)m * d + i, f32);
            rmsnorm(row, Ly->norm1, Ly->eps1, d, f32, xn + m * d);
        }
        gemv(&Ly->qkv, xn, M, y, omp_get_thread_num(), omp_get_num_threads(), !f32, &Ly->o);
        #pragma omp barrier
        #pragma omp for
        for (int m = 0; m < M; m++) {
            float *ym = y + (int64_t)m * nq;
            for (int i = 0; i < nq; i++) {
                float v = ym[i];
                if (Ly->qkv.bias) v += ld(Ly->qkv.bias, i, f32);
                ym[i] = rnd(v, f32);
            }
            int half = D / 2;
            for (int h = 0; h < nr; h++) {          // q and k heads: RoPE
                float *v = ym + h * D;
                for (int i = 0; i < D; i++) {
                    float sw = i < half ? v[i + half] : v[i - half];
                    float c = ld(cos, (int64_t)m * D + i, f32), s = ld(sin, (int64_t)m * D + i, f32);
                    // reference: addcmul(x * cos, swapped, sin), each rounded to the dtype
                    st(qkv, (int64_t)m * nq + h * D + i, rnd(x_cos_plus(v[i], c, sw, s, f32), f32), f32);
                }
            }
            for (int i = nr * D; i < nq; i++) st(qkv, (int64_t)m * nq + i, ym[i], f32);
        }
    }
}

// o [M, H·D], x [M, d] -> out [M, d] = x1 + down(silu(gate)·up) with x1 = x + o_proj(o),
// gate/up = gate_up(rmsnorm(x1)). ws: fp32 workspace of M·(H·D + 4 d + 3 ffn) floats.
void kvo_attn_out(const Layer *Ly, const void *o, const void *x, int M, void *out, int f32, float *ws,
                  int threads) {
    int d = Ly->d, HD = Ly->H * Ly->D, F = Ly->ffn;
    float *of = ws, *a = of + M * HD, *x1 = a + M * d, *h = x1 + M * d, *gu = h + M * d, *act = gu + 2 * M * F,
          *dn = act + M * F;
    #pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        #pragma omp for
        for (int64_t i = 0; i < (int64_t)M * HD; i++) of[i] = ld(o, i, f32);
        gemv(&Ly->o, of, M, a, tid, nth, !f32, &Ly->gate_up);
        #pragma omp barrier
        #pragma omp for
        for (int m = 0; m < M; m++) {
            for (int i = 0; i < d; i++)
                x1[m * d + i] = rnd(ld(x, (int64_t)m * d + i, f32) + rnd(a[m * d + i], f32), f32);
            rmsnorm(x1 + m * d, Ly->norm2, Ly->eps2, d, f32, h + m * d);
        }
        gemv(&Ly->gate_up, h, M, gu, tid, nth, !f32, &Ly->down);
        #pragma omp barrier
        #pragma omp for
        for (int64_t i = 0; i < (int64_t)M * F; i++) {
            int64_t m = i / F, j = i % F;
            float g = rnd(gu[m * 2 * F + j], f32), u = rnd(gu[m * 2 * F + F + j], f32);
            act[i] = rnd(rnd(g / (1.0f + expf(-g)), f32) * u, f32);
        }
        gemv(&Ly->down, act, M, dn, tid, nth, !f32, NULL);
        #pragma omp barrier
        #pragma omp for
        for (int64_t i = 0; i < (int64_t)M * d; i++) st(out, i, x1[i] + rnd(dn[i], f32), f32);
    }
}

// Floats a row of kvo_attn_in's / kvo_attn_out's workspace takes, whichever is larger.
static int64_t halves_ws(const Layer *Ly) {
    const int64_t d = Ly->d, HD = (int64_t)Ly->H * Ly->D, nq = (int64_t)(Ly->H + 2 * Ly->H_kv) * Ly->D;
    const int64_t in = d + nq, out = HD + 4 * d + 3 * (int64_t)Ly->ffn;
    return in > out ? in : out;
}

// Floats of kvo_layer_decode's workspace for M rows: the halves', then qkv, q fp32, o fp32,
// lse and o in the dtype.
int64_t kvo_layer_ws(const Layer *Ly, int M) {
    const int64_t HD = (int64_t)Ly->H * Ly->D, nq = (int64_t)(Ly->H + 2 * Ly->H_kv) * Ly->D;
    return M * (halves_ws(Ly) + nq + 3 * HD + Ly->H);
}

// A whole decode layer in one call: kvo_attn_in, the attention through hook (the new tokens'
// k/v appended and attended where the KV lives: kvoffload/attention/dense.py's prepared call),
// kvo_attn_out. x [M, d] -> out [M, d] in the activation dtype, as FusedBlock's three steps
// give (q handed over in fp32 from its rounded value, o rounded to the dtype): the same bits.
// k/v reach the hook in the activation dtype (paged_attn.c's kvo_convert_hook rounds them to
// another KV dtype). ws: kvo_layer_ws(Ly, M) floats. 0, or the hook's error.
int kvo_layer_decode(const Layer *Ly, const void *x, int M, const void *cos, const void *sin, void *out, int f32,
                     float *ws, int threads, const kvo_attn_hook *hook) {
    const int64_t HD = (int64_t)Ly->H * Ly->D, nq = (int64_t)(Ly->H + 2 * Ly->H_kv) * Ly->D;
    float *qkv = ws + M * halves_ws(Ly), *qf = qkv + M * nq, *of = qf + M * HD, *lse = of + M * HD, *o = lse + M * Ly->H;
    const size_t es = f32 ? 4 : 2;
    kvo_attn_in(Ly, x, M, cos, sin, qkv, f32, ws, threads);
    for (int m = 0; m < M; m++)
        for (int64_t i = 0; i < HD; i++) qf[m * HD + i] = ld(qkv, m * nq + i, f32);
    const char *k = (const char *)qkv + HD * es;
    int rc = hook->fn(hook->ctx, M, qf, HD, k, k + Ly->H_kv * Ly->D * es, nq, of, lse);
    if (rc) return rc;
    for (int64_t i = 0; i < M * HD; i++) st(o, i, of[i], f32);
    kvo_attn_out(Ly, o, x, M, out, f32, ws, threads);
    return 0;
}

// y [M, N] fp32 = x [M, K] fp32 · W^T: one projection alone (the LM head, tests, measurements).
// x_bf16: the caller vouches that every x is a bf16 number (int4 and q5 then take bf16 dot
// products, int8 for more than MAX_ROWS rows).
void kvo_gemv(const Linear *L, const float *x, int M, float *y, int x_bf16, int threads) {
    #pragma omp parallel num_threads(threads)
    gemv(L, x, M, y, omp_get_thread_num(), omp_get_num_threads(), x_bf16, NULL);
}
