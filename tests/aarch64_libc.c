/* The few C library functions the native kernels call, for their aarch64 build under an emulator
 * (tests/aarch64_emulator.py): there is no libc to link there, and no OS to ask for memory.
 *
 * Compiled with -ffreestanding, so clang never turns these loops back into calls to themselves.
 * malloc is a bump allocator over a static arena whose free releases the latest block (the
 * kernels free their scratch in the order they took it); expf works in double, so it is within
 * half an ulp of float plus a rounding, as the kernels' tests expect of libm's. */
#include <stddef.h>
#include <stdint.h>

#define ARENA_BYTES (8 << 20)
#define ALIGNMENT 64

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s)
        while (n--) *d++ = *s++;
    else
        while (n--) d[n] = s[n];
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--) *d++ = (unsigned char)c;
    return dst;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

static unsigned char arena[ARENA_BYTES] __attribute__((aligned(ALIGNMENT)));
static size_t top; /* bytes of the arena in use */

/* Each block is preceded by ALIGNMENT bytes holding the arena's top before it was taken. */
void *malloc(size_t n)
{
    const size_t need = ALIGNMENT + (n + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
    if (need > ARENA_BYTES - top) return NULL;
    unsigned char *block = arena + top;
    *(size_t *)block = top;
    top += need;
    return block + ALIGNMENT;
}

void free(void *p)
{
    if (!p) return;
    const size_t before = *(size_t *)((unsigned char *)p - ALIGNMENT);
    if ((unsigned char *)p - ALIGNMENT == arena + before) top = before; /* else an older block: kept */
}

float sqrtf(float x) { return __builtin_sqrtf(x); }
float fabsf(float x) { return __builtin_fabsf(x); }
float fmaxf(float a, float b) { return __builtin_fmaxf(a, b); }
float rintf(float x) { return __builtin_rintf(x); }

/* e^x = 2^n · e^r with r = x - n·ln2, |r| <= ln2/2, e^r by its Taylor series to r^11 (error < 1e-14). */
float expf(float x)
{
    if (x != x) return x;
    if (x < -104.0f) return 0.0f; /* below float's smallest subnormal; -inf included */
    if (x > 89.0f) return __builtin_inff();
    const double n = __builtin_round((double)x * 1.4426950408889634);
    const double r = (double)x - n * 0.6931471805599453;
    double p = 1.0;
    for (int k = 11; k > 0; k--) p = 1.0 + p * r / k;
    const union { uint64_t bits; double value; } two_n = {(uint64_t)((int64_t)n + 1023) << 52};
    return (float)(p * two_n.value);
}

/* The entry point a static executable needs; the emulator calls the kernels' functions instead. */
void _start(void) { __builtin_trap(); }
