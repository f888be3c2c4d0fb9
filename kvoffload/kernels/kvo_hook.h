/* Calls between the separately built kernels (each source is its own shared object):
 *   - kvo_paged_driver: paged_attn.c's kvo_paged_attn_v_* (untyped k/v), called by select.c's
 *     one-call sparse step and by kvo_paged_hook below;
 *   - kvo_attn_hook: a decode layer's attention as decode.c's kvo_layer_decode calls it between
 *     its two halves, so that a dense decode layer is one call from Python (the in-memory
 *     backend's prepared call: kvo_paged_hook over a kvo_paged_call, kernels/paged.py; the tiered
 *     backend's layer over RAM: kvo_paged_pair_hook over a kvo_paged_pair; either behind
 *     kvo_convert_hook over a kvo_convert where the KV dtype is not the activations'). */
#ifndef KVO_HOOK_H
#define KVO_HOOK_H
#include <stdint.h>

typedef int (*kvo_paged_driver)(int H_kv, int G, int D, int bs, int n_app, const void *k_new, int64_t k_bs,
        const void *v_new, int64_t v_bs, const int64_t *app_slot, const int64_t *app_col, int N,
        const float *q, int64_t q_rs, const int64_t *item_row, const int64_t *item_first,
        const int64_t *item_last, const int64_t *blk, const uint64_t *tmask, float scale,
        float *part_o, float *part_lse, int R, const int64_t *row_first, const int64_t *order,
        float *out, float *lse, int threads, int vgroup);

/* q [M, H, D] fp32 (row stride q_rs floats); k / v: the M new tokens' [H_kv, D] in the KV dtype
 * (row stride kv_rs elements), appended before attending; -> out [M, H, D], lse [M, H] fp32,
 * contiguous. 0, or the callee's error code. */
typedef int (*kvo_attn_fn)(const void *ctx, int M, const float *q, int64_t q_rs, const void *k, const void *v,
                           int64_t kv_rs, float *out, float *lse);
typedef struct {
    kvo_attn_fn fn;
    const void *ctx;
} kvo_attn_hook;

/* A prepared paged-kernel call (kernels/paged.py's PreparedCall: _PagedCall, the same fields
 * in the same order): everything but the per-call q, k/v, out and lse. */
typedef struct {
    kvo_paged_driver driver;
    int32_t H_kv, G, D, bs, n_app, N, R, threads, vgroup;
    float scale;
    const int64_t *app_slot, *app_col, *item_row, *item_first, *item_last, *blk;
    const uint64_t *tmask;
    float *part_o, *part_lse;
    const int64_t *row_first, *order;
} kvo_paged_call;

/* Two prepared calls and one merge (kernels/paged.py's PairedCall): `first` appends the new
 * tokens (its parts: rows [0, first->N) of part_o / part_lse), `second` (NULL: none; no append)
 * attends other blocks, possibly of another dtype (rows [first->N, first->N + second->N)); then
 * rows row_first[r] .. row_first[r+1] of `order` merge into output row r (R rows, H heads x D). */
typedef struct {
    const kvo_paged_call *first, *second;
    int32_t R, H, D, threads;
    const int64_t *row_first, *order;
    const float *part_o, *part_lse;
} kvo_paged_pair;

/* M rows of n elements at src (row stride rs elements, the activation dtype) -> dst [M, n] (the
 * KV dtype), rounded as torch's .to() rounds: paged_attn.c's kvo_cvt_<from>_<to>. */
typedef void (*kvo_cvt_fn)(const void *src, int64_t rs, int M, int n, void *dst);

/* A hook whose new tokens' k/v come in another dtype than the KV's (kernels/hook.py's
 * KVConvert): paged_attn.c's kvo_convert_hook converts them with cvt into buf ([2, rows, n] of
 * the KV dtype: k's rows, then v's), then calls inner. n = H_kv * D. */
typedef struct {
    kvo_attn_hook inner;
    kvo_cvt_fn cvt;
    int32_t rows, n, itemsize;
    void *buf;
} kvo_convert;
#endif
