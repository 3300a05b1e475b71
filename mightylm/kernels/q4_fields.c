/* Q4_0 and Q4_1 weights laid out for float32 arithmetic: layouts of ours (types MIGHTY_Q4_0_FIELDS and
 * MIGHTY_Q4_1_FIELDS), made from a GGUF file's rows when a model is loaded, never stored in a file.
 *
 * The stored blocks' float loop (gguf_blocks.c) spends most of its vector operations per block before any
 * arithmetic: widening 16 bytes into lanes, splitting nibbles, converting, then a scalar fp16 scale broadcast per
 * block. On the Intel Xeon here (AVX-512) it ran ~10 cycles a block, Q4_0 at 0.45x llama.cpp's tokens/s. Here a
 * row's bytes are only reordered, the same number of them:
 *
 *   row = the blocks' 16 code bytes one after another | their fp16 d | (Q4_1) their fp16 m
 *
 * so that 64 bytes of codes are 4 blocks, and 32-bit lane l of them (block 4 g + l / 4, i = l % 4) holds that
 * block's bytes 4 i .. 4 i + 3: eight 4-bit codes, field k (bits 4 k .. 4 k + 3) being value 4 i + k / 2 + 16 (k % 2)
 * of the block. One AND gives q 2^(4 k) in each lane (field 7: one shift gives q), converted to float exactly, and
 * x arrives laid out lane by lane and scaled by 2^(-4 k) (field 7: 1), exact powers of two, so every product is the
 * float product q x. Per 16 lanes of 8 values: 8 x (AND, conversion, multiply-add), then the lanes' four d (one
 * conversion for the four blocks) in one multiply-add, Q4_0's -8 d sum(x) started in the lanes (x's lane sums,
 * made with x), Q4_1's m sum(x) one more multiply-add. AVX2 takes each 64 bytes as two halves of 8 lanes (2 blocks).
 *
 * Several rows of x (AVX-512): each group's fields converted once for up to 8 rows, each row summed as one row is.
 * Results are float32 rounding of the stored loop's, in another order (tests/test_kernels.py). */
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

/* x laid out for one group of 4 blocks: 8 fields of 16 lanes, then the 16 lanes' constants (Q4_0: -8 sum x,
 * Q4_1: sum x) */
#define GROUP_FLOATS 144

static const float field_scale[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};

static inline long groups_of(long blocks) { return (blocks + 3) / 4; }

/* One row of x (in values) -> out (groups * GROUP_FLOATS); lanes past the last block are zeros. Per block of 32
 * values: field k (value m = k / 2 + 16 (k % 2) of each 4-value step i) of lane 4 (block % 4) + i, then each lane's
 * sum: no division per value (a first version with them cost ~10 % of a 576-value product). */
static void q4_x(const float *x, long in, int type, float *out) {
    const long blocks = in / 32, groups = groups_of(blocks);
    const float factor = type == Q4_0 ? -8.0f : 1.0f;
    memset(out + blocks / 4 * GROUP_FLOATS, 0, sizeof(float) * (groups - blocks / 4) * GROUP_FLOATS);
    for (long j = 0; j < blocks; j++) {
        const float *xb = x + 32 * j;
        float *o = out + j / 4 * GROUP_FLOATS + 4 * (j % 4);
        for (int k = 0; k < 8; k++) {
            const float *v = xb + k / 2 + 16 * (k % 2);
            for (int i = 0; i < 4; i++) o[16 * k + i] = v[4 * i] * field_scale[k];
        }
        for (int i = 0; i < 4; i++) {
            const float *a = xb + 4 * i, *b = xb + 16 + 4 * i;
            o[128 + i] = factor * (((a[0] + b[0]) + (a[1] + b[1])) + ((a[2] + b[2]) + (a[3] + b[3])));
        }
    }
}

/* n (<= 4) fp16 values from p, as a 64-bit pattern (zeros past n; a row's last group may hold fewer than 4 blocks) */
static inline unsigned long long halves(const unsigned char *p, long n) {
    unsigned long long h = 0;
    if (n == 4) {
        memcpy(&h, p, 8);
    } else {
        for (long i = 0; i < 2 * n; i++) h |= (unsigned long long)p[i] << 8 * i;
    }
    return h;
}

/* ---- AVX-512: a group of 4 blocks is one vector of 16 lanes ---- */
#define AVX512 __attribute__((target("avx512f,avx512bw,f16c,fma"), always_inline)) static inline

/* four fp16 values, each in 4 consecutive lanes of 16 */
AVX512 __m512 scales512(unsigned long long h) {
    const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3,
                                            4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7);
    return _mm512_cvtph_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x((long long)h), spread));
}

/* field k of 16 lanes as floats: q 2^(4 k), field 7 as q */
AVX512 __m512 field512(__m512i v, const int k) {
    return _mm512_cvtepi32_ps(k == 7 ? _mm512_srli_epi32(v, 28) : _mm512_and_si512(v, _mm512_set1_epi32(15 << 4 * k)));
}

/* 64 bytes of codes at p, of which n (1 to 4) blocks are there (a row's last group: the rest not read) */
AVX512 __m512i group_codes(const unsigned char *p, long n) {
    return n == 4 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32((__mmask16)((1u << 4 * n) - 1), p);
}

/* sum over the 8 fields f (as floats) of q x, started from `start`, for one group (xg: its GROUP_FLOATS) */
AVX512 __m512 group_dot512(const __m512 f[8], const float *xg, __m512 start) {
    __m512 t0 = start, t1 = _mm512_setzero_ps();
    t0 = _mm512_fmadd_ps(f[0], _mm512_loadu_ps(xg), t0);
    t1 = _mm512_fmadd_ps(f[1], _mm512_loadu_ps(xg + 16), t1);
    t0 = _mm512_fmadd_ps(f[2], _mm512_loadu_ps(xg + 32), t0);
    t1 = _mm512_fmadd_ps(f[3], _mm512_loadu_ps(xg + 48), t1);
    t0 = _mm512_fmadd_ps(f[4], _mm512_loadu_ps(xg + 64), t0);
    t1 = _mm512_fmadd_ps(f[5], _mm512_loadu_ps(xg + 80), t1);
    t0 = _mm512_fmadd_ps(f[6], _mm512_loadu_ps(xg + 96), t0);
    t1 = _mm512_fmadd_ps(f[7], _mm512_loadu_ps(xg + 112), t1);
    return _mm512_add_ps(t0, t1);
}

/* One output row times R rows of x (X: R of q4_x's layouts, `stride` floats apart; R = 1 is the one-row product):
 * each group's 8 fields converted once for the R rows, and every row summed as it is alone, so that a row's result
 * has the same bits whatever rows share its pass; results to y[r * ldy] */
AVX512 void many_rows512(const float *X, long stride, const unsigned char *row, long blocks, float *y, long ldy,
                         const int type, const int R) {
    const unsigned char *ds = row + 16 * blocks, *ms = ds + 2 * blocks;
    const long full = blocks / 4, tail = blocks % 4;
    __m512 acc[8], accm[8];
    for (int r = 0; r < R; r++) acc[r] = accm[r] = _mm512_setzero_ps();
    for (long g = 0; g <= full; g++) {
        const long n = g < full ? 4 : tail;
        if (n == 0) break;
        _mm_prefetch((const char *)row + 64 * g + PREFETCH, _MM_HINT_T0);
        const __m512i v = group_codes(row + 64 * g, n);
        __m512 f[8];
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) f[k] = field512(v, k);
        const __m512 d = scales512(halves(ds + 8 * g, n));
        const __m512 m = type == Q4_1 ? scales512(halves(ms + 8 * g, n)) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            const float *xg = X + r * stride + g * GROUP_FLOATS;
            const __m512 lanes = _mm512_loadu_ps(xg + 128);
            acc[r] = _mm512_fmadd_ps(group_dot512(f, xg, type == Q4_0 ? lanes : _mm512_setzero_ps()), d, acc[r]);
            if (type == Q4_1) accm[r] = _mm512_fmadd_ps(m, lanes, accm[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], accm[r]));
}

/* ---- AVX2: each group as two halves of 8 lanes (2 blocks each) ---- */
#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* two fp16 values (the low 32 bits of h), each in 4 consecutive lanes of 8 */
AVX2 __m256 scales256(unsigned long long h) {
    const __m128i spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)h), spread));
}

AVX2 __m256 field256(__m256i v, const int k) {
    return _mm256_cvtepi32_ps(k == 7 ? _mm256_srli_epi32(v, 28)
                                     : _mm256_and_si256(v, _mm256_set1_epi32(15 << 4 * k)));
}

/* 32 bytes of codes at p, of which n (1 or 2) blocks are there */
AVX2 __m256i half_codes(const unsigned char *p, long n) {
    return n == 2 ? _mm256_loadu_si256((const __m256i *)p)
                  : _mm256_maskload_epi32((const int *)p, _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
}

AVX2 float one_row256(const float *X, const unsigned char *row, long blocks, const int type) {
    const unsigned char *ds = row + 16 * blocks, *ms = ds + 2 * blocks;
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (long h = 0; 2 * h < blocks; h++) {  /* half h: blocks 2 h, 2 h + 1; its x at group h / 2, lanes 8 (h % 2) */
        const long n = blocks - 2 * h < 2 ? 1 : 2;
        const float *xh = X + h / 2 * GROUP_FLOATS + 8 * (h % 2);
        _mm_prefetch((const char *)row + 32 * h + PREFETCH, _MM_HINT_T0);
        const __m256i v = half_codes(row + 32 * h, n);
        const __m256 lanes = _mm256_loadu_ps(xh + 128);
        __m256 t0 = type == Q4_0 ? lanes : _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
        t0 = _mm256_fmadd_ps(field256(v, 0), _mm256_loadu_ps(xh), t0);
        t1 = _mm256_fmadd_ps(field256(v, 1), _mm256_loadu_ps(xh + 16), t1);
        t0 = _mm256_fmadd_ps(field256(v, 2), _mm256_loadu_ps(xh + 32), t0);
        t1 = _mm256_fmadd_ps(field256(v, 3), _mm256_loadu_ps(xh + 48), t1);
        t0 = _mm256_fmadd_ps(field256(v, 4), _mm256_loadu_ps(xh + 64), t0);
        t1 = _mm256_fmadd_ps(field256(v, 5), _mm256_loadu_ps(xh + 80), t1);
        t0 = _mm256_fmadd_ps(field256(v, 6), _mm256_loadu_ps(xh + 96), t0);
        t1 = _mm256_fmadd_ps(field256(v, 7), _mm256_loadu_ps(xh + 112), t1);
        acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), scales256(halves(ds + 4 * h, n)), acc);
        if (type == Q4_1) accm = _mm256_fmadd_ps(scales256(halves(ms + 4 * h, n)), lanes, accm);
    }
    return hsum(_mm256_add_ps(acc, accm));
}

/* R rows of x times one output row, each row as one_row256 takes it (the weight row in L1 after the first), so
 * that a row's result has the same bits whatever rows share its pass: AVX2 has too few registers to keep a half's
 * 8 fields beside the rows' sums (Q4 takes this layout on AVX-512 CPUs only: kernels.float_layout) */
AVX2 void many_rows256(const float *X, long stride, const unsigned char *row, long blocks, float *y, long ldy,
                       const int type, const int R) {
    for (int r = 0; r < R; r++) y[r * ldy] = one_row256(X + r * stride, row, blocks, type);
}

/* Output rows o0 .. o1 - 1 for n rows of x, results to y[r * ldy + o]: each type and row count its own copy, the loop
 * over output rows inside it (a call per output row cost ~10 ns: 0.5 ns a block on SmolLM2's 18-block rows) */
#define ROWS_CASES(F, type)                                                                              \
    switch (n) {                                                                                         \
        case 1: ROWS_LOOP(F, type, 1) break;                                                             \
        case 2: ROWS_LOOP(F, type, 2) break;                                                             \
        case 3: ROWS_LOOP(F, type, 3) break;                                                             \
        case 4: ROWS_LOOP(F, type, 4) break;                                                             \
        case 5: ROWS_LOOP(F, type, 5) break;                                                             \
        case 6: ROWS_LOOP(F, type, 6) break;                                                             \
        case 7: ROWS_LOOP(F, type, 7) break;                                                             \
        default: ROWS_LOOP(F, type, 8)                                                                   \
    }
#define ROWS_LOOP(F, type, R) \
    for (long o = o0; o < o1; o++) many_rows##F(X, stride, W + o * bytes, blocks, y + o, ldy, type, R);

__attribute__((target("avx512f,avx512bw,f16c,fma"), noinline))
static void band512(const float *X, long stride, long n, const unsigned char *W, long bytes, long blocks, long o0,
                    long o1, float *y, long ldy, int type) {
    if (type == Q4_0) { ROWS_CASES(512, Q4_0) } else { ROWS_CASES(512, Q4_1) }
}

__attribute__((target("avx2,fma,f16c"), noinline))
static void band256(const float *X, long stride, long n, const unsigned char *W, long bytes, long blocks, long o0,
                    long o1, float *y, long ldy, int type) {
    if (type == Q4_0) { ROWS_CASES(256, Q4_0) } else { ROWS_CASES(256, Q4_1) }
}

/* y (rows, out) = x (rows, in) @ W^T (+ bias), W in the layout above of ggml type `type` (2: Q4_0, 3: Q4_1);
 * in % 32 == 0. x's rows 8 at a time, laid out once for every output row (they stay in L1 while the weights
 * stream past); each thread a band of output rows. */
void mighty_gemm_q4_fields(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                           long in, long out, int nthreads) {
    const long blocks = in / 32, bytes = blocks * block_bytes(type), stride = groups_of(blocks) * GROUP_FLOATS;
    float *X = malloc(sizeof(float) * 8 * stride);
    for (long r = 0; r < rows; r += 8) {
        const long n = rows - r < 8 ? rows - r : 8;
        for (long k = 0; k < n; k++) q4_x(x + (r + k) * in, in, type, X + k * stride);
        #pragma omp parallel num_threads(nthreads)
        {
            const long t = omp_get_thread_num(), T = omp_get_num_threads();
            const long o0 = out * t / T, o1 = out * (t + 1) / T;
            if (mighty_isa_level) band512(X, stride, n, W, bytes, blocks, o0, o1, y + r * out, out, type);
            else band256(X, stride, n, W, bytes, blocks, o0, o1, y + r * out, out, type);
        }
    }
    free(X);
    if (bias)
        for (long r = 0; r < rows; r++)
            for (long o = 0; o < out; o++) y[r * out + o] += bias[o];
}
