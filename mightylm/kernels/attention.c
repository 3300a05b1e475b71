/* Attention of a decode step over the KV cache, AVX2 + FMA, OpenMP. On AVX-512 CPUs, with AVX2's bits: three queries
 * scored together in 32 registers, the exponentials 16 at a time, the values weighed 16 columns a register.
 *
 *   att[r, head] = softmax_t(q[r, head] . K[t] / sqrt(hd)) V[t]    over row r's slots t
 *
 * The heads of a group (grouped-query attention) and the rows of a sequence (a speculative pass, a prompt's chunk)
 * read the same keys and values. They are therefore taken together: a job is one sequence's kv head over one
 * stretch of STRETCH slots, and every query of it (group x rows) is scored against each block of 8 keys while the
 * block sits in L1, then every value row is loaded once for up to 6 queries. Row by row and head by head, each
 * query read the keys and values again (from L2, or from memory past ~1000 positions, where a token's attention
 * cost more than its weights). Each stretch's (max, sum, weighted values) are combined at the end, as in
 * flash-decoding; the stretches sit at fixed slots from the sequence's first, so that a row's arithmetic is the same
 * whatever other rows, sequences or threads share the call (greedy speculation reproduces plain decoding bit for
 * bit, a batch's rows equal the rows alone). The cache holds float32, or float16 (half the bytes read: a block of
 * keys or a piece of values widened into L1 once, then used as float32's). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

enum { KEYS = 8, MAX_QUERIES = 6, STRETCH = 128, PIECE = 4096 };

#define F16C __attribute__((target("avx2,fma,f16c")))
#define INLINE F16C __attribute__((always_inline)) static inline

/* The cache of one layer is read once a pass, from L3 or memory, and its rows were not in L1 when the loops needed
 * them: the scores' loop asks for the keys KEYS_AHEAD slots ahead, the values' loop for each value row VALUES_AHEAD
 * slots ahead (SmolLM2 on the Intel VM, AVX-512: a pass of 1-9 rows after 200 / 1000 positions 1.01-1.05x /
 * 1.04-1.11x faster, the attention alone after 1000 1.07-1.19x; 4 or 8 key blocks and 16 or 32 value rows ahead
 * were slower; bench/RESULTS.md). Only the order of loads changes: the same bits. */
enum { KEYS_AHEAD = 2 * KEYS, VALUES_AHEAD = 8 };

/* the cache lines of n bytes from p, asked for ahead of their use */
static inline __attribute__((always_inline)) void fetch(const void *p, long n) {
    for (long k = 0; k < n; k += 64) _mm_prefetch((const char *)p + k, _MM_HINT_T0);
}

/* n values of the cache from element i as float32 (float16 widened) into y */
INLINE void widen(float *y, const void *base, long i, long n, const int half) {
    if (!half) {
        memcpy(y, (const float *)base + i, sizeof(float) * n);
        return;
    }
    const unsigned short *h = (const unsigned short *)base + i;
    long k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k))));
    for (; k < n; k++) y[k] = _cvtsh_ss(h[k]);
}

/* the 8 lanes of each of a[0..7] added: two rounds of hadd and one of lanes */
INLINE __m256 across8(const __m256 a[KEYS]) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* q . K[i] for the 8 keys K[0..7] (rows of hd floats, hd % 8 == 0): one sum per key in its own register, then the
 * 8 added across at once (two rounds of hadd and one of lanes) instead of one horizontal sum per key */
INLINE __m256 scores8(const float *q, const float *K, long hd) {
    __m256 a[KEYS];
    for (int i = 0; i < KEYS; i++) a[i] = _mm256_setzero_ps();
    for (long c = 0; c < hd; c += 8) {
        const __m256 qc = _mm256_loadu_ps(q + c);
        for (int i = 0; i < KEYS; i++) a[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(K + i * hd + c), a[i]);
    }
    return across8(a);
}

/* the same for a head size that is not a multiple of 8, one key at a time */
__attribute__((noinline)) static __m256 scores8_any(const float *q, const float *K, long hd) {
    float s[KEYS];
    for (int i = 0; i < KEYS; i++) {
        s[i] = 0.0f;
        for (long c = 0; c < hd; c++) s[i] += q[c] * K[i * hd + c];
    }
    return _mm256_loadu_ps(s);
}

/* scores8 with the common head sizes as constants: each key's row then sits a constant offset from the first, so
 * the 8 rows take one address register (with hd a variable GCC kept the 8 row addresses on the stack and reloaded
 * one before each multiply-add; perf showed those loads among the hottest instructions). The same operations, so
 * the same bits. */
INLINE __m256 scores(const float *q, const float *K, long hd) {
    return hd == 64 ? scores8(q, K, 64) : hd == 128 ? scores8(q, K, 128) : hd % 8 ? scores8_any(q, K, hd)
                                                                                   : scores8(q, K, hd);
}

/* o[j][c0..cols) += sum over t in [a, b) of P[j][t] V[t][c0..cols) (V's rows hd floats apart) for n queries, 8 NV
 * columns at a time (n NV <= 12 accumulators): each load of V serves all n. Returns the first column not done. */
INLINE long weigh(const float *P, long ldp, const float *V, long hd, long c0, long a, long b, float *o, const int n,
                  const int NV, long stop) {
    long c = c0;
    for (; c + 8 * NV <= hd; c += 8 * NV) {
        __m256 acc[MAX_QUERIES][8];
        for (int j = 0; j < n; j++)
            for (int k = 0; k < NV; k++) acc[j][k] = _mm256_loadu_ps(o + j * hd + c + 8 * k);
        for (long t = a; t < b; t++) {
            __m256 v[8];
            if (c == 0 && t + VALUES_AHEAD < stop) fetch(V + (t + VALUES_AHEAD) * hd, sizeof(float) * hd);
            for (int k = 0; k < NV; k++) v[k] = _mm256_loadu_ps(V + t * hd + c + 8 * k);
            for (int j = 0; j < n; j++) {
                const __m256 p = _mm256_broadcast_ss(P + j * ldp + t);
                for (int k = 0; k < NV; k++) acc[j][k] = _mm256_fmadd_ps(p, v[k], acc[j][k]);
            }
        }
        for (int j = 0; j < n; j++)
            for (int k = 0; k < NV; k++) _mm256_storeu_ps(o + j * hd + c + 8 * k, acc[j][k]);
    }
    return c;
}

#define WEIGH(N, NV)                                                                                               \
    do {                                                                                                           \
        long c = weigh(p, ldp, Vp, hd, 0, t0, t1, oj, N, NV, stop);                                                \
        c = weigh(p, ldp, Vp, hd, c, t0, t1, oj, N, 1, stop);                                                      \
        for (; c < hd; c++)  /* a head size that is not a multiple of 8 */                                         \
            for (int i = 0; i < N; i++)                                                                            \
                for (long t = t0; t < t1; t++) oj[i * hd + c] += p[i * ldp + t] * Vp[t * hd + c];                  \
    } while (0)

/* weigh on AVX-512 (CPUs that have it, hd % 16 == 0): 16 columns a register, NV of them, for n queries. Every
 * output value takes the same multiply-adds in the same order as weigh's, so the same bits on both paths. */
__attribute__((target("avx512f"), always_inline)) static inline
void weigh16(const float *P, long ldp, const float *V, long hd, long c, long a, long b, float *o, const int n,
             const int NV, long stop) {
    __m512 acc[MAX_QUERIES][4];
    for (int j = 0; j < n; j++)
        for (int k = 0; k < NV; k++) acc[j][k] = _mm512_loadu_ps(o + j * hd + c + 16 * k);
    for (long t = a; t < b; t++) {
        __m512 v[4];
        if (c == 0 && t + VALUES_AHEAD < stop) fetch(V + (t + VALUES_AHEAD) * hd, sizeof(float) * hd);
        for (int k = 0; k < NV; k++) v[k] = _mm512_loadu_ps(V + t * hd + c + 16 * k);
        for (int j = 0; j < n; j++) {
            const __m512 p = _mm512_set1_ps(P[j * ldp + t]);
            for (int k = 0; k < NV; k++) acc[j][k] = _mm512_fmadd_ps(p, v[k], acc[j][k]);
        }
    }
    for (int j = 0; j < n; j++)
        for (int k = 0; k < NV; k++) _mm512_storeu_ps(o + j * hd + c + 16 * k, acc[j][k]);
}

#define WEIGH16(N)                                                                                                 \
    do {                                                                                                           \
        long c = 0;                                                                                                \
        for (; c + 64 <= hd; c += 64) weigh16(p, ldp, V, hd, c, a, b, oj, N, 4, stop);                             \
        for (; c < hd; c += 16) weigh16(p, ldp, V, hd, c, a, b, oj, N, 1, stop);                                   \
    } while (0)

/* o (n, hd) += the weights P times the values of slots [a, b), as weigh_queries' inner loop, on AVX-512: four
 * registers of 16 columns for up to 6 queries (24 sums), each value row loaded once for them (AVX2's 16 registers
 * hold the sums of only 16 columns for 6 queries: each value row was loaded four times). Out of line: the caller
 * is AVX2 code. */
__attribute__((target("avx512f"), noinline))
static void weigh512(const float *P, long ldp, const float *V, long hd, long a, long b, float *o, long n, long stop) {
    for (long j = 0; j < n; j += MAX_QUERIES) {
        const float *p = P + j * ldp;
        float *oj = o + j * hd;
        switch (n - j < MAX_QUERIES ? n - j : MAX_QUERIES) {
            case 1: WEIGH16(1); break;
            case 2: WEIGH16(2); break;
            case 3: WEIGH16(3); break;
            case 4: WEIGH16(4); break;
            case 5: WEIGH16(5); break;
            default: WEIGH16(6);
        }
    }
}

/* o (n, hd) = n queries' weights P (n rows of ldp) times the values (rows of hd, from element `at` of v_cache) of
 * slots [a, b), in pieces of PIECE floats (16 KB, widened first from float16), so that every pass over a piece's
 * columns after the first reads it from L1 */
INLINE void weigh_queries(const float *P, long ldp, const void *v_cache, long at, long hd, long a, long b, float *o,
                          long n, const int half) {
    const long piece = hd < PIECE ? PIECE / hd : 1;
    float widened[half ? piece * hd : 1];
    const long stop = half ? a : b;  /* the rows the values' loops fetch ahead (none from float16: widened in L1) */
    memset(o, 0, sizeof(float) * n * hd);
    for (long t0 = a; t0 < b; t0 += piece) {
        const long t1 = t0 + piece < b ? t0 + piece : b;
        const float *Vp = (const float *)v_cache + at;  /* slot t's values at Vp + t hd */
        if (half) {
            widen(widened, v_cache, at + t0 * hd, (t1 - t0) * hd, 1);
            Vp = widened - t0 * hd;
        }
        if (mighty_isa_level && hd % 16 == 0) {
            weigh512(P, ldp, Vp, hd, t0, t1, o, n, stop);
            continue;
        }
        for (long j = 0; j < n; j += MAX_QUERIES) {
            const float *p = P + j * ldp;
            float *oj = o + j * hd;
            switch (n - j < MAX_QUERIES ? n - j : MAX_QUERIES) {
                case 1: WEIGH(1, 8); break;
                case 2: WEIGH(2, 4); break;
                case 3: WEIGH(3, 4); break;
                case 4: WEIGH(4, 2); break;
                case 5: WEIGH(5, 2); break;
                default: WEIGH(6, 2);
            }
        }
    }
}

/* scores8 of three queries at once on AVX-512 (32 registers: 24 sums), each key block loaded once for the three:
 * the same operations per score, so the same bits. Head size 64 (SmolLM2's, Qwen2.5's); the queries from the first,
 * three at a time while all three see slot t; returns the first query not done. */
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"), noinline))
static long scores3_512(const float *const *q, const long *b, long nq, const float *K, long t, float *P, long ldp,
                        float scale) {
    long j = 0;
    const __m256 scale8 = _mm256_set1_ps(scale);
    for (; j + 3 <= nq && t < b[j] && t < b[j + 1] && t < b[j + 2]; j += 3) {
        __m256 a[3][KEYS];
        for (int u = 0; u < 3; u++)
            for (int i = 0; i < KEYS; i++) a[u][i] = _mm256_setzero_ps();
        for (long c = 0; c < 64; c += 8) {
            const __m256 q0 = _mm256_loadu_ps(q[j] + c), q1 = _mm256_loadu_ps(q[j + 1] + c),
                         q2 = _mm256_loadu_ps(q[j + 2] + c);
            for (int i = 0; i < KEYS; i++) {
                const __m256 k = _mm256_loadu_ps(K + i * 64 + c);
                a[0][i] = _mm256_fmadd_ps(q0, k, a[0][i]);
                a[1][i] = _mm256_fmadd_ps(q1, k, a[1][i]);
                a[2][i] = _mm256_fmadd_ps(q2, k, a[2][i]);
            }
        }
        for (int u = 0; u < 3; u++) _mm256_storeu_ps(P + (j + u) * ldp, _mm256_mul_ps(across8(a[u]), scale8));
    }
    return j;
}

/* exp_shifted on AVX-512 (kernels.h): the largest of p, and e^(p - it) in place, 16 at a time (exp16, exp8's bits),
 * their sum added 8 lanes at a time in exp_shifted's order, so the same bits */
__attribute__((target("avx2,fma,avx512f"), noinline)) static float exp_shifted512(float *p, long n, float *sum) {
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    long t = 0;
    for (; t + 16 <= n; t += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(p + t));
    float m = _mm512_reduce_max_ps(m16);
    for (; t < n; t++) m = p[t] > m ? p[t] : m;
    const __m512 mv = _mm512_set1_ps(m);
    __m256 s8 = _mm256_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + t), mv));
        _mm512_storeu_ps(p + t, e);
        const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1));
        s8 = _mm256_add_ps(_mm256_add_ps(s8, _mm512_castps512_ps256(e)), high);
    }
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm512_castps512_ps256(mv)));
        _mm256_storeu_ps(p + t, e);
        s8 = _mm256_add_ps(s8, e);
    }
    *sum = exp_tail(p, t, n, m, s8);
    return m;
}

/* The end of the slots lo .. that a row at `slot` sees in the stretch lo .. hi (its sequence's first slot `first`):
 * itself and those before it; a padding slot (before first) sees none here (itself alone: see the combining) */
INLINE long seen_end(long first, long lo, long hi, long slot) {
    return slot < first ? lo : slot + 1 < hi ? slot + 1 : hi;
}

/* The layout every job and the combining share (see mighty_attention) */
typedef struct {
    const float *qkv;
    long qkv_out, nh, nkv, hd, max_len, pos, per, group, nq, stretches, row_stride;
    const long *pads;
    float scale, *top, *sum, *out;
} work;

/* One job, its queries j0 .. j1: sequence s's kv head g over stretch `stretch` of its slots -> each query's top, sum
 * and weighted values. P: this thread's scores, a row of STRETCH + KEYS per query. */
INLINE void attend(const work *w, const void *k_cache, const void *v_cache, long job, long j0, long j1, float *P,
                   const int half) {
    const long nq = j1 - j0, group = w->group, hd = w->hd, pos = w->pos, per = w->per, ldp = STRETCH + KEYS;
    const long s = job / (w->nkv * w->stretches), g = job / w->stretches % w->nkv, stretch = job % w->stretches;
    const long first = w->pads ? w->pads[s] : 0, lo = first + stretch * STRETCH;
    const long hi = lo + STRETCH < pos + per ? lo + STRETCH : pos + per;
    const long at = s * w->row_stride + g * w->max_len * hd;  /* this kv head's slot 0, in values */
    long b[nq], B = lo;  /* each query's slots in this stretch, lo .. b[j]; their union lo .. B */
    const float *q[nq];  /* query j: row j / group, head j % group of this kv head's group */
    for (long j = 0; j < nq; j++) {
        const long r = (j0 + j) / group;
        q[j] = w->qkv + (s * per + r) * w->qkv_out + (g * group + (j0 + j) % group) * hd;
        b[j] = seen_end(first, lo, hi, pos + r);
        B = b[j] > B ? b[j] : B;
    }
    /* the scores, 8 keys at a time for every query that sees any of them (the 8 keys stay in L1: widened once from
     * float16; the last keys of the cache, fewer than 8, zero-padded): every key's score the same arithmetic */
    const __m256 scale8 = _mm256_set1_ps(w->scale);
    float block[KEYS * hd];
    for (long t = lo; t < B; t += KEYS) {
        const float *Kt = (const float *)k_cache + at + t * hd;
        if (t + KEYS_AHEAD < B)  /* (float16: the stored halves, which widen reads) */
            fetch((const char *)k_cache + (at + (t + KEYS_AHEAD) * hd) * (half ? 2 : 4), KEYS * hd * (half ? 2 : 4));
        if (half || t + KEYS > w->max_len) {
            const long n = t + KEYS > w->max_len ? w->max_len - t : KEYS;
            widen(block, k_cache, at + t * hd, n * hd, half);
            memset(block + n * hd, 0, sizeof(float) * (KEYS - n) * hd);
            Kt = block;
        }
        long j = 0;
        if (mighty_isa_level && hd == 64) j = scores3_512(q, b, nq, Kt, t, P + t - lo, ldp, w->scale);
        for (; j < nq; j++)
            if (t < b[j])  /* (scores past b[j] are never read) */
                _mm256_storeu_ps(P + j * ldp + t - lo, _mm256_mul_ps(scores(q[j], Kt, hd), scale8));
    }
    for (long j = 0; j < nq; j++) {
        float *p = P + j * ldp - lo, l = 0.0f;
        w->top[job * w->nq + j0 + j] = lo >= b[j] ? -INFINITY
                                       : mighty_isa_level ? exp_shifted512(p + lo, b[j] - lo, &l)
                                                          : exp_shifted(p + lo, b[j] - lo, &l);
        w->sum[job * w->nq + j0 + j] = l;
        const long z = b[j] > lo ? b[j] : lo;  /* the union's slots this query does not see weigh nothing */
        if (z < B) memset(p + z, 0, sizeof(float) * (B - z));
    }
    weigh_queries(P - lo, ldp, v_cache, at, hd, lo, B, w->out + (job * w->nq + j0) * hd, nq, half);
}

/* Query k's stretches combined into att: e^(m_c - M) rescales stretch c's sums to the largest score M (one
 * stretch: M its own, e^0 = 1, so the same bits as its sums divided out) */
INLINE void combine(const work *w, const void *v_cache, float *att, long k, const int half) {
    const long nq = w->nq, group = w->group, hd = w->hd, stretches = w->stretches;
    const long s = k / (w->nkv * nq), g = k / nq % w->nkv, j = k % nq, first_job = (s * w->nkv + g) * stretches;
    const long slot = w->pos + j / group;
    float *dst = att + (s * w->per + j / group) * w->nh * hd + (g * group + j % group) * hd;
    if (w->pads && slot < w->pads[s]) {  /* a padding slot: softmax of one score, its own value row */
        const long at = s * w->row_stride + (g * w->max_len + slot) * hd;
        widen(dst, v_cache, at, hd, half);
        return;
    }
    float m = -INFINITY, l = 0.0f, wc[stretches];
    for (long c = 0; c < stretches; c++)
        if (w->sum[(first_job + c) * nq + j] > 0.0f && w->top[(first_job + c) * nq + j] > m)
            m = w->top[(first_job + c) * nq + j];
    for (long c = 0; c < stretches; c++) {
        const long at = (first_job + c) * nq + j;
        wc[c] = w->sum[at] > 0.0f ? expf(w->top[at] - m) : 0.0f;
        l += wc[c] * w->sum[at];
    }
    memset(dst, 0, sizeof(float) * hd);
    for (long c = 0; c < stretches; c++) {
        if (wc[c] == 0.0f) continue;
        const float f = wc[c] / l, *o = w->out + ((first_job + c) * nq + j) * hd;
        for (long d = 0; d < hd; d++) dst[d] += f * o[d];
    }
}

/* The split of a call's work: the layout (w, its qkv set per call), the buffers, and each thread's runs of
 * (job, row) by end: the same for every layer of a pass (the rows, positions and caches' shape are) */
struct mighty_attention_plan {
    work w;
    long units, seqs, *end;
    int half;
    float *part, *scratch;
};

/* The plan for att (R, nh hd) from the rope'd queries in qkv (R rows of qkv_out; row r's head h at r qkv_out + h hd)
 * and the caches (n_kv, max_len, hd) per sequence (float32, or float16 where half), the keys and values of every row
 * already written. One sequence (pads NULL): row r sits at slot pos + r and sees slots 0 .. pos + r. A server's
 * batch (pads): R / T sequences of T rows, sequence s's cache row_stride values after s - 1's, its row i at slot
 * pos + i seeing slots pads[s] .. (a padding slot, before pads[s], sees itself alone, as model._mask has it). */
F16C mighty_attention_plan *attention_plan(long qkv_out, int half, long nh, long nkv, long hd, long max_len, long pos,
                                      long R, long T, const long *pads, long row_stride, int threads) {
    const long seqs = pads ? R / T : 1, per = pads ? T : R, group = nh / nkv, nq = group * per;
    long stretches = 1;  /* the most any sequence has: its slots from its first (pads[s]) to its last row's */
    for (long s = 0; s < seqs; s++) {
        const long first = pads ? pads[s] : 0, n = (pos + per - first + STRETCH - 1) / STRETCH;
        stretches = n > stretches ? n : stretches;
    }
    const long jobs = seqs * nkv * stretches;
    mighty_attention_plan *p = malloc(sizeof(*p));
    /* per job and query: the stretch's largest score, the sum of e^(score - it), and the weighted values */
    p->part = malloc(sizeof(float) * (jobs * nq * (hd + 2) + (long)threads * nq * (STRETCH + KEYS)));
    const work w = {NULL, qkv_out, nh, nkv, hd, max_len, pos, per, group, nq, stretches, row_stride, pads,
                    1.0f / sqrtf((float)hd), p->part, p->part + jobs * nq, p->part + 2 * jobs * nq};
    p->w = w;
    p->scratch = w.out + jobs * nq * hd;
    p->seqs = seqs;
    p->half = half;

    /* the threads take runs of (job, row) of about equal slots: jobs differ (a stretch's last is short; at 300
     * positions, 9 jobs of 128, 128 and 44 + rows slots, OpenMP's even count of jobs gave one thread 556 slots and
     * the other 344), and a thread's run takes a job's rows together (its keys and values read once for them) */
    p->units = jobs * per;
    p->end = malloc(sizeof(long) * (p->units + 1));  /* end[u]: the slots of units 0 .. u - 1 */
    p->end[0] = 0;
    for (long u = 0; u < p->units; u++) {
        const long job = u / per, r = u % per, s = job / (nkv * stretches), first = pads ? pads[s] : 0;
        const long lo = first + job % stretches * STRETCH, hi = lo + STRETCH < pos + per ? lo + STRETCH : pos + per;
        const long seen = seen_end(first, lo, hi, pos + r) - lo;  /* (below 0 for a stretch past the row) */
        p->end[u + 1] = p->end[u] + (seen > 0 ? seen : 0) + (r == 0 ? KEYS : 1);  /* (and a job's own work besides) */
    }
    return p;
}

void attention_free(mighty_attention_plan *p) {
    free(p->end);
    free(p->part);
    free(p);
}

/* This thread's share of the plan's attention over qkv and these caches -> att; called by every thread of the
 * region, it returns when all of att is written (the combining's barrier) */
F16C void attention_share(const mighty_attention_plan *p, const float *qkv, float *att, const void *k_cache,
                          const void *v_cache) {
    work w = p->w;
    w.qkv = qkv;
    const long me = omp_get_thread_num(), team = omp_get_num_threads(), units = p->units, per = w.per;
    const long *end = p->end;
    float *P = p->scratch + me * w.nq * (STRETCH + KEYS);
    long u0 = 0, u1;  /* this thread's units: those whose middle falls in its share of the slots */
    while (u0 < units && (end[u0] + end[u0 + 1]) * team / (2 * end[units]) < me) u0++;
    for (u1 = u0; u1 < units && (end[u1] + end[u1 + 1]) * team / (2 * end[units]) == me; u1++) continue;
    for (long u = u0; u < u1;) {  /* job u / per's rows from u % per, up to the run's end or the job's */
        const long job = u / per, stop = (job + 1) * per < u1 ? (job + 1) * per : u1;
        if (p->half) attend(&w, k_cache, v_cache, job, u % per * w.group, (stop - job * per) * w.group, P, 1);
        else attend(&w, k_cache, v_cache, job, u % per * w.group, (stop - job * per) * w.group, P, 0);
        u = stop;
    }
    #pragma omp barrier
    #pragma omp for schedule(static)
    for (long k = 0; k < p->seqs * w.nkv * w.nq; k++) {
        if (p->half) combine(&w, v_cache, att, k, 1);
        else combine(&w, v_cache, att, k, 0);
    }
}

/* att from qkv and the caches (attention_plan says what each is) in a parallel region of its own */
void mighty_attention(const float *qkv, long qkv_out, float *att, const void *k_cache, const void *v_cache,
                      int half, long nh, long nkv, long hd, long max_len, long pos, long R, long T,
                      const long *pads, long row_stride, int threads) {
    mighty_attention_plan *p = attention_plan(qkv_out, half, nh, nkv, hd, max_len, pos, R, T, pads, row_stride,
                                              threads);
    #pragma omp parallel num_threads(threads)
    attention_share(p, qkv, att, k_cache, v_cache);
    attention_free(p);
}
