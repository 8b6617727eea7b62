/* One decode step of a whole Llama-family decoder layer on CPU in one call:
 *   x += o_proj(attention(rope(q_proj(norm(x))), cache ∪ {rope(k_proj(norm(x))), v_proj(norm(x))}))
 *   x += down_proj(silu(gate_proj(norm'(x))) · up_proj(norm'(x)))
 * for T sequences of one new token each, every projection dense or factorised (x·Bᵀ)·Aᵀ.
 *
 * Why: the same step through torch and one native call per operation costs ~17 ms of framework
 * overhead per SmolLM2 step at batch 16 on a 2-core Zen 3 (~25 calls, 12 thread-team start-ups
 * and a dozen tensor allocations per layer, measured on a 30-layer model with 64-wide layers), as
 * much as the dense model's attention and head together, and the compressed and the dense model
 * pay it alike. Here a layer is one OpenMP parallel region whose phases are the work-shared pieces
 * of gemm.c, attention.c and elementwise.c, separated by their barriers.
 *
 * Layouts: x [T, hidden] (updated in place); cos/sin [T, head_dim]; slots int64 [T] (cache slot
 * of each new token: block * block_size + offset); caches [num_blocks, block_size, Hkv, D] of
 * cache_bits 32 (float32), 16 (float16, rounded to nearest even as torch rounds) or 8 (int8 with
 * their scale pools [num_blocks, block_size, Hkv], kernels/kv_quant.py: the new vectors are rounded
 * here by quantize_int8, exactly as quantize_vectors rounds them); block_tables int32
 * [T, table_stride]; context_lens int32 [T] (the new token included).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowrank_cpu.h"

/* y [M, N] = x [M, K] through a dense or factorised projection; `low` [M, R] holds x·Bᵀ. A dense
 * one with `barrier` 0 lets each thread go on to the next projection of the same input when its
 * own tiles are done (gemm_shared); a factorised one always ends in a barrier, as the next one
 * writes `low` again. */
static void linear_shared(const cpu_linear *l, const float *x, int64_t M, int64_t K, int64_t N, float *low, float *y,
                          int barrier)
{
    if (l->rank)
        lowrank_shared(x, M, K, &l->down, l->rank, &l->up, N, l->bias, low, y);
    else
        gemm_shared(x, K, M, K, &l->weight, N, y, N, l->bias, barrier);
}

/* x += y, row by row, with no barrier after: its rows are split among the threads as
 * rmsnorm_shared's are (both static over T rows), so the norm that follows reads only rows its
 * own thread has added. */
static void add_rows_shared(float *x, const float *y, int64_t T, int64_t C)
{
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++) x[t * C + c] += y[t * C + c];
}

/* g = silu(g) · u = g · σ(g) · u, with σ from e^-|g| (never overflows): σ = 1/(1+e) for g >= 0,
 * e/(1+e) below. */
static void silu_mul_shared(float *g, const float *u, int64_t T, int64_t I)
{
    const ivec sign = (ivec){0} + (int32_t)0x80000000;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *gr = g + t * I;
        const float *ur = u + t * I;
        int64_t i = 0;
        for (; i + LANES <= I; i += LANES) {
            const vec a = *(const vec_unaligned *)(gr + i);
            const vec e = exp_nonpositive((vec)((ivec)a | sign));
            const ivec positive = a >= 0.0f;
            const vec numerator = (vec)((positive & (ivec)(e - e + 1.0f)) | (~positive & (ivec)e));
            *(vec_unaligned *)(gr + i) = a * (numerator / (1.0f + e)) * *(const vec_unaligned *)(ur + i);
        }
        for (; i < I; i++) gr[i] = gr[i] / (1.0f + expf(-gr[i])) * ur[i];
    }
}

/* The new tokens' K and V rows [T, Hkv, D] into their cache slots, in the cache's format. */
static void write_cache_shared(const float *k, const float *v, const int64_t *slots, int64_t T, int64_t Hkv,
                               int64_t D, void *k_cache, void *v_cache, int64_t bits, float *k_scales,
                               float *v_scales)
{
    const int64_t kv = Hkv * D;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        if (bits == 32) {
            memcpy((float *)k_cache + slots[t] * kv, k + t * kv, sizeof(float) * kv);
            memcpy((float *)v_cache + slots[t] * kv, v + t * kv, sizeof(float) * kv);
            continue;
        }
        if (bits == 16) {
            lowrank_cpu_float_to_half(k + t * kv, kv, (uint16_t *)k_cache + slots[t] * kv);
            lowrank_cpu_float_to_half(v + t * kv, kv, (uint16_t *)v_cache + slots[t] * kv);
            continue;
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = slots[t] * Hkv + h;
            k_scales[row] = quantize_int8(k + t * kv + h * D, D, (int8_t *)k_cache + row * D);
            v_scales[row] = quantize_int8(v + t * kv + h * D, D, (int8_t *)v_cache + row * D);
        }
    }
}

static int64_t max_rank(const cpu_decoder_layer *L)
{
    const cpu_linear *all[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    int64_t most = 0;
    for (int i = 0; i < 7; i++) most = all[i]->rank > most ? all[i]->rank : most;
    return most;
}

/* Returns 0; -1 when the attention kernel does not take these head sizes or the cache format, -2
 * when a slot, a length or a block id lies outside the cache or the tables (checked before anything
 * is written), -3 when the scratch memory cannot be had. */
int lowrank_cpu_decoder_layer(const cpu_decoder_layer *L, float *x, int64_t T, const float *cos_table,
                              const float *sin_table, const int64_t *slots, void *k_cache, void *v_cache,
                              int64_t cache_bits, float *k_scales, float *v_scales, int64_t num_blocks,
                              int64_t block_size,
                              const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens,
                              int threads)
{
    const int64_t C = L->hidden, I = L->intermediate, Hq = L->num_heads, Hkv = L->num_kv_heads, D = L->head_dim;
    if (!lowrank_cpu_paged_decode_supports(Hq, Hkv, D) || D % 2 || !cache_format_valid(cache_bits, k_scales, v_scales))
        return -1;
    if (check_tables(block_tables, table_stride, context_lens, T, block_size, num_blocks)) return -2;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_blocks * block_size) return -2;

    /* per row: h [C], q [Hq D], k, v [Hkv D], attention [Hq D], projection out [C], gate, up [I], x·Bᵀ [R] */
    const int64_t width = 2 * C + 2 * Hq * D + 2 * Hkv * D + 2 * I + max_rank(L);
    float *scratch = malloc(sizeof(float) * T * width);
    if (!scratch) return -3;
    float *h = scratch, *q = h + T * C, *k = q + T * Hq * D, *v = k + T * Hkv * D, *att = v + T * Hkv * D;
    float *proj = att + T * Hq * D, *gate = proj + T * C, *up = gate + T * I, *low = up + T * I;
    const int64_t kv = Hkv * D;

#pragma omp parallel num_threads(threads)
    {
        rmsnorm_shared(x, L->input_norm, T, C, L->eps, h);
        linear_shared(&L->q, h, T, C, Hq * D, low, q, 0); /* q, k, v: one barrier after the three */
        linear_shared(&L->k, h, T, C, kv, low, k, 0);
        linear_shared(&L->v, h, T, C, kv, low, v, 1);
        rope_shared(q, cos_table, sin_table, T, Hq, D, q, 0);
        rope_shared(k, cos_table, sin_table, T, Hkv, D, k, 1);
        write_cache_shared(k, v, slots, T, Hkv, D, k_cache, v_cache, cache_bits, k_scales, v_scales);
        paged_decode_shared(q, k_cache, v_cache, cache_bits, k_scales, v_scales, block_tables, table_stride,
                            context_lens, T, Hq, Hkv, D, block_size, L->window, 1.0f / sqrtf((float)D), att);
        linear_shared(&L->o, att, T, Hq * D, C, low, proj, 1);
        add_rows_shared(x, proj, T, C);
        rmsnorm_shared(x, L->post_norm, T, C, L->eps, h);
        linear_shared(&L->gate, h, T, C, I, low, gate, 0);
        linear_shared(&L->up, h, T, C, I, low, up, 1);
        silu_mul_shared(gate, up, T, I);
        linear_shared(&L->down, gate, T, I, C, low, proj, 1);
        add_rows_shared(x, proj, T, C); /* the region's end is the barrier */
    }
    free(scratch);
    return 0;
}
