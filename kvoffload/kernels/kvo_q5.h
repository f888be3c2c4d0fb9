/* The q5 weight format (kvoffload/model/quant.py's Q5Linear), shared by decode.c (the GEMV)
 * and qweights.c (the prefill's dequantisation): 64 codes of one (block, input pair) -> two
 * vectors of 32 bf16 weights, q - 16 exactly. Needs AVX512BW (vpermw). */
#ifndef KVO_Q5_H
#define KVO_Q5_H
#if defined(__AVX512BW__)
#include <immintrin.h>
#include <stdint.h>

// q5: bf16(q - 16) for q = 0..31, the table vpermw reads a code's value from (5 index bits).
static const uint16_t Q5_BF16[32] = {
    0xc180, 0xc170, 0xc160, 0xc150, 0xc140, 0xc130, 0xc120, 0xc110, 0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040,
    0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130,
    0x4140, 0x4150, 0x4160, 0x4170};

// 64 codes of one (block, input pair) -> two vectors of 32 bf16 weights, q - 16 exactly: *lo rows
// 0..15 of the block, *hi rows 16..31, word 2i / 2i+1 the row's weight at input 2p / 2p+1.
static inline void q5_pair(const uint8_t *c, uint64_t h, __m512i table, __m512i *lo, __m512i *hi) {
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)c));
    __m512i a = _mm512_and_si512(v, _mm512_set1_epi16(15)), b = _mm512_srli_epi16(v, 4), sixteen = _mm512_set1_epi16(16);
    a = _mm512_mask_add_epi16(a, (__mmask32)h, a, sixteen);
    b = _mm512_mask_add_epi16(b, (__mmask32)(h >> 32), b, sixteen);
    *lo = _mm512_permutexvar_epi16(a, table);
    *hi = _mm512_permutexvar_epi16(b, table);
}

#endif
#endif
