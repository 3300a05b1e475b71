/* Products with GGUF's own blocks of 32 weights, read as stored (ggml-common.h); W (out, in / 32 blocks) row-major:
 *   Q8_0 (type 8):  fp16 d, 32 int8 q                 w = d * q
 *   Q4_0 (type 2):  fp16 d, 16 bytes                   w = d * q - 8 d
 *   Q4_1 (type 3):  fp16 d, fp16 m, 16 bytes           w = d * q + m
 * with byte j holding value j in its low nibble and value j + 16 in its high one. In short, w = d * q + c.
 * F16 (type 1) and BF16 (type 30) rows are taken as blocks of 32 plain values (64 bytes; d = 1, c = 0), converted
 * to float32 in registers (vcvtph2ps; a 16-bit shift for bfloat16).
 *
 *   y[r][0:out] = x[r][0:in] @ W^T (+ bias)      for each of `rows` rows of x
 *
 * One row (decoding one token): per block, sum_j w_j x_j = d * sum_j q_j x_j + c * sum_j x_j, so the 32 products
 * are taken with the codes (converted to float) and scaled once, and the block sums of x are computed once per
 * call. Two blocks per step with their own accumulators, so that no chain of dependent additions sets the pace.
 * Several rows (a prompt, a server's batch): each block is unpacked once into its 32 float weights and multiplied
 * into up to 8 rows held in registers, so the unpacking is shared by the rows.
 * Float32 arithmetic throughout: the result is dequantize-then-multiply up to float rounding. Each thread takes a
 * band of output rows (OpenMP), as the other quantized products do. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, BF16 = 30 };

/* Decoding reads each weight once, from L3 or memory; the hardware prefetchers of the machines here did not keep
 * ahead of two threads streaming blocks (perf: the stall sat on each block's first load), so the loop asks for the
 * bytes PREFETCH ahead itself. Measured on SmolLM2-135M Q4_1, AVX-512, 2 threads, interleaved runs in one process:
 * 69 tok/s without, 80 at 512 bytes, 92-96 at 2-16 KiB. */
#define PREFETCH 4096

float mighty_half_table[65536];

__attribute__((constructor, target("f16c")))
static void fill_half_table(void) {
    for (int h = 0; h < 65536; h++) mighty_half_table[h] = _cvtsh_ss((unsigned short)h);
}

static inline long block_bytes(int type) {
    return type == Q8_0 ? 34 : type == Q4_1 ? 20 : type == Q4_0 ? 18 : 64;  /* F16, BF16: 32 values of 2 bytes */
}

static inline int plain(int type) { return type == F16 || type == BF16; }

/* The block's scale d (1 for plain 16-bit values). */
static inline float block_scale(const unsigned char *blk, int type) { return plain(type) ? 1.0f : half_to_float(blk); }

/* The block's constant term c (see above). */
static inline float block_offset(const unsigned char *blk, int type, float d) {
    return type == Q4_1 ? half_to_float(blk + 2) : type == Q4_0 ? -8.0f * d : 0.0f;
}

static float *block_sums(const float *x, long in) {
    float *xsum = malloc(sizeof(float) * (in / 32 > 0 ? in / 32 : 1));
    for (long b = 0; b < in / 32; b++) {
        float t = 0.0f;
        for (long j = 0; j < 32; j++) t += x[32 * b + j];
        xsum[b] = t;
    }
    return xsum;
}

/* ---- AVX-512: a block is two registers of 16 ---- */
#define AVX512 __attribute__((target("avx512f,avx512bw,f16c,fma"), always_inline)) static inline

AVX512 void codes512(const unsigned char *blk, int type, __m512 *c0, __m512 *c1) {
    if (type == Q8_0) {
        *c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        *c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
    } else if (type == F16) {
        *c0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        *c1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
    } else if (type == BF16) {  /* bfloat16 is the top half of a float32 */
        *c0 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)blk)), 16));
        *c1 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + 32))), 16));
    } else {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + block_bytes(type) - 16)));
        *c0 = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
        *c1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
    }
}

/* d * (codes . x) of one block, and its constant term's share c * sum(x) added to *off */
AVX512 __m512 block_dot512(const unsigned char *blk, int type, const float *xb, float xsum, float *off, float *d) {
    __m512 c0, c1;
    codes512(blk, type, &c0, &c1);
    *d = block_scale(blk, type);
    if (type != Q8_0 && !plain(type)) *off += block_offset(blk, type, *d) * xsum;
    return _mm512_fmadd_ps(c1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(c0, _mm512_loadu_ps(xb)));
}

AVX512 float one_row512(const float *x, const float *xsum, const unsigned char *row, int type, long blocks) {
    const long bytes = block_bytes(type);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    float off0 = 0.0f, off1 = 0.0f, d0, d1;
    long b = 0;
    for (; b + 2 <= blocks; b += 2) {
        _mm_prefetch((const char *)(row + b * bytes) + PREFETCH, _MM_HINT_T0);
        const __m512 p0 = block_dot512(row + b * bytes, type, x + 32 * b, xsum[b], &off0, &d0);
        const __m512 p1 = block_dot512(row + (b + 1) * bytes, type, x + 32 * b + 32, xsum[b + 1], &off1, &d1);
        a0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d0), a0);
        a1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(d1), a1);
    }
    if (b < blocks) {
        const __m512 p0 = block_dot512(row + b * bytes, type, x + 32 * b, xsum[b], &off0, &d0);
        a0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d0), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + off0 + off1;
}

/* R rows of x (row stride ldx) times one weight row; results to y[r * ldy] */
AVX512 void many_rows512(const float *x, long ldx, const unsigned char *row, int type, long blocks, float *y,
                         long ldy, const int R) {
    const long bytes = block_bytes(type);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m512 w0, w1;
        codes512(blk, type, &w0, &w1);
        const float d = block_scale(blk, type);
        const __m512 vd = _mm512_set1_ps(d), vc = _mm512_set1_ps(block_offset(blk, type, d));
        w0 = _mm512_fmadd_ps(w0, vd, vc);
        w1 = _mm512_fmadd_ps(w1, vd, vc);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * ldx + 32 * b;
            acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r]));
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

/* Output row o for every row of x; `type` is a constant in each copy (see gemm below). */
AVX512 void out_row512(const float *x, long rows, const float *xsum, const unsigned char *W, const int type,
                       const float *bias, float *y, long in, long out, long o) {
    const long blocks = in / 32;
    const unsigned char *row = W + o * blocks * block_bytes(type);
    if (rows == 1) {
        y[o] = one_row512(x, xsum, row, type, blocks);
    } else {
        long r = 0;
        for (; r < rows; r += 8) {  /* the rest in one pass (a speculative step verifies 2-9 rows) */
            const float *xr = x + r * in;
            float *yr = y + r * out + o;
            switch (rows - r < 8 ? rows - r : 8) {
                case 8: many_rows512(xr, in, row, type, blocks, yr, out, 8); break;
                case 7: many_rows512(xr, in, row, type, blocks, yr, out, 7); break;
                case 6: many_rows512(xr, in, row, type, blocks, yr, out, 6); break;
                case 5: many_rows512(xr, in, row, type, blocks, yr, out, 5); break;
                case 4: many_rows512(xr, in, row, type, blocks, yr, out, 4); break;
                case 3: many_rows512(xr, in, row, type, blocks, yr, out, 3); break;
                case 2: many_rows512(xr, in, row, type, blocks, yr, out, 2); break;
                default: many_rows512(xr, in, row, type, blocks, yr, out, 1);
            }
        }
    }
    if (bias)
        for (long r = 0; r < rows; r++) y[r * out + o] += bias[o];
}

/* ---- AVX2: a block is four registers of 8 ---- */
#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

AVX2 void codes256(const unsigned char *blk, int type, __m256 c[4]) {
    if (type == Q8_0) {
        for (int k = 0; k < 4; k++)
            c[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * k))));
    } else if (type == F16) {
        for (int k = 0; k < 4; k++) c[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * k)));
    } else if (type == BF16) {
        for (int k = 0; k < 4; k++)
            c[k] = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(blk + 16 * k))), 16));
    } else {
        const unsigned char *qs = blk + block_bytes(type) - 16;
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
        const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
        const __m256i nibble = _mm256_set1_epi32(15);
        c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, nibble));   /* values 0..7 */
        c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, nibble));   /* 8..15 */
        c[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));       /* 16..23 */
        c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));       /* 24..31 */
    }
}

AVX2 float one_row256(const float *x, const float *xsum, const unsigned char *row, int type, long blocks) {
    const long bytes = block_bytes(type);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float off = 0.0f;
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        const float *xb = x + 32 * b;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m256 c[4];
        codes256(blk, type, c);
        const float d = block_scale(blk, type);
        __m256 p = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
        __m256 q = _mm256_mul_ps(c[1], _mm256_loadu_ps(xb + 8));
        p = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xb + 16), p);
        q = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), q);
        if (type != Q8_0 && !plain(type)) off += block_offset(blk, type, d) * xsum[b];
        a0 = _mm256_fmadd_ps(p, _mm256_set1_ps(d), a0);
        a1 = _mm256_fmadd_ps(q, _mm256_set1_ps(d), a1);
    }
    return hsum(_mm256_add_ps(a0, a1)) + off;
}

AVX2 void many_rows256(const float *x, long ldx, const unsigned char *row, int type, long blocks, float *y,
                       long ldy, const int R) {
    const long bytes = block_bytes(type);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m256 w[4];
        codes256(blk, type, w);
        const float d = block_scale(blk, type);
        const __m256 vd = _mm256_set1_ps(d), vc = _mm256_set1_ps(block_offset(blk, type, d));
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(w[k], vd, vc);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * ldx + 32 * b;
            for (int k = 0; k < 4; k++) acc[r] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xb + 8 * k), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum(acc[r]);
}

AVX2 void out_row256(const float *x, long rows, const float *xsum, const unsigned char *W, const int type,
                     const float *bias, float *y, long in, long out, long o) {
    const long blocks = in / 32;
    const unsigned char *row = W + o * blocks * block_bytes(type);
    if (rows == 1) {
        y[o] = one_row256(x, xsum, row, type, blocks);
    } else {
        long r = 0;
        for (; r < rows; r += 4) {
            const float *xr = x + r * in;
            float *yr = y + r * out + o;
            switch (rows - r < 4 ? rows - r : 4) {
                case 4: many_rows256(xr, in, row, type, blocks, yr, out, 4); break;
                case 3: many_rows256(xr, in, row, type, blocks, yr, out, 3); break;
                case 2: many_rows256(xr, in, row, type, blocks, yr, out, 2); break;
                default: many_rows256(xr, in, row, type, blocks, yr, out, 1);
            }
        }
    }
    if (bias)
        for (long r = 0; r < rows; r++) y[r * out + o] += bias[o];
}

/* Each output row is one call with the type a constant, so each type gets its own copy of the inner loops and no
 * branch on the type runs per block. (A constant passed into an OpenMP region does not reach its outlined body.) */
__attribute__((target("avx512f,avx512bw,f16c,fma")))
static void gemm512(const float *x, long rows, const float *xsum, const unsigned char *W, int type,
                    const float *bias, float *y, long in, long out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        if (type == Q8_0) out_row512(x, rows, xsum, W, Q8_0, bias, y, in, out, o);
        else if (type == Q4_0) out_row512(x, rows, xsum, W, Q4_0, bias, y, in, out, o);
        else if (type == Q4_1) out_row512(x, rows, xsum, W, Q4_1, bias, y, in, out, o);
        else if (type == F16) out_row512(x, rows, xsum, W, F16, bias, y, in, out, o);
        else out_row512(x, rows, xsum, W, BF16, bias, y, in, out, o);
    }
}

__attribute__((target("avx2,fma,f16c")))
static void gemm256(const float *x, long rows, const float *xsum, const unsigned char *W, int type,
                    const float *bias, float *y, long in, long out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        if (type == Q8_0) out_row256(x, rows, xsum, W, Q8_0, bias, y, in, out, o);
        else if (type == Q4_0) out_row256(x, rows, xsum, W, Q4_0, bias, y, in, out, o);
        else if (type == Q4_1) out_row256(x, rows, xsum, W, Q4_1, bias, y, in, out, o);
        else if (type == F16) out_row256(x, rows, xsum, W, F16, bias, y, in, out, o);
        else out_row256(x, rows, xsum, W, BF16, bias, y, in, out, o);
    }
}

/* x (rows, in) float32 row-major, y (rows, out); in % 32 == 0; type 8, 2, 3, 1 or 30; bias may be NULL. */
void mighty_gemm_ggml(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                      long in, long out, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    float *xsum = rows == 1 ? block_sums(x, in) : NULL;
    /* One row of float16 / bfloat16 values: the 256-bit loop, where it was faster on the AMD EPYC (Zen 4) with
     * AVX-512 here, 1.17-1.34x per token over in-process alternations (bench/RESULTS.md, 2026-12-03; its 512-bit
     * conversions are split in two there); not measured on Intel's AVX-512. */
    if (mighty_isa_level && !(rows == 1 && plain(type))) gemm512(x, rows, xsum, W, type, bias, y, in, out, nthreads);
    else gemm256(x, rows, xsum, W, type, bias, y, in, out, nthreads);
    free(xsum);
}

void mighty_gemv_ggml(const float *x, const unsigned char *W, int type, const float *bias, float *y, long in,
                      long out, int nthreads) {
    mighty_gemm_ggml(x, 1, W, type, bias, y, in, out, nthreads);
}

/* ---- Activations rounded to 8 bits, as llama.cpp multiplies (opt-in: `int8_activations_`) ----
 * One row of x is quantized per block of 32 as ggml's Q8_0 quantizes (dx = max|x| / 127, xq = x / dx rounded to
 * nearest even, dx kept in float32), and each block product is an exact integer dot product scaled once:
 *   Q4_0  d dx (q . xq - 8 sum xq)      Q4_1  d dx (q . xq) + m dx sum xq      Q8_0  d dx (q . xq)
 * u8 x s8 products four at a time into int32 (AVX-512 VNNI's vpdpbusd on 256-bit registers; AVX2's vpmaddubsw +
 * vpmaddwd, which cannot saturate here: |q| <= 128, |xq| <= 127). Q8_0's signed codes enter as |q| with their sign
 * moved onto xq. About twice as fast per block as the float path (a C microbenchmark, one AMD EPYC core, the
 * weights in L2: 0.9 against 1.8 ns per Q4_0 block), at the cost of the activations' rounding (~0.4 % of each
 * block's largest value): logits move within quantization noise, and near-ties can split, as in llama.cpp. */

/* x (in) -> xq (in), dx and sum xq per block (8 floats at a time; rounding to nearest even, as nearbyintf), and,
 * when c8 is not NULL (Q4_0), per block the 8 int32 lanes of -8 (1, 1, 1, 1) . xq four bytes at a time: Q4_0's
 * offset, -8 sum xq, laid out as the integer dot products' lanes, so that it starts their accumulator and costs
 * nothing per row. */
__attribute__((target("avx2,fma")))
static void quantize_x8(const float *x, long in, signed char *xq, float *dx, int *xs, int *c8) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (long b = 0; b < in / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xb + 8 * k);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float d = _mm_cvtss_f32(h) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4], s = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));  /* MXCSR: nearest even */
            s = _mm256_add_epi32(s, q[k]);
        }
        /* int32 -> int8 in order: packs interleave 128-bit lanes, a permute puts them back */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + 32 * b),
                            _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        dx[b] = d;
        xs[b] = _mm_cvtsi128_si32(t);
        for (int i = 0; c8 && i < 8; i++) {
            const signed char *four = xq + 32 * b + 4 * i;
            c8[8 * b + i] = -8 * (four[0] + four[1] + four[2] + four[3]);
        }
    }
}

/* float16 -> float32 by the F16C instruction: here, where the activations are integers and a block's work is a few
 * instructions, the 256 KB table's reads missed the cache behind the streamed weights (perf: the stall sat on
 * them) */
__attribute__((target("f16c"), always_inline)) static inline float half_to_float_f16c(const unsigned char *p) {
    unsigned short h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 unsigned codes (u8) of a block and xq with the codes' signs moved onto it (Q8_0) */
__attribute__((target("avx2"), always_inline)) static inline void codes_u8(const unsigned char *blk, int type,
                                                                          __m256i *q, __m256i *xv) {
    if (type == Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *q = _mm256_abs_epi8(w);
        *xv = _mm256_sign_epi8(*xv, w);
    } else {
        const __m128i r = _mm_loadu_si128((const __m128i *)(blk + block_bytes(type) - 16));
        *q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(r, 4), r), _mm256_set1_epi8(15));
    }
}

/* Output rows o .. o + n - 1 (n <= 4, `row_bytes` apart) for one row of xq: each block of xq loaded once for the
 * rows, their four sums reduced together. */
#define Q8X_ROWS(name, attrs, DOT)                                                                                  \
    attrs void name(const signed char *xq, const float *dx, const int *xs, const int *c8, const unsigned char *row, \
                    long row_bytes, int type, long blocks, float *y, const int n) {                                \
        const long bytes = block_bytes(type);                                                                      \
        __m256 acc[4];                                                                                             \
        float off[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sums[4];                                                         \
        for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();                                                 \
        for (long b = 0; b < blocks; b++) {                                                                        \
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));                               \
            const __m256i c0 = type == Q4_0 ? _mm256_loadu_si256((const __m256i *)(c8 + 8 * b))                  \
                                            : _mm256_setzero_si256();                                              \
            for (int r = 0; r < n; r++) {                                                                          \
                const unsigned char *blk = row + r * row_bytes + b * bytes;                                        \
                _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);                                           \
                __m256i q, xv = x0;                                                                                \
                codes_u8(blk, type, &q, &xv);                                                                      \
                const float d = half_to_float_f16c(blk) * dx[b];                                                   \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(c0, q, xv)), _mm256_set1_ps(d), acc[r]);          \
                if (type == Q4_1) off[r] += half_to_float_f16c(blk + 2) * dx[b] * (float)xs[b];                   \
            }                                                                                                      \
        }                                                                                                          \
        const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));          \
        const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));                       \
        _mm_storeu_ps(sums, _mm_add_ps(t, _mm_loadu_ps(off)));                                                     \
        for (int r = 0; r < n; r++) y[r] = sums[r];                                                                \
    }

#define DOT_VNNI(c, q, x) _mm256_dpbusd_epi32(c, q, x) /* c + the products, four at a time */
#define DOT_AVX2(c, q, x) _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)))
Q8X_ROWS(rows_q8x_vnni, __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"), always_inline))
         static inline, DOT_VNNI)
Q8X_ROWS(rows_q8x_avx2, __attribute__((target("avx2,fma,f16c"), always_inline)) static inline, DOT_AVX2)

/* Rows in groups of four (the type a constant in each copy of the loops), then the last 1-3. */
#define GEMV_Q8X(rows_q8x)                                                                                         \
    const long blocks = in / 32, row_bytes = blocks * block_bytes(type), groups = out / 4;                         \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                             \
    for (long g = 0; g < groups; g++) {                                                                            \
        const unsigned char *rows = W + 4 * g * row_bytes;                                                         \
        if (type == Q8_0) rows_q8x(xq, dx, xs, c8, rows, row_bytes, Q8_0, blocks, y + 4 * g, 4);                  \
        else if (type == Q4_0) rows_q8x(xq, dx, xs, c8, rows, row_bytes, Q4_0, blocks, y + 4 * g, 4);             \
        else rows_q8x(xq, dx, xs, c8, rows, row_bytes, Q4_1, blocks, y + 4 * g, 4);                                \
    }                                                                                                              \
    if (out > 4 * groups)                                                                                          \
        rows_q8x(xq, dx, xs, c8, W + 4 * groups * row_bytes, row_bytes, type, blocks, y + 4 * groups,               \
                 (int)(out - 4 * groups));

/* Several rows, each its own sequence's decoded token (a server's batch): every row quantized as above; then for
 * each output row, each weight block is unpacked once and multiplied into up to 8 rows of x, each row's sum taken
 * in the order the one-row kernel takes it (so a row gets exactly what it gets alone). */
#define Q8X_MANY(name, attrs, DOT)                                                                                 \
    attrs void name(const signed char *xq, const float *dx, const int *xs, const int *c8, long in,                 \
                    const unsigned char *row, int type, long blocks, float *y, long ldy, const int R) {            \
        const long bytes = block_bytes(type);                                                                      \
        __m256 acc[8];                                                                                             \
        float off[8];                                                                                              \
        for (int r = 0; r < R; r++) {                                                                              \
            acc[r] = _mm256_setzero_ps();                                                                          \
            off[r] = 0.0f;                                                                                         \
        }                                                                                                          \
        for (long b = 0; b < blocks; b++) {                                                                        \
            const unsigned char *blk = row + b * bytes;                                                            \
            _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);                                               \
            const float d = half_to_float_f16c(blk), m = type == Q4_1 ? half_to_float_f16c(blk + 2) : 0.0f;        \
            __m256i q, w = _mm256_setzero_si256();                                                                 \
            if (type == Q8_0) {                                                                                    \
                w = _mm256_loadu_si256((const __m256i *)(blk + 2));                                                \
                q = _mm256_abs_epi8(w);                                                                            \
            } else {                                                                                               \
                const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + bytes - 16));                         \
                q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(15));       \
            }                                                                                                      \
            for (int r = 0; r < R; r++) {                                                                          \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * in + 32 * b));                         \
                if (type == Q8_0) xv = _mm256_sign_epi8(xv, w);                                                    \
                const long rb = r * blocks + b;                                                                    \
                const __m256i c0 = type == Q4_0 ? _mm256_loadu_si256((const __m256i *)(c8 + 8 * rb))             \
                                                : _mm256_setzero_si256();                                          \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(c0, q, xv)), _mm256_set1_ps(d * dx[rb]), acc[r]); \
                if (type == Q4_1) off[r] += m * dx[rb] * (float)xs[rb];                                            \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < R; r++) { /* ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)): Q8X_ROWS's order */   \
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r], acc[r]), _mm256_setzero_ps());                 \
            y[r * ldy] = (_mm256_cvtss_f32(h) + _mm_cvtss_f32(_mm256_extractf128_ps(h, 1))) + off[r];             \
        }                                                                                                          \
    }

Q8X_MANY(many_q8x_vnni, __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"), always_inline))
         static inline, DOT_VNNI)
Q8X_MANY(many_q8x_avx2, __attribute__((target("avx2,fma,f16c"), always_inline)) static inline, DOT_AVX2)

#define GEMM_Q8X(many_q8x)                                                                                         \
    const long blocks = in / 32;                                                                                   \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                             \
    for (long o = 0; o < out; o++) {                                                                               \
        const unsigned char *row = W + o * blocks * block_bytes(type);                                             \
        for (long r = 0; r < rows; r += 8) {                                                                       \
            const int n = rows - r < 8 ? (int)(rows - r) : 8;                                                      \
            const signed char *xr = xq + r * in;                                                                   \
            const float *dr = dx + r * blocks;                                                                     \
            const int *sr = xs + r * blocks, *cr = c8 ? c8 + r * 8 * blocks : NULL;                                \
            if (type == Q8_0) many_q8x(xr, dr, sr, cr, in, row, Q8_0, blocks, y + r * out + o, out, n);            \
            else if (type == Q4_0) many_q8x(xr, dr, sr, cr, in, row, Q4_0, blocks, y + r * out + o, out, n);       \
            else many_q8x(xr, dr, sr, cr, in, row, Q4_1, blocks, y + r * out + o, out, n);                         \
        }                                                                                                          \
    }

__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
static void gemm_q8x_vnni(const signed char *xq, const float *dx, const int *xs, const int *c8, long rows,
                          const unsigned char *W, int type, float *y, long in, long out, int nthreads) {
    GEMM_Q8X(many_q8x_vnni)
}

__attribute__((target("avx2,fma,f16c")))
static void gemm_q8x_avx2(const signed char *xq, const float *dx, const int *xs, const int *c8, long rows,
                          const unsigned char *W, int type, float *y, long in, long out, int nthreads) {
    GEMM_Q8X(many_q8x_avx2)
}

__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
static void gemv_q8x_vnni(const signed char *xq, const float *dx, const int *xs, const int *c8, const unsigned char *W,
                          int type, float *y, long in, long out, int nthreads) {
    GEMV_Q8X(rows_q8x_vnni)
}

__attribute__((target("avx2,fma,f16c")))
static void gemv_q8x_avx2(const signed char *xq, const float *dx, const int *xs, const int *c8, const unsigned char *W,
                          int type, float *y, long in, long out, int nthreads) {
    GEMV_Q8X(rows_q8x_avx2)
}

/* `rows` rows x (rows, in), each rounded to 8 bits per block (above), @ Q8_0 / Q4_0 / Q4_1 blocks; other types:
 * the float path. Each row's result is what it gets alone. in % 32 == 0; bias may be NULL. */
void mighty_gemm_ggml_q8x(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                          long in, long out, int nthreads) {
    if (type != Q8_0 && type != Q4_0 && type != Q4_1) {
        mighty_gemm_ggml(x, rows, W, type, bias, y, in, out, nthreads);
        return;
    }
    if (nthreads < 1) nthreads = 1;
    const long blocks = in / 32 > 0 ? in / 32 : 1;
    signed char *xq = malloc(rows * in);
    float *dx = malloc(sizeof(float) * rows * blocks);
    int *xs = malloc(sizeof(int) * rows * blocks);
    int *c8 = type == Q4_0 ? malloc(sizeof(int) * 8 * rows * blocks) : NULL;
    for (long r = 0; r < rows; r++)
        quantize_x8(x + r * in, in, xq + r * in, dx + r * blocks, xs + r * blocks, c8 ? c8 + r * 8 * blocks : NULL);
    if (rows == 1 && mighty_isa_level) gemv_q8x_vnni(xq, dx, xs, c8, W, type, y, in, out, nthreads);
    else if (rows == 1) gemv_q8x_avx2(xq, dx, xs, c8, W, type, y, in, out, nthreads);
    else if (mighty_isa_level) gemm_q8x_vnni(xq, dx, xs, c8, rows, W, type, y, in, out, nthreads);
    else gemm_q8x_avx2(xq, dx, xs, c8, rows, W, type, y, in, out, nthreads);
    if (bias)
        for (long r = 0; r < rows; r++)
            for (long o = 0; o < out; o++) y[r * out + o] += bias[o];
    free(xq);
    free(dx);
    free(xs);
    free(c8);
}


/* ---- Rows of a table as float32 (an embedding lookup) ----
 * y (n, in) = the rows idx[0..n) of W dequantized, value for value as compress/gguf_blocks.py's dequantize_blocks
 * computes them (d * q, d * (q - 8), d * q + m rounded after each operation: no fused multiply-add; bfloat16 and
 * float16 exactly). For a decoded token's lookup the dozen torch operations of that path cost ~0.1-0.25 ms,
 * 2-4 % of the token. Returns -1, having written nothing, where an index is outside the n_rows of W. */
__attribute__((optimize("fp-contract=off")))
int mighty_ggml_rows(const unsigned char *W, long n_rows, int type, const long *idx, long n, long in, float *y) {
    const long blocks = in / 32, bytes = block_bytes(type), row_bytes = blocks * bytes;
    for (long r = 0; r < n; r++)
        if (idx[r] < 0 || idx[r] >= n_rows) return -1;  /* an id past the table: nothing read */
    for (long r = 0; r < n; r++) {
        const unsigned char *row = W + idx[r] * row_bytes;
        float *out = y + r * in;
        for (long b = 0; b < blocks; b++) {
            const unsigned char *blk = row + b * bytes;
            float *o = out + 32 * b;
            if (type == F16 || type == BF16) {
                for (int j = 0; j < 32; j++) {
                    unsigned short h;
                    memcpy(&h, blk + 2 * j, 2);
                    if (type == F16) {
                        o[j] = mighty_half_table[h];
                    } else {
                        const unsigned int bits = (unsigned int)h << 16;
                        memcpy(o + j, &bits, 4);
                    }
                }
            } else if (type == Q8_0) {
                const float d = half_to_float(blk);
                for (int j = 0; j < 32; j++) o[j] = (float)(signed char)blk[2 + j] * d;
            } else {
                const float d = half_to_float(blk), m = type == Q4_1 ? half_to_float(blk + 2) : 0.0f;
                const unsigned char *qs = blk + bytes - 16;
                for (int j = 0; j < 16; j++) {
                    const int lo = qs[j] & 15, hi = qs[j] >> 4;
                    if (type == Q4_0) {
                        o[j] = (float)(lo - 8) * d;
                        o[j + 16] = (float)(hi - 8) * d;
                    } else {
                        o[j] = (float)lo * d + m;
                        o[j + 16] = (float)hi * d + m;
                    }
                }
            }
        }
    }
    return 0;
}
