/* The q5 weight format (kvoffload/model/quant.py's Q5Linear), shared by decode.c (the GEMV)
 * and qweights.c (the prefill's dequantisation): 128 codes of one (block of 32 rows, quad of
 * inputs) -> four vectors of 32 bf16 weights, each 128 + q exactly (Q5_OFFSET - 16 = 128:
 * w = d·(q - 16) = d·((128 + q) - Q5_OFFSET)). Needs AVX512BW.
 *
 * Layout of a quad (64 bytes + two uint64): byte i = 16·l + e (l the 128-bit lane) holds in its
 * low nibble the low 4 bits of the code at input 4t + e % 2 of row r(i), in its high nibble that
 * at input 4t + 2 + e % 2, where r(i) = 4·l + (e % 8) / 2, + 16 when e >= 8; bit i of the first
 * / second uint64 is the fifth bit of the low / high nibble's code. Then vpunpck{l,h}bw of the
 * nibbles with 0x43 (bf16 0x4300 = 128, its 7 mantissa bits the code) gives, per 32-bit lane j,
 * row j (+16) at an input pair: no table lookup, no widening. */
#ifndef KVO_Q5_H
#define KVO_Q5_H

// Byte i of a quad: its row in the block (the layout above), and the input of the quad's four
// that its low nibble holds (its high nibble: that + 2). The packing and the scalar paths read
// these; the unpack below is their vector form.
static inline int q5_row(int i) { return 4 * (i / 16) + (i % 8) / 2 + (i % 16 >= 8 ? 16 : 0); }
static inline int q5_input(int i) { return i % 2; }

#if defined(__AVX512BW__)
#include <immintrin.h>
#include <stdint.h>

#define Q5_OFFSET 144.0f      /* the bf16 weights are 128 + q = (q - 16) + 144 */

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

#endif
#endif
