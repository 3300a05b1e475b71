/* Q5_0 weights laid out for float32 arithmetic on AVX2: a layout of ours (type MIGHTY_Q5_0_FIELDS), made from a
 * GGUF file's Q5_0 rows when a model is loaded, never stored in a file.
 *
 * A stored Q5_0 block (fp16 d, 32 fifth bits, 16 bytes of nibbles; gguf_blocks.c) costs the AVX2 float loop most
 * of its vector operations before any arithmetic: widening bytes, splitting nibbles, and one OR per 8 values of
 * their fifth bits from a table whose index is computed in scalar code. That loop reads Q5_0 at ~15 GB/s of its
 * 2 cores where the memory gives ~30 (Qwen2.5-Coder's Q4_K_M file holds 254 MB of Q5_0). Here a row's codes
 * q (0..31) are 5-bit fields of 32-bit lanes, six to a lane:
 *
 *   a run of three blocks (96 values) = 2 vectors of 8 lanes (64 bytes) + the three blocks' fp16 d (6 bytes)
 *   group j (values 8 j .. 8 j + 7 of the run, j < 12) = bits 5 k .. 5 k + 4 of vector j / 6, k = j % 6
 *
 * and a row's last one or two blocks are a run of their own (one vector + 2 bytes, or two + 4). One AND gives
 * q 2^(5 k) in each lane, converted to float exactly, and x arrives scaled by 2^(-5 k) (exact: powers of two), so
 * every product is the float product q x of the stored blocks: per 8 values one AND, one conversion and one
 * multiply-add. 70 bytes for 96 values (Q5_0: 66; a 28-block row 664 bytes instead of 616).
 *
 * One row of x: per block d (q . x - 16 sum x), the constant term taken as -2 sum x in each lane of the block's
 * first group (float rounding of the stored loop's result, in another order); two output rows per pass share x.
 * Several rows: each group unpacked once for up to 4 rows given group by group, each row summed as one row is (so
 * a row's result has the same bits whatever rows share its pass). Measured on Qwen2.5-Coder's shapes (AMD EPYC,
 * AVX2, 2 threads, alternated in one process): one row 0.65-0.71x the stored loop's time (bench/RESULTS.md). */
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

#define RUN_BYTES 70

static inline long run_vectors(long blocks) { return (4 * blocks + 5) / 6; }

long mighty_q5_0_fields_row_bytes(long in) {
    const long blocks = in / 32, tail = blocks % 3;
    return blocks / 3 * RUN_BYTES + (tail ? 32 * run_vectors(tail) + 2 * tail : 0);
}

/* A stored block's 32 codes q (0..31) as 4 vectors of 8 (values 0..7, 8..15, 16..23, 24..31) */
__attribute__((target("avx2"), always_inline)) static inline void block_codes(const unsigned char *blk, __m256i v[4]) {
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 6)));
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 14)));
    const __m256i nibble = _mm256_set1_epi32(15), bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    unsigned int qh;
    memcpy(&qh, blk + 2, 4);
    v[0] = _mm256_and_si256(lo, nibble);
    v[1] = _mm256_and_si256(hi, nibble);
    v[2] = _mm256_srli_epi32(lo, 4);
    v[3] = _mm256_srli_epi32(hi, 4);
    for (int g = 0; g < 4; g++) {  /* value 8 g + i's fifth bit: bit 8 g + i of qh, as 16 */
        const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(qh >> 8 * g)), bit), bit);
        v[g] = _mm256_or_si256(v[g], _mm256_and_si256(set, _mm256_set1_epi32(16)));
    }
}

/* rows of stored Q5_0 blocks (rows, in / 32 blocks of 22 bytes) -> the layout above (rows * row_bytes) */
__attribute__((target("avx2")))
void mighty_q5_0_fields(const unsigned char *src, long rows, long in, unsigned char *dst, int nthreads) {
    const long blocks = in / 32, bytes = mighty_q5_0_fields_row_bytes(in);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const unsigned char *row = src + r * blocks * 22;
        unsigned char *out = dst + r * bytes;
        for (long first = 0; first < blocks; first += 3) {
            const long n = blocks - first < 3 ? blocks - first : 3, vectors = run_vectors(n);
            __m256i lanes[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (long b = 0; b < n; b++) {
                const unsigned char *blk = row + (first + b) * 22;
                __m256i v[4];
                block_codes(blk, v);
                for (int g = 0; g < 4; g++) {
                    const int j = 4 * (int)b + g;
                    const __m128i at = _mm_cvtsi32_si128(5 * (j % 6));
                    lanes[j / 6] = _mm256_or_si256(lanes[j / 6], _mm256_sll_epi32(v[g], at));
                }
                memcpy(out + 32 * vectors + 2 * b, blk, 2);
            }
            memcpy(out, lanes, 32 * vectors);
            out += 32 * vectors + 2 * n;
        }
    }
}

/* The layout above back to stored Q5_0 rows (dequantizing, widening or tiling a layer that holds it) */
void mighty_q5_0_unfields(const unsigned char *src, long rows, long in, unsigned char *dst) {
    const long blocks = in / 32, bytes = mighty_q5_0_fields_row_bytes(in);
    for (long r = 0; r < rows; r++) {
        const unsigned char *t = src + r * bytes;
        for (long first = 0; first < blocks; first += 3) {
            const long n = blocks - first < 3 ? blocks - first : 3, vectors = run_vectors(n);
            unsigned int lanes[16];
            memcpy(lanes, t, 32 * vectors);
            for (long b = 0; b < n; b++) {
                unsigned char *blk = dst + (r * blocks + first + b) * 22;
                unsigned int qh = 0;
                memcpy(blk, t + 32 * vectors + 2 * b, 2);
                memset(blk + 6, 0, 16);
                for (int v = 0; v < 32; v++) {  /* value v: group 4 b + v / 8, lane v % 8 */
                    const int j = 4 * (int)b + v / 8;
                    const unsigned int q = lanes[8 * (j / 6) + v % 8] >> 5 * (j % 6) & 31;
                    blk[6 + v % 16] |= (unsigned char)((q & 15) << (v < 16 ? 0 : 4));
                    qh |= (q >> 4) << v;
                }
                memcpy(blk + 2, &qh, 4);
            }
            t += 32 * vectors + 2 * n;
        }
    }
}

/* Field k's mask, 8 lanes: loaded as an operand (GCC otherwise rebuilt each mask from an immediate per use, three
 * instructions, in the unrolled loops) */
#define LANES(v) {v, v, v, v, v, v, v, v}
static const unsigned int masks[6][8] __attribute__((aligned(32))) = {
    LANES(31u), LANES(31u << 5), LANES(31u << 10), LANES(31u << 15), LANES(31u << 20), LANES(31u << 25)};

/* q 2^(5 k) of group j's 8 values, as floats */
#define FIELD(v, j) \
    _mm256_cvtepi32_ps(_mm256_and_si256((v)[(j) / 6], _mm256_load_si256((const __m256i *)masks[(j) % 6])))

#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* One run of `nb` blocks (a constant in each copy) of `n` output rows (1 or 2, `stride` bytes apart) times one row of
 * x (xb: the run's part of xs; s2: its blocks' -2 sum x terms), into acc[o][block & 1] */
AVX2 void run_dots(const float *xb, const float *s2, const unsigned char *t, long stride, __m256 acc[2][2],
                   const int n, const int nb) {
    const int vectors = (4 * nb + 5) / 6;
    __m256i v[2][2];
    for (int o = 0; o < n; o++) {
        const unsigned char *to = t + o * stride;
        _mm_prefetch((const char *)to + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)to + PREFETCH + 64, _MM_HINT_T0);
        v[o][0] = _mm256_loadu_si256((const __m256i *)to);
        v[o][1] = vectors > 1 ? _mm256_loadu_si256((const __m256i *)(to + 32)) : v[o][0];
    }
    _Pragma("GCC unroll 3") for (int b = 0; b < nb; b++) {  /* unrolled: each group's field a constant */
        const __m256 s = _mm256_broadcast_ss(s2 + b);
        __m256 p[2];
        for (int o = 0; o < n; o++) p[o] = _mm256_fmsub_ps(FIELD(v[o], 4 * b), _mm256_loadu_ps(xb + 32 * b), s);
        _Pragma("GCC unroll 3") for (int g = 1; g < 4; g++)
            for (int o = 0; o < n; o++)
                p[o] = _mm256_fmadd_ps(FIELD(v[o], 4 * b + g), _mm256_loadu_ps(xb + 32 * b + 8 * g), p[o]);
        for (int o = 0; o < n; o++)
            acc[o][b & 1] = _mm256_fmadd_ps(
                p[o], _mm256_set1_ps(half_to_float(t + o * stride + 32 * vectors + 2 * b)), acc[o][b & 1]);
    }
}

/* `n` output rows (1 or 2) times one row of x: their dot products to y[0], y[n - 1] */
AVX2 void dots(const float *xs, const float *sums2, const unsigned char *row, long stride, long blocks, float *y,
               const int n) {
    __m256 acc[2][2];
    for (int o = 0; o < n; o++) acc[o][0] = acc[o][1] = _mm256_setzero_ps();
    long first = 0;
    for (; first + 3 <= blocks; first += 3)
        run_dots(xs + 32 * first, sums2 + first, row + first / 3 * RUN_BYTES, stride, acc, n, 3);
    if (blocks - first == 2) run_dots(xs + 32 * first, sums2 + first, row + first / 3 * RUN_BYTES, stride, acc, n, 2);
    if (blocks - first == 1) run_dots(xs + 32 * first, sums2 + first, row + first / 3 * RUN_BYTES, stride, acc, n, 1);
    for (int o = 0; o < n; o++) y[o] = hsum(_mm256_add_ps(acc[o][0], acc[o][1]));
}

/* One run of `nb` blocks of one output row times rows F .. F + R - 1 (R <= 4) of the N rows of x in xg and sg
 * (the run's first group and first block sum; fields_layout: group by group), every row summed as run_dots sums
 * it, into acc[block & 1][r] */
AVX2 void run_rows(const float *xg, const float *sg, const unsigned char *t, __m256 acc[2][4], const int N,
                   const int F, const int R, const int nb) {
    const int vectors = (4 * nb + 5) / 6;
    _mm_prefetch((const char *)t + PREFETCH, _MM_HINT_T0);
    _mm_prefetch((const char *)t + PREFETCH + 64, _MM_HINT_T0);
    const __m256i v[2] = {_mm256_loadu_si256((const __m256i *)t),
                          vectors > 1 ? _mm256_loadu_si256((const __m256i *)(t + 32)) : _mm256_setzero_si256()};
    _Pragma("GCC unroll 3") for (int b = 0; b < nb; b++) {  /* unrolled: each group's field a constant */
        const __m256 d = _mm256_set1_ps(half_to_float(t + 32 * vectors + 2 * b));
        __m256 f[4];
        for (int g = 0; g < 4; g++) f[g] = FIELD(v, 4 * b + g);
        for (int r = 0; r < R; r++) {
            const float *xr = xg + 8 * (F + r);
            __m256 p = _mm256_fmsub_ps(f[0], _mm256_loadu_ps(xr + 8 * 4 * b * N),
                                       _mm256_broadcast_ss(sg + b * N + F + r));
            for (int g = 1; g < 4; g++) p = _mm256_fmadd_ps(f[g], _mm256_loadu_ps(xr + 8 * (4 * b + g) * N), p);
            acc[b & 1][r] = _mm256_fmadd_ps(p, d, acc[b & 1][r]);
        }
    }
}

/* Rows F .. F + R - 1 of the N rows of x in xg and sg times one weight row; results to y[(F + r) * ldy] */
AVX2 void many_rows(const float *xg, const float *sg, const unsigned char *row, long blocks, float *y, long ldy,
                    const int N, const int F, const int R) {
    __m256 acc[2][4];
    for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    long first = 0;
    const unsigned char *t = row;
    for (; first + 3 <= blocks; first += 3, t += RUN_BYTES)
        run_rows(xg + 32 * N * first, sg + N * first, t, acc, N, F, R, 3);
    if (blocks - first == 2) run_rows(xg + 32 * N * first, sg + N * first, t, acc, N, F, R, 2);
    if (blocks - first == 1) run_rows(xg + 32 * N * first, sg + N * first, t, acc, N, F, R, 1);
    for (int r = 0; r < R; r++) y[(F + r) * ldy] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
}

__attribute__((target("avx2,fma,f16c"), noinline))
static void rows_pass(const float *xg, long n, const float *sg, const unsigned char *row, long units, float *y,
                      long out) {
    FIELDS_ROWS_CASES(many_rows)
}

__attribute__((target("avx2,fma,f16c"), noinline))
static void dots_pass(const float *xs, const float *sums2, const unsigned char *row, long stride, long blocks, float *y,
                      int n) {
    if (n == 2) dots(xs, sums2, row, stride, blocks, y, 2);
    else dots(xs, sums2, row, stride, blocks, y, 1);
}

/* y (rows, out) = x (rows, in) @ W^T (+ bias), W in the layout above; in % 32 == 0. The one path on every CPU
 * (AVX-512 machines keep stored Q5_0: their loop sets fifth bits under a mask, no table). */
void mighty_gemm_q5_0_fields(const float *x, long rows, const unsigned char *W, const float *bias, float *y,
                             long in, long out, int nthreads) {
    const fields_layout layout = {.bits = 5, .fields = 6, .period = 12, .sum_size = 32, .sum_factor = 2.0f,
                                  .row_bytes = mighty_q5_0_fields_row_bytes(in), .units = in / 32, .dots = dots_pass,
                                  .rows = rows_pass};
    fields_gemm(x, rows, W, bias, y, in, out, nthreads, &layout);
}
