/* The native CPU kernels' one interface, in two parts.
 *
 * The ABI (below, down to "internal"): the constants, the layer struct and every function the
 * library exports. kernels/cpu/build.py reads the prototypes from this file to declare them to
 * ctypes, and Python reads the constants and the struct's layout from the library itself
 * (lowrank_cpu_constant), so nothing here is written twice; tests/test_cpu_native.py checks the
 * ctypes mirror of the struct (kernels/cpu/decoder_layer.py) against the library's offsets.
 *
 * The internal pieces that decoder_layer.c composes into one call per decoder layer. Each is
 * work-shared among the threads of the enclosing OpenMP parallel region (an orphaned `omp for`,
 * with the implicit barrier at its end), so a layer is one parallel region instead of one per
 * operation. Hidden: only the lowrank_cpu_* entry points leave the library. */
#ifndef LOWRANK_CPU_H
#define LOWRANK_CPU_H
#include <stdint.h>

#define PANEL 16         /* output columns per panel of the packed weight layout (gemm.c) */
#define MAX_GROUP 32     /* query heads per KV head the attention kernel takes */
#define MAX_HEAD_DIM 256 /* the largest head size it takes */
#define HEAD_DIM_MULTIPLE 16 /* head sizes it takes: a multiple of every ISA's LANES, so a model takes
                              * the same path on every machine */

typedef struct {
    const void *data;     /* W [N, K] as panels (gemm.c): float [K][PANEL], int8 levels [K][PANEL], or
                           * int4 levels [ceil(K/2)][PANEL] bytes (k even in the low nibble, stored +8) */
    const float *scales;  /* int8 / int4: [panels][ceil(K/group)][PANEL], one per group of inputs; else NULL */
    int64_t bits;         /* 32 (float), 8 or 4 */
    int64_t group;        /* inputs per scale (even); 0 for float */
    int64_t activations;  /* 8: the rows of x are rounded to int8 per group of inputs and multiplied in
                           * integers where the host has VNNI (gemm.c); 32: float32 activations */
} cpu_weight;

typedef struct {
    cpu_weight weight;    /* dense W [N, K]; data NULL when factorised */
    cpu_weight down, up;  /* factorised: B [R, K] and A [N, R] */
    const float *bias;    /* [N] or NULL */
    int64_t rank;         /* R; 0 when dense */
} cpu_linear;

typedef struct {
    cpu_linear q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm; /* RMSNorm weights [hidden] */
    float eps;
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim;
    int64_t window; /* sliding window in tokens; 0: none */
} cpu_decoder_layer;

/* exported: one prototype per line, the only lines build.py reads */
int64_t lowrank_cpu_constant(const char *name);
void lowrank_cpu_linear(const float *x, int64_t M, int64_t K, const cpu_weight *w, int64_t N, const float *bias, float *y, int threads);
void lowrank_cpu_lowrank(const float *x, int64_t M, int64_t K, const cpu_weight *b, int64_t R, const cpu_weight *a, int64_t N, const float *bias, float *scratch, float *y, int threads);
void lowrank_cpu_rmsnorm(const float *x, const float *w, int64_t T, int64_t C, float eps, float *y, int threads);
void lowrank_cpu_rope(const float *x, const float *cos_table, const float *sin_table, int64_t T, int64_t H, int64_t D, float *y, int threads);
int lowrank_cpu_paged_decode_supports(int64_t Hq, int64_t Hkv, int64_t D);
int lowrank_cpu_paged_decode(const float *q, const void *k_cache, const void *v_cache, int64_t cache_bits, const float *k_scales, const float *v_scales, const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size, int64_t num_blocks, int64_t window, float scale, float *out, int threads);
void lowrank_cpu_half_to_float(const uint16_t *h, int64_t n, float *f);
void lowrank_cpu_float_to_half(const float *f, int64_t n, uint16_t *h);
int lowrank_cpu_decoder_layer(const cpu_decoder_layer *L, float *x, int64_t T, const float *cos_table, const float *sin_table, const int64_t *slots, void *k_cache, void *v_cache, int64_t cache_bits, float *k_scales, float *v_scales, int64_t num_blocks, int64_t block_size, const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens, int threads);
/* end exported */

/* internal */

#define HIDDEN __attribute__((visibility("hidden")))

/* One vector register of LANES floats: vectors wider than the host's registers spill every
 * operation to the stack (AVX-512-sized vectors on a Zen 3 ran the GEMM at 10 GFLOP/s instead of
 * ~120, and decode attention at 18 ms per SmolLM2 step at batch 16 instead of ~8). */
#if defined(__AVX512F__)
#define LANES 16 /* 32 zmm registers */
#elif defined(__AVX__)
#define LANES 8 /* 16 ymm registers */
#else
#define LANES 4 /* SSE's 16 xmm or NEON's 32 q registers */
#endif

/* VNNI (vpdpbusd): per 32-bit lane, four u8 x s8 products summed into an int32, four times the
 * multiply-adds of a float FMA per instruction. gemm.c multiplies int8 / int4 weights by int8
 * activations with it where a weight asks for that (cpu_weight.activations). */
#if LANES == 16 && defined(__AVX512VNNI__)
#define VNNI 1
#elif LANES == 8 && defined(__AVXVNNI__)
#define VNNI 1
#else
#define VNNI 0
#endif
/* Software prefetches ask for every cache level (prefetcht0): on an Intel Xeon (AVX-512) the
 * non-temporal hint (prefetchnta, which the Zen 3 they were first tuned on served as well) held
 * the weight stream of a batch-1 GEMV to under half the bandwidth prefetcht0 reaches, in
 * alternating runs (issue 20's notes). */
#define PREFETCH_LOCALITY 3

#define VNNI_MIN_ROWS 4 /* fewer rows are bound by the weights' bytes: the float path serves them */

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef float vec_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

/* e^x for x <= 0, LANES at once: Cephes' expf (2^n times a degree-6 polynomial on |r| <= ln2/2),
 * within 2 ulp; below -87 (e^x < 2^-126) it gives ~1e-38. */
static inline vec exp_nonpositive(vec x)
{
    const vec lowest = x - x - 87.0f;
    const ivec low = x < lowest;
    x = (vec)(((ivec)x & ~low) | ((ivec)lowest & low));
    const vec shifter = x - x + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vec t = x * 1.44269504088896341f + shifter;
    const vec n = t - shifter;
    const vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const ivec two_n = ((ivec)t - (ivec)shifter + 127) << 23; /* 2^n from n's integer bits */
    return p * (vec)two_n;
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) · Wᵀ + bias (may be NULL), W packed as panels.
 * With `barrier` 0 a thread goes on as soon as its own tiles are done (y is whole only after the
 * team's next barrier): for the independent projections of one input. */
HIDDEN void gemm_shared(const float *x, int64_t ldx, int64_t M, int64_t K, const cpu_weight *w, int64_t N, float *y,
                        int64_t ldy, const float *bias, int barrier);

/* y [M, N] = (x [M, K] · Bᵀ) · Aᵀ + bias, B [R, K] and A [N, R] packed; scratch [M, R] holds x·Bᵀ. */
HIDDEN void lowrank_shared(const float *x, int64_t M, int64_t K, const cpu_weight *b, int64_t R,
                           const cpu_weight *a, int64_t N, const float *bias, float *scratch, float *y);

/* The paged decode attention over (sequence, KV head) pairs; the tables already checked. Caches of
 * cache_bits 32 (float32), 16 (float16) or 8 (int8, with their scale pools: kernels/kv_quant.py). */
HIDDEN void paged_decode_shared(const float *q, const void *k_cache, const void *v_cache, int64_t cache_bits,
                                const float *k_scales,
                                const float *v_scales, const int32_t *block_tables, int64_t table_stride,
                                const int32_t *context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                                int64_t block_size, int64_t window, float scale, float *out);

/* Whether cache_bits names a cache format (32, 16, or 8 with both scale pools, and only then). */
HIDDEN int cache_format_valid(int64_t bits, const float *k_scales, const float *v_scales);

/* 0 when every block a sequence reads lies in the cache and every length within its table, else -2. */
HIDDEN int check_tables(const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens, int64_t B,
                        int64_t block_size, int64_t num_blocks);

/* x [n] rounded to int8 levels q (d = max|x| / 127, q = round(x / d)); returns d (elementwise.c). */
HIDDEN float quantize_int8(const float *x, int64_t n, int8_t *q);

HIDDEN void rmsnorm_shared(const float *x, const float *w, int64_t T, int64_t C, float eps, float *y);
HIDDEN void rope_shared(const float *x, const float *cos_table, const float *sin_table, int64_t T, int64_t H,
                        int64_t D, float *y, int barrier); /* barrier: as gemm_shared's */
#endif
