/* CPU GEMMs for the engine's linears at every batch size: y = x·Wᵀ (+ bias), and the fused
 * low-rank y = (x·Bᵀ)·Aᵀ (+ bias) whose rank-r intermediate never leaves the cache.
 *
 * Why our own: at decode sizes (1-64 rows) oneDNN spends ~16 µs per call building its primitive
 * descriptor and MKL's small-M path runs at a third of peak, so a factorised layer (two small
 * GEMMs) gained nothing over the dense one it replaces. This kernel is one loop nest that GCC
 * vectorises for the host (-march=native): ~1 µs per call, the DRAM bandwidth at 1 row, and
 * oneDNN's speed at prefill sizes.
 *
 * Weight layout ("panels"): W [N, K] is stored as ceil(N/16) panels of [K][16] floats, panel p
 * holding output columns 16p..16p+15 (zero-padded past N), so the inner loop reads the weight as
 * one contiguous stream. A tile is R rows x 1 panel held in vector accumulators (one lane per
 * output column): per k, one load of the panel's 16 weights and one FMA per row and register with
 * x[m][k] broadcast. R is what the host's vector registers hold (ONE_PANEL_ROWS below): 16 with
 * AVX-512, where float tiles are 8 rows x 2 panels instead, or x 3 panels from 8 rows (and
 * quantised ones 8 x 2 from 9 rows); 6 with AVX2, a panel row taking two of its 16 registers. The row tiles of a panel run back to
 * back, so it comes from DRAM once and from L2 after; above 128 rows, in 128-row blocks. Tiles are
 * split across OpenMP threads (the runtime torch uses). The native decoder layer (decoder_layer.c)
 * calls `gemm_shared` directly.
 *
 * Quantised weights (weight-only, kernels/quant.py's levels) keep the same panels with the levels
 * in place of the floats, 4 (int8) or 8 (int4) inputs of a column per 32-bit word: int8 as
 * [ceil(K/4)][16] words, int4 as [ceil(K/8)][16], and beside them the group scales as
 * [ceil(K/group)][16] floats per panel. Decode reads 1 or 0.5 byte per weight (plus 4/group for the scale) instead of 4: the
 * levels are widened and scaled in registers, the activations and the accumulation stay float32.
 *
 * Integer products (VNNI hosts, weights packed with activations = 8): from VNNI_MIN_ROWS rows, where
 * the multiply-adds and not the weights' bytes bound the step, x is rounded to int8 per group of the
 * weight's inputs (d_x = max|x| / 127, llama.cpp's Q8_0 activations) and each group's products are
 * summed in int32 by vpdpbusd, 4 multiply-adds per lane per instruction against an FMA's one, then
 * scaled once by d_w·d_x. vpdpbusd multiplies unsigned by signed bytes: the weight levels are made
 * unsigned by an XOR with 0x80 (w + 128), and 128·Σ q_x, computed as x is rounded, taken off each
 * group's sum. int4 levels unpack to 16·w (a nibble moved to a byte's top), the 16 folded into the
 * scale; their activations are stored each 8 inputs as the even ones then the odd ones, the order
 * the low and high nibbles come out in. A factorised layer's rank-r intermediate is rounded again
 * for A. kernels/quant.py's quantize_activations is the reference.
 *
 * Built and loaded by kernels/cpu/build.py; packing and dispatch are in kernels/cpu/gemm.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowrank_cpu.h"
#if VNNI || defined(__SSSE3__)
#include <immintrin.h>
#endif

#define MAX_ROWS 16
#define MAX_TILES 3 /* adjacent panels per tile (AVX-512) */
#define ROW_BLOCK 128 /* rows per tile at prefill sizes: 128 x K floats stay in L2 */
#define PREFETCH 64 /* cache lines of weights fetched ahead of the FMAs */
#define LINE 64

/* Rows per tile: the accumulators (rows x vectors per panel row), the panel row and one broadcast
 * must fit the vector registers (LANES, lowrank_cpu.h). Measured on a 2-core Zen 3 (AVX2) at
 * 16 x 1536 x 576: the AVX-512 tile (16 rows, as 32 accumulators of 8 floats) ran at 10 GFLOP/s,
 * 6 rows at ~120. No two-panel tiles below AVX-512 (TWO_PANEL_ROWS 0): 2 rows x 2 panels would be
 * bound by its loads. Quantised weights hold their group's scales in registers too, so below
 * AVX-512 their tiles are shorter (QUANT_ROWS).
 *
 * With AVX-512, float weights take two-panel tiles at every row count: a thread then streams two
 * panels at once, and on the Xeon (cold SmolLM2 weights, alternating builds) that drew 14 % more
 * bandwidth at 1 row than one panel, 20-25 % more at 2-8 rows, and 5-8 % at 16, the 16 x 1 tile's
 * 17 loads per 16 FMAs becoming 10. Quantised ones from QUANT_TWO_PANEL_MIN rows: below it the
 * one-panel tiles, which fold their scales with more chains, were faster (int8: 5.2 against 6.2 ms
 * for 30 layers' projections at 2 rows, 7.5 against 8.4 at 8; at 16 rows 14.7 against 13.3).
 * Float ones take three panels from THREE_PANEL_MIN rows: 24 accumulators, 3 weight loads and 8
 * broadcasts per 24 FMAs, with x packed so the broadcasts share one pointer (pack_rows; 30 layers'
 * fp32 projections at 64 rows 45.4 -> 42.6 ms, the head 12.2 -> 10.7, one process alternating
 * builds; equal at 8 rows). */
#if LANES == 16
#define ONE_PANEL_ROWS 16
#define TWO_PANEL_ROWS 8
#define THREE_PANEL_ROWS 8
#define QUANT_ROWS 16
#elif LANES == 8 || defined(__aarch64__)
#define ONE_PANEL_ROWS 6 /* 16 ymm with AVX2, 32 q registers with NEON */
#define QUANT_ROWS 4
#else
#define ONE_PANEL_ROWS 3 /* SSE: 16 xmm, 4 per panel row */
#define QUANT_ROWS 2
#endif
#ifndef TWO_PANEL_ROWS
#define TWO_PANEL_ROWS 0
#define THREE_PANEL_ROWS 0
#endif
#define THREE_PANEL_MIN 8 /* rows from which float tiles take three panels (AVX-512) */
#define QUANT_TWO_PANEL_MIN 9
#define VECTORS (PANEL / LANES) /* registers per panel row */

typedef int32_t ivec_unaligned __attribute__((vector_size(LANES * sizeof(int32_t)), aligned(sizeof(int32_t))));

/* Quantised panels hold PER_WORD(BITS) consecutive inputs of one output column in each 32-bit
 * word (byte or nibble j = input PER_WORD·r + j, two's complement), so one panel row is PANEL
 * words (a cache line) for 4 (int8) or 8 (int4) inputs. A level is widened by moving it to the
 * top of its 32-bit lane (level_to_top below) and converting the lane: GCC scalarises a direct
 * int8 -> int32 vector conversion (one byte per instruction). */
#define PER_WORD(BITS) ((BITS) == 32 ? 1 : 32 / (BITS))
#define ROW_BYTES (PANEL * 4) /* one panel row, every format */

/* Level j of every lane's word moved to the lane's top bits, zeros below: as a float that is
 * q·2^(32-BITS) exactly, the power of two folded into the group scale (TOP_SCALE). Byte b of each
 * lane is moved up by one in-lane byte shuffle (pshufb, a port the conversions and FMAs leave
 * idle) where the ISA has one, by a shift and a mask elsewhere; an int4 level is then its byte's
 * high nibble masked, or its low nibble shifted up by 4. */
#define TOP_SCALE(BITS) (1.0f / (float)(1u << (32 - (BITS))))
static inline __attribute__((always_inline)) ivec byte_to_top(ivec words, const int b)
{
    const ivec top = (ivec){0} + (int32_t)0xFF000000;
    if (b == 3) return words & top;
#if (LANES == 16 && defined(__AVX512BW__)) || (LANES == 8 && defined(__AVX2__)) || (LANES == 4 && defined(__SSSE3__))
    /* per lane: its byte b to byte 3 (bytes are indexed within 16-byte lanes), the others zeroed
     * (a control byte's top bit) */
#define LANE_BYTE(p) (int32_t)(0x00808080u | (4u * (p)) << 24)
#define QUAD LANE_BYTE(0), LANE_BYTE(1), LANE_BYTE(2), LANE_BYTE(3)
#if LANES == 16
    const ivec first = {QUAD, QUAD, QUAD, QUAD};
#elif LANES == 8
    const ivec first = {QUAD, QUAD};
#else
    const ivec first = {QUAD};
#endif
#undef QUAD
#undef LANE_BYTE
    const ivec control = first + (int32_t)((uint32_t)b << 24);
#if LANES == 16
    return (ivec)_mm512_shuffle_epi8((__m512i)words, (__m512i)control);
#elif LANES == 8
    return (ivec)_mm256_shuffle_epi8((__m256i)words, (__m256i)control);
#else
    return (ivec)_mm_shuffle_epi8((__m128i)words, (__m128i)control);
#endif
#else
    return (words << (24 - 8 * b)) & top;
#endif
}

static inline __attribute__((always_inline)) ivec level_to_top(ivec words, const int BITS, const int j)
{
    if (BITS == 8) return byte_to_top(words, j);
    const ivec byte = byte_to_top(words, j / 2);
    return j % 2 ? byte & ((ivec){0} + (int32_t)0xF0000000) : byte << 4;
}

/* Panel row r of TILES adjacent panels into `words`, which it returns. */
static inline __attribute__((always_inline)) const ivec *load_words(const int TILES, const char *panel,
                                                                   int64_t panel_bytes, int64_t r, ivec *words)
{
    for (int t = 0; t < TILES; t++)
        for (int v = 0; v < VECTORS; v++)
            words[t * VECTORS + v] = *(const ivec_unaligned *)(panel + t * panel_bytes + ROW_BYTES * r + 4 * LANES * v);
    return words;
}

/* One input of a quantised panel row into the accumulators of ROWS rows: its level times
 * 2^(32-BITS) as float (level_to_top), then acc += x·q·d, or part += x·q where the tile folds
 * its scale in once per group (FOLD); d carries TOP_SCALE. */
static inline __attribute__((always_inline)) void fma_level(const int ROWS, const int NV, const int BITS,
                                                            const int FOLD, const ivec *words, const int j,
                                                            const vec *d, const float *x, int64_t ldx,
                                                            vec acc[][MAX_TILES * VECTORS],
                                                            vec part[][MAX_TILES * VECTORS])
{
    vec wk[MAX_TILES * VECTORS];
    for (int v = 0; v < NV; v++) {
        wk[v] = __builtin_convertvector(level_to_top(words[v], BITS, j), vec);
        if (!FOLD) wk[v] *= d[v];
    }
    for (int m = 0; m < ROWS; m++)
        for (int v = 0; v < NV; v++) {
            if (FOLD)
                part[m][v] += x[m * ldx] * wk[v];
            else
                acc[m][v] += x[m * ldx] * wk[v];
        }
}

/* rows x[0..ROWS) (row stride ldx) times TILES adjacent panels -> y columns [0, cols) of those
 * rows. ROWS, TILES and BITS are compile-time constants at every call site, so the accumulators
 * live in registers (they are never address-taken): one panel, or with AVX-512 8 rows x 2 or 3
 * panels (each broadcast of x feeds two or three FMAs: 10 loads per 16 FMAs instead of 17, and two
 * weight streams), the three-panel ones reading x packed (PACKED rows per input, pack_rows).
 * `ahead`, `spread`: the lines this tile fetches for later ones (tile_all_rows). Quantised levels are widened to float in registers before the same FMAs and scaled
 * per input (w = q·d), or, in tiles of few rows, once per group of summed products; the float
 * weight never exists in memory. */
static inline __attribute__((always_inline)) void tile_rows(const int ROWS, const int TILES, const int BITS,
                                                            const int PACKED, const float *x, int64_t ldx, int64_t K,
                                                            const cpu_weight *w, const char *panel,
                                                            int64_t panel_bytes, const float *scales, float *y,
                                                            int64_t ldy, int cols, const float *bias,
                                                            const char *ahead, int spread)
{
    vec acc[MAX_ROWS][MAX_TILES * VECTORS];
    for (int m = 0; m < ROWS; m++)
        for (int v = 0; v < TILES * VECTORS; v++) acc[m][v] = (vec){0};
    if (BITS == 32) {
        for (int64_t k = 0; k < K; k++) {
            vec wk[MAX_TILES * VECTORS];
            for (int t = 0; t < TILES; t++) {
                const float *row = (const float *)(panel + t * panel_bytes) + PANEL * k;
                if (ahead && spread < 0)
                    __builtin_prefetch(ahead + t * panel_bytes + LINE * k, 0, PREFETCH_LOCALITY);
                else if (ahead && !(k & ((1 << spread) - 1))) /* one line per 2^spread inputs, into L2 */
                    __builtin_prefetch(ahead + t * panel_bytes + LINE * (k >> spread), 0, 2);
                for (int v = 0; v < VECTORS; v++) wk[t * VECTORS + v] = *(const vec_unaligned *)(row + LANES * v);
            }
            for (int m = 0; m < ROWS; m++) {
                const float xm = PACKED ? x[k * PACKED + m] : x[m * ldx + k];
                for (int v = 0; v < TILES * VECTORS; v++) acc[m][v] += xm * wk[v];
            }
        }
    } else {
        /* A tile of a few rows has few accumulators, and each would wait on its previous FMA (one
         * per input): there the inputs of a word go round CHAINS partial sums of q·x per group,
         * scaled by d once per group, which also saves the multiply per weight. */
        const int FOLD = ROWS * TILES * VECTORS < 4, CHAINS = FOLD ? 4 / (ROWS * TILES * VECTORS) : 1;
        const int64_t group = w->group, groups = (K + group - 1) / group;
        for (int64_t g = 0; g < groups; g++) {
            vec d[MAX_TILES * VECTORS], part[4][MAX_ROWS][MAX_TILES * VECTORS];
            ivec words[MAX_TILES * VECTORS];
            for (int t = 0; t < TILES; t++)
                for (int v = 0; v < VECTORS; v++)
                    d[t * VECTORS + v] =
                        *(const vec_unaligned *)(scales + (t * groups + g) * PANEL + LANES * v) * TOP_SCALE(BITS);
            if (FOLD)
                for (int c = 0; c < CHAINS; c++)
                    for (int m = 0; m < ROWS; m++)
                        for (int v = 0; v < TILES * VECTORS; v++) part[c][m][v] = (vec){0};
            const int64_t k_end = (g + 1) * group < K ? (g + 1) * group : K;
            int64_t k = g * group;
            /* the inputs before the group's first whole word, its whole words, those after the last */
            for (; k < k_end && k % PER_WORD(BITS); k++)
                fma_level(ROWS, TILES * VECTORS, BITS, FOLD, load_words(TILES, panel, panel_bytes, k / PER_WORD(BITS), words),
                          (int)(k % PER_WORD(BITS)), d, x + k, ldx, acc, part[0]);
            for (; k + PER_WORD(BITS) <= k_end; k += PER_WORD(BITS)) {
                const int64_t r = k / PER_WORD(BITS);
                load_words(TILES, panel, panel_bytes, r, words);
                for (int t = 0; t < TILES && ahead; t++)
                    __builtin_prefetch(ahead + t * panel_bytes + ROW_BYTES * r, 0, PREFETCH_LOCALITY);
                for (int j = 0; j < PER_WORD(BITS); j++)
                    fma_level(ROWS, TILES * VECTORS, BITS, FOLD, words, j, d, x + k + j, ldx, acc, part[j % CHAINS]);
            }
            for (; k < k_end; k++)
                fma_level(ROWS, TILES * VECTORS, BITS, FOLD, load_words(TILES, panel, panel_bytes, k / PER_WORD(BITS), words),
                          (int)(k % PER_WORD(BITS)), d, x + k, ldx, acc, part[0]);
            if (FOLD)
                for (int m = 0; m < ROWS; m++)
                    for (int v = 0; v < TILES * VECTORS; v++) {
                        vec sum = part[0][m][v];
                        for (int c = 1; c < CHAINS; c++) sum += part[c][m][v];
                        acc[m][v] += sum * d[v];
                    }
        }
    }
    for (int t = 0; t < TILES && PANEL * t < cols; t++) {
        const int width = cols - PANEL * t < PANEL ? cols - PANEL * t : PANEL;
        float b[PANEL] = {0};
        if (bias) memcpy(b, bias + PANEL * t, sizeof(float) * width);
        for (int m = 0; m < ROWS; m++) {
            float *out = y + m * ldy + PANEL * t, tail[PANEL];
            float *dst = width == PANEL ? out : tail;  /* a partial panel goes through `tail` */
            for (int v = 0; v < VECTORS; v++)
                *(vec_unaligned *)(dst + LANES * v) = acc[m][t * VECTORS + v] + *(const vec_unaligned *)(b + LANES * v);
            if (width < PANEL) memcpy(out, tail, sizeof(float) * width);
        }
    }
}

/* All M rows times `tiles` (1-3) adjacent panels: full blocks of rows, then the remainder, each
 * with its row count as a constant. Three-panel tiles (float, AVX-512) read x packed (pack_rows,
 * ldx = K).
 *
 * The first row tile streams its panels from DRAM, fetching them PREFETCH lines ahead; the later
 * ones read them from L2 and meanwhile fetch the next tile's panels, so DRAM stays busy through
 * the compute-bound tiles. One-panel tiles fetch all of the next panel in each later tile (16 rows
 * on the Zen 3, cold SmolLM2 weights: 30 layers' dense projections 50-55 -> 40-51 ms, the head
 * 12-13.6 -> 9.5-11.7 ms, alternating runs). Float tiles of two or three panels, whose later tiles
 * are compute-bound for longer, spread it: the first 2^spread later tiles fetch a 2^-spread share
 * each into L2, one line per 2^spread inputs, where the whole of it from every later tile into L1
 * had cost more than it hid (on the Xeon at 64 rows, one process alternating builds: 30 layers'
 * fp32 projections 52.7 -> 45.4 ms with two-panel tiles, 42.6 with three, the head 14.5 -> 11.2 ms,
 * against no fetching ahead). */
static inline __attribute__((always_inline)) void tile_all_rows(const int BITS, const int tiles, const float *x,
                                                                int64_t ldx, int64_t M, int64_t K,
                                                                const cpu_weight *w, const char *panel,
                                                                int64_t panel_bytes, const float *scales,
                                                                float *y, int64_t ldy, int cols, const float *bias)
{
    const int three = THREE_PANEL_ROWS && BITS == 32 && tiles == 3, two = TWO_PANEL_ROWS && tiles == 2;
    const int64_t block = three ? THREE_PANEL_ROWS : two ? TWO_PANEL_ROWS : BITS == 32 ? ONE_PANEL_ROWS : QUANT_ROWS;
    const char *own = panel + LINE * PREFETCH, *next = panel + tiles * panel_bytes;
    const int64_t later = (M + block - 1) / block - 1; /* row tiles after the first */
    const int spread = BITS == 32 && tiles > 1 ? (later >= 4 ? 2 : later >= 2 ? 1 : 0) : -1;
    const int64_t share = spread < 0 ? 0 : LINE * ((K + (1 << spread) - 1) >> spread); /* bytes per panel */
    int64_t m = 0;
#define AHEAD(m)                                                                                           \
    (!(m) ? own : spread < 0 ? next : (m) / block <= (1 << spread) ? next + share * ((m) / block - 1) : 0)
#define SPREAD(m) ((m) ? spread : -1)
    for (; m + block <= M; m += block) {
        if (three)
            tile_rows(THREE_PANEL_ROWS, 3, BITS, THREE_PANEL_ROWS, x + m * ldx, ldx, K, w, panel, panel_bytes,
                      scales, y + m * ldy, ldy, cols, bias, AHEAD(m), SPREAD(m));
        else if (two)
            tile_rows(TWO_PANEL_ROWS, 2, BITS, 0, x + m * ldx, ldx, K, w, panel, panel_bytes, scales, y + m * ldy,
                      ldy, cols, bias, AHEAD(m), SPREAD(m));
        else if (BITS == 32)
            tile_rows(ONE_PANEL_ROWS, 1, BITS, 0, x + m * ldx, ldx, K, w, panel, panel_bytes, scales, y + m * ldy,
                      ldy, cols, bias, AHEAD(m), SPREAD(m));
        else
            tile_rows(QUANT_ROWS, 1, BITS, 0, x + m * ldx, ldx, K, w, panel, panel_bytes, scales, y + m * ldy, ldy,
                      cols, bias, AHEAD(m), SPREAD(m));
    }
    const float *xr = x + m * ldx;
    const char *ahead = AHEAD(m);
    const int spread_r = SPREAD(m);
#undef AHEAD
#undef SPREAD
    float *yr = y + m * ldy;
    switch (M - m) {  /* below `block` rows */
#define REMAINDER(n)                                                                                        \
    case n:                                                                                                 \
        if (three) {  /* constant conditions: no tile wider than the registers */                           \
            if (n < THREE_PANEL_ROWS)                                                                       \
                tile_rows(n, 3, BITS, THREE_PANEL_ROWS, xr, ldx, K, w, panel, panel_bytes, scales, yr, ldy, \
                          cols, bias, ahead, spread_r);                                                     \
        } else if (two) {                                                                                   \
            if (n < TWO_PANEL_ROWS)                                                                         \
                tile_rows(n, 2, BITS, 0, xr, ldx, K, w, panel, panel_bytes, scales, yr, ldy, cols, bias,    \
                          ahead, spread_r);                                                                 \
        } else if (n < (BITS == 32 ? ONE_PANEL_ROWS : QUANT_ROWS))                                           \
            tile_rows(n, 1, BITS, 0, xr, ldx, K, w, panel, panel_bytes, scales, yr, ldy, cols, bias, ahead,  \
                      spread_r);                                                                            \
        break;
    REMAINDER(1) REMAINDER(2) REMAINDER(3) REMAINDER(4) REMAINDER(5) REMAINDER(6) REMAINDER(7)
    REMAINDER(8) REMAINDER(9) REMAINDER(10) REMAINDER(11) REMAINDER(12) REMAINDER(13) REMAINDER(14)
    REMAINDER(15)
#undef REMAINDER
    default: break;
    }
}

#if VNNI
#if LANES == 16
#define VNNI_ROWS 12 /* 12 int32 and 12 float accumulators, the weights and two masks: 28 of 32 zmm */
#else
#define VNNI_ROWS 2 /* a panel row is 2 ymm: 2 x 2 int32 + 2 x 2 float accumulators, 4 weights, 2 masks */
#endif

/* acc + per lane i, Σ_j weights.u8[4i + j] · activations.s8[j] (one word broadcast to every lane). */
static inline ivec dot4(ivec acc, ivec weights, int32_t activations)
{
#if LANES == 16
    return (ivec)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)weights, _mm512_set1_epi32(activations));
#else
    return (ivec)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)weights, _mm256_set1_epi32(activations));
#endif
}

/* Rows of x [M, K] rounded to int8 per group of inputs (quantize_int8): xq [M, groups·group], a
 * short last group padded with 0 and, for int4 weights, each 8 inputs stored evens first; xd
 * [M, groups] the scales; xs [M, groups] = 128·Σ q, the term the weights' +128 adds. */
static void quantize_rows_shared(const int BITS, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t group,
                                 int8_t *xq, float *xd, int32_t *xs)
{
    const int64_t groups = (K + group - 1) / group, ldq = groups * group;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t k0 = g * group, n = K - k0 < group ? K - k0 : group;
            int8_t *q = xq + m * ldq + k0;
            xd[m * groups + g] = quantize_int8(x + m * ldx + k0, n, q);
            memset(q + n, 0, group - n);
            int32_t sum = 0;
            for (int64_t i = 0; i < group; i++) sum += q[i];
            xs[m * groups + g] = 128 * sum;
            if (BITS == 4)
                for (int64_t b = 0; b < group; b += 8) { /* 0..7 -> 0 2 4 6 1 3 5 7 */
                    int8_t block[8];
                    for (int j = 0; j < 8; j++) block[(j & 1) * 4 + j / 2] = q[b + j];
                    memcpy(q + b, block, 8);
                }
        }
    }
}

/* Panel row r (one word per lane: 4 int8 or 8 int4 levels) times the same inputs of ROWS rounded
 * rows, summed into sums [ROWS][VECTORS] by vpdpbusd. */
static inline __attribute__((always_inline)) void vnni_word(const int ROWS, const int BITS, const char *panel,
                                                            int64_t r, const int8_t *xq, int64_t ldq,
                                                            const char *ahead, ivec sums[][VECTORS])
{
    const ivec flip = (ivec){0} + (int32_t)0x80808080, high = (ivec){0} + (int32_t)0xF0F0F0F0;
    __builtin_prefetch(ahead + ROW_BYTES * r, 0, PREFETCH_LOCALITY);
    ivec w[VECTORS];
    for (int v = 0; v < VECTORS; v++) w[v] = *(const ivec_unaligned *)(panel + ROW_BYTES * r + 4 * LANES * v);
    if (BITS == 8) {
        for (int v = 0; v < VECTORS; v++) w[v] ^= flip;
        for (int m = 0; m < ROWS; m++) {
            const int32_t a = ((const int32_t *)(xq + m * ldq))[r];
            for (int v = 0; v < VECTORS; v++) sums[m][v] = dot4(sums[m][v], w[v], a);
        }
    } else { /* the even inputs' nibbles, then the odd ones', each at the top of a byte */
        ivec even[VECTORS], odd[VECTORS];
        for (int v = 0; v < VECTORS; v++) {
            even[v] = ((w[v] << 4) & high) ^ flip;
            odd[v] = (w[v] & high) ^ flip;
        }
        for (int m = 0; m < ROWS; m++) {
            const int32_t *a = (const int32_t *)(xq + m * ldq) + 2 * r;
            for (int v = 0; v < VECTORS; v++) sums[m][v] = dot4(dot4(sums[m][v], even[v], a[0]), odd[v], a[1]);
        }
    }
}

/* ROWS rows of the rounded x times one panel -> y columns [0, cols). Per group of inputs: the
 * products summed in int32 registers, less the offset term, then converted and scaled by d_w·d_x
 * into the float accumulators. */
static inline __attribute__((always_inline)) void tile_rows_vnni(const int ROWS, const int BITS, const int8_t *xq,
                                                                 int64_t ldq, const float *xd, const int32_t *xs,
                                                                 int64_t groups, int64_t group, int64_t words,
                                                                 const char *panel, const float *scales, float *y,
                                                                 int64_t ldy, int cols, const float *bias,
                                                                 const char *ahead)
{
    vec acc[VNNI_ROWS][VECTORS];
    for (int m = 0; m < ROWS; m++)
        for (int v = 0; v < VECTORS; v++) acc[m][v] = (vec){0};
    /* a tile of few rows would wait on each int32 sum's previous vpdpbusd: there consecutive words go
     * round CHAINS sums */
    const int CHAINS = ROWS * VECTORS < 4 ? 4 / (ROWS * VECTORS) : 1;
    const int64_t per_group = group / PER_WORD(BITS); /* weight words per group */
    for (int64_t g = 0; g < groups; g++) {
        ivec sums[4][VNNI_ROWS][VECTORS];
        for (int c = 0; c < CHAINS; c++)
            for (int m = 0; m < ROWS; m++)
                for (int v = 0; v < VECTORS; v++) sums[c][m][v] = (ivec){0};
        const int64_t r_end = (g + 1) * per_group < words ? (g + 1) * per_group : words;
        int64_t r = g * per_group;
        for (; r + CHAINS <= r_end; r += CHAINS)
            for (int c = 0; c < CHAINS; c++) vnni_word(ROWS, BITS, panel, r + c, xq, ldq, ahead, sums[c]);
        for (; r < r_end; r++) vnni_word(ROWS, BITS, panel, r, xq, ldq, ahead, sums[0]);
        for (int c = 1; c < CHAINS; c++)
            for (int m = 0; m < ROWS; m++)
                for (int v = 0; v < VECTORS; v++) sums[0][m][v] += sums[c][m][v];
        for (int v = 0; v < VECTORS; v++) {
            const vec d = *(const vec_unaligned *)(scales + g * PANEL + LANES * v) * (BITS == 8 ? 1.0f : 0.0625f);
            for (int m = 0; m < ROWS; m++)
                acc[m][v] += __builtin_convertvector(sums[0][m][v] - xs[m * groups + g], vec) * (d * xd[m * groups + g]);
        }
    }
    const int width = cols < PANEL ? cols : PANEL;
    float b[PANEL] = {0};
    if (bias) memcpy(b, bias, sizeof(float) * width);
    for (int m = 0; m < ROWS; m++) {
        float *out = y + m * ldy, tail[PANEL];
        float *dst = width == PANEL ? out : tail; /* a partial panel goes through `tail` */
        for (int v = 0; v < VECTORS; v++)
            *(vec_unaligned *)(dst + LANES * v) = acc[m][v] + *(const vec_unaligned *)(b + LANES * v);
        if (width < PANEL) memcpy(out, tail, sizeof(float) * width);
    }
}

/* All M rows of the rounded x times one panel, VNNI_ROWS at a time, then the remainder. */
static inline __attribute__((always_inline)) void tile_all_rows_vnni(const int BITS, const int8_t *xq, int64_t ldq,
                                                                     const float *xd, const int32_t *xs, int64_t M,
                                                                     int64_t groups, int64_t group, int64_t words,
                                                                     const char *panel, int64_t panel_bytes,
                                                                     const float *scales, float *y, int64_t ldy,
                                                                     int cols, const float *bias)
{
    const char *own = panel + LINE * PREFETCH, *next = panel + panel_bytes;
    int64_t m = 0;
    for (; m + VNNI_ROWS <= M; m += VNNI_ROWS)
        tile_rows_vnni(VNNI_ROWS, BITS, xq + m * ldq, ldq, xd + m * groups, xs + m * groups, groups, group, words,
                       panel, scales, y + m * ldy, ldy, cols, bias, m ? next : own);
    switch (M - m) {
#define REMAINDER(n)                                                                                          \
    case n:                                                                                                   \
        if (n < VNNI_ROWS)                                                                                    \
            tile_rows_vnni(n, BITS, xq + m * ldq, ldq, xd + m * groups, xs + m * groups, groups, group, words, \
                           panel, scales, y + m * ldy, ldy, cols, bias, m ? next : own);                      \
        break;
    REMAINDER(1) REMAINDER(2) REMAINDER(3) REMAINDER(4) REMAINDER(5) REMAINDER(6) REMAINDER(7)
    REMAINDER(8) REMAINDER(9) REMAINDER(10) REMAINDER(11)
#undef REMAINDER
    default: break;
    }
}

/* gemm_tiles through integer products: x rounded once into shared scratch (one thread allocates,
 * all round their rows), then the (row block, panel) tiles. Returns 0, having done nothing, where
 * the scratch cannot be had (the float path then serves the call). */
static inline __attribute__((always_inline)) int gemm_tiles_vnni(const int BITS, const float *x, int64_t ldx,
                                                                 int64_t M, int64_t K, const cpu_weight *w, int64_t N,
                                                                 float *y, int64_t ldy, const float *bias)
{
    const int64_t group = w->group, groups = (K + group - 1) / group, ldq = groups * group;
    const int64_t words = (K + PER_WORD(BITS) - 1) / PER_WORD(BITS), panel_bytes = ROW_BYTES * words;
    const int64_t panels = (N + PANEL - 1) / PANEL, row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    char *scratch;
#pragma omp single copyprivate(scratch)
    scratch = malloc(M * ldq + M * groups * (sizeof(float) + sizeof(int32_t)));
    if (!scratch) return 0;
    int8_t *xq = (int8_t *)scratch;
    float *xd = (float *)(scratch + M * ldq); /* ldq is a multiple of 8: aligned */
    int32_t *xs = (int32_t *)(xd + M * groups);
    quantize_rows_shared(BITS, x, ldx, M, K, group, xq, xd, xs); /* its barrier: xq is whole */
#pragma omp for collapse(2) schedule(static)
    for (int64_t r = 0; r < row_blocks; r++) {
        for (int64_t p = 0; p < panels; p++) {
            const int64_t m = r * ROW_BLOCK, rows = M - m < ROW_BLOCK ? M - m : ROW_BLOCK;
            const int64_t width = N - PANEL * p < PANEL ? N - PANEL * p : PANEL;
            tile_all_rows_vnni(BITS, xq + m * ldq, ldq, xd + m * groups, xs + m * groups, rows, groups, group, words,
                               (const char *)w->data + p * panel_bytes, panel_bytes, w->scales + p * groups * PANEL,
                               y + m * ldy + PANEL * p, ldy, (int)width, bias ? bias + PANEL * p : 0);
        }
    }
#pragma omp single
    free(scratch);
    return 1;
}
#endif

#if THREE_PANEL_ROWS
/* x [rows, K] (row stride ldx) packed for three-panel tiles as [ceil(rows/8)][K][8] (rows past the
 * end zero), so that a tile's 8 broadcasts per input come from one pointer at constant offsets:
 * GCC kept the 8 row pointers of the unpacked x on the stack, reloading one per broadcast. Into
 * this thread's buffer, grown as needed and kept for the thread's next call (the threads of the
 * OpenMP pool live as long as the process); NULL where it cannot grow. */
static const float *pack_rows(const float *x, int64_t ldx, int64_t rows, int64_t K)
{
    static __thread float *buffer;
    static __thread int64_t capacity;
    const int64_t blocks = (rows + THREE_PANEL_ROWS - 1) / THREE_PANEL_ROWS, need = blocks * THREE_PANEL_ROWS * K;
    if (need > capacity) {
        free(buffer);
        buffer = malloc(sizeof(float) * need);
        capacity = buffer ? need : 0;
        if (!buffer) return NULL;
    }
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t i = 0; i < THREE_PANEL_ROWS; i++) {
                const int64_t m = b * THREE_PANEL_ROWS + i;
                buffer[(b * K + k) * THREE_PANEL_ROWS + i] = m < rows ? x[m * ldx + k] : 0.0f;
            }
    return buffer;
}
#endif

/* The (row block, panel) tiles of one weight format, shared among the region's threads. */
static inline __attribute__((always_inline)) void gemm_tiles(const int BITS, const float *x, int64_t ldx, int64_t M,
                                                             int64_t K, const cpu_weight *w, int64_t N, float *y,
                                                             int64_t ldy, const float *bias, int barrier)
{
#if VNNI
    if (BITS != 32 && w->activations == 8 && M >= VNNI_MIN_ROWS && w->group % 8 == 0 &&
        gemm_tiles_vnni(BITS, x, ldx, M, K, w, N, y, ldy, bias))
        return;
#endif
    const int64_t panels = (N + PANEL - 1) / PANEL, row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t step = THREE_PANEL_ROWS && BITS == 32 && M >= THREE_PANEL_MIN      ? 3
                         : TWO_PANEL_ROWS && (BITS == 32 || M >= QUANT_TWO_PANEL_MIN) ? 2
                                                                                      : 1;
    const int64_t tiles = (panels + step - 1) / step;
    const int64_t panel_bytes = ROW_BYTES * ((K + PER_WORD(BITS) - 1) / PER_WORD(BITS));
    const int64_t groups = BITS == 32 ? 0 : (K + w->group - 1) / w->group;
#if THREE_PANEL_ROWS
    int64_t packed_block = -1; /* the row block this thread's packed rows hold */
    const float *packed = NULL;
#endif
#pragma omp for collapse(2) schedule(static) nowait
    for (int64_t r = 0; r < row_blocks; r++) {
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t m = r * ROW_BLOCK, rows = M - m < ROW_BLOCK ? M - m : ROW_BLOCK, p = t * step;
            const int64_t width = N - PANEL * p < step * PANEL ? N - PANEL * p : step * PANEL;
            const char *panel = (const char *)w->data + p * panel_bytes;
            const float *scales = BITS == 32 ? 0 : w->scales + p * groups * PANEL, *b = bias ? bias + PANEL * p : 0;
            float *out = y + m * ldy + PANEL * p;
#if THREE_PANEL_ROWS
            if (BITS == 32 && width > 2 * PANEL) {
                if (packed_block != r) {
                    packed = pack_rows(x + m * ldx, ldx, rows, K);
                    packed_block = r;
                }
                if (packed) {
                    tile_all_rows(BITS, 3, packed, K, rows, K, w, panel, panel_bytes, scales, out, ldy, (int)width, b);
                } else { /* no memory for the packed rows: two panels, then one */
                    tile_all_rows(BITS, 2, x + m * ldx, ldx, rows, K, w, panel, panel_bytes, scales, out, ldy,
                                  2 * PANEL, b);
                    tile_all_rows(BITS, 1, x + m * ldx, ldx, rows, K, w, panel + 2 * panel_bytes, panel_bytes,
                                  scales, out + 2 * PANEL, ldy, (int)width - 2 * PANEL, b ? b + 2 * PANEL : 0);
                }
                continue;
            }
#endif
            tile_all_rows(BITS, width > PANEL ? 2 : 1, x + m * ldx, ldx, rows, K, w, panel, panel_bytes, scales, out,
                          ldy, (int)width, b);
        }
    }
    if (barrier) {
#pragma omp barrier
    }
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) · Wᵀ + bias, W packed; called inside a
 * parallel region, the (row block, panel) tiles shared among its threads (implicit barrier at the
 * end). Up to ROW_BLOCK rows the threads split the panels; beyond, each thread takes whole row
 * blocks, whose rows stay in its L2 while the panels stream past. */
void gemm_shared(const float *x, int64_t ldx, int64_t M, int64_t K, const cpu_weight *w, int64_t N, float *y,
                 int64_t ldy, const float *bias, int barrier)
{
    if (w->bits == 8)
        gemm_tiles(8, x, ldx, M, K, w, N, y, ldy, bias, barrier);
    else if (w->bits == 4)
        gemm_tiles(4, x, ldx, M, K, w, N, y, ldy, bias, barrier);
    else
        gemm_tiles(32, x, ldx, M, K, w, N, y, ldy, bias, barrier);
}

/* y [M, N] = x [M, K] · Wᵀ + bias (bias may be NULL); x, y contiguous. */
void lowrank_cpu_linear(const float *x, int64_t M, int64_t K, const cpu_weight *w, int64_t N, const float *bias,
                        float *y, int threads)
{
#pragma omp parallel num_threads(threads)
    gemm_shared(x, K, M, K, w, N, y, N, bias, 1);
}

void lowrank_shared(const float *x, int64_t M, int64_t K, const cpu_weight *b, int64_t R, const cpu_weight *a,
                    int64_t N, const float *bias, float *scratch, float *y)
{
    gemm_shared(x, K, M, K, b, R, scratch, R, 0, 1); /* its barrier: scratch is whole */
    gemm_shared(scratch, R, M, R, a, N, y, N, bias, 1);
}

/* y [M, N] = (x [M, K] · Bᵀ) · Aᵀ + bias with B [R, K], A [N, R] packed; scratch [M, R] holds
 * x·Bᵀ between the two phases (one parallel region, a barrier between them). */
void lowrank_cpu_lowrank(const float *x, int64_t M, int64_t K, const cpu_weight *b, int64_t R,
                         const cpu_weight *a, int64_t N, const float *bias, float *scratch, float *y, int threads)
{
#pragma omp parallel num_threads(threads)
    lowrank_shared(x, M, K, b, R, a, N, bias, scratch, y);
}
