// Weight (de)quantisation kernels: GGUF blocks -> fp32 rows, and the decode formats
// (the int4 layout of kvoffload.model.quant.int4_pack, per-channel int8) -> dense rows for
// prefill GEMMs.
//
// Built with -ffp-contract=off: every value is computed with the same float operations,
// in the same order, as the references (gguf.quants for the GGUF types, the PyTorch
// expressions in kvoffload/model/quant.py for the decode formats), so results are
// bit-identical to them.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvo_math.h"
#include "kvo_q5.h"

// ggml type ids
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

static inline float rd_half(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return f16_to_f32(h); }

// ---- GGUF blocks -> fp32 (one block at a time; layouts as ggml's dequantize_row_*) ----

static void blk_q4_0(const uint8_t *b, float *y) {
    float d = rd_half(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((qs[j] & 0xf) - 8) * d;
        y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
    }
}

static void blk_q4_1(const uint8_t *b, float *y) {
    float d = rd_half(b), m = rd_half(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 0xf) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static void blk_q5_0(const uint8_t *b, float *y) {
    float d = rd_half(b);
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int x0 = ((qs[j] & 0xf) | (((qh >> j) << 4) & 0x10)) - 16;
        int x1 = ((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
        y[j] = d * (float)x0;
        y[j + 16] = d * (float)x1;
    }
}

static void blk_q5_1(const uint8_t *b, float *y) {
    float d = rd_half(b), m = rd_half(b + 2);
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int x0 = (qs[j] & 0xf) | (((qh >> j) << 4) & 0x10);
        int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
        y[j] = d * (float)x0 + m;
        y[j + 16] = d * (float)x1 + m;
    }
}

static void blk_q8_0(const uint8_t *b, float *y) {
    float d = rd_half(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
}

static inline void scale_min_k4(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void blk_q4_k(const uint8_t *b, float *y) {
    float d = rd_half(b), dmin = rd_half(b + 2);
    const uint8_t *sc = b + 4, *q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
        int s, m;
        scale_min_k4(is, sc, &s, &m);
        float d1 = d * (float)s, m1 = dmin * (float)m;
        scale_min_k4(is + 1, sc, &s, &m);
        float d2 = d * (float)s, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)(q[l] & 0xf) - m1;
        for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
    }
}

static void blk_q5_k(const uint8_t *b, float *y) {
    float d = rd_half(b), dmin = rd_half(b + 2);
    const uint8_t *sc = b + 4, *qh = b + 16, *ql = b + 48;
    int u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
        int s, m;
        scale_min_k4(is, sc, &s, &m);
        float d1 = d * (float)s, m1 = dmin * (float)m;
        scale_min_k4(is + 1, sc, &s, &m);
        float d2 = d * (float)s, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)((ql[l] & 0xf) + (qh[l] & u1 ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
}

static void blk_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = rd_half(b + 208);
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = ((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = (d * (float)sc[is]) * (float)q1;
            y[l + 32] = (d * (float)sc[is + 2]) * (float)q2;
            y[l + 64] = (d * (float)sc[is + 4]) * (float)q3;
            y[l + 96] = (d * (float)sc[is + 6]) * (float)q4;
        }
    }
}

typedef void (*blk_fn)(const uint8_t *, float *);

static int block_info(int qtype, blk_fn *fn, int *bsize, int *bbytes) {
    switch (qtype) {
    case T_Q4_0: *fn = blk_q4_0; *bsize = 32; *bbytes = 18; return 0;
    case T_Q4_1: *fn = blk_q4_1; *bsize = 32; *bbytes = 20; return 0;
    case T_Q5_0: *fn = blk_q5_0; *bsize = 32; *bbytes = 22; return 0;
    case T_Q5_1: *fn = blk_q5_1; *bsize = 32; *bbytes = 24; return 0;
    case T_Q8_0: *fn = blk_q8_0; *bsize = 32; *bbytes = 34; return 0;
    case T_Q4_K: *fn = blk_q4_k; *bsize = 256; *bbytes = 144; return 0;
    case T_Q5_K: *fn = blk_q5_k; *bsize = 256; *bbytes = 176; return 0;
    case T_Q6_K: *fn = blk_q6_k; *bsize = 256; *bbytes = 210; return 0;
    default: return -1;
    }
}

int kvo_gguf_supported(int qtype) {
    blk_fn fn;
    int bs, bb;
    return block_info(qtype, &fn, &bs, &bb) == 0;
}

// Gathered rows: dst[i] = row idx[i] of src (rows of `row_stride` bytes), dequantised to fp32
// [n, cols]; idx NULL = rows 0..n-1. Returns -1 for an unsupported type or a row length that is
// not a whole number of blocks.
int kvo_gguf_gather(int qtype, const uint8_t *src, int64_t row_stride, const int64_t *idx, int64_t n,
                    int64_t cols, float *dst, int threads) {
    blk_fn fn;
    int bs, bb;
    if (block_info(qtype, &fn, &bs, &bb) != 0 || cols % bs) return -1;
    int64_t nb = cols / bs;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * cols >= (1 << 16))
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *b = src + (idx ? idx[r] : r) * row_stride;
        float *y = dst + r * cols;
        for (int64_t i = 0; i < nb; i++) fn(b + i * bb, y + i * bs);
    }
    return 0;
}

// ---- decode formats -> dense rows (prefill scratch) ----

// The int4 layout (kvoffload.model.quant.int4_pack; PyTorch's AVX-512 pack; N a multiple of 64):
// packed [N/64, K, 32] bytes; byte (nb, k, j) holds row nb*64+j in its low nibble and row
// nb*64+32+j in its high one. scale_zero [K/g, N, 2] (bf16 or fp32): w = (q - 8) * scale + zero.
// Rows n0..n1 (multiples of 64) -> dst [K, n1-n0] = W[n0:n1]^T, bf16 (out_f32 = 0) or fp32:
// the transpose is the pack's own order (for one k, 32 bytes hold 64 consecutive rows), so a
// block's row of 64 outputs comes from 32 contiguous bytes and vectorises; the GEMM reads W^T
// as fast as W. Threads split the groups of k (each writes whole rows of dst).
static inline void int4_row64(const uint8_t *pk, const float *s, const float *z, void *dst, int out_f32) {
    float w[64];
    for (int j = 0; j < 32; j++) {
        w[j] = (float)((pk[j] & 0xf) - 8) * s[j] + z[j];
        w[j + 32] = (float)((pk[j] >> 4) - 8) * s[j + 32] + z[j + 32];
    }
    if (out_f32) {
        memcpy(dst, w, sizeof w);
    } else {
        uint16_t *d = dst;
        for (int j = 0; j < 64; j++) d[j] = f32_to_bf16(w[j]);
    }
}

int kvo_int4pack_dequant_t(const uint8_t *packed, const void *scale_zero, int sz_f32, int64_t N, int64_t K,
                           int group, int64_t n0, int64_t n1, void *dst, int out_f32, int threads) {
    if (N % 64 || n0 % 64 || n1 % 64 || K % group || n0 < 0 || n1 > N || n0 > n1) return -1;
    int64_t width = n1 - n0, blocks = width / 64, G = K / group;
    size_t esz = out_f32 ? 4 : 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < G; g++) {
        float s[64], z[64];
        for (int64_t bi = 0; bi < blocks; bi++) {
            int64_t nb = n0 / 64 + bi, at = (g * N + nb * 64) * 2;
            for (int j = 0; j < 64; j++) {
                s[j] = sz_f32 ? ((const float *)scale_zero)[at + 2 * j] : bf16_to_f32(((const uint16_t *)scale_zero)[at + 2 * j]);
                z[j] = sz_f32 ? ((const float *)scale_zero)[at + 2 * j + 1]
                              : bf16_to_f32(((const uint16_t *)scale_zero)[at + 2 * j + 1]);
            }
            const uint8_t *p = packed + (nb * K + g * group) * 32;
            for (int64_t kk = 0; kk < group; kk++)
                int4_row64(p + kk * 32, s, z, (char *)dst + ((g * group + kk) * width + bi * 64) * esz, out_f32);
        }
    }
    return 0;
}

// Per-row int8 (Int8Linear: w = q * scale[n]) rows n0..n1 -> dst [n1-n0, K], bf16 (out_f32 = 0)
// or fp32; scale bf16 or fp32 (sc_f32). The product is rounded once, as torch.mul rounds it.
int kvo_int8_dequant(const int8_t *q, const void *scale, int sc_f32, int64_t K, int64_t n0, int64_t n1,
                     void *dst, int out_f32, int threads) {
    if (n0 < 0 || n0 > n1) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        float s = sc_f32 ? ((const float *)scale)[n] : bf16_to_f32(((const uint16_t *)scale)[n]);
        const int8_t *qr = q + n * K;
        if (out_f32) {
            float *d = (float *)dst + (n - n0) * K;
            for (int64_t k = 0; k < K; k++) d[k] = (float)qr[k] * s;
        } else {
            uint16_t *d = (uint16_t *)dst + (n - n0) * K;
            for (int64_t k = 0; k < K; k++) d[k] = f32_to_bf16((float)qr[k] * s);
        }
    }
    return 0;
}

// GGUF Q4_0 / Q4_1 rows -> the int4 layout without leaving the codes (N a multiple of 64).
// Output row n is read from rows[n] (an address: fuses q/k/v, undoes a row permutation).
// packed [N/64, K, 32] as above; scale_zero [K/32, N, 2] fp32: Q4_0 w = d·(q-8) -> (d, 0);
// Q4_1 w = d·q + m -> (d, m + 8·d).
int kvo_q4_pack(int qtype, const int64_t *rows, int64_t N, int64_t K, uint8_t *packed, float *scale_zero,
                int threads) {
    if ((qtype != T_Q4_0 && qtype != T_Q4_1) || N % 64 || K % 32) return -1;
    int bb = qtype == T_Q4_0 ? 18 : 20, hdr = bb - 16;
    int64_t G = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < N / 64; nb++) {
        uint8_t *p = packed + nb * K * 32;
        for (int64_t g = 0; g < G; g++) {
            uint8_t code[64][32];                   // [row in block, k in group]
            for (int j = 0; j < 64; j++) {
                int64_t n = nb * 64 + j;
                const uint8_t *b = (const uint8_t *)(intptr_t)rows[n] + g * bb;
                float d = rd_half(b);
                scale_zero[(g * N + n) * 2] = d;
                scale_zero[(g * N + n) * 2 + 1] = qtype == T_Q4_0 ? 0.0f : rd_half(b + 2) + 8.0f * d;
                const uint8_t *qs = b + hdr;
                for (int t = 0; t < 16; t++) {
                    code[j][t] = qs[t] & 0xf;
                    code[j][t + 16] = qs[t] >> 4;
                }
            }
            for (int t = 0; t < 32; t++) {
                uint8_t *dst = p + (g * 32 + t) * 32;
                for (int jj = 0; jj < 32; jj++) dst[jj] = (uint8_t)(code[jj][t] | (code[jj + 32][t] << 4));
            }
        }
    }
    return 0;
}

// GGUF rows -> symmetric per-row int8 (the reference: kvoffload.model.quant.int8_rows):
// scale = max(max|w|, 1e-12) / 127, q = clamp(round_half_even(w / scale), -127, 127).
// Output row n is read from rows[n] (an address), so parts are fused and rows permuted here.
int kvo_gguf_to_int8(int qtype, const int64_t *rows, int64_t N, int64_t cols, int8_t *q, float *scale,
                     int threads) {
    blk_fn fn;
    int bs, bb;
    if (block_info(qtype, &fn, &bs, &bb) != 0 || cols % bs) return -1;
    int64_t nb = cols / bs;
    #pragma omp parallel num_threads(threads)
    {
        float *w = malloc(sizeof(float) * cols);
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *b = (const uint8_t *)(intptr_t)rows[n];
            for (int64_t i = 0; i < nb; i++) fn(b + i * bb, w + i * bs);
            float amax = 0.0f;
            for (int64_t k = 0; k < cols; k++) {
                float a = fabsf(w[k]);
                amax = a > amax ? a : amax;
            }
            float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
            scale[n] = s;
            int8_t *qn = q + n * cols;
            for (int64_t k = 0; k < cols; k++) {
                float r = nearbyintf(w[k] / s);
                qn[k] = (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
            }
        }
        free(w);
    }
    return 0;
}

// ---- q5 (Q5Linear, kvoffload/model/quant.py): GGUF Q5_0's codes for bf16 pair dot products ----
// codes [N/32, K/4, 64] bytes and hbits [N/32, K/4, 2] uint64: one (block of 32 rows, quad of
// inputs) as kvo_q5.h lays it out; scale [K/32, N] fp16 (the file's d): w = d·(q - 16).

// GGUF Q5_0 rows -> q5 (N, K multiples of 32). Output row n is read from rows[n] (an address).
int kvo_q5_pack(const int64_t *rows, int64_t N, int64_t K, uint8_t *codes, uint64_t *hbits, uint16_t *scale,
                int threads) {
    if (N % 32 || K % 32) return -1;
    int64_t G = K / 32, K4 = K / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < N / 32; nb++) {
        for (int64_t g = 0; g < G; g++) {
            uint8_t code[32][32];                   // [row in block, input in group]
            for (int r = 0; r < 32; r++) {
                int64_t n = nb * 32 + r;
                const uint8_t *b = (const uint8_t *)(intptr_t)rows[n] + g * 22;
                uint32_t qh;
                memcpy(&qh, b + 2, 4);
                memcpy(&scale[g * N + n], b, 2);
                for (int j = 0; j < 16; j++) {
                    code[r][j] = (uint8_t)((b[6 + j] & 0xf) | (((qh >> j) & 1) << 4));
                    code[r][j + 16] = (uint8_t)((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
                }
            }
            for (int tt = 0; tt < 8; tt++) {
                int64_t t = g * 8 + tt;
                uint8_t *dst = codes + (nb * K4 + t) * 64;
                uint64_t h0 = 0, h1 = 0;
                for (int i = 0; i < 64; i++) {
                    int r = q5_row(i), k = 4 * tt + q5_input(i);
                    uint8_t a = code[r][k], c = code[r][k + 2];
                    dst[i] = (uint8_t)((a & 0xf) | (c << 4));
                    h0 |= (uint64_t)(a >> 4) << i;
                    h1 |= (uint64_t)(c >> 4) << i;
                }
                hbits[(nb * K4 + t) * 2] = h0;
                hbits[(nb * K4 + t) * 2 + 1] = h1;
            }
        }
    }
    return 0;
}

// q5 rows n0..n1 (multiples of 32) -> dst [K, n1-n0] = W[n0:n1]^T, bf16 (out_f32 = 0) or fp32,
// as the reference's (q - 16) * d rounded once to the dtype (the product is exact in fp32). For
// one input pair a block gives 32 consecutive outputs of two rows of dst: vectorised with
// the GEMV's own unpacking where AVX512BW (or AVX2 + F16C) is there, else element by element.
#if defined(__AVX512BW__)
static inline void q5_store16(void *dst, int64_t at, __m512 w, int out_f32) {
    if (out_f32) {
        _mm512_storeu_ps((float *)dst + at, w);
        return;
    }
    __m512i u = _mm512_castps_si512(w);      // round to nearest even, as f32_to_bf16 (no NaN here)
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i *)((uint16_t *)dst + at), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#elif defined(KVO_Q5_AVX2)
static inline void q5_store8(void *dst, int64_t at, __m256 w, int out_f32) {
    if (out_f32) {
        _mm256_storeu_ps((float *)dst + at, w);
        return;
    }
    __m256i u = _mm256_castps_si256(w);      // round to nearest even, as f32_to_bf16 (no NaN here)
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    _mm_storeu_si128((__m128i *)((uint16_t *)dst + at), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}
#endif

int kvo_q5_dequant_t(const uint8_t *codes, const uint64_t *hbits, const uint16_t *scale, int64_t N, int64_t K,
                     int64_t n0, int64_t n1, void *dst, int out_f32, int threads) {
    if (N % 32 || K % 32 || n0 % 32 || n1 % 32 || n0 < 0 || n1 > N || n0 > n1) return -1;
    int64_t width = n1 - n0, K4 = K / 4, G = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < G; g++) {
        for (int64_t nb = n0 / 32; nb < n1 / 32; nb++) {
#if defined(__AVX512BW__)
            const __m512i odd = _mm512_set1_epi32((int)0xffff0000u);
            __m512 s[2], c[2];                   // d, and -Q5_OFFSET·d (exact: 144 = 9·16)
            for (int i = 0; i < 2; i++) {
                s[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + g * N + nb * 32 + i * 16)));
                c[i] = _mm512_mul_ps(_mm512_set1_ps(-Q5_OFFSET), s[i]);
            }
            for (int64_t t = g * 8; t < g * 8 + 8; t++) {
                __m512i w[4];
                q5_quad(codes + (nb * K4 + t) * 64, hbits + (nb * K4 + t) * 2, w);
                for (int i = 0; i < 4; i++) {       // (128 + q)·d - 144·d: (q - 16)·d exactly, one rounding
                    __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w[i], 16)), wo = _mm512_castsi512_ps(_mm512_and_si512(w[i], odd));
                    int64_t at = (4 * t + 2 * (i / 2)) * width + nb * 32 - n0 + (i % 2) * 16;
                    q5_store16(dst, at, _mm512_fmadd_ps(we, s[i % 2], c[i % 2]), out_f32);
                    q5_store16(dst, at + width, _mm512_fmadd_ps(wo, s[i % 2], c[i % 2]), out_f32);
                }
            }
#elif defined(KVO_Q5_AVX2)
            __m256 s[4], c[4];                   // d, and -Q5_OFFSET·d of rows 8v .. 8v+7
            for (int v = 0; v < 4; v++) {
                s[v] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g * N + nb * 32 + v * 8)));
                c[v] = _mm256_mul_ps(_mm256_set1_ps(-Q5_OFFSET), s[v]);
            }
            for (int64_t t = g * 8; t < g * 8 + 8; t++) {
                __m256i q[2][2];
                for (int half = 0; half < 2; half++) q5_half(codes + (nb * K4 + t) * 64, hbits + (nb * K4 + t) * 2, half, q[half]);
                for (int v = 0; v < 4; v++)
                    for (int e = 0; e < 2; e++) {
                        __m256 we, wo;
                        q5_rows8(q[v % 2][e], v, &we, &wo);
                        int64_t at = (4 * t + 2 * e) * width + nb * 32 - n0 + v * 8;
                        q5_store8(dst, at, _mm256_fmadd_ps(we, s[v], c[v]), out_f32);
                        q5_store8(dst, at + width, _mm256_fmadd_ps(wo, s[v], c[v]), out_f32);
                    }
            }
#else
            float s[32];
            for (int r = 0; r < 32; r++) s[r] = f16_to_f32(scale[g * N + nb * 32 + r]);
            for (int64_t t = g * 8; t < g * 8 + 8; t++) {
                const uint8_t *c = codes + (nb * K4 + t) * 64;
                const uint64_t h0 = hbits[(nb * K4 + t) * 2], h1 = hbits[(nb * K4 + t) * 2 + 1];
                float w[4][32];                     // [input 4t + e, row in block]
                for (int i = 0; i < 64; i++) {
                    int r = q5_row(i), e = q5_input(i);
                    int a = (c[i] & 0xf) | (int)((h0 >> i) & 1) << 4, b = (c[i] >> 4) | (int)((h1 >> i) & 1) << 4;
                    w[e][r] = (float)(a - 16) * s[r];
                    w[e + 2][r] = (float)(b - 16) * s[r];
                }
                for (int e = 0; e < 4; e++) {
                    int64_t at = (4 * t + e) * width + (nb * 32 - n0);
                    if (out_f32) memcpy((float *)dst + at, w[e], sizeof w[e]);
                    else
                        for (int r = 0; r < 32; r++) ((uint16_t *)dst)[at + r] = f32_to_bf16(w[e][r]);
                }
            }
#endif
        }
    }
    return 0;
}
