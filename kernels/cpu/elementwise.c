/* The per-layer elementwise work of a CPU decode step, one call each: RMSNorm and RoPE.
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
