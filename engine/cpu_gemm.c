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
 * one contiguous stream. Each panel computes up to 16 rows at a time into 16 vector accumulators
 * (one per row, one lane per output column): per k, one vector load of the weight and one FMA per
 * row with x[m][k] broadcast. Panels are split across OpenMP threads (the runtime torch uses).
 *
 * Built and loaded by engine/cpu_native.py; packing and dispatch are in engine/cpu_gemm.py.
 */
#include <stdint.h>
#include <string.h>

#define PANEL 16
#define MAX_ROWS 16
#define PAIR_ROWS 8
#define ROW_BLOCK 128 /* rows per tile at prefill sizes: 128 x K floats stay in L2 */
#define PREFETCH 32 /* weight rows (of 16 floats: one cache line) fetched ahead of the FMAs */

typedef float vec __attribute__((vector_size(PANEL * sizeof(float))));
typedef float vec_unaligned __attribute__((vector_size(PANEL * sizeof(float)), aligned(sizeof(float))));

/* rows x[0..ROWS) (row stride ldx) times one panel -> y columns [0, cols) of those rows. ROWS is
 * a compile-time constant at every call site, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t ldx, const int ROWS, int64_t K,
                                                             const float *panel, float *y, int64_t ldy, int cols,
                                                             const float *bias)
{
    vec acc[MAX_ROWS];
    for (int m = 0; m < ROWS; m++) acc[m] = (vec){0};
    for (int64_t k = 0; k < K; k++) {
        __builtin_prefetch(panel + PANEL * (k + PREFETCH), 0, 0);
        vec w = *(const vec_unaligned *)(panel + PANEL * k);
        for (int m = 0; m < ROWS; m++) acc[m] += x[m * ldx + k] * w;
    }
    if (bias) {
        vec b = {0};
        memcpy(&b, bias, sizeof(float) * cols);
        for (int m = 0; m < ROWS; m++) acc[m] += b;
    }
    if (cols == PANEL) {
        for (int m = 0; m < ROWS; m++) *(vec_unaligned *)(y + m * ldy) = acc[m];
    } else {
        for (int m = 0; m < ROWS; m++) memcpy(y + m * ldy, &acc[m], sizeof(float) * cols);
    }
}

/* All M rows times one panel: blocks of MAX_ROWS, then the remainder with its own constant. */
static void panel_all_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const float *panel, float *y,
                           int64_t ldy, int cols, const float *bias)
{
    int64_t m = 0;
    for (; m + MAX_ROWS <= M; m += MAX_ROWS)
        panel_rows(x + m * ldx, ldx, MAX_ROWS, K, panel, y + m * ldy, ldy, cols, bias);
    const float *xr = x + m * ldx;
    float *yr = y + m * ldy;
    switch (M - m) {
#define REMAINDER(n) case n: panel_rows(xr, ldx, n, K, panel, yr, ldy, cols, bias); break;
    REMAINDER(1) REMAINDER(2) REMAINDER(3) REMAINDER(4) REMAINDER(5) REMAINDER(6) REMAINDER(7)
    REMAINDER(8) REMAINDER(9) REMAINDER(10) REMAINDER(11) REMAINDER(12) REMAINDER(13) REMAINDER(14)
    REMAINDER(15)
#undef REMAINDER
    default: break;
    }
}

/* Prefill sizes: PAIR_ROWS rows times two adjacent panels (32 columns), so each broadcast of x
 * feeds two FMAs: 10 loads per 16 FMAs instead of 17. */
static inline __attribute__((always_inline)) void pair_rows(const float *x, int64_t ldx, const int ROWS, int64_t K,
                                                            const float *panel, float *y, int64_t ldy, int cols,
                                                            const float *bias)
{
    const float *next = panel + K * PANEL;
    vec acc[PAIR_ROWS], acc2[PAIR_ROWS];
    for (int m = 0; m < ROWS; m++) acc[m] = acc2[m] = (vec){0};
    for (int64_t k = 0; k < K; k++) {
        vec w = *(const vec_unaligned *)(panel + PANEL * k), w2 = *(const vec_unaligned *)(next + PANEL * k);
        for (int m = 0; m < ROWS; m++) {
            const float xm = x[m * ldx + k];
            acc[m] += xm * w;
            acc2[m] += xm * w2;
        }
    }
    float tile[PAIR_ROWS][2 * PANEL];
    for (int m = 0; m < ROWS; m++) {
        memcpy(tile[m], &acc[m], sizeof(vec));
        memcpy(tile[m] + PANEL, &acc2[m], sizeof(vec));
        if (bias)
            for (int c = 0; c < cols; c++) tile[m][c] += bias[c];
        memcpy(y + m * ldy, tile[m], sizeof(float) * cols);
    }
}

static void pair_all_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const float *panel, float *y,
                          int64_t ldy, int cols, const float *bias)
{
    int64_t m = 0;
    for (; m + PAIR_ROWS <= M; m += PAIR_ROWS)
        pair_rows(x + m * ldx, ldx, PAIR_ROWS, K, panel, y + m * ldy, ldy, cols, bias);
    const float *xr = x + m * ldx;
    float *yr = y + m * ldy;
    switch (M - m) {
#define REMAINDER(n) case n: pair_rows(xr, ldx, n, K, panel, yr, ldy, cols, bias); break;
    REMAINDER(1) REMAINDER(2) REMAINDER(3) REMAINDER(4) REMAINDER(5) REMAINDER(6) REMAINDER(7)
#undef REMAINDER
    default: break;
    }
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) · Wᵀ + bias, W packed; called inside a
 * parallel region, the (row block, panel) tiles shared among its threads (implicit barrier at the
 * end). Up to ROW_BLOCK rows the threads split the panels; beyond, each thread takes whole row
 * blocks, whose rows stay in its L2 while the panels stream past. */
static void gemm_shared(const float *x, int64_t ldx, int64_t M, int64_t K, const float *packed, int64_t N, float *y,
                        int64_t ldy, const float *bias)
{
    const int64_t panels = (N + PANEL - 1) / PANEL, row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t step = M > MAX_ROWS ? 2 : 1, tiles = (panels + step - 1) / step;  /* panels per tile */
#pragma omp for collapse(2) schedule(static)
    for (int64_t r = 0; r < row_blocks; r++) {
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t m = r * ROW_BLOCK, rows = M - m < ROW_BLOCK ? M - m : ROW_BLOCK, p = t * step;
            const int64_t width = N - PANEL * p < step * PANEL ? N - PANEL * p : step * PANEL;
            const float *w = packed + p * K * PANEL, *b = bias ? bias + PANEL * p : 0;
            float *out = y + m * ldy + PANEL * p;
            if (width > PANEL)
                pair_all_rows(x + m * ldx, ldx, rows, K, w, out, ldy, (int)width, b);
            else
                panel_all_rows(x + m * ldx, ldx, rows, K, w, out, ldy, (int)width, b);
        }
    }
}

/* y [M, N] = x [M, K] · Wᵀ + bias (bias may be NULL); x, y contiguous. */
void lowrank_cpu_linear(const float *x, int64_t M, int64_t K, const float *packed, int64_t N, const float *bias,
                        float *y, int threads)
{
#pragma omp parallel num_threads(threads)
    gemm_shared(x, K, M, K, packed, N, y, N, bias);
}

/* y [M, N] = (x [M, K] · Bᵀ) · Aᵀ + bias with B [R, K], A [N, R] packed; scratch [M, R] holds
 * x·Bᵀ between the two phases (one parallel region, a barrier between them). */
void lowrank_cpu_lowrank(const float *x, int64_t M, int64_t K, const float *packed_b, int64_t R,
                         const float *packed_a, int64_t N, const float *bias, float *scratch, float *y, int threads)
{
#pragma omp parallel num_threads(threads)
    {
        gemm_shared(x, K, M, K, packed_b, R, scratch, R, 0);
        gemm_shared(scratch, R, M, R, packed_a, N, y, N, bias);
    }
}
