/* The per-layer elementwise work of a CPU decode step, one call each: RMSNorm and RoPE; and the
 * int8 rounding of a vector that the KV cache and the VNNI GEMMs share.
 *
 * Why: in torch each is 5-6 small ops (~20 µs at 16 tokens), 120 of them per SmolLM2 step, ~2 ms
 * of a ~40 ms step that the compressed and the dense model share. Here each is a single pass.
 * float32, rows contiguous; single-threaded below PARALLEL_MIN elements (a decode step's rows fit
 * in L1, where starting threads costs more than the work). Their row loops are also pieces of
 * the native decoder layer (decoder_layer.c, through lowrank_cpu.h).
 */
#include <math.h>
#include <stdint.h>

#include "lowrank_cpu.h"

#define PARALLEL_MIN (1 << 16)

typedef int32_t ivec_unaligned_e __attribute__((vector_size(LANES * sizeof(int32_t)), aligned(sizeof(float))));

/* y [T, C] = w ⊙ x · (mean(x²) + eps)^-½ row by row (HF's RMSNorm, computed in float32). */
void rmsnorm_shared(const float *x, const float *w, int64_t T, int64_t C, float eps, float *y)
{
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *row = x + t * C;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t c = 0; c < C; c++) squares += row[c] * row[c];
        const float inv = 1.0f / sqrtf(squares / (float)C + eps);
        float *out = y + t * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) out[c] = w[c] * (row[c] * inv);
    }
}

/* y [T, H, D] = x rotated by cos/sin [T, D], rotate-half convention: the first half of each head
 * pairs with the second (y₁ = x₁ cos₁ − x₂ sin₁, y₂ = x₂ cos₂ + x₁ sin₂). */
void rope_shared(const float *x, const float *cos_table, const float *sin_table, int64_t T, int64_t H, int64_t D,
                 float *y)
{
    const int64_t half = D / 2;
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) {
            const float *in = x + (t * H + h) * D, *cs = cos_table + t * D, *sn = sin_table + t * D;
            float *out = y + (t * H + h) * D;
#pragma omp simd
            for (int64_t d = 0; d < half; d++) {  /* both read before either is written: y may be x */
                const float first = in[d], second = in[d + half];
                out[d] = first * cs[d] - second * sn[d];
                out[d + half] = second * cs[d + half] + first * sn[d + half];
            }
        }
    }
}

void lowrank_cpu_rmsnorm(const float *x, const float *w, int64_t T, int64_t C, float eps, float *y, int threads)
{
#pragma omp parallel num_threads(threads) if (T * C >= PARALLEL_MIN)
    rmsnorm_shared(x, w, T, C, eps, y);
}

/* y == x rotates in place. */
void lowrank_cpu_rope(const float *x, const float *cos_table, const float *sin_table, int64_t T, int64_t H, int64_t D,
                      float *y, int threads)
{
#pragma omp parallel num_threads(threads) if (T * H * D >= PARALLEL_MIN)
    rope_shared(x, cos_table, sin_table, T, H, D, y);
}

/* x [n] as int8 levels q = round(x / d) (a true division, half to even), d = max|x| / 127 returned,
 * q clamped to [-127, 127] and 0 where d = 0: kernels/kv_quant.py's quantize_vectors and
 * kernels/quant.py's quantize_activations, which the tests hold every writer to. */
float quantize_int8(const float *x, int64_t n, int8_t *q)
{
    const ivec magnitude = (ivec){0} + 0x7fffffff;
    ivec most = {0}; /* max |x| lane by lane, as bits: for non-negative floats the integer order is the float order */
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const ivec a = *(const ivec_unaligned_e *)(x + i) & magnitude, larger = a > most;
        most = (a & larger) | (most & ~larger);
    }
    float amax = 0.0f;
    for (int j = 0; j < LANES; j++) amax = fmaxf(amax, ((union { ivec v; float f[LANES]; }){most}).f[j]);
    for (; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f, divisor = d > 0.0f ? d : 1.0f;
    for (i = 0; i < n; i++) {
        const float r = rintf(x[i] / divisor);
        q[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
    return d;
}
