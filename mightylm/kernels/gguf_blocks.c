/* Products with GGUF's own blocks of 32 weights, read as stored (ggml-common.h); W (out, in / 32 blocks) row-major:
 *   Q8_0 (type 8):  fp16 d, 32 int8 q                 w = d * q
 *   Q4_0 (type 2):  fp16 d, 16 bytes                   w = d * q - 8 d
 *   Q4_1 (type 3):  fp16 d, fp16 m, 16 bytes           w = d * q + m
 *   Q5_0 (type 6):  fp16 d, uint32 qh, 16 bytes        w = d * q - 16 d   (bit j of qh: value j's fifth bit)
 * with byte j holding value j in its low nibble and value j + 16 in its high one. In short, w = d * q + c.
 * F16 (type 1) and BF16 (type 30) rows are taken as blocks of 32 plain values (64 bytes; d = 1, c = 0), converted
 * to float32 in registers (vcvtph2ps; a 16-bit shift for bfloat16).
 *
 *   y[r][0:out] = x[r][0:in] @ W^T (+ bias)      for each of `rows` rows of x
 *
 * One row (decoding one token): per block, sum_j w_j x_j = d * sum_j q_j x_j + c * sum_j x_j, so the 32 products
 * are taken with the codes (converted to float) and scaled once, and the block sums of x are computed once per
 * call (AVX-512: two blocks per step with their own accumulators; AVX2: see out_dots256).
 * Several rows (a prompt, a server's batch, a speculative pass): each block is unpacked once for up to 4 rows
 * (AVX2) or 8 (AVX-512) held in registers, and every row is summed exactly as the one-row loop sums it, so that a
 * row's result has the same bits whatever rows share its pass (greedy speculative decoding then equals plain
 * decoding by construction, and a row's text never depends on its batch); rows go 8 at a time through every output
 * row (those 8 rows of x stay in L1).
 * Float32 arithmetic throughout: the result is dequantize-then-multiply up to float rounding. Each thread takes a
 * band of output rows (OpenMP), as the other quantized products do. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

float mighty_half_table[65536];

/* Q5_0's fifth bits as the AVX2 loops add them: entry b holds 16 in lane i where bit i of b is set (8 KB, in L1
 * beside x), so that eight values' fifth bits cost one vector OR instead of four shifts and masks */
static int fifth_bits[256][8] __attribute__((aligned(32)));

__attribute__((constructor, target("f16c")))
static void fill_tables(void) {
    for (int h = 0; h < 65536; h++) mighty_half_table[h] = _cvtsh_ss((unsigned short)h);
    for (int b = 0; b < 256; b++)
        for (int i = 0; i < 8; i++) fifth_bits[b][i] = (b >> i & 1) << 4;
}

static inline int plain(int type) { return type == F16 || type == BF16; }

/* Rows of x per pass of the float32 products (mighty_gemm_ggml): every output row for those rows, which stay in L1
 * while the weights stream past; the most one block's unpacking serves (out_row256) */
#define CHUNK 8

/* The block's scale d (1 for plain 16-bit values). */
static inline float block_scale(const unsigned char *blk, int type) { return plain(type) ? 1.0f : half_to_float(blk); }

/* The sums of each block of 32 values of `rows` rows of x (rows, in): rows * in / 32 floats, row by row */
static float *block_sums(const float *x, long rows, long in) {
    float *xsum = malloc(sizeof(float) * (rows * in / 32 > 0 ? rows * in / 32 : 1));
    group_sums(x, rows * in, 32, 1.0f, xsum);
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
        __m512i v0 = _mm512_and_si512(q, _mm512_set1_epi32(15)), v1 = _mm512_srli_epi32(q, 4);
        if (type == Q5_0) {  /* value j's fifth bit, bit j of qh, as 16: qh's halves are the masks of one OR each */
            unsigned int qh;
            memcpy(&qh, blk + 2, 4);
            const __m512i sixteen = _mm512_set1_epi32(16);
            v0 = _mm512_mask_or_epi32(v0, (__mmask16)(qh & 0xFFFF), v0, sixteen);
            v1 = _mm512_mask_or_epi32(v1, (__mmask16)(qh >> 16), v1, sixteen);
        }
        *c0 = _mm512_cvtepi32_ps(v0);
        *c1 = _mm512_cvtepi32_ps(v1);
    }
}

/* codes c . x + k sum(x) of one block, Q4_0's (k = -8) and Q5_0's (-16) constant term taken in the lanes
 * (block_step256 says why): -sum(x) in each of the 16 lanes for Q5_0, in 8 of them for Q4_0 (a broadcast under a
 * mask) */
AVX512 __m512 block_dot512(const __m512 c[2], int type, const float *xb, const float *xsum) {
    __m512 p;
    if (type == Q4_0 || type == Q5_0) {
        const __m512 s = _mm512_set1_ps(*xsum);
        p = _mm512_fmsub_ps(c[0], _mm512_loadu_ps(xb), type == Q5_0 ? s : _mm512_maskz_mov_ps(0x00FF, s));
    } else {
        p = _mm512_mul_ps(c[0], _mm512_loadu_ps(xb));
    }
    return _mm512_fmadd_ps(c[1], _mm512_loadu_ps(xb + 16), p);
}

/* R (at most 8) rows of x (row stride ldx; their block sums xsum, ldx / 32 a row) times one weight row: per block
 * d * block_dot512, even and odd blocks in sums of their own; Q4_1's m * sum(x) one scalar multiply-add per two
 * blocks, as on AVX2. Each pair of blocks is unpacked once for the R rows, and every row is summed as it is alone
 * (R = 1 is the one-row product), so that a row's result has the same bits whatever rows share its pass. Results
 * to y[r * ldy]. */
AVX512 void many_rows512(const float *x, long ldx, const float *xsum, const unsigned char *row, int type, long blocks,
                         float *y, long ldy, const int R) {
    const long bytes = block_bytes(type), sums = ldx / 32;
    __m512 a0[8], a1[8];
    float mins[8];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps(), mins[r] = 0.0f;
    long b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const unsigned char *blk = row + b * bytes;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m512 c0[2], c1[2];
        codes512(blk, type, &c0[0], &c0[1]);
        codes512(blk + bytes, type, &c1[0], &c1[1]);
        const __m512 d0 = _mm512_set1_ps(block_scale(blk, type)), d1 = _mm512_set1_ps(block_scale(blk + bytes, type));
        const float m0 = type == Q4_1 ? half_to_float(blk + 2) : 0.0f;
        const float m1 = type == Q4_1 ? half_to_float(blk + bytes + 2) : 0.0f;
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * ldx + 32 * b, *xs = xsum + r * sums + b;
            a0[r] = _mm512_fmadd_ps(block_dot512(c0, type, xb, xs), d0, a0[r]);
            a1[r] = _mm512_fmadd_ps(block_dot512(c1, type, xb + 32, xs + 1), d1, a1[r]);
            if (type == Q4_1) mins[r] += m0 * xs[0] + m1 * xs[1];
        }
    }
    if (b < blocks) {
        const unsigned char *blk = row + b * bytes;
        __m512 c[2];
        codes512(blk, type, &c[0], &c[1]);
        const __m512 d = _mm512_set1_ps(block_scale(blk, type));
        const float m = type == Q4_1 ? half_to_float(blk + 2) : 0.0f;
        for (int r = 0; r < R; r++) {
            const float *xs = xsum + r * sums + b;
            a0[r] = _mm512_fmadd_ps(block_dot512(c, type, x + r * ldx + 32 * b, xs), d, a0[r]);
            if (type == Q4_1) mins[r] += m * xs[0];
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])) + mins[r];
}

/* R (at most 8) rows of float16 / bfloat16 values (type a constant) times one weight row, each row summed exactly
 * as out_dots256 sums it alone: its products of values 0-7 and 16-23 (its a0) and of 8-15 and 24-31 (its a1) are
 * lanes 0-7 and 8-15 of one register of 16, so the 256-bit loop's one row and this loop's rows get the same bits
 * (one row stays on the 256-bit loop, faster on the AMD EPYC; see mighty_gemm_ggml). Results to y[r * ldy]. */
AVX512 void plain_rows512(const float *x, long ldx, const unsigned char *row, int type, long blocks, float *y,
                          long ldy, const int R) {
    __m512 acc[8];
    const __m512 one = _mm512_set1_ps(1.0f);  /* out_dots256's d of a plain block */
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * 64;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m512 c0, c1;
        codes512(blk, type, &c0, &c1);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * ldx + 32 * b;
            const __m512 p = _mm512_fmadd_ps(c1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(c0, _mm512_loadu_ps(xb)));
            acc[r] = _mm512_fmadd_ps(p, one, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float a[16];
        _mm512_storeu_ps(a, acc[r]);
        y[r * ldy] = hsum(_mm256_add_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(a + 8))) + 0.0f;
    }
}

/* Output row o for every row of x; `type` is a constant in each copy (see gemm below). */
AVX512 void out_row512(const float *x, long rows, const float *xsum, const unsigned char *W, const int type,
                       const float *bias, float *y, long in, long out, long o) {
    const long blocks = in / 32;
    const unsigned char *row = W + o * blocks * block_bytes(type);
    /* at most CHUNK (8) rows: mighty_gemm_ggml's passes; R a constant in each copy */
#define ROWS512(R)                                                                   \
    (plain(type) ? plain_rows512(x, in, row, type, blocks, y + o, out, R)            \
                 : many_rows512(x, in, xsum, row, type, blocks, y + o, out, R))
    switch (rows) {
        case 1: ROWS512(1); break;
        case 2: ROWS512(2); break;
        case 3: ROWS512(3); break;
        case 4: ROWS512(4); break;
        case 5: ROWS512(5); break;
        case 6: ROWS512(6); break;
        case 7: ROWS512(7); break;
        default: ROWS512(8);
    }
#undef ROWS512
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
        __m256i v[4] = {_mm256_and_si256(lo, nibble), _mm256_and_si256(hi, nibble),  /* values 0..7, 8..15 */
                        _mm256_srli_epi32(lo, 4), _mm256_srli_epi32(hi, 4)};          /* 16..23, 24..31 */
        if (type == Q5_0) {  /* value j's fifth bit, bit j of qh, as 16 */
            unsigned int qh;
            memcpy(&qh, blk + 2, 4);
            for (int k = 0; k < 4; k++)
                v[k] = _mm256_or_si256(v[k], _mm256_load_si256((const __m256i *)fifth_bits[qh >> 8 * k & 255]));
        }
        for (int k = 0; k < 4; k++) c[k] = _mm256_cvtepi32_ps(v[k]);
    }
}

/* One block of one row of x, given the block's codes c, d and (Q4_1) m, and the row's block sum s: d * (codes . x
 * + k s) into a0 and a1, Q4_0's (k = -8) and Q5_0's (-16) constant term taken as -s in each of the 8 lanes of one
 * or two of the four products (no scalar work per block: the loop is bound by its vector operations, and the scalar
 * constant term cost ~15 % of its time); Q4_1's m * s, not a multiple of d, one scalar multiply-add (as a vector of
 * its own it was 3-8 % slower). The one-row and several-row products both take every row's block through this, so
 * a row's result has the same bits whatever rows share its pass (a speculative pass's, a server's batch). */
AVX2 void block_step256(const __m256 c[4], const int type, const float *xb, const float *s, const __m256 d,
                        const float m, __m256 *a0, __m256 *a1, float *mins) {
    __m256 p, q;
    if (type == Q4_0 || type == Q5_0) {
        const __m256 vs = _mm256_broadcast_ss(s);
        p = _mm256_fmsub_ps(c[0], _mm256_loadu_ps(xb), vs);
        q = type == Q5_0 ? _mm256_fmsub_ps(c[1], _mm256_loadu_ps(xb + 8), vs)
                         : _mm256_mul_ps(c[1], _mm256_loadu_ps(xb + 8));
    } else {
        p = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
        q = _mm256_mul_ps(c[1], _mm256_loadu_ps(xb + 8));
    }
    p = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xb + 16), p);
    q = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), q);
    *a0 = _mm256_fmadd_ps(p, d, *a0);
    *a1 = _mm256_fmadd_ps(q, d, *a1);
    if (type == Q4_1) *mins += m * *s;
}

/* One row of x times n output rows (1 or 2, `stride` bytes apart; two share x's loads and block sums, 0.92x the
 * time per row for Q4_0 / Q5_0 on the AMD EPYC here) */
AVX2 void out_dots256(const float *x, const float *xsum, const unsigned char *row, long stride, int type, long blocks,
                      float *y, const int n) {
    const long bytes = block_bytes(type);
    __m256 a0[2], a1[2];
    float mins[2] = {0.0f, 0.0f};
    for (int o = 0; o < n; o++) a0[o] = a1[o] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        for (int o = 0; o < n; o++) {
            const unsigned char *blk = row + o * stride + b * bytes;
            _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
            __m256 c[4];
            codes256(blk, type, c);
            block_step256(c, type, x + 32 * b, xsum + b, _mm256_set1_ps(block_scale(blk, type)),
                          type == Q4_1 ? half_to_float(blk + 2) : 0.0f, &a0[o], &a1[o], &mins[o]);
        }
    }
    for (int o = 0; o < n; o++) y[o] = hsum(_mm256_add_ps(a0[o], a1[o])) + mins[o];
}

/* R (at most 4) rows of x (row stride ldx; their block sums xsum, ldx / 32 a row) times one weight row: each block
 * unpacked once for the R rows, every row summed as out_dots256 sums it; results to y[r * ldy] */
AVX2 void many_rows256(const float *x, long ldx, const float *xsum, const unsigned char *row, int type, long blocks,
                       float *y, long ldy, const int R) {
    const long bytes = block_bytes(type);
    __m256 a0[4], a1[4];
    float mins[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m256 c[4];
        codes256(blk, type, c);
        const __m256 d = _mm256_set1_ps(block_scale(blk, type));
        const float m = type == Q4_1 ? half_to_float(blk + 2) : 0.0f;
        for (int r = 0; r < R; r++)
            block_step256(c, type, x + r * ldx + 32 * b, xsum + r * (ldx / 32) + b, d, m, &a0[r], &a1[r], &mins[r]);
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum(_mm256_add_ps(a0[r], a1[r])) + mins[r];
}

AVX2 void out_row256(const float *x, long rows, const float *xsum, const unsigned char *W, const int type,
                     const float *bias, float *y, long in, long out, long o) {
    const long blocks = in / 32;
    const unsigned char *row = W + o * blocks * block_bytes(type);
    if (rows == 1) out_dots256(x, xsum, row, 0, type, blocks, y + o, 1);
    for (long r = 0; rows > 1 && r < rows; r += 4) {  /* at most CHUNK (8): mighty_gemm_ggml's passes, 4 at a time */
        const float *xr = x + r * in, *sr = xsum + r * (in / 32);
        switch (rows - r) {
            case 1: many_rows256(xr, in, sr, row, type, blocks, y + r * out + o, out, 1); break;
            case 2: many_rows256(xr, in, sr, row, type, blocks, y + r * out + o, out, 2); break;
            case 3: many_rows256(xr, in, sr, row, type, blocks, y + r * out + o, out, 3); break;
            default: many_rows256(xr, in, sr, row, type, blocks, y + r * out + o, out, 4);
        }
    }
    if (bias)
        for (long r = 0; r < rows; r++) y[r * out + o] += bias[o];
}

/* ---- Q6_K (type 14), a K-quant: super-blocks of 256 values in 210 bytes (ggml-common.h block_q6_K) ----
 *   ql[128] low 4 bits | qh[64] high 2 bits | scales[16] int8, one per 16 values | fp16 d
 *   w = d * scale * (q - 32),  q = low | high << 4  (0..63)
 * Values 32 p .. 32 p + 31 of a super-block (p < 8; half h = p / 4, quarter j = p % 4, l < 32):
 *   low = ql[64 h + 32 (j & 1) + l] >> 4 (j / 2) & 15,  high = qh[32 h + l] >> 2 j & 3,
 *   scale = scales[8 h + 2 j + l / 16]
 * (dequantize_row_q6_K). The codes q - 32 become floats (exact integers) multiplied by x; the super-block's 16
 * scales times d are converted once and scale each group's sum (one row) or the codes (several rows). Rows whose
 * length is not a multiple of 256 are never Q6_K (llama.cpp's quantizer picks another type for them). One AVX2 loop
 * serves both paths (AVX-512 machines run it too). */
#define Q6K_BYTES 210

/* The 32 signed codes q - 32 (-32..31) of part p of a super-block (its two groups' scales: scales[2 p], [2 p + 1]) */
AVX2 __m256i q6k_part256(const unsigned char *blk, int p) {
    const int h = p >> 2, j = p & 3;
    const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (j & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (j >> 1)), _mm256_set1_epi8(15));
    const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), _mm256_set1_epi8(3)), 4);
    return _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
}

/* A super-block's 210 bytes, PREFETCH ahead */
AVX2 void q6k_prefetch(const unsigned char *blk) {
    for (int k = 0; k < Q6K_BYTES; k += 64) _mm_prefetch((const char *)blk + PREFETCH + k, _MM_HINT_T0);
}

/* A super-block's 16 int8 scales times its d, as floats (one per 16 values) */
AVX2 void q6k_scales256(const unsigned char *blk, float scale[16]) {
    const __m256 d = _mm256_set1_ps(half_to_float(blk + 208));
    for (int k = 0; k < 2; k++)
        _mm256_store_ps(scale + 8 * k, _mm256_mul_ps(d, _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 192 + 8 * k))))));
}

/* The 32 signed codes of part p as floats (l 0..7, 8..15, 16..23, 24..31) */
AVX2 void q6k_floats256(const unsigned char *blk, int p, __m256 c[4]) {
    const __m256i q = q6k_part256(blk, p);
    const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
    c[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0));
    c[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)));
    c[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1));
    c[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)));
}

/* One part (32 values) of one row of x, given its codes c and its two groups' scales: each group of 16 values'
 * products summed, then scaled by its scale (d folded in, the super-block's 16 converted once) instead of scaling
 * every code (0.86x the time), into a0 and a1. The one-row and several-row products both take every row's parts
 * through this, so a row's result has the same bits whatever rows share its pass. */
AVX2 void q6k_step256(const __m256 c[4], const float *xb, const float *scale, __m256 *a0, __m256 *a1) {
    const __m256 g0 = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xb + 8), _mm256_mul_ps(c[0], _mm256_loadu_ps(xb)));
    const __m256 g1 = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), _mm256_mul_ps(c[2], _mm256_loadu_ps(xb + 16)));
    *a0 = _mm256_fmadd_ps(g0, _mm256_broadcast_ss(scale), *a0);
    *a1 = _mm256_fmadd_ps(g1, _mm256_broadcast_ss(scale + 1), *a1);
}

/* One row of x times n output rows (1 or 2, `stride` bytes apart; two share x's loads). The 8 parts unrolled (their
 * shifts constants): 0.86x the time. */
AVX2 void q6k_out_dots256(const float *x, const unsigned char *row, long stride, long supers, float *y, const int n) {
    __m256 a0[2], a1[2];
    float scale[2][16] __attribute__((aligned(32)));
    for (int o = 0; o < n; o++) a0[o] = a1[o] = _mm256_setzero_ps();
    for (long s = 0; s < supers; s++) {
        for (int o = 0; o < n; o++) {
            q6k_prefetch(row + o * stride + s * Q6K_BYTES);
            q6k_scales256(row + o * stride + s * Q6K_BYTES, scale[o]);
        }
        _Pragma("GCC unroll 8") for (int part = 0; part < 8; part++) {
            for (int o = 0; o < n; o++) {
                __m256 c[4];
                q6k_floats256(row + o * stride + s * Q6K_BYTES, part, c);
                q6k_step256(c, x + 256 * s + 32 * part, scale[o] + 2 * part, &a0[o], &a1[o]);
            }
        }
    }
    for (int o = 0; o < n; o++) y[o] = hsum(_mm256_add_ps(a0[o], a1[o]));
}

/* R (at most 4) rows of x times one weight row: each part unpacked once for the R rows, every row summed as
 * q6k_out_dots256 sums it; results to y[r * ldy] */
AVX2 void q6k_many_rows256(const float *x, long ldx, const unsigned char *row, long supers, float *y, long ldy,
                           const int R) {
    __m256 a0[4], a1[4];
    float scale[16] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (long s = 0; s < supers; s++) {
        const unsigned char *blk = row + s * Q6K_BYTES;
        q6k_prefetch(blk);
        q6k_scales256(blk, scale);
        for (int part = 0; part < 8; part++) {
            __m256 c[4];
            q6k_floats256(blk, part, c);
            for (int r = 0; r < R; r++)
                q6k_step256(c, x + r * ldx + 256 * s + 32 * part, scale + 2 * part, &a0[r], &a1[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum(_mm256_add_ps(a0[r], a1[r]));
}

AVX2 void q6k_out_row256(const float *x, long rows, const unsigned char *W, const float *bias, float *y, long in,
                         long out, long o) {
    const long supers = in / 256;
    const unsigned char *row = W + o * supers * Q6K_BYTES;
    if (rows == 1) {
        q6k_out_dots256(x, row, 0, supers, y + o, 1);
    } else {
        for (long r = 0; r < rows; r += 4) {
            const float *xr = x + r * in;
            float *yr = y + r * out + o;
            switch (rows - r < 4 ? rows - r : 4) {
                case 4: q6k_many_rows256(xr, in, row, supers, yr, out, 4); break;
                case 3: q6k_many_rows256(xr, in, row, supers, yr, out, 3); break;
                case 2: q6k_many_rows256(xr, in, row, supers, yr, out, 2); break;
                default: q6k_many_rows256(xr, in, row, supers, yr, out, 1);
            }
        }
    }
    if (bias)
        for (long r = 0; r < rows; r++) y[r * out + o] += bias[o];
}

/* ---- Q4_K (type 12), a K-quant: super-blocks of 256 values in 144 bytes (ggml-common.h block_q4_K) ----
 *   fp16 d | fp16 dmin | 12 bytes: eight 6-bit scales and eight 6-bit mins | 128 bytes of 4-bit codes
 *   sub-block b (32 values): w = (d * scale_b) * q - (dmin * min_b); its codes are the low nibbles of bytes
 *   32 (b / 2) .. 32 (b / 2) + 31 for even b, their high nibbles for odd b (dequantize_row_q4_K).
 * Float32 arithmetic, as the other block types: per sub-block d scale_b (q . x) - dmin min_b (sum x), the codes
 * converted to floats. One AVX2 loop for both paths; int8 activations leave Q4_K in float32 (no tiles). */
#define Q4K_BYTES 144

/* scale and min of sub-block j (get_scale_min_k4) */
static inline void q4k_scale_min(const unsigned char *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* the 32 codes of sub-block b as floats, 8 at a time */
AVX2 void q4k_codes256(const unsigned char *blk, int b, __m256 c[4]) {
    const unsigned char *qs = blk + 16 + 32 * (b / 2);
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k)));
        c[k] = _mm256_cvtepi32_ps(b & 1 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15)));
    }
}

/* A super-block's eight scales times d (to scale[]) and eight mins times dmin: the 6-bit fields rearranged as
 * words into eight scale bytes and eight min bytes (ggml's own rearrangement of get_scale_min_k4), widened as
 * vectors; stored byte by byte and loaded as a vector, they stalled each super-block on store forwarding */
AVX2 __m256 q4k_scales256(const unsigned char *blk, float scale[8]) {
    unsigned int u[3];
    memcpy(u, blk + 4, 12);
    const unsigned int low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
    const __m128i v = _mm_setr_epi32((int)(u[0] & low6), (int)((u[2] & low4) | ((u[0] >> 6 & top2) << 4)),
                                     (int)(u[1] & low6), (int)((u[2] >> 4 & low4) | ((u[1] >> 6 & top2) << 4)));
    _mm256_store_ps(scale,
                    _mm256_mul_ps(_mm256_set1_ps(half_to_float(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))));
    return _mm256_mul_ps(_mm256_set1_ps(half_to_float(blk + 2)),
                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))));
}

/* One row of x times n output rows (1 or 2, `stride` bytes apart; two share x's loads: 0.81x the time per row): the
 * two sub-blocks that share 32 bytes of codes (low and high nibbles) unpacked together, each one's products summed
 * and scaled once; the mins against the eight block sums of x in one vector step per super-block (no scalar work
 * per sub-block) */
AVX2 void q4k_out_dots256(const float *x, const float *xsum, const unsigned char *row, long stride, long supers,
                          float *y, const int n) {
    __m256 a0[2], a1[2], mins[2];
    float scale[2][8] __attribute__((aligned(32)));
    const __m256i nibble = _mm256_set1_epi32(15);
    for (int o = 0; o < n; o++) a0[o] = a1[o] = mins[o] = _mm256_setzero_ps();
    for (long s = 0; s < supers; s++) {
        for (int o = 0; o < n; o++) {
            const unsigned char *blk = row + o * stride + s * Q4K_BYTES;
            for (int k = 0; k < Q4K_BYTES; k += 64) _mm_prefetch((const char *)blk + PREFETCH + k, _MM_HINT_T0);
            mins[o] = _mm256_fmadd_ps(q4k_scales256(blk, scale[o]), _mm256_loadu_ps(xsum + 8 * s), mins[o]);
        }
        _Pragma("GCC unroll 4") for (int b = 0; b < 8; b += 2) {  /* sub-blocks b (low nibbles) and b + 1 (high) */
            const float *xb = x + 256 * s + 32 * b;
            for (int o = 0; o < n; o++) {
                const unsigned char *qs = row + o * stride + s * Q4K_BYTES + 16 + 16 * b;
                __m256 p = _mm256_setzero_ps(), q = _mm256_setzero_ps();
                for (int k = 0; k < 4; k++) {
                    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k)));
                    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nibble)), _mm256_loadu_ps(xb + 8 * k),
                                        p);
                    q = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)),
                                        _mm256_loadu_ps(xb + 32 + 8 * k), q);
                }
                a0[o] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(scale[o] + b), a0[o]);
                a1[o] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(scale[o] + b + 1), a1[o]);
            }
        }
    }
    for (int o = 0; o < n; o++) y[o] = hsum(_mm256_add_ps(a0[o], a1[o])) - hsum(mins[o]);
}

/* Several rows of x times one output row: each sub-block's codes unpacked once for the R rows, and every row's
 * sums taken in q4k_out_dots256's order (even and odd sub-blocks in two sums, added at the end), so that a row's
 * result has the same bits whatever rows share its pass: a speculative pass's rows, then rounded to 8 bits by the
 * int8 products after them, part from plain decoding's otherwise (greedy text changed on Qwen2.5-Coder's Q4_K_M). */
AVX2 void q4k_rows256(const float *x, long ldx, const float *xsum, const unsigned char *row, long supers, float *y,
                      long ldy, const int R) {
    __m256 acc[2][4], mins[4];
    float scale[8] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = mins[r] = _mm256_setzero_ps();
    for (long s = 0; s < supers; s++) {
        const unsigned char *blk = row + s * Q4K_BYTES;
        for (int k = 0; k < Q4K_BYTES; k += 64) _mm_prefetch((const char *)blk + PREFETCH + k, _MM_HINT_T0);
        const __m256 m = q4k_scales256(blk, scale);
        for (int r = 0; r < R; r++)
            mins[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + r * (ldx / 32) + 8 * s), mins[r]);
        _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) {  /* (unrolled: acc[b & 1] stays in registers) */
            __m256 c[4];
            q4k_codes256(blk, b, c);
            const __m256 sb = _mm256_broadcast_ss(scale + b);
            for (int r = 0; r < R; r++) {
                const float *xb = x + r * ldx + 256 * s + 32 * b;
                __m256 p = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
                for (int k = 1; k < 4; k++) p = _mm256_fmadd_ps(c[k], _mm256_loadu_ps(xb + 8 * k), p);
                acc[b & 1][r] = _mm256_fmadd_ps(p, sb, acc[b & 1][r]);
            }
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) - hsum(mins[r]);
}

AVX2 void q4k_out_row256(const float *x, long rows, const float *xsum, const unsigned char *W, const float *bias,
                         float *y, long in, long out, long o) {
    const long supers = in / 256;
    const unsigned char *row = W + o * supers * Q4K_BYTES;
    if (rows == 1) {
        q4k_out_dots256(x, xsum, row, 0, supers, y + o, 1);
        if (bias) y[o] += bias[o];
        return;
    }
    for (long r = 0; r < rows; r += 4) {  /* each row's block sums of x: xsum[r * in / 32 ..] */
        const float *xr = x + r * in, *sr = xsum + r * (in / 32);
        float *yr = y + r * out + o;
        switch (rows - r < 4 ? rows - r : 4) {
            case 4: q4k_rows256(xr, in, sr, row, supers, yr, out, 4); break;
            case 3: q4k_rows256(xr, in, sr, row, supers, yr, out, 3); break;
            case 2: q4k_rows256(xr, in, sr, row, supers, yr, out, 2); break;
            default: q4k_rows256(xr, in, sr, row, supers, yr, out, 1);
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
        else if (type == Q5_0) out_row512(x, rows, xsum, W, Q5_0, bias, y, in, out, o);
        else if (type == F16) out_row512(x, rows, xsum, W, F16, bias, y, in, out, o);
        else out_row512(x, rows, xsum, W, BF16, bias, y, in, out, o);
    }
}

__attribute__((target("avx2,fma,f16c")))
static void gemm256(const float *x, long rows, const float *xsum, const unsigned char *W, int type,
                    const float *bias, float *y, long in, long out, int nthreads) {
    if (rows == 1 && (type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q6_K || type == Q4_K)) {
        /* one row of x, compute-bound types: output rows two at a time (Q8_0 and 16-bit rows, bound by memory,
         * gained nothing measurable) */
        const long stride = type == Q6_K ? in / 256 * Q6K_BYTES : type == Q4_K ? in / 256 * Q4K_BYTES
                                                                   : in / 32 * block_bytes(type);
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long o = 0; o < out; o += 2) {
            const int n = o + 1 < out ? 2 : 1;
            const unsigned char *row = W + o * stride;
            if (type == Q5_0) out_dots256(x, xsum, row, stride, Q5_0, in / 32, y + o, n);
            else if (type == Q4_0) out_dots256(x, xsum, row, stride, Q4_0, in / 32, y + o, n);
            else if (type == Q4_1) out_dots256(x, xsum, row, stride, Q4_1, in / 32, y + o, n);
            else if (type == Q6_K) q6k_out_dots256(x, row, stride, in / 256, y + o, n);
            else q4k_out_dots256(x, xsum, row, stride, in / 256, y + o, n);
            for (long k = o; bias && k < o + n; k++) y[k] += bias[k];
        }
        return;
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        if (type == Q8_0) out_row256(x, rows, xsum, W, Q8_0, bias, y, in, out, o);
        else if (type == Q4_0) out_row256(x, rows, xsum, W, Q4_0, bias, y, in, out, o);
        else if (type == Q4_1) out_row256(x, rows, xsum, W, Q4_1, bias, y, in, out, o);
        else if (type == Q5_0) out_row256(x, rows, xsum, W, Q5_0, bias, y, in, out, o);
        else if (type == F16) out_row256(x, rows, xsum, W, F16, bias, y, in, out, o);
        else if (type == Q6_K) q6k_out_row256(x, rows, W, bias, y, in, out, o);
        else if (type == Q4_K) q4k_out_row256(x, rows, xsum, W, bias, y, in, out, o);
        else out_row256(x, rows, xsum, W, BF16, bias, y, in, out, o);
    }
}

/* x (rows, in) float32 row-major, y (rows, out); in % 32 == 0 (Q4_K, Q6_K: % 256); type 8, 2, 3, 6, 1, 30, 12 or 14,
 * or MIGHTY_Q5_0_FIELDS / MIGHTY_Q6_K_FIELDS / MIGHTY_Q4_0_FIELDS / MIGHTY_Q4_1_FIELDS (q5_0_fields.c, q6_k_fields.c,
 * q4_fields.c); bias may be NULL. */
void mighty_gemm_ggml(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                      long in, long out, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (type == MIGHTY_Q5_0_FIELDS) {
        mighty_gemm_q5_0_fields(x, rows, W, bias, y, in, out, nthreads);
        return;
    }
    if (type == MIGHTY_Q6_K_FIELDS) {
        mighty_gemm_q6_k_fields(x, rows, W, bias, y, in, out, nthreads);
        return;
    }
    if (type == MIGHTY_Q4_0_FIELDS || type == MIGHTY_Q4_1_FIELDS) {
        mighty_gemm_q4_fields(x, rows, W, type == MIGHTY_Q4_0_FIELDS ? Q4_0 : Q4_1, bias, y, in, out, nthreads);
        return;
    }
    /* block sums of every row of x: the 32-value types' constant terms of one-row products; Q4_K's mins */
    float *xsum = type == Q6_K ? NULL : block_sums(x, rows, in);
    /* One row of float16 / bfloat16 values: the 256-bit loop, where it was faster on the AMD EPYC (Zen 4) with
     * AVX-512 here, 1.17-1.34x per token over in-process alternations (bench/RESULTS.md, 2026-12-03; its 512-bit
     * conversions are split in two there); not measured on Intel's AVX-512. Several rows: plain_rows512, whose
     * rows get the 256-bit loop's bits. */
    const int wide = mighty_isa_level && !(rows == 1 && plain(type)) && type != Q6_K && type != Q4_K;
    /* CHUNK rows of x at a time, every output row for them: x's rows stay in L1 while the weights stream past */
    for (long r = 0; r < rows; r += CHUNK) {
        const long n = rows - r < CHUNK ? rows - r : CHUNK;
        const float *xs = xsum ? xsum + r * (in / 32) : NULL;
        if (wide) gemm512(x + r * in, n, xs, W, type, bias, y + r * out, in, out, nthreads);
        else gemm256(x + r * in, n, xs, W, type, bias, y + r * out, in, out, nthreads);
    }
    free(xsum);
}

void mighty_gemv_ggml(const float *x, const unsigned char *W, int type, const float *bias, float *y, long in,
                      long out, int nthreads) {
    mighty_gemm_ggml(x, 1, W, type, bias, y, in, out, nthreads);
}

/* ---- Activations rounded to 8 bits, as llama.cpp multiplies (opt-in: `int8_activations_`) ----
 * Each row of x is quantized per block of 32 as ggml's Q8_0 quantizes (dx = max|x| / 127, xq = x / dx rounded to
 * nearest even, dx kept in float32), every row by itself, so that a row's result never depends on the rows beside
 * it: a prompt's tokens, a speculative step's drafts and a server's batch each get what one decoded token gets.
 *
 * The weights are first laid out in tiles of 16 output rows (compress/gguf_blocks.py, tile_blocks; the same bytes
 * as stored, reordered): for rows 16 g .. 16 g + 15 and block b, one tile of
 *     16 fp16 d | 16 fp16 m (Q4_1 only) | the codes
 * with the codes in "steps": step s (values 4 s .. 4 s + 3 of the block) is one 64-byte vector whose 4-byte lane l
 * holds row l's four codes. Q4_0 / Q4_1: 64-byte chunk t (t < 4) holds step t in its low nibbles and step t + 4 in
 * its high ones (256 bytes); Q8_0: the 8 steps of q + 128 as unsigned bytes (512 bytes). One vpdpbusd per step
 * multiplies the 16 rows' codes by x's four values broadcast, so 8 of them give the 16 rows' exact integer block
 * sums in one register, scaled once for the 16 (llama.cpp's repacked x86 formats do the same with 8 rows); a tile
 * is unpacked once for up to 8 rows of x. Per output row, in block order, in float32:
 *     Q4_0  acc += (q . xq - 8 sum xq) * (d dx)
 *     Q4_1  acc += (q . xq) * (d dx);  acc += m * (dx sum xq)
 *     Q8_0  acc += ((q + 128) . xq - 128 sum xq) * (d dx)
 * The integers are exact and the float operations the same lane for lane on every path, so AVX2 (vpmaddubsw +
 * vpmaddwd on each half of a tile, which cannot saturate here: |q| <= 15, or Q8_0's |q| <= 128 with its sign moved
 * onto xq, times |xq| <= 127) gives AVX-512's bits. The cost is the activations' rounding (~0.4 % of each block's
 * largest value): logits move within quantization noise, and near-ties can split, as in llama.cpp. */

/* Loads a block of 32 floats into v; returns their largest |x| */
__attribute__((target("avx2"), always_inline)) static inline
float block_max(const float *xb, __m256 v[4]) {
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[k]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* Four vectors of 8 int32 in -127..127 -> 32 int8 in order at q (packs interleave 128-bit lanes, a permute puts
 * them back); returns their sum */
__attribute__((target("avx2"), always_inline)) static inline
int pack32(const __m256i v[4], signed char *q) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
}

/* One row: x (in) -> xq (in), and dx and sum xq per block (8 floats at a time; rounding to nearest even). */
__attribute__((target("avx2,fma")))
static void quantize_x8(const float *x, long in, signed char *xq, float *dx, int *xs) {
    for (long b = 0; b < in / 32; b++) {
        __m256 v[4];
        const float d = block_max(x + 32 * b, v) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));  /* MXCSR: nearest even */
        dx[b] = d;
        xs[b] = pack32(q, xq + 32 * b);
    }
}

/* quantize_x8 on AVX-512: the same largest |x|, the same rounding, the same bytes (vpmovsdb saturates as packs does,
 * and no value passes 127) and sums, 16 values a register; dx and its inverse for 16 blocks at a time (IEEE
 * division lane by lane: the bits of one block's), which one block after another waited on */
__attribute__((target("avx512f"))) static void quantize_x8_512(const float *x, long in, signed char *xq, float *dx,
                                                               int *xs) {
    const long blocks = in / 32;
    for (long b = 0; b < blocks; b++)
        dx[b] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 32 * b)),
                                                   _mm512_abs_ps(_mm512_loadu_ps(x + 32 * b + 16))));
    for (long b0 = 0; b0 < blocks; b0 += 16) {
        const __mmask16 k = blocks - b0 < 16 ? (__mmask16)((1u << (blocks - b0)) - 1) : (__mmask16)0xffff;
        const __m512 d = _mm512_div_ps(_mm512_maskz_loadu_ps(k, dx + b0), _mm512_set1_ps(127.0f));
        const __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ),
                                              _mm512_set1_ps(1.0f), d);
        float inverse[16];
        _mm512_mask_storeu_ps(dx + b0, k, d);
        _mm512_storeu_ps(inverse, id);
        for (long b = b0; b < b0 + 16 && b < blocks; b++) {
            const __m512 v = _mm512_set1_ps(inverse[b - b0]);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * b), v));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * b + 16), v));
            _mm_storeu_si128((__m128i *)(xq + 32 * b), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(xq + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
            xs[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
    }
}

static inline int four(const signed char *p) {  /* four int8 values as one int32 lane */
    int v;
    memcpy(&v, p, 4);
    return v;
}

/* R rows of xq (stride in) times the 16 output rows of one group of tiles -> y[r * ldy + 0..15] */
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma"), always_inline)) static inline
void tile_rows512(const signed char *xq, const float *dx, const int *xs, const float *dxs, long in,
                  const unsigned char *T, const int type, long blocks, float *y, long ldy, const int R) {
    const long bytes = tile_bytes(type);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *t = T + b * bytes;
        for (long k = 0; k < bytes; k += 64) _mm_prefetch((const char *)t + PREFETCH + k, _MM_HINT_T0);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t));
        const __m512 m = type == Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 32)))
                                      : _mm512_setzero_ps();
        __m512i s[8];
        tile_steps512(t, type, s);
        for (int r = 0; r < R; r++) {
            const long rb = r * blocks + b;
            const signed char *xb = xq + r * in + 32 * b;
            __m512i i0 = _mm512_set1_epi32(start(type, xs[rb])), i1 = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {  /* two chains of four: the sum is an exact integer either way */
                i0 = _mm512_dpbusd_epi32(i0, s[k], _mm512_set1_epi32(four(xb + 4 * k)));
                i1 = _mm512_dpbusd_epi32(i1, s[k + 4], _mm512_set1_epi32(four(xb + 16 + 4 * k)));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(dx[rb])), acc[r]);
            if (type == Q4_1) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(dxs[rb]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

/* An empty statement that takes v in a register and may change it: the compiler must have v's value here, so it
 * adds each product into its row's sum as written instead of keeping every product live for a tree of additions
 * at the end (GCC -O3 did that: 8 rows' products spilled to the stack, ~17 stack accesses per row and block). */
#define KEEP(v) __asm__("" : "+x"(v))

/* The same on AVX2, one half of each tile (8 output rows) at a time. A block's codes are read a chunk at a time and
 * multiplied into every row of x before the next chunk: each row holds one integer sum in a register (the codes of
 * a whole block stay in registers only for a few rows: with 8 they spilled, ~40 % more instructions per row). The
 * integers are the same as AVX-512's; only the order of exact integer additions differs. x comes in block order
 * (by_block: block b of row r at (b R + r) 32, its dx, xs and dxs at b R + r), so `in` is not read. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline
void tile_rows256(const signed char *xq, const float *dx, const int *xs, const float *dxs, long in,
                  const unsigned char *T, const int type, long blocks, float *y, long ldy, const int R) {
    (void)in;
    const long bytes = tile_bytes(type), head = tile_head(type);
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
    for (int h = 0; h < 2; h++) {
        __m256 acc[8];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (long b = 0; b < blocks; b++) {
            const unsigned char *t = T + b * bytes, *c = t + head + 32 * h;
            for (long k = 0; h == 0 && k < bytes; k += 64) _mm_prefetch((const char *)t + PREFETCH + k, _MM_HINT_T0);
            __m256i sum[8];  /* row r's block sums of the 8 output rows: 16-bit pair sums (Q4_0, Q4_1) or 32-bit */
            for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
            if (type == Q8_0) {  /* q . xq as |q| . sign(xq, q) (vpmaddubsw takes one unsigned operand) */
                for (int k = 0; k < 8; k++) {
                    const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c + 64 * k)),
                                                       _mm256_set1_epi8(-128));
                    const __m256i a = _mm256_abs_epi8(q);
                    for (int r = 0; r < R; r++) {
                        const __m256i x4 = _mm256_sign_epi8(_mm256_set1_epi32(four(xq + (b * R + r) * 32 + 4 * k)), q);
                        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, x4), ones));
                        KEEP(sum[r]);
                    }
                }
            } else {  /* chunk k: step k in the low nibbles, step k + 4 in the high ones */
                const __m256i fh = type == Q5_0 ? _mm256_loadu_si256((const __m256i *)(t + 32 + 32 * h))
                                                : _mm256_setzero_si256();
                for (int k = 0; k < 4; k++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 64 * k));
                    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    if (type == Q5_0) {
                        lo = _mm256_or_si256(lo, FIFTH(_mm256_slli_epi16, _mm256_srli_epi16, _mm256_and_si256,
                                                       _mm256_set1_epi8, fh, k));
                        hi = _mm256_or_si256(hi, FIFTH(_mm256_slli_epi16, _mm256_srli_epi16, _mm256_and_si256,
                                                       _mm256_set1_epi8, fh, k + 4));
                    }
                    for (int r = 0; r < R; r++) {
                        const signed char *xb = xq + (b * R + r) * 32;
                        const __m256i p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, _mm256_set1_epi32(four(xb + 4 * k))),
                            _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four(xb + 16 + 4 * k))));
                        /* 4-bit codes: a pair's product sum is at most 2 * 15 * 127 = 3810, so all eight steps add in
                         * 16 bits (30480) and widen once; 5-bit codes (7874 a pair): two steps (15748), widened each */
                        sum[r] = type == Q5_0 ? _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, ones))
                                              : _mm256_add_epi16(sum[r], p);
                        KEEP(sum[r]);
                    }
                }
                if (type != Q5_0)
                    for (int r = 0; r < R; r++) sum[r] = _mm256_madd_epi16(sum[r], ones);
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16 * h)));
            const __m256 m = type == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 32 + 16 * h)))
                                          : _mm256_setzero_ps();
            for (int r = 0; r < R; r++) {
                const long rb = b * R + r;
                const __m256i i = _mm256_add_epi32(sum[r], _mm256_set1_epi32(type == Q8_0 ? 0 : start(type, xs[rb])));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d, _mm256_set1_ps(dx[rb])), acc[r]);
                if (type == Q4_1) acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(dxs[rb]), acc[r]);
            }
        }
        for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ldy + 8 * h, acc[r]);
    }
}

/* Every group of 16 output rows (a band of them per thread), the rows of x 8 at a time (R and the type constants in
 * each copy of the loops, so that the accumulators stay in registers). */
#define GEMM_TILES(tile_rows)                                                                                      \
    const long blocks = in / 32, groups = out / TILE;                                                              \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                             \
    TILE_GROUPS(tile_rows, 0, groups)

#define TILE_GROUPS(tile_rows, g0, g1) TILE_GROUPS_INTO(tile_rows, g0, g1, y, out, 0)

/* The same into Y: group g's outputs of row r at Y + r LDY + TILE (g - G0) */
#define TILE_GROUPS_INTO(tile_rows, g0, g1, Y, LDY, G0)                                                            \
    for (long g = g0; g < g1; g++) {                                                                               \
        const unsigned char *tg = T + g * blocks * tile_bytes(type);                                               \
        for (long r = 0; r < rows; r += 8) {                                                                       \
            const signed char *xr = xq + r * in;                                                                   \
            const float *dr = dx + r * blocks, *sr = dxs + r * blocks;                                             \
            const int *nr = xs + r * blocks;                                                                       \
            float *yr = (Y) + r * (LDY) + TILE * (g - (G0));                                                       \
            const int n = rows - r < 8 ? (int)(rows - r) : 8;                                                      \
            TILE_CASES(tile_rows, Q8_0, LDY) else TILE_CASES(tile_rows, Q4_0, LDY)                                 \
            else TILE_CASES(tile_rows, Q4_1, LDY) else TILE_CASES(tile_rows, Q5_0, LDY)                            \
        }                                                                                                          \
    }

#define TILE_CASES(tile_rows, TYPE, ldy)                                                                           \
    if (type == TYPE) switch (n) {                                                                                 \
        case 8: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 8); break;                               \
        case 7: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 7); break;                               \
        case 6: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 6); break;                               \
        case 5: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 5); break;                               \
        case 4: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 4); break;                               \
        case 3: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 3); break;                               \
        case 2: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 2); break;                               \
        default: tile_rows(xr, dr, nr, sr, in, tg, TYPE, blocks, yr, ldy, 1);                                     \
    }

/* ---- Each row's largest output, found as the tiles make them (greedy decoding's argmax) ----
 * best[r] = the index of the first largest of row r's outputs, or of its first NaN (numpy's argmax), without
 * writing the outputs: each thread makes its share of the groups of tiles BEST_GROUPS at a time into a small buffer
 * and finds their largest while they sit in L1, then one thread combines the threads' answers. SmolLM2's head wrote
 * 49,152 logits a row (196 KB) that numpy's argmax read back afterwards, from L3 and the other core's cache: ~25 us a
 * row (the head and its argmax 31-37 us faster this way at 1-5 rows; bench/RESULTS.md). */
enum { BEST_GROUPS = 64, BEST_WIDTH = BEST_GROUPS * TILE, BEST_ROWS = 16 };

/* The index of the first largest of y[0..n) (of its first NaN where there is one), and that value in *top: the
 * largest in four chains of vector maxima, then the first lane equal to it */
__attribute__((target("avx2"))) static long first_largest(const float *y, long n, float *top) {
    __m256 m[4] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY),
                   _mm256_set1_ps(-INFINITY)};
    __m256 nan = _mm256_setzero_ps();
    long i = 0;
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++) {
            const __m256 v = _mm256_loadu_ps(y + i + 8 * k);
            m[k] = _mm256_max_ps(m[k], v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
    float lanes[8], largest = -INFINITY;
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
    for (int k = 0; k < 8; k++) largest = lanes[k] > largest ? lanes[k] : largest;
    int has_nan = _mm256_movemask_ps(nan) != 0;
    for (long j = i; j < n; j++) {
        has_nan |= y[j] != y[j];
        largest = y[j] > largest ? y[j] : largest;
    }
    const __m256 want = _mm256_set1_ps(largest);
    for (long j = 0; j + 8 <= n; j += 8) {  /* the first lane equal to the largest (with a NaN: unordered) */
        const __m256 v = _mm256_loadu_ps(y + j);
        const int hit = _mm256_movemask_ps(has_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                                   : _mm256_cmp_ps(v, want, _CMP_EQ_OQ));
        if (hit) {
            *top = y[j + __builtin_ctz(hit)];
            return j + __builtin_ctz(hit);
        }
    }
    for (long j = n / 8 * 8; j < n; j++)
        if (has_nan ? y[j] != y[j] : y[j] == largest) {
            *top = y[j];
            return j;
        }
    *top = largest;
    return 0;
}

/* (top, at) of the outputs so far replaced by a later part's (value, index) where that is larger, or a NaN (the
 * first NaN stays) */
static inline void keep_larger(float *top, long *at, float value, long index) {
    if (*at < 0 || (*top == *top && (value != value || value > *top))) {
        *top = value;
        *at = index;
    }
}

#define BEST_TILES(tile_rows)                                                                                      \
    const long blocks = in / 32, groups = out / TILE;                                                              \
    float top[nthreads * rows];                                                                                    \
    long at[nthreads * rows];                                                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                                  \
    {                                                                                                              \
        const long me = omp_get_thread_num(), team = omp_get_num_threads();                                         \
        const long first = groups * me / team, last = groups * (me + 1) / team;                                    \
        float chunk[rows * BEST_WIDTH];  /* this thread's outputs of up to BEST_GROUPS groups (rows <= BEST_ROWS) */\
        for (long r = 0; r < rows; r++) at[me * rows + r] = -1;                                                    \
        for (long c = first; c < last; c += BEST_GROUPS) {                                                         \
            const long c1 = c + BEST_GROUPS < last ? c + BEST_GROUPS : last;                                       \
            TILE_GROUPS_INTO(tile_rows, c, c1, chunk, BEST_WIDTH, c)                                               \
            for (long r = 0; r < rows; r++) {                                                                      \
                float value;                                                                                       \
                const long i = TILE * c + first_largest(chunk + r * BEST_WIDTH, TILE * (c1 - c), &value);          \
                keep_larger(top + me * rows + r, at + me * rows + r, value, i);                                    \
            }                                                                                                      \
        }                                                                                                          \
        _Pragma("omp barrier")                                                                                     \
        _Pragma("omp master")                                                                                      \
        for (long r = 0; r < rows; r++) {                                                                          \
            float value = 0.0f;                                                                                    \
            best[r] = -1;                                                                                          \
            for (long t = 0; t < team; t++)                                                                        \
                if (at[t * rows + r] >= 0) keep_larger(&value, best + r, top[t * rows + r], at[t * rows + r]);     \
        }                                                                                                          \
    }

__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma")))
static void gemm_tiles512(const signed char *xq, const float *dx, const int *xs, const float *dxs, long rows,
                          const unsigned char *T, int type, float *y, long in, long out, int nthreads, long *best) {
    if (best) {
        BEST_TILES(tile_rows512)
    } else {
        GEMM_TILES(tile_rows512)
    }
}

static void quantize_x24(const float *x, long in, signed char *xq, float *dx, int *xs);

/* gemm_tiles512 for several rows of x in float32, each written in three rows of int8 limbs (quantize_x24), in one
 * parallel region: the threads first write the rows (a row of x each in turn), then share the groups of tiles.
 * Written before the region, the rows left the other threads waiting (float32 passes of 3-5 rows 1.01-1.03x faster
 * this way). int8's rounding stays before the region: it is cheaper than the barrier and the rows' moves between the
 * cores' caches (0.98x). */
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma")))
static void gemm_int24_rows512(const float *x, long x_rows, signed char *xq, float *dx, int *xs, float *dxs,
                               const unsigned char *T, int type, float *y, long in, long out, int nthreads) {
    const long blocks = in / 32, groups = out / TILE, rows = 3 * x_rows;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (long r = 0; r < x_rows; r++) {
            const long at = 3 * r * blocks;
            quantize_x24(x + r * in, in, xq + 3 * r * in, dx + at, xs + at);
            for (long b = at; b < at + 3 * blocks; b++) dxs[b] = dx[b] * (float)xs[b];
        }
        #pragma omp for schedule(static)
        TILE_GROUPS(tile_rows512, 0, groups)
    }
}

__attribute__((target("avx2,fma,f16c")))
static void gemm_tiles256(const signed char *xq, const float *dx, const int *xs, const float *dxs, long rows,
                          const unsigned char *T, int type, float *y, long in, long out, int nthreads, long *best) {
    if (best) {
        BEST_TILES(tile_rows256)
    } else {
        GEMM_TILES(tile_rows256)
    }
}

/* Q6_K with activations rounded to 8 bits (per block of 32, as above), over its super-blocks in tiles of 16 rows
 * (kernels.tile_rows, the same bytes reordered): per 16 rows and super-block
 *     16 fp16 d | int8 scales [16 groups of 16 values][16 rows] | 8 blocks of 32 values, 384 bytes each:
 *     4 chunks of 64 (step s's low 4 bits, lane l = row l's values 4 s .. 4 s + 3, in each byte's low half, step
 *     s + 4's in its high half) | 2 chunks of 64 (the high 2 bits of steps m, m + 2, m + 4, m + 6 at bits 0-1 .. 6-7)
 * A block's codes are unpacked once per half tile (8 rows) for up to 8 rows of x; per row and group of 16 values
 * the four steps' |q - 32| . sign(xq, q - 32) pair sums add in 16 bits (at most 4 * 2 * 32 * 127 = 32512), one
 * vpmaddwd weights them by the 8 rows' scales, and per block of 32 the exact integer sum is scaled by d dx in
 * float32: acc += (sum over the two groups of scale (q - 32) . xq) * (d dx) (llama.cpp's Q6_K dot takes the same
 * integers over x rounded per 256 instead). One AVX2 loop for both paths; x in block order (by_block). */
#define Q6K_TILE (TILE * Q6K_BYTES)

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline
void q6k_tile_rows256(const signed char *xq, const float *dx, const unsigned char *T, long supers,
                      float *y, long ldy, const int R) {
    const __m256i low4 = _mm256_set1_epi8(15), bits45 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; h++) {
        __m256 acc[8];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (long s = 0; s < supers; s++) {
            const unsigned char *t = T + s * Q6K_TILE;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16 * h)));
            for (int b = 0; b < 8; b++) {
                const unsigned char *c = t + 288 + 384 * b;
                for (int k = 0; h == 0 && k < 384; k += 64) _mm_prefetch((const char *)c + PREFETCH + k, _MM_HINT_T0);
                const __m256i hb0 = _mm256_loadu_si256((const __m256i *)(c + 256 + 32 * h)),
                              hb1 = _mm256_loadu_si256((const __m256i *)(c + 320 + 32 * h));
                __m256i i32[8];
                for (int r = 0; r < R; r++) i32[r] = _mm256_setzero_si256();
                for (int G = 0; G < 2; G++) {  /* steps 4 G .. 4 G + 3: the codes of group 2 b + G, then every row */
                    __m256i q[4];
                    for (int j = 0; j < 4; j++) {  /* chunk j: step j in its low nibbles, step j + 4 in its high ones */
                        const __m256i n = _mm256_loadu_si256((const __m256i *)(c + 64 * j + 32 * h));
                        q[j] = _mm256_and_si256(G ? _mm256_srli_epi16(n, 4) : n, low4);
                    }
                    /* step s's high bits (chunk s % 2, pair s / 2) moved to bits 4-5 */
                    q[0] = _mm256_or_si256(q[0], _mm256_and_si256(G ? hb0 : _mm256_slli_epi16(hb0, 4), bits45));
                    q[1] = _mm256_or_si256(q[1], _mm256_and_si256(G ? hb1 : _mm256_slli_epi16(hb1, 4), bits45));
                    q[2] = _mm256_or_si256(q[2], _mm256_and_si256(G ? _mm256_srli_epi16(hb0, 2)
                                                                    : _mm256_slli_epi16(hb0, 2), bits45));
                    q[3] = _mm256_or_si256(q[3], _mm256_and_si256(G ? _mm256_srli_epi16(hb1, 2)
                                                                    : _mm256_slli_epi16(hb1, 2), bits45));
                    __m256i a[4];  /* |q - 32|: vpmaddubsw's unsigned operand, the sign moved onto x */
                    for (int j = 0; j < 4; j++) {
                        q[j] = _mm256_sub_epi8(q[j], off);
                        a[j] = _mm256_abs_epi8(q[j]);
                    }
                    /* the 8 rows' scales of the group, each in both 16-bit halves */
                    const __m256i v = _mm256_cvtepu16_epi32(_mm_cvtepi8_epi16(
                        _mm_loadl_epi64((const __m128i *)(t + 32 + 16 * (2 * b + G) + 8 * h))));
                    const __m256i sc = _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
                    for (int r = 0; r < R; r++) {
                        const signed char *xb = xq + ((8 * s + b) * R + r) * 32 + 16 * G;
                        __m256i i16 = _mm256_setzero_si256();
                        for (int j = 0; j < 4; j++) {
                            const __m256i x4 = _mm256_sign_epi8(_mm256_set1_epi32(four(xb + 4 * j)), q[j]);
                            i16 = _mm256_add_epi16(i16, _mm256_maddubs_epi16(a[j], x4));
                        }
                        i32[r] = _mm256_add_epi32(i32[r], _mm256_madd_epi16(i16, sc));
                        KEEP(i32[r]);
                    }
                }
                for (int r = 0; r < R; r++) {
                    const long rb = (8 * s + b) * R + r;
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[r]), _mm256_mul_ps(d, _mm256_set1_ps(dx[rb])),
                                             acc[r]);
                }
            }
        }
        for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ldy + 8 * h, acc[r]);
    }
}

__attribute__((target("avx2,fma,f16c")))
static void q6k_gemm_tiles(const signed char *xq, const float *dx, long rows, const unsigned char *T, float *y,
                           long in, long out, int nthreads) {
    const long supers = in / 256, groups = out / TILE;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long g = 0; g < groups; g++) {
        const unsigned char *tg = T + g * supers * Q6K_TILE;
        for (long r = 0; r < rows; r += 8) {
            const signed char *xr = xq + r * in;
            const float *dr = dx + r * (in / 32);
            float *yr = y + r * out + TILE * g;
            switch (rows - r < 8 ? rows - r : 8) {
                case 8: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 8); break;
                case 7: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 7); break;
                case 6: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 6); break;
                case 5: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 5); break;
                case 4: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 4); break;
                case 3: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 3); break;
                case 2: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 2); break;
                default: q6k_tile_rows256(xr, dr, tg, supers, yr, out, 1);
            }
        }
    }
}

/* The AVX2 loop's order of x: each group of 8 rows (the rows one pass of tile_rows256 takes, n of them) by block,
 * row after row within a block (block b of row r at (b n + r) 32 from the group's start, its dx, xs and dxs at
 * b n + r), so that one pointer and constant offsets reach every row's block: with a pointer per row the loop
 * ran out of general registers and spilled them (~30 stack accesses per block at 8 rows). */
static void by_block(signed char *xq, float *dx, int *xs, float *dxs, long rows, long in) {
    const long blocks = in / 32;
    signed char *q = malloc(8 * in);
    float *d = malloc(sizeof(float) * 8 * blocks), *ds = malloc(sizeof(float) * 8 * blocks);
    int *s = malloc(sizeof(int) * 8 * blocks);
    for (long r0 = 0; r0 < rows; r0 += 8) {
        const long n = rows - r0 < 8 ? rows - r0 : 8;
        if (n == 1) break;  /* one row: the same order */
        for (long r = 0; r < n; r++)
            for (long b = 0; b < blocks; b++) {
                memcpy(q + (b * n + r) * 32, xq + (r0 + r) * in + 32 * b, 32);
                d[b * n + r] = dx[(r0 + r) * blocks + b];
                s[b * n + r] = xs[(r0 + r) * blocks + b];
                ds[b * n + r] = dxs[(r0 + r) * blocks + b];
            }
        memcpy(xq + r0 * in, q, n * in);
        memcpy(dx + r0 * blocks, d, sizeof(float) * n * blocks);
        memcpy(xs + r0 * blocks, s, sizeof(int) * n * blocks);
        memcpy(dxs + r0 * blocks, ds, sizeof(float) * n * blocks);
    }
    free(q);
    free(d);
    free(ds);
    free(s);
}

/* One row in 24 bits: x (in) -> three rows of int8 limbs (xq: 3 rows of in values; dx, xs: 3 rows of a value per
 * block), so that per block of 32 x = dx X, with X = x / dx rounded to an integer, |X| <= LIMBS_TOP (the block's
 * largest |x|), written X = a 255^2 + b 255 + c with digits a, b, c in -127..127 (255 is odd: each integer has one
 * such writing). Limb a's dx is dx 255^2, b's dx 255, c's dx: each limb is a row of int8 activations as
 * quantize_x8 makes them, so the tiles' exact integer products over the three rows, scaled and added, are x's
 * product with x rounded to 24 bits per block: at most max |x| / (2 LIMBS_TOP) ~ max |x| 2^-24 a value, float32's
 * own rounding, where quantize_x8's 8 bits lose up to 0.4 % of a block's largest value. The digits come from float
 * arithmetic on exact integers (all below 2^24, see digit). A block whose largest |x| is below 2^-64 counts as
 * zeros (its products lie below float32's resolution of any sum that is not itself that small); one holding an
 * infinity or a NaN gives NaN dx, so that every output it reaches is NaN, as in float arithmetic. */
enum { LIMB = 255, LIMBS_TOP = 127 * (LIMB * LIMB + LIMB + 1) };

/* The digit q of the integers r (|r| <= 127.5 base) at an odd base: r / base rounded to the nearest integer, as
 * r times the rounded reciprocal (for every |r| <= LIMBS_TOP at 255^2, and every |r| <= 127 256 at 255, that
 * product rounds to the right integer: the digits test checks them all); r keeps the rest, r - q base, exactly */
__attribute__((target("avx2,fma"), always_inline)) static inline
__m256 digit(__m256 *r, float base) {
    const __m256 q = _mm256_round_ps(_mm256_mul_ps(*r, _mm256_set1_ps(1.0f / base)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    *r = _mm256_fnmadd_ps(q, _mm256_set1_ps(base), *r);
    return q;
}

/* blocks b0 .. b1 of the row (the limbs' rows in xq, dx and xs are the whole row's: in and in / 32 apart) */
__attribute__((target("avx2,fma")))
static void quantize_x24_blocks(const float *x, long in, long b0, long b1, signed char *xq, float *dx, int *xs) {
    const long blocks = in / 32;
    const __m256 top = _mm256_set1_ps((float)LIMBS_TOP);
    for (long b = b0; b < b1; b++) {
        __m256 v[4], bad = _mm256_setzero_ps();  /* bad: 0, or NaN where x is not finite */
        const float mx = block_max(x + 32 * b, v);
        for (int k = 0; k < 4; k++) bad = _mm256_add_ps(bad, _mm256_mul_ps(v[k], _mm256_setzero_ps()));
        __m128 f = _mm_add_ps(_mm256_castps256_ps128(bad), _mm256_extractf128_ps(bad, 1));
        f = _mm_add_ps(f, _mm_movehl_ps(f, f));
        f = _mm_add_ss(f, _mm_movehdup_ps(f));
        const float finite = _mm_cvtss_f32(f) == 0.0f, small = 0x1p-64f;
        const float id = finite && mx >= small ? (float)LIMBS_TOP / mx : 0.0f;
        const float d = !finite ? NAN : mx >= small ? mx / (float)LIMBS_TOP : 0.0f;
        __m256i a[4], bb[4], c[4];
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(finite ? v[k] : _mm256_setzero_ps(), _mm256_set1_ps(id)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), top)), top);
            a[k] = _mm256_cvtps_epi32(digit(&r, (float)(LIMB * LIMB)));
            bb[k] = _mm256_cvtps_epi32(digit(&r, (float)LIMB));
            c[k] = _mm256_cvtps_epi32(r);
        }
        const __m256i *limbs[3] = {a, bb, c};
        const float scale[3] = {d * (float)(LIMB * LIMB), d * (float)LIMB, d};
        for (int l = 0; l < 3; l++) {
            xs[l * blocks + b] = pack32(limbs[l], xq + l * in + 32 * b);
            dx[l * blocks + b] = scale[l];
        }
    }
}

static void quantize_x24(const float *x, long in, signed char *xq, float *dx, int *xs) {
    quantize_x24_blocks(x, in, 0, in / 32, xq, dx, xs);
}

/* The tiles' product of `rows` rows of activations already in int8 (xq, dx, xs per block, as quantize_x8 and
 * quantize_x24 make them) -> y (rows, out), on the current kernel path; with `best` (not Q6_K), each row's argmax */
static void tile_product(signed char *xq, float *dx, int *xs, long rows, const unsigned char *T, int type, float *y,
                         long in, long out, int nthreads, long *best) {
    const long blocks = in / 32;
    float *dxs = malloc(sizeof(float) * rows * blocks);
    for (long i = 0; i < rows * blocks; i++) dxs[i] = dx[i] * (float)xs[i];
    if (type == Q6_K || !mighty_isa_level) by_block(xq, dx, xs, dxs, rows, in);  /* the AVX2 loops' order */
    if (type == Q6_K) q6k_gemm_tiles(xq, dx, rows, T, y, in, out, nthreads);
    else if (mighty_isa_level) gemm_tiles512(xq, dx, xs, dxs, rows, T, type, y, in, out, nthreads, best);
    else gemm_tiles256(xq, dx, xs, dxs, rows, T, type, y, in, out, nthreads, best);
    free(dxs);
}

static int tiled_shape(int type, long in, long out) {
    return (type == Q6_K ? in % 256 == 0 && in >= 256
                         : (type == Q8_0 || type == Q4_0 || type == Q4_1 || type == Q5_0) && in % 32 == 0 && in >= 32)
           && out % TILE == 0;
}

/* Outputs o0 .. o1 of each of y's rows (rows, out): with 3 limbs, their products (yl: three rows of out a row of y)
 * added as (y_a + y_b) + y_c; then the bias (which may be NULL) */
static void limbs_and_bias(float *y, const float *yl, const float *bias, long rows, int limbs, long out, long o0,
                           long o1) {
    for (long r = 0; r < rows; r++) {
        float *yr = y + r * out;
        if (limbs == 3) {
            const float *ya = yl + 3 * r * out, *yb = ya + out, *yc = yb + out;
            for (long o = o0; o < o1; o++) yr[o] = (ya[o] + yb[o]) + yc[o];
        }
        if (bias)
            for (long o = o0; o < o1; o++) yr[o] += bias[o];
    }
}

/* y (rows, out) = x (rows, in) @ weights in tiles, each row of x as `limbs` rows of int8 activations (1:
 * quantize_x8; 3: quantize_x24, whose three products are added as (y_a + y_b) + y_c), + bias (which may be NULL);
 * with `best` (limbs 1, no bias, not Q6_K: y is then the tiles' own output), each row's argmax too */
static int gemm_tiled(const float *x, long rows, const unsigned char *T, int type, const float *bias, float *y,
                      long in, long out, int nthreads, int limbs, long *best) {
    if (!tiled_shape(type, in, out)) return -1;
    if (nthreads < 1) nthreads = 1;
    const long blocks = in / 32, n = limbs * rows;
    signed char *xq = malloc(n * in);
    float *dx = malloc(sizeof(float) * n * blocks), *yl = limbs == 1 ? y : malloc(sizeof(float) * n * out);
    int *xs = malloc(sizeof(int) * n * blocks);
    if (limbs == 3 && mighty_isa_level && type != Q6_K && rows > 1) {  /* the threads share the rounding */
        float *dxs = malloc(sizeof(float) * n * blocks);
        gemm_int24_rows512(x, rows, xq, dx, xs, dxs, T, type, yl, in, out, nthreads);
        free(dxs);
    } else {
        for (long r = 0; r < rows; r++)
            (limbs == 3 ? quantize_x24 : mighty_isa_level ? quantize_x8_512 : quantize_x8)(
                x + r * in, in, xq + limbs * r * in, dx + limbs * r * blocks, xs + limbs * r * blocks);
        tile_product(xq, dx, xs, n, T, type, yl, in, out, nthreads, best);
    }
    if (!best) limbs_and_bias(y, yl, bias, rows, limbs, out, 0, out);
    free(xq);
    free(dx);
    free(xs);
    if (yl != y) free(yl);
    return 0;
}

/* ---- The tiles inside a caller's parallel region (gemv.c's one region a pass) ----
 * gemm_tiled's rounding and products, each call the calling thread's share; the caller puts a barrier between a
 * product's rounding and its tiles. The Q8_0 / Q4_0 / Q4_1 / Q5_0 tiles (Q6_K has a loop of its own). */
int region_tiled(int type, long in, long out) {
    return type != Q6_K && tiled_shape(type, in, out);
}

/* Blocks b0 .. b1 of row r of x_rows (x: the row, in values) rounded as gemm_tiled rounds it: limbs 1 (quantize_x8)
 * or 3 (quantize_x24), in the order the path's loops read: on AVX-512 a row's limbs rows of in values (xq) and of a
 * value per block (dx, xs, dxs) after the rows before it; on AVX2 by_block's order, written in place */
void region_round(const float *x, long in, long b0, long b1, int limbs, long r, long x_rows, signed char *xq,
                  float *dx, int *xs, float *dxs) {
    const long blocks = in / 32, rows = limbs * x_rows;
    if (mighty_isa_level) {
        const long at = limbs * r * blocks;
        if (limbs == 3) quantize_x24_blocks(x, in, b0, b1, xq + 3 * r * in, dx + at, xs + at);
        else quantize_x8_512(x + 32 * b0, 32 * (b1 - b0), xq + r * in + 32 * b0, dx + at + b0, xs + at + b0);
        for (long l = 0; l < limbs; l++)
            for (long b = at + l * blocks + b0; b < at + l * blocks + b1; b++) dxs[b] = dx[b] * (float)xs[b];
        return;
    }
    for (long b = b0; b < b1; b++) {  /* a block at a time, each limb to its place in its group of 8 rows */
        signed char q[3 * 32];
        float d[3];
        int sum[3];
        if (limbs == 3) quantize_x24_blocks(x + 32 * b, 32, 0, 1, q, d, sum);
        else quantize_x8(x + 32 * b, 32, q, d, sum);
        for (long l = 0; l < limbs; l++) {
            const long t = limbs * r + l, r0 = t / 8 * 8, n = rows - r0 < 8 ? rows - r0 : 8;
            const long at = r0 * blocks + b * n + t - r0;
            memcpy(xq + 32 * at, q + 32 * l, 32);
            dx[at] = d[l];
            xs[at] = sum[l];
            dxs[at] = d[l] * (float)sum[l];
        }
    }
}

/* This thread's groups of TILE outputs of y (x_rows, out) from region_round's rows (limbs a row of x), as
 * gemm_tiled writes them: three limbs' products added as (y_a + y_b) + y_c (yl: their (3 x_rows, out) scratch),
 * then the bias (which may be NULL) */
#define REGION_PRODUCT(tile_rows)                                                                                  \
    const long me = omp_get_thread_num(), team = omp_get_num_threads();                                            \
    const long blocks = in / 32, groups = out / TILE, rows = limbs * x_rows;                                       \
    const long g0 = groups * me / team, g1 = groups * (me + 1) / team;                                             \
    float *y = limbs == 1 ? out_y : yl;                                                                            \
    TILE_GROUPS(tile_rows, g0, g1)                                                                                 \
    limbs_and_bias(out_y, yl, bias, x_rows, limbs, out, TILE * g0, TILE * g1);

__attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma")))
static void region_product512(const signed char *xq, const float *dx, const int *xs, const float *dxs, long x_rows,
                              int limbs, const unsigned char *T, int type, const float *bias, float *out_y, float *yl,
                              long in, long out) {
    REGION_PRODUCT(tile_rows512)
}

__attribute__((target("avx2,fma,f16c")))
static void region_product256(const signed char *xq, const float *dx, const int *xs, const float *dxs, long x_rows,
                              int limbs, const unsigned char *T, int type, const float *bias, float *out_y, float *yl,
                              long in, long out) {
    REGION_PRODUCT(tile_rows256)
}

void region_product(const signed char *xq, const float *dx, const int *xs, const float *dxs, long x_rows, int limbs,
                    const unsigned char *T, int type, const float *bias, float *out_y, float *yl, long in, long out) {
    (mighty_isa_level ? region_product512 : region_product256)(xq, dx, xs, dxs, x_rows, limbs, T, type, bias, out_y,
                                                               yl, in, out);
}

/* y (rows, out) = x (rows, in), each row rounded to 8 bits per block (above), @ Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K
 * weights laid out in tiles of 16 rows (+ bias, which may be NULL). in % 32 == 0 (Q6_K: % 256), out % 16 == 0.
 * Returns -1, having written nothing, for another type or shape. */
int mighty_gemm_ggml_q8x(const float *x, long rows, const unsigned char *T, int type, const float *bias, float *y,
                         long in, long out, int nthreads) {
    return gemm_tiled(x, rows, T, type, bias, y, in, out, nthreads, 1, NULL);
}

/* Each row's greedy token of mighty_gemm_ggml_q8x's product (no bias): best[r] = the index of the first largest of
 * output row r (or of its first NaN: numpy's argmax), the outputs themselves never written (BEST_TILES). Returns
 * -1, having written nothing, for Q6_K, more than BEST_ROWS rows, or what mighty_gemm_ggml_q8x refuses. */
int mighty_gemm_ggml_q8x_best(const float *x, long rows, const unsigned char *T, int type, long in, long out,
                              int nthreads, long *best) {
    if (type == Q6_K || rows > BEST_ROWS) return -1;
    return gemm_tiled(x, rows, T, type, NULL, NULL, in, out, nthreads, 1, best);
}

/* The same product with x in 24 bits (quantize_x24): three rows of limbs per row of x through the same tiles. The
 * weights' integers times x's within float32 rounding, at the cost of three int8 rows in the tiles instead of a float
 * conversion and multiply-add per weight. */
int mighty_gemm_ggml_int24(const float *x, long rows, const unsigned char *T, int type, const float *bias, float *y,
                           long in, long out, int nthreads) {
    return gemm_tiled(x, rows, T, type, bias, y, in, out, nthreads, 3, NULL);
}


/* ---- Rows of a table as float32 (an embedding lookup) ----
 * y (n, in) = the rows idx[0..n) of W dequantized, value for value as compress/gguf_blocks.py's dequantize_blocks
 * computes them (d * q, d * (q - 8), d * q + m rounded after each operation: no fused multiply-add; bfloat16 and
 * float16 exactly). For a decoded token's lookup the dozen torch operations of that path cost ~0.1-0.25 ms,
 * 2-4 % of the token. Returns -1, having written nothing, where an index is outside the n_rows of W. */
__attribute__((optimize("fp-contract=off")))
int mighty_ggml_rows(const unsigned char *W, long n_rows, int type, const long *idx, long n, long in, float *y) {
    const long blocks = in / 32, bytes = block_bytes(type);
    const long row_bytes = type == Q6_K ? in / 256 * Q6K_BYTES : type == Q4_K ? in / 256 * Q4K_BYTES : blocks * bytes;
    for (long r = 0; r < n; r++)
        if (idx[r] < 0 || idx[r] >= n_rows) return -1;  /* an id past the table: nothing read */
    for (long r = 0; r < n; r++) {
        const unsigned char *row = W + idx[r] * row_bytes;
        float *out = y + r * in;
        if (type == Q4_K) {  /* (d * scale) * q - dmin * min, the dequantizer's order */
            for (long s = 0; s < in / 256; s++) {
                const unsigned char *blk = row + s * Q4K_BYTES;
                const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
                for (int b = 0; b < 8; b++) {
                    int sc, m;
                    q4k_scale_min(blk + 4, b, &sc, &m);
                    const float d1 = d * (float)sc, m1 = dmin * (float)m;
                    const unsigned char *qs = blk + 16 + 32 * (b / 2);
                    for (int l = 0; l < 32; l++)
                        out[256 * s + 32 * b + l] = d1 * (float)(b & 1 ? qs[l] >> 4 : qs[l] & 15) - m1;
                }
            }
            continue;
        }
        if (type == Q6_K) {  /* (d * scale) * (q - 32), the torch dequantizer's order */
            for (long s = 0; s < in / 256; s++) {
                const unsigned char *blk = row + s * Q6K_BYTES;
                const float d = half_to_float(blk + 208);
                for (int v = 0; v < 256; v++) {
                    const int h = v / 128, j = v % 128 / 32, l = v % 32;
                    const int lo = blk[64 * h + 32 * (j & 1) + l] >> 4 * (j >> 1) & 15;
                    const int hi = blk[128 + 32 * h + l] >> 2 * j & 3;
                    const float scale = (float)(signed char)blk[192 + 8 * h + 2 * j + l / 16];
                    out[256 * s + v] = d * scale * (float)((lo | hi << 4) - 32);
                }
            }
            continue;
        }
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
                unsigned int qh = 0;
                if (type == Q5_0) memcpy(&qh, blk + 2, 4);
                for (int j = 0; j < 16; j++) {
                    const int lo = qs[j] & 15, hi = qs[j] >> 4;
                    if (type == Q5_0) {
                        o[j] = (float)((lo | (int)(qh >> j & 1) << 4) - 16) * d;
                        o[j + 16] = (float)((hi | (int)(qh >> (j + 16) & 1) << 4) - 16) * d;
                    } else if (type == Q4_0) {
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
