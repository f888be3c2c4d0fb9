/* The q5 weight format (kvoffload/model/quant.py's Q5Linear), shared by decode.c (the GEMV)
 * and qweights.c (the prefill's dequantisation): 128 codes of one (block of 32 rows, quad of
 * inputs) -> four vectors of 32 bf16 weights, each 128 + q exactly (Q5_OFFSET - 16 = 128:
 * w = d·(q - 16) = d·((128 + q) - Q5_OFFSET)). Needs AVX512BW, or AVX2 + F16C (below).
 *
 * Layout of a quad (64 bytes + two uint64): byte i = 16·l + e (l the 128-bit lane) holds in its
 * low nibble the low 4 bits of the code at input 4t + e % 2 of row r(i), in its high nibble that
 * at input 4t + 2 + e % 2, where r(i) = 4·l + (e % 8) / 2, + 16 when e >= 8; bit i of the first
 * / second uint64 is the fifth bit of the low / high nibble's code. Then vpunpck{l,h}bw of the
 * nibbles with 0x43 (bf16 0x4300 = 128, its 7 mantissa bits the code) gives, per 32-bit lane j,
 * row j (+16) at an input pair: no table lookup, no widening.
 *
 * Without AVX512BW (AVX2 + F16C: KVO_Q5_AVX2) a quad is taken in halves of 32 bytes (lanes 0-1
 * and 2-3); the same byte interleaving per 128-bit lane gives the same bf16 pairs, 8 rows a
 * vector (q5_half below), and the fifth bits become a byte mask by a shuffle and a compare. */
#ifndef KVO_Q5_H
#define KVO_Q5_H

// Byte i of a quad: its row in the block (the layout above), and the input of the quad's four
// that its low nibble holds (its high nibble: that + 2). The packing and the scalar paths read
// these; the unpack below is their vector form.
static inline int q5_row(int i) { return 4 * (i / 16) + (i % 8) / 2 + (i % 16 >= 8 ? 16 : 0); }
static inline int q5_input(int i) { return i % 2; }

#define Q5_OFFSET 144.0f      /* the bf16 weights are 128 + q = (q - 16) + 144 */

#if defined(__AVX512BW__)
#include <immintrin.h>
#include <stdint.h>


// One quad -> w[0] rows 0..15 at inputs (4t, 4t+1), w[1] rows 16..31 at them, w[2] / w[3] the
// same at inputs (4t+2, 4t+3): 32-bit lane j of w[i] holds row j (+16) as bf16 (128 + q) pairs.
static inline void q5_quad(const uint8_t *c, const uint64_t *h, __m512i w[4]) {
    const __m512i b = _mm512_loadu_si512((const void *)c), lo4 = _mm512_set1_epi8(15);
    const __m512i e = _mm512_set1_epi8(0x43), sixteen = _mm512_set1_epi8(16);
    __m512i lo = _mm512_and_si512(b, lo4);
    __m512i hi = _mm512_srli_epi16(_mm512_xor_si512(b, lo), 4);     // the high nibbles, no carry across bytes
    lo = _mm512_mask_add_epi8(lo, (__mmask64)h[0], lo, sixteen);
    hi = _mm512_mask_add_epi8(hi, (__mmask64)h[1], hi, sixteen);
    w[0] = _mm512_unpacklo_epi8(lo, e);
    w[1] = _mm512_unpackhi_epi8(lo, e);
    w[2] = _mm512_unpacklo_epi8(hi, e);
    w[3] = _mm512_unpackhi_epi8(hi, e);
}

#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>

#define KVO_Q5_AVX2 1

// Byte i of the result: 16 where bit i of bits is set, else 0.
static inline __m256i q5_bits16(uint32_t bits) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), pick), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

// Half `half` (bytes 32·half ..) of one quad -> its codes as bytes, 0..31: codes[0] the low
// nibbles' (inputs 4t, 4t+1), codes[1] the high nibbles' (4t+2, 4t+3).
static inline void q5_half(const uint8_t *c, const uint64_t *h, int half, __m256i codes[2]) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)(c + 32 * half));
    const __m256i l = _mm256_and_si256(b, _mm256_set1_epi8(15));
    const __m256i u = _mm256_srli_epi16(_mm256_xor_si256(b, l), 4);   // the high nibbles, no carry across bytes
    codes[0] = _mm256_or_si256(l, q5_bits16((uint32_t)(h[0] >> (32 * half))));
    codes[1] = _mm256_or_si256(u, q5_bits16((uint32_t)(h[1] >> (32 * half))));
}

// Vector v (0..3) of a quad, rows 8v .. 8v+7 (half v % 2; the low (v < 2) or high bytes of each
// lane), from q5_half's codes of its half (codes[0] or codes[1]: an input pair) -> lane j of *we /
// *wo: row 8v + j at the pair's even / odd input as fp32 128 + q (the bf16 pair's low / high half).
static inline void q5_rows8(__m256i codes, int v, __m256 *we, __m256 *wo) {
    const __m256i e = _mm256_set1_epi8(0x43);
    const __m256i w = v < 2 ? _mm256_unpacklo_epi8(codes, e) : _mm256_unpackhi_epi8(codes, e);
    *we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    *wo = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xffff0000u)));
}

#endif
#endif
