/* Batch-1 matrix-vector products, AVX2 + FMA, OpenMP: float32 (below), int8 and NF4 (at the end); float32 and
 * int8 also with AVX-512 (F, and BW + VNNI for int8), chosen at run time (mighty_set_isa).
 *
 *   y[0:out] = x[0:in] @ Wt[0:in][0:out] (+ bias)     Wt row-major, i.e. W^T of an (out, in) Linear
 *
 * Decoding one token is bound by how fast the weights stream from memory. Each thread takes a
 * contiguous band of rows of Wt and streams it front to back (the access pattern hardware
 * prefetchers like best), accumulating into its own copy of y, which stays in L1/L2; the copies
 * are summed at the end. Four rows per pass quarter the traffic on the accumulator.
 *
 * Linked against `libgomp.so.1` by soname: loaded into a process where torch has already loaded
 * its libgomp, the same runtime and thread pool are reused (no second set of spinning threads).
 */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static void band(const float *x, const float *W, float *y, long i0, long i1, long out) {
    memset(y, 0, (size_t)out * sizeof(float));
    long i = i0;
    for (; i + 4 <= i1; i += 4) {
        const __m256 a0 = _mm256_set1_ps(x[i]), a1 = _mm256_set1_ps(x[i + 1]);
        const __m256 a2 = _mm256_set1_ps(x[i + 2]), a3 = _mm256_set1_ps(x[i + 3]);
        const float *w0 = W + i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
        long o = 0;
        for (; o + 8 <= out; o += 8) {
            __m256 acc = _mm256_loadu_ps(y + o);
            acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + o), acc);
            acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + o), acc);
            acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + o), acc);
            acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + o), acc);
            _mm256_storeu_ps(y + o, acc);
        }
        for (; o < out; o++) y[o] += x[i] * w0[o] + x[i + 1] * w1[o] + x[i + 2] * w2[o] + x[i + 3] * w3[o];
    }
    for (; i < i1; i++)
        for (long o = 0; o < out; o++) y[o] += x[i] * W[i * out + o];
}

/* The same band with AVX-512: 16 floats per register, the tail under a mask. */
__attribute__((target("avx512f")))
static void band512(const float *x, const float *W, float *y, long i0, long i1, long out) {
    memset(y, 0, (size_t)out * sizeof(float));
    const __mmask16 tail = (__mmask16)((1u << (out % 16)) - 1);
    const long body = out - out % 16;
    long i = i0;
    for (; i + 4 <= i1; i += 4) {
        const __m512 a0 = _mm512_set1_ps(x[i]), a1 = _mm512_set1_ps(x[i + 1]);
        const __m512 a2 = _mm512_set1_ps(x[i + 2]), a3 = _mm512_set1_ps(x[i + 3]);
        const float *w0 = W + i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
        for (long o = 0; o < body; o += 16) {
            __m512 acc = _mm512_loadu_ps(y + o);
            acc = _mm512_fmadd_ps(a0, _mm512_loadu_ps(w0 + o), acc);
            acc = _mm512_fmadd_ps(a1, _mm512_loadu_ps(w1 + o), acc);
            acc = _mm512_fmadd_ps(a2, _mm512_loadu_ps(w2 + o), acc);
            acc = _mm512_fmadd_ps(a3, _mm512_loadu_ps(w3 + o), acc);
            _mm512_storeu_ps(y + o, acc);
        }
        if (tail) {
            __m512 acc = _mm512_maskz_loadu_ps(tail, y + body);
            acc = _mm512_fmadd_ps(a0, _mm512_maskz_loadu_ps(tail, w0 + body), acc);
            acc = _mm512_fmadd_ps(a1, _mm512_maskz_loadu_ps(tail, w1 + body), acc);
            acc = _mm512_fmadd_ps(a2, _mm512_maskz_loadu_ps(tail, w2 + body), acc);
            acc = _mm512_fmadd_ps(a3, _mm512_maskz_loadu_ps(tail, w3 + body), acc);
            _mm512_mask_storeu_ps(y + body, tail, acc);
        }
    }
    for (; i < i1; i++)
        for (long o = 0; o < out; o++) y[o] += x[i] * W[i * out + o];
}

/* Which instruction set the products use: 0 AVX2 + FMA (the baseline), 1 AVX-512F (float32) with AVX-512 VNNI
 * (int8) where the CPU has them. Chosen once by the caller from the CPU's flags (mighty_set_isa). */
int mighty_isa_level = 0;

void mighty_set_isa(int which) { mighty_isa_level = which; }

int mighty_isa(void) { return mighty_isa_level; }

/* scratch: (nthreads - 1) * out floats for the other threads' partial sums. bias may be NULL. */
void mighty_gemv(const float *x, const float *W, const float *bias, float *y, float *scratch,
                 long in, long out, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int used = 1;  /* OpenMP may grant fewer threads than asked (nested regions, limits) */
    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const long i0 = in * t / n, i1 = in * (t + 1) / n;
        float *mine = t == 0 ? y : scratch + (long)(t - 1) * out;
        if (mighty_isa_level) band512(x, W, mine, i0, i1, out); else band(x, W, mine, i0, i1, out);
        if (t == 0) used = n;
    }
    for (int t = 1; t < used; t++) {
        const float *part = scratch + (long)(t - 1) * out;
        for (long o = 0; o < out; o++) y[o] += part[o];
    }
    if (bias)
        for (long o = 0; o < out; o++) y[o] += bias[o];
}


/* ---- quantized weights, output-major: each thread takes a band of output rows ---- */

/* NF4: codes packed two per byte (first in the high nibble), blocks of `block` along each row
 * (in % block == 0, block % 16 == 0), one float absmax per block; `levels` the 16 NF4 values.
 * xe/xo: x at even/odd positions (the high/low nibbles of each byte), each in / 2 long. */
void mighty_gemv_nf4(const float *xe, const float *xo, const unsigned char *W, const float *absmax,
                     const float *levels, const float *bias, float *y, long in, long out, long block, int nthreads) {
    const __m256 lut_lo = _mm256_loadu_ps(levels), lut_hi = _mm256_loadu_ps(levels + 8);
    const __m256i seven = _mm256_set1_epi32(7), nibble = _mm256_set1_epi32(15);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        const unsigned char *w = W + o * (in / 2);
        const float *am = absmax + o * (in / block);
        __m256 acc = _mm256_setzero_ps();
        for (long b = 0; b < in / block; b++) {
            __m256 part = _mm256_setzero_ps();
            for (long p = b * block / 2; p < (b + 1) * block / 2; p += 8) {  /* 8 bytes: 16 codes */
                const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + p)));
                const __m256i h = _mm256_srli_epi32(bytes, 4), l = _mm256_and_si256(bytes, nibble);
                const __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, h), _mm256_permutevar8x32_ps(lut_hi, h),
                                                   _mm256_castsi256_ps(_mm256_cmpgt_epi32(h, seven)));
                const __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, l), _mm256_permutevar8x32_ps(lut_hi, l),
                                                   _mm256_castsi256_ps(_mm256_cmpgt_epi32(l, seven)));
                part = _mm256_fmadd_ps(vh, _mm256_loadu_ps(xe + p), part);
                part = _mm256_fmadd_ps(vl, _mm256_loadu_ps(xo + p), part);
            }
            acc = _mm256_fmadd_ps(part, _mm256_set1_ps(am[b]), acc);
        }
        y[o] = hsum(acc) + (bias ? bias[o] : 0.0f);
    }
}

/* int4, asymmetric per group: w = (q - 8) * scale + zero, so per group g of `group` inputs
 *   sum_j w_j x_j = scale * sum_j q_j x_j + (zero - 8 * scale) * sum_j x_j.
 * Codes packed as for NF4 (high nibble first); scale/zero (out, in / group); xsum (in / group). */
void mighty_gemv_int4(const float *xe, const float *xo, const unsigned char *W, const float *scale,
                      const float *zero, const float *xsum, const float *bias, float *y, long in, long out,
                      long group, int nthreads) {
    const __m256i nibble = _mm256_set1_epi32(15);
    const long groups = in / group;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        const unsigned char *w = W + o * (in / 2);
        const float *s = scale + o * groups, *z = zero + o * groups;
        float total = 0.0f;
        __m256 acc = _mm256_setzero_ps();
        for (long g = 0; g < groups; g++) {
            __m256 part = _mm256_setzero_ps();
            for (long p = g * group / 2; p < (g + 1) * group / 2; p += 8) {  /* 8 bytes: 16 codes */
                const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + p)));
                const __m256 vh = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
                const __m256 vl = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, nibble));
                part = _mm256_fmadd_ps(vh, _mm256_loadu_ps(xe + p), part);
                part = _mm256_fmadd_ps(vl, _mm256_loadu_ps(xo + p), part);
            }
            acc = _mm256_fmadd_ps(part, _mm256_set1_ps(s[g]), acc);
            total += (z[g] - 8.0f * s[g]) * xsum[g];
        }
        y[o] = hsum(acc) + total + (bias ? bias[o] : 0.0f);
    }
}

/* int8 weights, per output channel: y[o] = scale[o] * sum_j W[o][j] x[j] (+ bias[o]), W (out, in) row-major,
 * in % 32 == 0. x is first rounded to int16, xq = round(x / xs) with xs = max|x| / 32767 (an error
 * of at most 1.5e-5 of the largest input, far below the weights' int8 rounding); then every product
 * is an exact integer: 16 weights sign-extended by one instruction and multiplied-and-paired by one
 * madd, half the conversion work of going through float, so the loop keeps up with memory.
 * int32 partial sums are flushed to float every 1024 inputs (1024 * 127 * 32767 < 2^31). */
/* AVX-512 VNNI: 32 int8 weights widened to int16 and multiplied with 32 int16 inputs, pairs summed into 16 int32
 * lanes by one vpdpwssd (the AVX2 path needs a madd and an add for 16). Same arithmetic, same result. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void int8_rows512(const signed char *W, const short *xq, const float *scale, const float *bias, float *y,
                         float xs, long in, long out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        const signed char *w = W + o * in;
        __m512 total = _mm512_setzero_ps();
        for (long c = 0; c < in; c += 1024) {  /* int32 lanes summed into float every 1024 inputs: no overflow */
            const long end = c + 1024 < in ? c + 1024 : in;
            __m512i acc = _mm512_setzero_si512();
            for (long j = c; j < end; j += 32) {
                const __m512i w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j)));
                acc = _mm512_dpwssd_epi32(acc, w16, _mm512_loadu_si512((const void *)(xq + j)));
            }
            total = _mm512_add_ps(total, _mm512_cvtepi32_ps(acc));
        }
        y[o] = _mm512_reduce_add_ps(total) * scale[o] * xs + (bias ? bias[o] : 0.0f);
    }
}

void mighty_gemv_int8(const float *x, const signed char *W, const float *scale, const float *bias, float *y,
                      long in, long out, int nthreads) {
    float amax = 0.0f;
    for (long j = 0; j < in; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float xs = amax > 0.0f ? amax / 32767.0f : 1.0f;
    short *xq = (short *)aligned_alloc(64, (size_t)((in * sizeof(short) + 63) / 64 * 64));
    for (long j = 0; j < in; j++) xq[j] = (short)lrintf(x[j] / xs);
    if (mighty_isa_level) {
        int8_rows512(W, xq, scale, bias, y, xs, in, out, nthreads);
        free(xq);
        return;
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        const signed char *w = W + o * in;
        __m256 total = _mm256_setzero_ps();
        for (long c = 0; c < in; c += 1024) {
            const long end = c + 1024 < in ? c + 1024 : in;
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            for (long j = c; j < end; j += 32) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(w + j));
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_load_si256((const __m256i *)(xq + j))));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, _mm256_load_si256((const __m256i *)(xq + j + 16))));
            }
            total = _mm256_add_ps(total, _mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)));
        }
        y[o] = hsum(total) * scale[o] * xs + (bias ? bias[o] : 0.0f);
    }
    free(xq);
}


/* ---- one whole transformer block for one token (batch-1 decoding) ----
 *
 * Eager PyTorch spends more time dispatching a block's ~25 small operations (norms, RoPE, the cache
 * write, attention over the cache, SiLU, residual adds) than streaming its weights; this does the
 * same arithmetic in one call, with the products through the GEMVs above:
 *   x += o_proj(attention(rope(q), rope(k), v over the cache))   on rms_norm(x) * attn_norm
 *   x += down_proj(silu(gate) * up)                              on rms_norm(x) * mlp_norm
 * Each projection is float32 input-major, int8 output-major with per-row scales, NF4 (codes two per byte,
 * one float absmax per block of `block` inputs, `levels` the 16 NF4 values) or int4 (codes two per byte, a
 * scale and a zero per group of `block` inputs), GGUF's Q8_0 / Q4_0 / Q4_1 blocks or F16 / BF16 rows as stored,
 * or 2:4 sparse (kept values and their 2-bit positions, sparse24.c). */
enum { PROJ_FLOAT32 = 0, PROJ_INT8 = 1, PROJ_NF4 = 2, PROJ_INT4 = 3, PROJ_GGML = 4, PROJ_SPARSE24 = 5,
       PROJ_GGML_Q8X = 6, /* GGUF blocks in tiles of 16 rows, activations rounded to 8 bits (gguf_blocks.c) */
       PROJ_GGML_INT24 = 7  /* the same tiles, activations in 24 bits: float32's rounding (gguf_blocks.c) */ };
typedef struct {
    const void *w;
    const float *scale;   /* int8: per-row scales; NF4: per-block absmax; int4: (out, in / block) scales */
    const float *bias;
    const float *levels;  /* NF4 only */
    long block;           /* NF4: block; int4: group; GGUF: the ggml type (8 Q8_0, 2 Q4_0, 3 Q4_1, 1 F16, 30 BF16) */
    int kind;
    const float *zero;    /* int4 only: (out, in / block) */
    const unsigned char *index;  /* 2:4 only: the kept values' positions (w holds the values) */
} mighty_proj;

typedef struct {
    mighty_proj qkv, o, gate_up, down;
    /* a mixture of experts in place of gate_up / down when n_experts > 0: the router (input-major float32, kind 0),
     * and each expert's fused gate_up and down projections; each token runs its top_k experts, their softmax
     * weights renormalised to sum to 1 when norm_topk (moe.py) */
    mighty_proj router;
    const mighty_proj *expert_gate_up, *expert_down;
    long n_experts, top_k;
    int norm_topk;
    const float *attn_norm, *mlp_norm;
    void *k_cache, *v_cache;    /* this layer's (n_kv, max_len, head_dim), batch row 0: float32, or float16 (kv_half) */
    const float *cos, *sin;     /* (head_dim) for this position; sin with the rotate-half sign folded in */
    long dim, n_heads, n_kv, head_dim, ffn, max_len, pos;
    float eps;
    int threads;
    long rows;                  /* tokens of this sequence decoded together (speculative verification): 1 or more */
    /* or, when pads is not NULL, `rows` sequences (a server's batch), `tokens` each, at slots pos .. pos + tokens - 1:
     * row r's cache is row_stride floats after row r - 1's, its tokens sit in slots pads[r] .. (left padding), and
     * each attends to its own row's slots up to itself; x holds row r's tokens one after another */
    const long *pads;
    long row_stride;
    long tokens;
    /* per-request LoRA (serve/adapters.py): lora[s] is sequence s's adapter (NULL: none), its terms for every block
     * in one table (mighty_lora, below), of which this block's are at layer; lora NULL: no adapter anywhere */
    const struct mighty_lora *const *lora;
    long layer;
    int kv_half;                /* the cache holds float16 (IEEE half, F16C's rounding to nearest even) */
} mighty_block;

/* One LoRA term of a projection: y[offset .. offset + out) += Bt^T (A x), A (rank, in) and Bt (rank, out) row-major
 * float32 (Bt: the adapter's B transposed, already scaled). An adapter's table holds LORA_TERMS terms per projection
 * (q, k, v of the fused qkv; gate, up of gate_up; o and down one each) for the 4 projections of every block, in
 * that order; rank 0: no term. */
enum { LORA_TERMS = 3, LORA_PROJECTIONS = 4 };
typedef struct mighty_lora {
    const float *A, *Bt;
    long rank, offset, out;
} mighty_lora;

/* scratch: at least max(in, (threads - 1) * out) floats */
static void project(const mighty_proj *p, const float *x, float *y, float *scratch, long in, long out, int threads) {
    if (p->kind == PROJ_INT8) {
        mighty_gemv_int8(x, (const signed char *)p->w, p->scale, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_NF4) {
        float *xe = scratch, *xo = scratch + in / 2;  /* x at even / odd positions: the high / low nibbles */
        for (long j = 0; j < in / 2; j++) { xe[j] = x[2 * j]; xo[j] = x[2 * j + 1]; }
        mighty_gemv_nf4(xe, xo, (const unsigned char *)p->w, p->scale, p->levels, p->bias, y, in, out, p->block,
                        threads);
    } else if (p->kind == PROJ_SPARSE24) {
        mighty_gemm_sparse24(x, 1, (const float *)p->w, p->index, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_GGML) {
        mighty_gemv_ggml(x, (const unsigned char *)p->w, (int)p->block, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_GGML_Q8X) {
        mighty_gemm_ggml_q8x(x, 1, (const unsigned char *)p->w, (int)p->block, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_GGML_INT24) {
        mighty_gemm_ggml_int24(x, 1, (const unsigned char *)p->w, (int)p->block, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_INT4) {
        const long groups = in / p->block;
        float *buf = malloc(sizeof(float) * (in + groups)), *xe = buf, *xo = buf + in / 2, *xsum = buf + in;
        for (long j = 0; j < in / 2; j++) { xe[j] = x[2 * j]; xo[j] = x[2 * j + 1]; }
        for (long g = 0; g < groups; g++) {
            float t = 0.0f;
            for (long j = g * p->block; j < (g + 1) * p->block; j++) t += x[j];
            xsum[g] = t;
        }
        mighty_gemv_int4(xe, xo, (const unsigned char *)p->w, p->scale, p->zero, xsum, p->bias, y, in, out, p->block,
                         threads);
        free(buf);
    } else {
        mighty_gemv(x, (const float *)p->w, p->bias, y, scratch, in, out, threads);
    }
}

/* Several rows (x (rows, in) -> y (rows, out)): GGUF blocks and 2:4 weights are read once for all rows; the other
 * kinds run row by row. GGUF tiles with int8 activations (PROJ_GGML_Q8X) round every row to 8 bits as it would be
 * alone (a prompt's tokens, a speculative step's, a server's batch). */
static void project_rows(const mighty_proj *p, const float *x, float *y, float *scratch, long in, long out, long rows,
                         int threads) {
    if (rows == 1) {
        project(p, x, y, scratch, in, out, threads);
    } else if (p->kind == PROJ_GGML_Q8X) {
        mighty_gemm_ggml_q8x(x, rows, (const unsigned char *)p->w, (int)p->block, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_GGML_INT24) {
        mighty_gemm_ggml_int24(x, rows, (const unsigned char *)p->w, (int)p->block, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_GGML) {
        mighty_gemm_ggml(x, rows, (const unsigned char *)p->w, (int)p->block, p->bias, y, in, out, threads);
    } else if (p->kind == PROJ_SPARSE24) {
        mighty_gemm_sparse24(x, rows, (const float *)p->w, p->index, p->bias, y, in, out, threads);
    } else {
        for (long r = 0; r < rows; r++) project(p, x + r * in, y + r * out, scratch, in, out, threads);
    }
}

/* e^x of n floats in place (see exp8) */
void mighty_exp(float *x, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float tail[8] = {0};
        memcpy(tail, x + i, sizeof(float) * (n - i));
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        memcpy(x + i, tail, sizeof(float) * (n - i));
    }
}

/* y (R, width) += each row's LoRA terms for projection p of this block on x (R, in). The rows of one adapter go
 * together, so that its A and B are read from memory once for all of them; the threads first share the rank-sized
 * products h = A x (by row and term), then the updates y += B h (by adapter, term and 64 columns), which write
 * disjoint parts of y. */
enum { LORA_COLUMNS = 64 };
static void lora_rows(const mighty_block *b, int p, const float *x, float *y, long in, long width, long R,
                      int threads) {
    if (!b->lora) return;
    const long T = b->pads && b->tokens > 1 ? b->tokens : 1;
    /* the rows with an adapter, grouped by it: rows[first[g] .. first[g + 1]) are group g's, terms[i] the terms of
     * rows[i]'s adapter for this projection */
    char *done = calloc(R, 1);
    long *rows = malloc(sizeof(long) * R), *first = malloc(sizeof(long) * (R + 1)), groups = 0, n = 0;
    const mighty_lora **terms = malloc(sizeof(*terms) * R);
    long rank = 0, out = 0;  /* the largest of any term */
    for (long r = 0; r < R; r++) {
        const mighty_lora *table = b->lora[b->pads ? r / T : 0];
        if (done[r] || !table) continue;
        const mighty_lora *mine = table + (b->layer * LORA_PROJECTIONS + p) * LORA_TERMS;
        first[groups++] = n;
        for (long j = r; j < R; j++)
            if (!done[j] && b->lora[b->pads ? j / T : 0] == table) { terms[n] = mine; rows[n++] = j; done[j] = 1; }
        for (int t = 0; t < LORA_TERMS; t++) {
            rank = mine[t].rank > rank ? mine[t].rank : rank;
            out = mine[t].out > out ? mine[t].out : out;
        }
    }
    first[groups] = n;
    if (rank > 0) {
        float *h = malloc(sizeof(float) * n * LORA_TERMS * rank);  /* h[(i * LORA_TERMS + t) * rank + k], i: row */
        const long chunks = (out + LORA_COLUMNS - 1) / LORA_COLUMNS;
        #pragma omp parallel num_threads(threads)
        {
            /* h = A x for one row and term, eight rows of A at a time: x read once for eight independent sums */
            #pragma omp for schedule(static)
            for (long job = 0; job < n * LORA_TERMS; job++) {
                const long i = job / LORA_TERMS, t = job % LORA_TERMS;
                const mighty_lora *l = terms[i] + t;
                const float *xi = x + rows[i] * in;
                for (long k0 = 0; k0 < l->rank; k0 += 8) {
                    const long kn = l->rank - k0 < 8 ? l->rank - k0 : 8;
                    __m256 acc[8];
                    for (long k = 0; k < kn; k++) acc[k] = _mm256_setzero_ps();
                    long j = 0;
                    for (; j + 8 <= in; j += 8) {
                        const __m256 xv = _mm256_loadu_ps(xi + j);
                        for (long k = 0; k < kn; k++)
                            acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(l->A + (k0 + k) * in + j), xv, acc[k]);
                    }
                    for (long k = 0; k < kn; k++) {
                        float v = hsum(acc[k]);
                        for (long jj = j; jj < in; jj++) v += l->A[(k0 + k) * in + jj] * xi[jj];
                        h[(i * LORA_TERMS + t) * rank + k0 + k] = v;
                    }
                }
            }
            /* y += B h, LORA_COLUMNS columns of one term for the adapter's rows: each 8 columns of a row summed over
             * the rank in a register, then added to y once */
            #pragma omp for schedule(static)
            for (long job = 0; job < groups * LORA_TERMS * chunks; job++) {
                const long g = job / (LORA_TERMS * chunks), t = job / chunks % LORA_TERMS, c = job % chunks;
                const mighty_lora *l = terms[first[g]] + t;
                const long lo = c * LORA_COLUMNS, end = lo + LORA_COLUMNS < l->out ? lo + LORA_COLUMNS : l->out;
                for (long i = first[g]; i < first[g + 1]; i++) {
                    float *yi = y + rows[i] * width + l->offset;
                    const float *hr = h + (i * LORA_TERMS + t) * rank;
                    long o = lo;
                    for (; o + 8 <= end; o += 8) {
                        __m256 sum = _mm256_loadu_ps(yi + o);
                        for (long k = 0; k < l->rank; k++)
                            sum = _mm256_fmadd_ps(_mm256_set1_ps(hr[k]), _mm256_loadu_ps(l->Bt + k * l->out + o), sum);
                        _mm256_storeu_ps(yi + o, sum);
                    }
                    for (; o < end; o++)
                        for (long k = 0; k < l->rank; k++) yi[o] += hr[k] * l->Bt[k * l->out + o];
                }
            }
        }
        free(h);
    }
    free(done);
    free(rows);
    free(first);
    free(terms);
}

/* float32 -> float16 (round to nearest even) of n values */
__attribute__((target("avx2,fma,f16c"))) static void to_half(unsigned short *y, const float *x, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

/* 1 / sqrt(mean(x^2) + eps), and y = w x times it (rms_norm), the squares summed in double in 16 lanes (four
 * chains of four, then across, then the tail): one chain of n dependent additions cost ~4 cycles a value, half of
 * this file's own time in a pass of 5 rows, run by one thread while the others wait */
static float rms_inverse(const float *x, long n, float eps) {
    __m256d s[4];
    for (int k = 0; k < 4; k++) s[k] = _mm256_setzero_pd();
    long i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 4; k++) {
            const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * k));
            s[k] = _mm256_fmadd_pd(v, v, s[k]);
        }
    double lanes[4], ss;
    _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_add_pd(s[0], s[1]), _mm256_add_pd(s[2], s[3])));
    ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; i < n; i++) ss += (double)x[i] * x[i];
    return 1.0f / sqrtf((float)(ss / n) + eps);
}

static void rms_norm(const float *x, const float *w, float *y, long n, float eps) {
    const float r = rms_inverse(x, n, eps);
    for (long i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

static void rope(float *v, const float *cos, const float *sin, long hd) {
    const long half = hd / 2;
    for (long i = 0; i < half; i++) {  /* v*cos + roll(v, hd/2)*sin_signed */
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] + b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Row r of qkv (rows of q, k, v) at its slot (one sequence: pos + r; with pads, row r % T of sequence r / T, whose
 * cache sits row_stride values after the one before): RoPE of kv head g's query heads and of its key (cos / sin: a
 * row per row of qkv), then its key and value into the caches */
static void rope_store(float *qkv, long r, long g, const mighty_block *b, void *k_cache, void *v_cache,
                       const float *cos, const float *sin, long pos, long max_len, long T, const long *pads,
                       long row_stride) {
    const long hd = b->head_dim, nkv = b->n_kv, group = b->n_heads / nkv, q_out = b->n_heads * hd;
    float *q = qkv + r * (q_out + 2 * nkv * hd), *k = q + q_out + g * hd, *v = k + nkv * hd;
    for (long j = g * group; j < (g + 1) * group; j++) rope(q + j * hd, cos + r * hd, sin + r * hd, hd);
    rope(k, cos + r * hd, sin + r * hd, hd);
    const long slot = pos + (pads ? r % T : r), at = (pads ? r / T * row_stride : 0) + (g * max_len + slot) * hd;
    if (b->kv_half) {
        to_half((unsigned short *)k_cache + at, k, hd);
        to_half((unsigned short *)v_cache + at, v, hd);
    } else {
        memcpy((float *)k_cache + at, k, sizeof(float) * hd);
        memcpy((float *)v_cache + at, v, sizeof(float) * hd);
    }
}

/* x += sum over the token's top_k experts of weight_e * down_e(silu(gate_e(h)) * up_e(h)), as moe.MoE computes it:
 * softmax over all router logits (in float), the k largest (ties to the lower index, as torch.topk), optionally
 * renormalised. ffn is the experts' width; gu and tmp are scratch of 2 * ffn and dim floats. */
static void moe_ffn(float *x, const float *h, const mighty_block *b, float *gu, float *tmp, float *scratch,
                    int threads) {
    const long dim = b->dim, ffn = b->ffn, E = b->n_experts, k = b->top_k;
    float logits[256], weight[256];
    long chosen[256];
    project(&b->router, h, logits, scratch, dim, E, threads);
    float top = -INFINITY, sum = 0.0f;
    for (long e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
    for (long e = 0; e < E; e++) sum += (logits[e] = expf(logits[e] - top));
    float picked = 0.0f;
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        chosen[j] = best;
        weight[j] = logits[best] / sum;
        picked += weight[j];
    }
    for (long j = 0; j < k; j++) {
        const float w = b->norm_topk ? weight[j] / picked : weight[j];
        project(&b->expert_gate_up[chosen[j]], h, gu, scratch, dim, 2 * ffn, threads);
        silu_mul(gu, gu + ffn, gu, ffn);
        project(&b->expert_down[chosen[j]], gu, tmp, scratch, ffn, dim, threads);
        for (long i = 0; i < dim; i++) x[i] += w * tmp[i];
    }
}

/* x (rows, dim): the block over `rows` consecutive tokens of one sequence at positions pos .. pos + rows - 1, each
 * attending to the cache up to itself; cos / sin (rows, head_dim). With pads: rows x tokens token-rows (see
 * mighty_block), cos / sin one row for each. */
void mighty_decode_block(float *x, const mighty_block *b) {
    const long dim = b->dim, hd = b->head_dim, nh = b->n_heads, nkv = b->n_kv, ffn = b->ffn;
    const long *pads = b->pads, T = pads && b->tokens > 1 ? b->tokens : 1;  /* tokens per sequence of a batch */
    const long R = (b->rows < 1 ? 1 : b->rows) * T;
    const long q_out = nh * hd, kv_out = nkv * hd, qkv_out = q_out + 2 * kv_out;
    const long widest = 2 * ffn > qkv_out ? 2 * ffn : qkv_out;
    const int threads = b->threads < 1 ? 1 : b->threads;
    float *h = malloc(sizeof(float) * (R * (dim + qkv_out + q_out + dim + 2 * ffn)
                                       + (long)threads * (widest > dim ? widest : dim)));
    float *qkv = h + R * dim, *att = qkv + R * qkv_out, *tmp = att + R * q_out, *gu = tmp + R * dim;
    float *scratch = gu + R * 2 * ffn;

    for (long r = 0; r < R; r++) rms_norm(x + r * dim, b->attn_norm, h + r * dim, dim, b->eps);
    project_rows(&b->qkv, h, qkv, scratch, dim, qkv_out, R, threads);
    lora_rows(b, 0, h, qkv, dim, qkv_out, R, threads);
    for (long r = 0; r < R; r++)
        for (long g = 0; g < nkv; g++)
            rope_store(qkv, r, g, b, b->k_cache, b->v_cache, b->cos, b->sin, b->pos, b->max_len, T, pads,
                       b->row_stride);
    mighty_attention(qkv, qkv_out, att, b->k_cache, b->v_cache, b->kv_half, nh, nkv, hd, b->max_len, b->pos, R, T,
                     pads, b->row_stride, threads);
    project_rows(&b->o, att, tmp, scratch, q_out, dim, R, threads);
    lora_rows(b, 1, att, tmp, q_out, dim, R, threads);
    for (long i = 0; i < R * dim; i++) x[i] += tmp[i];

    for (long r = 0; r < R; r++) rms_norm(x + r * dim, b->mlp_norm, h + r * dim, dim, b->eps);
    if (b->n_experts > 0) {
        for (long r = 0; r < R; r++) moe_ffn(x + r * dim, h + r * dim, b, gu, tmp, scratch, threads);
        free(h);
        return;
    }
    project_rows(&b->gate_up, h, gu, scratch, dim, 2 * ffn, R, threads);
    lora_rows(b, 2, h, gu, dim, 2 * ffn, R, threads);
    for (long r = 0; r < R; r++) {
        float *g = gu + r * 2 * ffn;
        silu_mul(g, g + ffn, g, ffn);  /* silu(gate) * up */
    }
    /* down reads silu(gate) * up of each row: the first ffn values of its 2 * ffn */
    if (R == 1) {
        project(&b->down, gu, tmp, scratch, ffn, dim, threads);
    } else {
        for (long r = 1; r < R; r++) memmove(gu + r * ffn, gu + r * 2 * ffn, sizeof(float) * ffn);
        project_rows(&b->down, gu, tmp, scratch, ffn, dim, R, threads);
    }
    lora_rows(b, 3, gu, tmp, ffn, dim, R, threads);
    for (long i = 0; i < R * dim; i++) x[i] += tmp[i];
    free(h);
}

/* ---- All blocks of a pass in one parallel region ----
 * Each product, attention and the work between them ran in regions of their own: ~5 a block, each 0.6-0.85 us to
 * open and close on 2 threads, and between them the main thread alone rounded the rows, ran SwiGLU, RoPE, the residual
 * adds and the norms while the others waited (~20 % of a 5-row int8 pass's wall time). Here the threads stay in one
 * region from the first block to the last, every step shared and a barrier between steps. Each row's arithmetic is
 * the same as mighty_decode_block's (the same functions on the same values), so the bits are. Taken where every
 * product is in the tiles (region_tiled) and no block has experts or LoRA. */

/* Whether the region path takes these blocks: the products all tiles, the blocks all of one shape */
int mighty_one_region(const mighty_block *const *blocks, long n, const mighty_lora *const *lora, int threads) {
    if (threads < 2 || lora || n < 1) return 0;
    const mighty_block *a = blocks[0];
    for (long i = 0; i < n; i++) {
        const mighty_block *b = blocks[i];
        if (b->n_experts || b->dim != a->dim || b->n_heads != a->n_heads || b->n_kv != a->n_kv || b->ffn != a->ffn
            || b->head_dim != a->head_dim || b->kv_half != a->kv_half)
            return 0;
        const long q_out = b->n_heads * b->head_dim, qkv_out = q_out + 2 * b->n_kv * b->head_dim;
        const mighty_proj *p[4] = {&b->qkv, &b->o, &b->gate_up, &b->down};
        const long in[4] = {b->dim, q_out, b->dim, b->ffn}, out[4] = {qkv_out, b->dim, 2 * b->ffn, b->dim};
        for (int k = 0; k < 4; k++)
            if ((p[k]->kind != PROJ_GGML_Q8X && p[k]->kind != PROJ_GGML_INT24)
                || !region_tiled((int)p[k]->block, in[k], out[k]))
                return 0;
    }
    return 1;
}

/* A product's rows rounded for the tiles and its output's scratch (region_round, region_product) */
typedef struct {
    signed char *xq;
    float *dx, *dxs, *yl;
    int *xs;
} rounded;

static int limbs_of(const mighty_proj *p) { return p->kind == PROJ_GGML_INT24 ? 3 : 1; }

/* This thread's share of R rows of `blocks` blocks: units (row, part), a row's blocks in `team` parts when there
 * are fewer rows than threads, and on AVX2 always, each thread its part of every row (its loops read the rows
 * interleaved block by block: rows shared out would have both threads writing the same cache lines, measured 6 % of
 * a 5-row pass). Returns the first unit, *stop past the last, *parts the parts a row. */
static long my_units(long R, long *stop, long *parts) {
    const long me = omp_get_thread_num(), team = omp_get_num_threads();
    *parts = R < team || !mighty_isa_level ? team : 1;
    *stop = R * *parts * (me + 1) / team;
    return R * *parts * me / team;
}

/* unit u's row, and its blocks b0 .. b1: units row by row on AVX-512, part by part on AVX2 */
static long unit_blocks(long u, long R, long parts, long blocks, long *b0, long *b1) {
    const long part = mighty_isa_level ? u % parts : u / R;
    *b0 = blocks * part / parts;
    *b1 = blocks * (part + 1) / parts;
    return mighty_isa_level ? u / parts : u % R;
}

/* This thread's share of rows x (R, in) rounded for product p */
static void round_share(const float *x, long R, long in, const mighty_proj *p, const rounded *q) {
    const long blocks = in / 32;
    long stop, parts;
    for (long u = my_units(R, &stop, &parts), b0, b1; u < stop; u++) {
        const long r = unit_blocks(u, R, parts, blocks, &b0, &b1);
        region_round(x + r * in, in, b0, b1, limbs_of(p), r, R, q->xq, q->dx, q->xs, q->dxs);
    }
}

static void product_share(const mighty_proj *p, const rounded *q, long R, float *y, long in, long out) {
    region_product(q->xq, q->dx, q->xs, q->dxs, R, limbs_of(p), (const unsigned char *)p->w, (int)p->block, p->bias,
                   y, q->yl, in, out);
}

/* The norm w of rows x (R, dim) -> h, rounded for product p; with add, of x + add, which this thread also writes to
 * its blocks of sum (each thread adds the whole row for its norm, into row: dim floats of its own) */
static void norm_share(const float *x, const float *add, float *sum, float *row, const float *w, float eps,
                       float *h, long R, long dim, const mighty_proj *p, const rounded *q) {
    const long blocks = dim / 32;
    long stop, parts;
    for (long u = my_units(R, &stop, &parts), b0, b1; u < stop; u++) {
        const long r = unit_blocks(u, R, parts, blocks, &b0, &b1);
        const float *v = x + r * dim;
        if (add) {
            for (long i = 0; i < dim; i++) row[i] = v[i] + add[r * dim + i];
            memcpy(sum + r * dim + 32 * b0, row + 32 * b0, sizeof(float) * 32 * (b1 - b0));
            v = row;
        }
        const float s = rms_inverse(v, dim, eps);
        for (long i = 32 * b0; i < 32 * b1; i++) h[r * dim + i] = w[i] * (v[i] * s);
        region_round(h + r * dim, dim, b0, b1, limbs_of(p), r, R, q->xq, q->dx, q->xs, q->dxs);
    }
}

/* rope_store of this thread's (row, kv head) units */
static void rope_share(float *qkv, const mighty_block *b, void *k_cache, void *v_cache, const float *cos,
                       const float *sin, long R, long T, const long *pads, long row_stride, long pos, long max_len) {
    const long nkv = b->n_kv, me = omp_get_thread_num(), team = omp_get_num_threads();
    for (long u = R * nkv * me / team; u < R * nkv * (me + 1) / team; u++)
        rope_store(qkv, u / nkv, u % nkv, b, k_cache, v_cache, cos, sin, pos, max_len, T, pads, row_stride);
}

/* silu(gate) * up of every row (gu: R rows of 2 ffn) -> act (R, ffn), rounded for product p */
static void swiglu_share(const float *gu, float *act, long R, long ffn, const mighty_proj *p, const rounded *q) {
    const long blocks = ffn / 32;
    long stop, parts;
    for (long u = my_units(R, &stop, &parts), b0, b1; u < stop; u++) {
        const long r = unit_blocks(u, R, parts, blocks, &b0, &b1);
        const float *g = gu + r * 2 * ffn;
        silu_mul(g + 32 * b0, g + ffn + 32 * b0, act + r * ffn + 32 * b0, 32 * (b1 - b0));
        region_round(act + r * ffn, ffn, b0, b1, limbs_of(p), r, R, q->xq, q->dx, q->xs, q->dxs);
    }
}

static long most(long a, long b) { return a > b ? a : b; }

static void swap(float **a, float **b) {
    float *was = *a;
    *a = *b;
    *b = was;
}

/* mighty_decode_blocks' arguments (see there) */
static void blocks_in_region(float *x, const mighty_block *const *blocks, long n, void *const *k_caches,
                             void *const *v_caches, const float *cos, const float *sin, long pos, long max_len,
                             long rows, int threads, const long *pads, long row_stride, long tokens) {
    const mighty_block *a = blocks[0];
    const long dim = a->dim, hd = a->head_dim, nh = a->n_heads, nkv = a->n_kv, ffn = a->ffn;
    const long T = pads && tokens > 1 ? tokens : 1, R = (rows < 1 ? 1 : rows) * T;
    const long q_out = nh * hd, qkv_out = q_out + 2 * nkv * hd;
    const long in = most(most(dim, q_out), ffn), out = most(most(qkv_out, 2 * ffn), dim);  /* the widest product's */
    float *buf = malloc(sizeof(float) * (R * (3 * dim + qkv_out + q_out + 3 * ffn + 3 * out + 9 * in / 32)
                                         + (long)threads * dim));
    float *spare = buf, *h = spare + R * dim, *tmp = h + R * dim, *qkv = tmp + R * dim, *att = qkv + R * qkv_out;
    float *gu = att + R * q_out, *act = gu + R * 2 * ffn, *rows_own = act + R * ffn;
    rounded q = {malloc(3 * R * in), rows_own + (long)threads * dim, NULL, NULL, NULL};
    q.dxs = q.dx + 3 * R * in / 32;
    q.yl = q.dxs + 3 * R * in / 32;
    q.xs = malloc(sizeof(int) * 3 * R * in / 32);
    mighty_attention_plan *plan = attention_plan(qkv_out, a->kv_half, nh, nkv, hd, max_len, pos, R, T, pads,
                                                 row_stride, threads);

    #pragma omp parallel num_threads(threads)
    {
        float *cur = x, *next = spare, *row = rows_own + (long)omp_get_thread_num() * dim;
        for (long i = 0; i < n; i++) {
            const mighty_block *b = blocks[i];
            norm_share(cur, i ? tmp : NULL, next, row, b->attn_norm, b->eps, h, R, dim, &b->qkv, &q);
            if (i) swap(&cur, &next);  /* the last block's residual is in next now (once the barrier below is passed) */
            #pragma omp barrier
            product_share(&b->qkv, &q, R, qkv, dim, qkv_out);
            #pragma omp barrier
            rope_share(qkv, b, k_caches[i], v_caches[i], cos, sin, R, T, pads, row_stride, pos, max_len);
            #pragma omp barrier
            attention_share(plan, qkv, att, k_caches[i], v_caches[i]);
            round_share(att, R, q_out, &b->o, &q);
            #pragma omp barrier
            product_share(&b->o, &q, R, tmp, q_out, dim);
            #pragma omp barrier
            norm_share(cur, tmp, next, row, b->mlp_norm, b->eps, h, R, dim, &b->gate_up, &q);
            swap(&cur, &next);
            #pragma omp barrier
            product_share(&b->gate_up, &q, R, gu, dim, 2 * ffn);
            #pragma omp barrier
            swiglu_share(gu, act, R, ffn, &b->down, &q);
            #pragma omp barrier
            product_share(&b->down, &q, R, tmp, ffn, dim);
            #pragma omp barrier
        }
        #pragma omp for schedule(static)
        for (long e = 0; e < R * dim; e++) x[e] = cur[e] + tmp[e];  /* the last residual (cur may be x) */
    }
    attention_free(plan);
    free(q.xq);
    free(q.xs);
    free(buf);
}

/* All n blocks of a model for the same token(s) in one call: each block as described by blocks[i], with this call's
 * caches (k_caches[i], v_caches[i]), RoPE rows, positions, threads and rows (consecutive tokens of one sequence, or
 * with pads a batch of sequences, see mighty_block); the struct is copied, so concurrent callers never see each
 * other's. One call per block from Python cost ~35 us each in the interpreter (the checks, the
 * struct's fields, ctypes): a third of a token's time on SmolLM2-135M's 30 blocks of Q4_0. Where mighty_one_region
 * says so, all of them in one parallel region (blocks_in_region), else block by block. */
void mighty_decode_blocks(float *x, const mighty_block *const *blocks, long n, void *const *k_caches,
                          void *const *v_caches, const float *cos, const float *sin, long pos, long max_len,
                          long rows, int threads, const long *pads, long row_stride, long tokens,
                          const mighty_lora *const *lora) {
    if (mighty_one_region(blocks, n, lora, threads)) {
        blocks_in_region(x, blocks, n, k_caches, v_caches, cos, sin, pos, max_len, rows, threads, pads, row_stride,
                         tokens);
        return;
    }
    for (long i = 0; i < n; i++) {
        mighty_block b = *blocks[i];
        b.lora = lora;
        b.layer = i;
        b.pads = pads;
        b.row_stride = row_stride;
        b.tokens = tokens;
        b.k_cache = k_caches[i];
        b.v_cache = v_caches[i];
        b.cos = cos;
        b.sin = sin;
        b.pos = pos;
        b.max_len = max_len;
        b.rows = rows;
        b.threads = threads;
        mighty_decode_block(x, &b);
    }
}
