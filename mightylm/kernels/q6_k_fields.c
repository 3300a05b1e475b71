/* Q6_K weights laid out for float32 arithmetic: a layout of ours (type MIGHTY_Q6_K_FIELDS), made from a GGUF file's
 * Q6_K rows when a model is loaded (lite.py), never stored in a file. AVX2 code, as the stored blocks' Q6_K loop
 * is on every machine (AVX-512 ones run it too).
 *
 * A stored Q6_K super-block (256 values: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 d;
 * gguf_blocks.c) costs the AVX2 float loop ~23 vector operations per 32 values before the arithmetic is done:
 * shifts and masks to assemble each 6-bit code, widening bytes into lanes, converting. Here a row's codes q
 * (0..63) are 6-bit fields of 32-bit lanes, five to a lane:
 *
 *   a super-block = 7 vectors of 8 lanes (224 bytes) + its 16 int8 scales + fp16 d      (242 bytes; stored 210)
 *   group j (values 8 j .. 8 j + 7, j < 32) = bits 6 k .. 6 k + 5 of vector j / 5, k = j % 5
 *
 * An AND gives q 2^(6 k) in each lane, converted to float exactly, and x arrives scaled by 2^(-6 k) (exact: powers
 * of two), so every product is the float product q x of the stored blocks: per 8 values one AND, one conversion
 * and one multiply-add. One row of x: per 16 values (one scale) d scale (q . x - 32 sum x), the constant term as
 * -4 sum x in each lane of the first group of 8; two output rows per pass share x. Several rows: each group
 * unpacked once for up to 4 rows of x given group by group, each row summed as one row is. */
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

#define SUPER_BYTES 242
#define STORED_BYTES 210

long mighty_q6_k_fields_row_bytes(long in) { return in / 256 * SUPER_BYTES; }

/* rows of stored Q6_K super-blocks (rows, in / 256 of 210 bytes) -> the layout above (rows * row_bytes) */
__attribute__((target("avx2")))
void mighty_q6_k_fields(const unsigned char *src, long rows, long in, unsigned char *dst, int nthreads) {
    const long supers = in / 256;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++)
        for (long s = 0; s < supers; s++) {
            const unsigned char *blk = src + (r * supers + s) * STORED_BYTES;
            unsigned char *out = dst + (r * supers + s) * SUPER_BYTES;
            __m256i lanes[7];
            for (int k = 0; k < 7; k++) lanes[k] = _mm256_setzero_si256();
            for (int p = 0; p < 8; p++) {  /* values 32 p .. 32 p + 31 (dequantize_row_q6_K: half h, quarter j) */
                const int h = p / 4, j = p % 4;
                const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (j & 1)));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
                const __m256i low = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (j / 2)), _mm256_set1_epi8(15));
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), _mm256_set1_epi8(3));
                unsigned char q[32];
                _mm256_storeu_si256((__m256i *)q, _mm256_or_si256(low, _mm256_slli_epi16(high, 4)));
                for (int g = 0; g < 4; g++) {
                    const int group = 4 * p + g;
                    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * g)));
                    lanes[group / 5] = _mm256_or_si256(lanes[group / 5],
                                                       _mm256_sll_epi32(v, _mm_cvtsi32_si128(6 * (group % 5))));
                }
            }
            memcpy(out, lanes, 224);
            memcpy(out + 224, blk + 192, 18);  /* the 16 scales and d */
        }
}

/* The layout above back to stored Q6_K rows (dequantizing or tiling a layer that holds it) */
void mighty_q6_k_unfields(const unsigned char *src, long rows, long in, unsigned char *dst) {
    const long supers = in / 256;
    for (long s = 0; s < rows * supers; s++) {
        const unsigned char *t = src + s * SUPER_BYTES;
        unsigned char *blk = dst + s * STORED_BYTES;
        unsigned int lanes[56];
        memcpy(lanes, t, 224);
        memset(blk, 0, 192);
        for (int v = 0; v < 256; v++) {  /* dequantize_row_q6_K's order: half h, quarter j, l < 32 */
            const int h = v / 128, j = v % 128 / 32, l = v % 32, group = v / 8;
            const unsigned int q = lanes[8 * (group / 5) + v % 8] >> 6 * (group % 5) & 63;
            blk[64 * h + 32 * (j & 1) + l] |= (unsigned char)((q & 15) << 4 * (j / 2));
            blk[128 + 32 * h + l] |= (unsigned char)((q >> 4) << 2 * j);
        }
        memcpy(blk + 192, t + 224, 18);
    }
}

#define LANES(v) {v, v, v, v, v, v, v, v}
static const unsigned int masks[5][8] __attribute__((aligned(32))) = {
    LANES(63u), LANES(63u << 6), LANES(63u << 12), LANES(63u << 18), LANES(63u << 24)};

#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* q 2^(6 k) of group j's 8 values (v: the super-block's 7 vectors), as floats */
#define FIELD(v, j) \
    _mm256_cvtepi32_ps(_mm256_and_si256((v)[(j) / 5], _mm256_load_si256((const __m256i *)masks[(j) % 5])))

/* A super-block's 16 scales times its d, as floats */
AVX2 void scales(const unsigned char *t, float scale[16]) {
    const __m256 d = _mm256_set1_ps(half_to_float(t + 240));
    for (int k = 0; k < 2; k++)
        _mm256_store_ps(scale + 8 * k, _mm256_mul_ps(d, _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(t + 224 + 8 * k))))));
}

/* `n` output rows (1 or 2, `stride` bytes apart) times one row of x (xs: scaled; sums4: 4 sum x per 16 values) */
AVX2 void dots(const float *xs, const float *sums4, const unsigned char *row, long stride, long supers, float *y,
               const int n) {
    __m256 acc[2][2];
    float scale[2][16] __attribute__((aligned(32)));
    for (int o = 0; o < n; o++) acc[o][0] = acc[o][1] = _mm256_setzero_ps();
    for (long s = 0; s < supers; s++) {
        __m256i v[2][7];
        for (int o = 0; o < n; o++) {
            const unsigned char *t = row + o * stride + s * SUPER_BYTES;
            for (int k = 0; k < SUPER_BYTES; k += 64) _mm_prefetch((const char *)t + PREFETCH + k, _MM_HINT_T0);
            for (int k = 0; k < 7; k++) v[o][k] = _mm256_loadu_si256((const __m256i *)(t + 32 * k));
            scales(t, scale[o]);
        }
        const float *xb = xs + 256 * s;
        _Pragma("GCC unroll 16") for (int q = 0; q < 16; q++) {  /* 16 values a scale: groups 2 q, 2 q + 1 */
            const __m256 c = _mm256_broadcast_ss(sums4 + 16 * s + q);
            for (int o = 0; o < n; o++) {
                const __m256 p = _mm256_fmadd_ps(FIELD(v[o], 2 * q + 1), _mm256_loadu_ps(xb + 16 * q + 8),
                                                 _mm256_fmsub_ps(FIELD(v[o], 2 * q), _mm256_loadu_ps(xb + 16 * q), c));
                acc[o][q & 1] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(scale[o] + q), acc[o][q & 1]);
            }
        }
    }
    for (int o = 0; o < n; o++) y[o] = hsum(_mm256_add_ps(acc[o][0], acc[o][1]));
}

/* Rows F .. F + R - 1 (R <= 4) of the N rows of x in xg and sg (fields_layout: group by group) times one weight
 * row: each pair of groups unpacked once for the R rows, every row summed as `dots` sums it; results to
 * y[(F + r) * ldy] */
AVX2 void many_rows(const float *xg, const float *sg, const unsigned char *row, long supers, float *y, long ldy,
                    const int N, const int F, const int R) {
    __m256 acc[2][4];
    float scale[16] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    for (long s = 0; s < supers; s++) {
        const unsigned char *t = row + s * SUPER_BYTES;
        for (int k = 0; k < SUPER_BYTES; k += 64) _mm_prefetch((const char *)t + PREFETCH + k, _MM_HINT_T0);
        scales(t, scale);
        const float *xb = xg + 256 * N * s + 8 * F, *sb = sg + 16 * N * s + F;
        _Pragma("GCC unroll 16") for (int q = 0; q < 16; q++) {  /* 16 values a scale: groups 2 q, 2 q + 1 */
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(t + 32 * (2 * q / 5)));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(t + 32 * ((2 * q + 1) / 5)));
            const __m256 f0 = FIELD(&v0, 2 * q % 5), f1 = FIELD(&v1, (2 * q + 1) % 5);
            const __m256 sc = _mm256_broadcast_ss(scale + q);
            for (int r = 0; r < R; r++) {
                const __m256 p = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xb + 8 * ((2 * q + 1) * N + r)),
                                                 _mm256_fmsub_ps(f0, _mm256_loadu_ps(xb + 8 * (2 * q * N + r)),
                                                                 _mm256_broadcast_ss(sb + q * N + r)));
                acc[q & 1][r] = _mm256_fmadd_ps(p, sc, acc[q & 1][r]);
            }
        }
    }
    for (int r = 0; r < R; r++) y[(F + r) * ldy] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
}

__attribute__((target("avx2,fma,f16c"), noinline))
static void rows_pass(const float *xg, long n, const float *sg, const unsigned char *row, long units, float *y,
                      long out) {
    FIELDS_ROWS_CASES(many_rows)
}

__attribute__((target("avx2,fma,f16c"), noinline))
static void dots_pass(const float *xs, const float *sums4, const unsigned char *row, long stride, long supers, float *y,
                      int n) {
    if (n == 2) dots(xs, sums4, row, stride, supers, y, 2);
    else dots(xs, sums4, row, stride, supers, y, 1);
}

/* y (rows, out) = x (rows, in) @ W^T (+ bias), W in the layout above; in % 256 == 0 */
void mighty_gemm_q6_k_fields(const float *x, long rows, const unsigned char *W, const float *bias, float *y,
                             long in, long out, int nthreads) {
    const fields_layout layout = {.bits = 6, .fields = 5, .period = 32, .sum_size = 16, .sum_factor = 4.0f,
                                  .row_bytes = mighty_q6_k_fields_row_bytes(in), .units = in / 256, .dots = dots_pass,
                                  .rows = rows_pass};
    fields_gemm(x, rows, W, bias, y, in, out, nthreads, &layout);
}
