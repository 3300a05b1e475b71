/* What the kernel sources share: the instruction set chosen at run time, the prefetch distance, our block layouts'
 * entry points and small helpers. */
#ifndef MIGHTY_KERNELS_H
#define MIGHTY_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* 0: AVX2 + FMA (the baseline); 1: AVX-512 (F, BW, VNNI) where the CPU has it. Set once by mighty_set_isa. */
extern int mighty_isa_level;

/* Decoding reads each weight once, from L3 or memory; the hardware prefetchers of the machines here did not keep
 * ahead of two threads streaming blocks (perf: the stall sat on each block's first load), so the loop asks for the
 * bytes PREFETCH ahead itself. Measured on SmolLM2-135M Q4_1, AVX-512, 2 threads, interleaved runs in one process:
 * 69 tok/s without, 80 at 512 bytes, 92-96 at 2-16 KiB. */
#define PREFETCH 4096

/* GGUF's block types (ggml-common.h) and the bytes of one block of 32 values (F16, BF16: 32 plain values) */
enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30 };

static inline long block_bytes(int type) {
    return type == Q8_0 ? 34 : type == Q5_0 ? 22 : type == Q4_1 ? 20 : type == Q4_0 ? 18 : 64;
}

/* The int8 products' tiles (gguf_blocks.c explains them): 16 output rows a block, their d (and Q4_1's m, Q5_0's
 * fifth bits) in a head, then the codes in 8 steps of 4 values per row */
#define TILE 16

static inline long tile_bytes(int type) { return TILE * block_bytes(type); }

static inline long tile_head(int type) { return type == Q4_1 ? 64 : type == Q5_0 ? 96 : 32; }

/* The integer block sum's starting value: the codes' offset times sum xq */
static inline int start(int type, int xs) {
    return type == Q4_0 ? -8 * xs : type == Q5_0 ? -16 * xs : type == Q8_0 ? -128 * xs : 0;
}

/* Q5_0 tiles: the byte of lane l and value j holds in bit k the fifth bit of step k's value; step k's at bit 4
 * (shifts of 16-bit lanes move bits across bytes only below or above bit 4, which the mask drops) */
#define FIFTH(shl, srl, and, set1, h, k)                                                                      \
    and((k) < 4 ? shl(h, 4 - (k)) : (k) == 4 ? (h) : srl(h, (k) - 4), set1(0x10))

/* A tile's 8 steps as unsigned bytes, step k in s[k] (its 4-byte lane l: row l's four codes of the step) */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void tile_steps512(const unsigned char *t, int type, __m512i s[8]) {
    const unsigned char *c = t + tile_head(type);
    if (type == Q8_0) {
        for (int k = 0; k < 8; k++) s[k] = _mm512_loadu_si512(c + 64 * k);
        return;
    }
    for (int k = 0; k < 4; k++) {
        const __m512i v = _mm512_loadu_si512(c + 64 * k);
        s[k] = _mm512_and_si512(v, _mm512_set1_epi8(15));
        s[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
    }
    if (type == Q5_0) {
        const __m512i h = _mm512_loadu_si512(t + 32);
        for (int k = 0; k < 8; k++)
            s[k] = _mm512_or_si512(s[k], FIFTH(_mm512_slli_epi16, _mm512_srli_epi16, _mm512_and_si512,
                                               _mm512_set1_epi8, h, k));
    }
}

/* Our own layouts of Q5_0 and Q6_K rows for float32 arithmetic (q5_0_fields.c, q6_k_fields.c), multiplied by
 * mighty_gemm_ggml as types of their own */
#define MIGHTY_Q5_0_FIELDS 106
void mighty_gemm_q5_0_fields(const float *x, long rows, const unsigned char *W, const float *bias, float *y,
                             long in, long out, int nthreads);
#define MIGHTY_Q6_K_FIELDS 114
void mighty_gemm_q6_k_fields(const float *x, long rows, const unsigned char *W, const float *bias, float *y,
                             long in, long out, int nthreads);
/* ... and of Q4_0 and Q4_1 rows (q4_fields.c): the stored bytes reordered within each row */
#define MIGHTY_Q4_0_FIELDS 102
#define MIGHTY_Q4_1_FIELDS 103
void mighty_gemm_q4_fields(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                           long in, long out, int nthreads);

/* factor times the sum of each `size` values of x (n / size of them): a block's constant term */
static inline void group_sums(const float *x, long n, long size, float factor, float *sums) {
    for (long b = 0; b < n / size; b++) {
        float t = 0.0f;
        for (long j = 0; j < size; j++) t += x[size * b + j];
        sums[b] = factor * t;
    }
}

/* What differs between our layouts (q5_0_fields.c, q6_k_fields.c) for the product they share (fields_gemm): x's
 * scaling (group g of 8 values times 2^(-bits k), k = g % period % fields, its field in its run), one row's constant
 * term (sum_factor times the sum of each sum_size values), a weight row's bytes and units (blocks or super-blocks),
 * and the kernels: `dots` (one row of x times n = 1 or 2 output rows, stride bytes apart), `rows` (n <= 8 rows of x
 * given group by group, group g of row k at xg[8 (g n + k)], and their sums the same way, sum u of row k at
 * sg[u n + k], times one output row; results y[k * out]). `rows` sums every row as `dots` does, so that a row's
 * result has the same bits whatever rows share its pass (a speculative pass's, a server's batch). */
typedef struct {
    int bits, fields, period;
    long sum_size;
    float sum_factor;
    long row_bytes, units;
    void (*dots)(const float *xs, const float *sums, const unsigned char *row, long stride, long units, float *y,
                 int n);
    void (*rows)(const float *xg, long n, const float *sg, const unsigned char *row, long units, float *y, long out);
} fields_layout;

/* x's rows scaled for a layout, group by group (one row: in its own order) */
static inline void fields_x(const float *x, long n, long in, const fields_layout *L, float *out) {
    float scale[32];
    for (int p = 0; p < L->period; p++) scale[p] = ldexpf(1.0f, -L->bits * (p % L->fields));
    for (long g = 0; g < in / 8; g++)
        for (long k = 0; k < n; k++)
            for (int i = 0; i < 8; i++) out[8 * (g * n + k) + i] = x[k * in + 8 * g + i] * scale[g % L->period];
}

/* y (rows, out) = x (rows, in) @ W^T (+ bias), W in layout L: one row of x two output rows a call, several rows 8 at
 * a time (they stay in L1 while the weights stream past) */
static inline void fields_gemm(const float *x, long rows, const unsigned char *W, const float *bias, float *y,
                               long in, long out, int nthreads, const fields_layout *L) {
    const long bytes = L->row_bytes, n_sums = in / L->sum_size;
    float *sums = malloc(sizeof(float) * (rows < 8 ? rows : 8) * n_sums);
    if (rows == 1) {
        float *xs = malloc(sizeof(float) * in);
        fields_x(x, 1, in, L, xs);
        group_sums(x, in, L->sum_size, L->sum_factor, sums);
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long o = 0; o < out; o += 2) L->dots(xs, sums, W + o * bytes, bytes, L->units, y + o, o + 1 < out ? 2 : 1);
        free(xs);
    } else {
        float *xg = malloc(sizeof(float) * 8 * in), *sg = malloc(sizeof(float) * 8 * n_sums);
        for (long r = 0; r < rows; r += 8) {
            const long n = rows - r < 8 ? rows - r : 8;
            fields_x(x + r * in, n, in, L, xg);
            for (long k = 0; k < n; k++)
                group_sums(x + (r + k) * in, in, L->sum_size, L->sum_factor, sums + k * n_sums);
            for (long u = 0; u < n_sums; u++)
                for (long k = 0; k < n; k++) sg[u * n + k] = sums[k * n_sums + u];
            #pragma omp parallel for num_threads(nthreads) schedule(static)
            for (long o = 0; o < out; o++) L->rows(xg, n, sg, W + o * bytes, L->units, y + r * out + o, out);
        }
        free(xg);
        free(sg);
    }
    free(sums);
    if (bias)
        for (long r = 0; r < rows; r++)
            for (long o = 0; o < out; o++) y[r * out + o] += bias[o];
}

/* A `rows` kernel's cases (see fields_layout): n rows of x, at most 4 at a time through KERNEL(xg, sg, row, units,
 * y, ldy, N, F, R) (rows F .. F + R - 1 of the N laid out; N, F, R constants in each copy), the weight row staying in
 * L1 between the two calls of 5 to 8 rows */
#define FIELDS_ROWS_CASES(KERNEL)                                                                          \
    switch (n) {                                                                                           \
        case 1: KERNEL(xg, sg, row, units, y, out, 1, 0, 1); break;                                        \
        case 2: KERNEL(xg, sg, row, units, y, out, 2, 0, 2); break;                                        \
        case 3: KERNEL(xg, sg, row, units, y, out, 3, 0, 3); break;                                        \
        case 4: KERNEL(xg, sg, row, units, y, out, 4, 0, 4); break;                                        \
        case 5: KERNEL(xg, sg, row, units, y, out, 5, 0, 4); KERNEL(xg, sg, row, units, y, out, 5, 4, 1); break; \
        case 6: KERNEL(xg, sg, row, units, y, out, 6, 0, 4); KERNEL(xg, sg, row, units, y, out, 6, 4, 2); break; \
        case 7: KERNEL(xg, sg, row, units, y, out, 7, 0, 4); KERNEL(xg, sg, row, units, y, out, 7, 4, 3); break; \
        default: KERNEL(xg, sg, row, units, y, out, 8, 0, 4); KERNEL(xg, sg, row, units, y, out, 8, 4, 4);       \
    }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 floats: x = n ln 2 + r (|r| <= ln 2 / 2, ln 2 in two parts so that r is exact), e^r by its Taylor
 * series to degree 7 (truncation error below 6e-9 relative), times 2^n put into the exponent bits. Within 2 ulp of
 * expf over [-87, 88] (tests/test_kernels.py); x below -87.3 gives ~1e-38 instead of a denormal, above 88.3 e^88.3,
 * still finite. libm's expf one value at a time cost ~5-10 ns: 46,000 of them a token in
 * SmolLM2-135M's SiLU alone. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));  /* (in this order NaN stays) */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);   /* ln 2's leading bits: n * it is exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);         /* the rest of ln 2 */
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* exp8 on 16 floats (AVX-512): the same operations lane for lane, so the same bits, in half the instructions */
__attribute__((target("avx512f"), always_inline)) static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.3f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}

/* silu_mul's first n - n % 16 values on AVX-512 (exp16: the same bits); returns how many it did */
__attribute__((target("avx512f"), noinline, unused)) static long silu_mul16(const float *g, const float *u, float *h,
                                                                            long n) {
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(g + i), e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        _mm512_storeu_ps(h + i, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                              _mm512_loadu_ps(u + i)));
    }
    return i;
}

/* h[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i] for n values (h may be g): the decode block's SwiGLU and
 * training's (swiglu.c) */
static inline void silu_mul(const float *g, const float *u, float *h, long n) {
    long i = mighty_isa_level ? silu_mul16(g, u, h, n) : 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* float16 -> float32 through a table of all 65536 values (256 KB, filled when the library loads): a scalar
 * F16C conversion costs more than the 32 multiply-adds of a block it scales (measured: 3.4 against 2.0 ns per
 * Q4_1 block on one core), a table read only a load. ggml did the same for years. */
extern float mighty_half_table[65536];

static inline float half_to_float(const unsigned char *p) {
    unsigned short h;
    memcpy(&h, p, 2);
    return mighty_half_table[h];
}

void mighty_gemv_ggml(const float *x, const unsigned char *W, int type, const float *bias, float *y, long in,
                      long out, int nthreads);

void mighty_gemm_ggml(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                      long in, long out, int nthreads);

int mighty_gemm_ggml_q8x(const float *x, long rows, const unsigned char *T, int type, const float *bias, float *y,
                         long in, long out, int nthreads);

int mighty_gemm_ggml_int24(const float *x, long rows, const unsigned char *T, int type, const float *bias, float *y,
                           long in, long out, int nthreads);

int mighty_gemm_ggml_q8x_best(const float *x, long rows, const unsigned char *T, int type, long in, long out,
                              int nthreads, long *best);

void mighty_gemm_sparse24(const float *x, long rows, const float *values, const unsigned char *index,
                          const float *bias, float *y, long in, long out, int nthreads);

/* e^x of n floats in place (gemv.c) */
void mighty_exp(float *x, long n);

/* h = silu(g) * u and its backward, for training (swiglu.c) */
void mighty_swiglu(const float *g, const float *u, float *h, long n, int nthreads);
void mighty_swiglu_backward(const float *dh, const float *g, const float *u, float *dg, float *du, long n,
                            int nthreads);

/* each logits row to scale (softmax - one-hot label), its cross-entropy to losses (cross_entropy.c) */
void mighty_softmax_cross_entropy(float *logits, long rows, long vocab, const long *labels, float scale,
                                  float *losses, int nthreads);

void mighty_attention(const float *qkv, long qkv_out, float *att, const void *k_cache, const void *v_cache, int half,
                      long nh, long nkv, long hd, long max_len, long pos, long R, long T, const long *pads,
                      long row_stride, int threads);

/* The GGUF tiles' rounding and products in steps, for a caller's own parallel region (gguf_blocks.c) */
int region_tiled(int type, long in, long out);
void region_round(const float *x, long in, long b0, long b1, int limbs, long r, long x_rows, signed char *xq,
                  float *dx, int *xs, float *dxs);
void region_product(const signed char *xq, const float *dx, const int *xs, const float *dxs, long x_rows, int limbs,
                    const unsigned char *T, int type, const float *bias, float *out_y, float *yl, long in, long out);

/* mighty_attention in steps, for a caller's own parallel region (gemv.c's one region a pass): the plan for a pass's
 * rows and positions (the same for each of its layers), then each layer's attention_share, called by every thread */
typedef struct mighty_attention_plan mighty_attention_plan;
mighty_attention_plan *attention_plan(long qkv_out, int half, long nh, long nkv, long hd, long max_len, long pos,
                                      long R, long T, const long *pads, long row_stride, int threads);
void attention_share(const mighty_attention_plan *p, const float *qkv, float *att, const void *k_cache,
                     const void *v_cache);
void attention_free(mighty_attention_plan *p);

/* exp_shifted's end: p[t .. n) (fewer than 8) shifted by m and raised in one padded vector; returns the sum of s8's
 * lanes, then of theirs */
static inline float exp_tail(float *p, long t, long n, float m, __m256 s8) {
    float s = hsum(s8);
    const long tail = t;
    for (; t < n; t++) p[t] -= m;
    mighty_exp(p + tail, n - tail);
    for (t = tail; t < n; t++) s += p[t];
    return s;
}

/* p[0..n) = e^(p - max p), returning max p and (in *sum) the sum of the new p (attention's scores, the loss's
 * logits): 8 lanes at a time (a scalar loop's max and sum are chains of dependent operations, ~3 cycles a value) */
static inline float exp_shifted(float *p, long n, float *sum) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    long t = 0;
    for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(p + t));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (; t < n; t++) m = p[t] > m ? p[t] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 s8 = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), mv));
        _mm256_storeu_ps(p + t, e);
        s8 = _mm256_add_ps(s8, e);
    }
    *sum = exp_tail(p, t, n, m, s8);
    return m;
}

#endif
