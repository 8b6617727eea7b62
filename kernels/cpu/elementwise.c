/* The per-layer elementwise work of a CPU decode step, one call each: RMSNorm and RoPE; the
 * int8 rounding of a vector that the KV cache and the VNNI GEMMs share; and the float16 <-> float32
 * conversions of a float16 KV cache.
 *
 * Why: in torch each is 5-6 small ops (~20 µs at 16 tokens), 120 of them per SmolLM2 step, ~2 ms
 * of a ~40 ms step that the compressed and the dense model share. Here each is a single pass.
 * float32, rows contiguous; single-threaded below PARALLEL_MIN elements (a decode step's rows fit
 * in L1, where starting threads costs more than the work). Their row loops are also pieces of
 * the native decoder layer (decoder_layer.c, through lowrank_cpu.h).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lowrank_cpu.h"
#if LANES == 16 || (LANES == 8 && defined(__F16C__))
#include <immintrin.h>
#define NEAREST_EVEN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#endif

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
                 float *y, int barrier)
{
    const int64_t half = D / 2;
#pragma omp for collapse(2) schedule(static) nowait
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
    if (barrier) {
#pragma omp barrier
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
    rope_shared(x, cos_table, sin_table, T, H, D, y, 1);
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

/* IEEE binary16 (as its bits) <-> binary32, n values: exact one way and rounded to nearest even the
 * other, as torch's .float() and .to(torch.float16) are (subnormals, infinities and NaN included),
 * so the native writer of a float16 KV cache stores what the torch one stores. One instruction per
 * LANES values where the ISA converts (AVX-512F; F16C beside AVX2); aarch64 through its __fp16
 * type (fcvtl / fcvtn once vectorised); elsewhere (SSE2) by the bit manipulation below, after
 * F. Giesen's half_to_float and float_to_half_fast3_rtne. */
#if !defined(__aarch64__)
static inline float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float half_bits_to_float(uint16_t h)
{
    const uint32_t exponent_mask = 0x7c00u << 13;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13; /* exponent and mantissa into place */
    const uint32_t exponent = o & exponent_mask;
    o += (uint32_t)(127 - 15) << 23; /* rebias */
    if (exponent == exponent_mask)
        o += (uint32_t)(128 - 16) << 23; /* infinity or NaN: the largest exponent */
    else if (exponent == 0)                /* zero or subnormal: renormalised by a float subtraction */
        o = float_bits(bits_float(o + (1u << 23)) - bits_float(113u << 23));
    return bits_float(o | (uint32_t)(h & 0x8000u) << 16);
}

static inline uint16_t float_to_half_bits(float x)
{
    uint32_t f = float_bits(x);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint16_t o;
    if (f >= (uint32_t)(127 + 16) << 23) /* past the largest half: infinity, or a quiet NaN */
        o = f > 255u << 23 ? 0x7e00 : 0x7c00;
    else if (f < 113u << 23) { /* a half subnormal or zero: the float addition rounds to nearest even */
        const float magic = bits_float((uint32_t)((127 - 15) + (23 - 10) + 1) << 23);
        o = (uint16_t)(float_bits(bits_float(f) + magic) - float_bits(magic));
    } else {
        const uint32_t odd = (f >> 13) & 1; /* the kept mantissa's last bit: ties go to even */
        f += ((uint32_t)(15 - 127) << 23) + 0xfff + odd;
        o = (uint16_t)(f >> 13);
    }
    return o | (uint16_t)(sign >> 16);
}
#endif

void lowrank_cpu_half_to_float(const uint16_t *h, int64_t n, float *f)
{
    int64_t i = 0;
#if LANES == 16
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#elif LANES == 8 && defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
#if defined(__aarch64__)
    for (; i < n; i++) f[i] = (float)((const __fp16 *)h)[i];
#else
    for (; i < n; i++) f[i] = half_bits_to_float(h[i]);
#endif
}

void lowrank_cpu_float_to_half(const float *f, int64_t n, uint16_t *h)
{
    int64_t i = 0;
#if LANES == 16
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(h + i), _mm512_cvtps_ph(_mm512_loadu_ps(f + i), NEAREST_EVEN));
#elif LANES == 8 && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), NEAREST_EVEN));
#endif
#if defined(__aarch64__)
    for (; i < n; i++) ((__fp16 *)h)[i] = (__fp16)f[i];
#else
    for (; i < n; i++) h[i] = float_to_half_bits(f[i]);
#endif
}
