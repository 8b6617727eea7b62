/* Paged decode attention on CPU: one new query per sequence over its keys in the paged KV cache.
 *
 * Why our own: the torch reference gathers every sequence's K and V into padded copies, then calls
 * SDPA, ~250 µs per layer at 16 sequences of ~100 tokens, for ~4 MFLOP of work. Here each unit of
 * work, a sequence's KV heads (all of them, or one at small batches: heads_per_unit), walks its
 * block table once, reading keys and values in place, with an online softmax (flash-decoding's
 * recurrence) for the query heads sharing those KV heads. The units are handed to the OpenMP
 * threads as they come free (sequences differ in length). float32, head_dim a multiple of 16.
 *
 * A float16 cache (cache_bits 16) or an int8 one (8, kernels/kv_quant.py, with its scale pools
 * k_scales, v_scales [num_blocks, block_size, Hkv], one per cached vector): each key and value row
 * is widened (and scaled) into a float row on the stack (in L1) as it is read, and the float code
 * runs on that, so the cache is read at a half or a quarter of the bytes and the arithmetic is the
 * float kernel's (at batch 16-64 a step reads as many bytes of cache as of weights; llama.cpp
 * caches float16 by default).
 *
 * Layouts: q, out [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D];
 * block_tables int32 [B, table_stride]; context_lens int32 [B] (tokens per sequence, the new one
 * included). Query head h reads KV head h / (Hq / Hkv). A key j is visible when j < len and, with
 * a window w > 0, len - 1 - j < w.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lowrank_cpu.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 32          /* keys scored together: one softmax rescale per chunk, one exp per score */
#define PREFETCH_KEYS 8   /* keys ahead whose K and V rows are fetched while this one is scored */
#define LINE 64           /* bytes per cache line */
#define UNITS_PER_THREAD 4 /* sequences per thread from which a unit of work takes all their KV heads */
#define UNIT_ROW 1024     /* the most floats of one key's rows a unit widens at once (8 heads of 128) */

#if defined(__clang__) || __GNUC__ >= 12  /* __builtin_shufflevector: halve in registers */
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

static inline float sum8(vec8 a)
{
    vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float sum_lanes(vec v)  /* a tree of halvings: log2(LANES) dependent adds, not LANES - 1 */
{
#if LANES == 16
    return sum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#elif LANES == 8
    return sum8(v);
#else
    return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}
#else  /* older GCC: the same tree through memory (about 2x slower attention) */
static inline float sum_lanes(vec v)
{
    float lanes[LANES];
    memcpy(lanes, &v, sizeof v);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    return lanes[0];
}
#endif

static inline float dot(const float *a, const float *b, int64_t D)
{
    vec acc = {0};
    for (int64_t d = 0; d < D; d += LANES) acc += *(const vec_unaligned *)(a + d) * *(const vec_unaligned *)(b + d);
    return sum_lanes(acc);
}

static inline void multiply(float *acc, float a, int64_t D)  /* acc = a·acc */
{
    for (int64_t d = 0; d < D; d += LANES) *(vec_unaligned *)(acc + d) *= a;
}

static inline void add_scaled(float *acc, const float *v, float b, int64_t D)  /* acc += b·v */
{
    for (int64_t d = 0; d < D; d += LANES) *(vec_unaligned *)(acc + d) += b * *(const vec_unaligned *)(v + d);
}

/* A walk through a sequence's keys in order: the cache slot (block * block_size + offset) of key j
 * through its block table, with no division per key (two 64-bit divisions per key took ~1/5 of a
 * batch-16 SmolLM2 decode step's attention on a Zen 3). */
typedef struct {
    const int32_t *table;
    int64_t block, offset, block_size;
} key_cursor;

static inline key_cursor cursor_at(const int32_t *table, int64_t j, int64_t block_size)
{
    return (key_cursor){table, j / block_size, j % block_size, block_size};
}

static inline int64_t cursor_next(key_cursor *c) /* the current key's slot; then step to the next key */
{
    const int64_t slot = (int64_t)c->table[c->block] * c->block_size + c->offset;
    if (++c->offset == c->block_size) {
        c->offset = 0;
        c->block++;
    }
    return slot;
}

/* `count` adjacent rows from row `row` (slot * Hkv + head) of a cache, D floats each: in place for a
 * float32 cache; a float16 one's widened into `buf`; an int8 one's levels widened and scaled into
 * `buf` (one multiply per value, as kernels/kv_quant.py's dequantize_vectors does). */
static inline const float *cache_rows(const void *cache, int64_t bits, const float *scales, int64_t row,
                                      int64_t count, int64_t D, float *buf)
{
    if (bits == 32) return (const float *)cache + row * D;
    if (bits == 16) {
        lowrank_cpu_half_to_float((const uint16_t *)cache + row * D, count * D, buf);
        return buf;
    }
    const int8_t *levels = (const int8_t *)cache + row * D;
    for (int64_t r = 0; r < count; r++) {
        const float d = scales[row + r];
        for (int64_t i = 0; i < D; i++) buf[r * D + i] = (float)levels[r * D + i] * d;
    }
    return buf;
}

/* Fetch `bytes` from `at` into the cache, a line at a time. */
static inline void prefetch_span(const char *at, int64_t bytes)
{
    const char *line = (const char *)((uintptr_t)at & ~(uintptr_t)(LINE - 1));
    for (; line < at + bytes; line += LINE) __builtin_prefetch(line, 0, PREFETCH_LOCALITY);
}

/* KV heads one unit of work takes together. A key's rows of every KV head lie side by side in the
 * cache, so a unit holding all of a sequence's heads reads one contiguous span per key where a
 * unit per head reads 1/Hkv of it at a stride (cold SmolLM2 caches at batch 64 on the Xeon:
 * ~17 -> ~15 ms for 30 layers' attention). With fewer sequences than UNITS_PER_THREAD per thread,
 * one head per unit, so that a single sequence still spreads over the threads. */
static int64_t heads_per_unit(int64_t B, int64_t Hkv, int64_t G, int64_t D)
{
#ifdef _OPENMP
    const int threads = omp_get_num_threads(); /* of the enclosing region */
#else
    const int threads = 1;
#endif
    if (B < UNITS_PER_THREAD * threads) return 1;
    int64_t n = Hkv;
    while (Hkv % n || n * G > MAX_GROUP || n * D > UNIT_ROW) n--;
    return n;
}

int check_tables(const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens, int64_t B,
                 int64_t block_size, int64_t num_blocks)
{
    for (int64_t b = 0; b < B; b++) {
        const int64_t len = context_lens[b];
        if (len < 0 || len > table_stride * block_size) return -2;
        for (int64_t i = 0; i < (len + block_size - 1) / block_size; i++) {
            const int32_t block = block_tables[b * table_stride + i];
            if (block < 0 || block >= num_blocks) return -2;
        }
    }
    return 0;
}

int lowrank_cpu_paged_decode_supports(int64_t Hq, int64_t Hkv, int64_t D)
{
    return Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= MAX_GROUP && D <= MAX_HEAD_DIM && D % HEAD_DIM_MULTIPLE == 0;
}

int cache_format_valid(int64_t bits, const float *k_scales, const float *v_scales)
{
    return bits == 8 ? k_scales && v_scales : (bits == 32 || bits == 16) && !k_scales && !v_scales;
}

void paged_decode_shared(const float *q, const void *k_cache, const void *v_cache, int64_t cache_bits,
                         const float *k_scales, const float *v_scales, const int32_t *block_tables,
                         int64_t table_stride, const int32_t *context_lens, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t D, int64_t block_size, int64_t window, float scale, float *out)
{
    const int64_t G = Hq / Hkv, row_bytes = D * cache_bits / 8;
    const int64_t heads = heads_per_unit(B, Hkv, G, D), units = Hkv / heads;
    const int64_t Hu = heads * G; /* query heads per unit, adjacent in q and out */
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < B * units; unit++) {
        const int64_t b = unit / units, h = unit % units * heads, len = context_lens[b];
        const int64_t first = window > 0 && len > window ? len - window : 0;
        const int32_t *table = block_tables + b * table_stride;
        const float *qu = q + (b * Hq + h * G) * D;
        float m[MAX_GROUP], l[MAX_GROUP], p[MAX_GROUP][CHUNK] __attribute__((aligned(64)));
        float acc[MAX_GROUP * MAX_HEAD_DIM] __attribute__((aligned(64)));
        float key_buf[UNIT_ROW] __attribute__((aligned(64)));   /* a float16 or int8 cache's */
        float value_buf[UNIT_ROW] __attribute__((aligned(64))); /* rows, widened */
        int64_t rows[CHUNK];
        key_cursor key = cursor_at(table, first, block_size);
        key_cursor ahead = cursor_at(table, first + PREFETCH_KEYS, block_size);
        for (int64_t g = 0; g < Hu; g++) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
            for (int64_t d = 0; d < D; d++) acc[g * D + d] = 0.0f;
        }
        for (int64_t start = first; start < len; start += CHUNK) {
            const int64_t n = len - start < CHUNK ? len - start : CHUNK;
            for (int64_t c = 0; c < n; c++) {  /* scores of the chunk's keys */
                if (start + c + PREFETCH_KEYS < len) {  /* the cache is scattered and cold (weights stream
                                                         * between layers): fetch ahead */
                    const int64_t next = (cursor_next(&ahead) * Hkv + h) * row_bytes;
                    prefetch_span((const char *)k_cache + next, heads * row_bytes);
                    prefetch_span((const char *)v_cache + next, heads * row_bytes);
                }
                rows[c] = cursor_next(&key) * Hkv + h;
                const float *k = cache_rows(k_cache, cache_bits, k_scales, rows[c], heads, D, key_buf);
                for (int64_t g = 0; g < Hu; g++) p[g][c] = dot(qu + g * D, k + g / G * D, D) * scale;
            }
            for (int64_t g = 0; g < Hu; g++) {  /* online softmax: rescale once, exponentials LANES at a time */
                float m_new = m[g];
                for (int64_t c = 0; c < n; c++) m_new = p[g][c] > m_new ? p[g][c] : m_new;
                const float rescale = expf(m[g] - m_new);
                for (int64_t c = 0; c < n; c += LANES) {
                    vec *scores = (vec *)(p[g] + c);
                    *scores = exp_nonpositive(*scores - m_new);
                }
                float sum = 0.0f;
                for (int64_t c = 0; c < n; c++) sum += p[g][c];
                l[g] = l[g] * rescale + sum;
                m[g] = m_new;
                multiply(acc + g * D, rescale, D);
            }
            for (int64_t c = 0; c < n; c++) {  /* the values, weighted: each read (and widened) once */
                const float *v = cache_rows(v_cache, cache_bits, v_scales, rows[c], heads, D, value_buf);
                for (int64_t g = 0; g < Hu; g++) add_scaled(acc + g * D, v + g / G * D, p[g][c], D);
            }
        }
        for (int64_t g = 0; g < Hu; g++) {
            float *o = out + (b * Hq + h * G + g) * D;
            const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
            for (int64_t d = 0; d < D; d++) o[d] = acc[g * D + d] * inv;
        }
    }
}

/* Returns 0; -1 when a size or the cache format is beyond this kernel, -2 when a length or block
 * id is out of range (checked before anything is read). */
int lowrank_cpu_paged_decode(const float *q, const void *k_cache, const void *v_cache, int64_t cache_bits,
                             const float *k_scales, const float *v_scales, const int32_t *block_tables,
                             int64_t table_stride, const int32_t *context_lens, int64_t B, int64_t Hq, int64_t Hkv,
                             int64_t D, int64_t block_size, int64_t num_blocks, int64_t window, float scale,
                             float *out, int threads)
{
    if (!lowrank_cpu_paged_decode_supports(Hq, Hkv, D) || !cache_format_valid(cache_bits, k_scales, v_scales))
        return -1;
    if (check_tables(block_tables, table_stride, context_lens, B, block_size, num_blocks)) return -2;
#pragma omp parallel num_threads(threads)
    paged_decode_shared(q, k_cache, v_cache, cache_bits, k_scales, v_scales, block_tables, table_stride,
                        context_lens, B, Hq, Hkv, D, block_size, window, scale, out);
    return 0;
}
