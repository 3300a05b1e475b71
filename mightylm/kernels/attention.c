/* Attention of a decode step over the KV cache, AVX2 + FMA, OpenMP.
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
 * bit, a batch's rows equal the rows alone). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

enum { KEYS = 8, MAX_QUERIES = 6, STRETCH = 128 };

/* q . K[i] for the 8 keys K[0..7] (rows of hd floats, hd % 8 == 0): one sum per key in its own register, then the
 * 8 added across at once (two rounds of hadd and one of lanes) instead of one horizontal sum per key */
__attribute__((always_inline)) static inline __m256 scores8(const float *q, const float *K, long hd) {
    __m256 a[KEYS];
    for (int i = 0; i < KEYS; i++) a[i] = _mm256_setzero_ps();
    for (long c = 0; c < hd; c += 8) {
        const __m256 qc = _mm256_loadu_ps(q + c);
        for (int i = 0; i < KEYS; i++) a[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(K + i * hd + c), a[i]);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
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

/* p[0..n) = e^(p - max p), returning max p and (in *sum) the sum of the new p: 8 lanes at a time (a scalar loop's
 * max and sum are chains of dependent operations, ~3 cycles a value) */
static float exp_shifted(float *p, long n, float *sum) {
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
    float s = hsum(s8);
    for (; t < n; t++) {
        float tail[8] = {p[t] - m};
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        p[t] = tail[0];
        s += tail[0];
    }
    *sum = s;
    return m;
}

/* o[j][0..cols) += sum over t in [a, b) of P[j][t] V[t][0..cols) (V's rows ldv floats apart) for n queries, 8 NV
 * columns at a time (n NV <= 12 accumulators): each load of V serves all n */
__attribute__((always_inline)) static inline
long weigh(const float *P, long ldp, const float *V, long ldv, long cols, long a, long b, float *o, long ldo,
           const int n, const int NV) {
    long c = 0;
    for (; c + 8 * NV <= cols; c += 8 * NV) {
        __m256 acc[MAX_QUERIES][8];
        for (int j = 0; j < n; j++)
            for (int k = 0; k < NV; k++) acc[j][k] = _mm256_loadu_ps(o + j * ldo + c + 8 * k);
        for (long t = a; t < b; t++) {
            __m256 v[8];
            for (int k = 0; k < NV; k++) v[k] = _mm256_loadu_ps(V + t * ldv + c + 8 * k);
            for (int j = 0; j < n; j++) {
                const __m256 p = _mm256_broadcast_ss(P + j * ldp + t);
                for (int k = 0; k < NV; k++) acc[j][k] = _mm256_fmadd_ps(p, v[k], acc[j][k]);
            }
        }
        for (int j = 0; j < n; j++)
            for (int k = 0; k < NV; k++) _mm256_storeu_ps(o + j * ldo + c + 8 * k, acc[j][k]);
    }
    return c;  /* the columns done */
}

#define WEIGH(N, NV)                                                                                               \
    do {                                                                                                           \
        long c = weigh(p, ldp, V, hd, hd, t0, t1, oj, hd, N, NV);                                                  \
        c += weigh(p, ldp, V + c, hd, hd - c, t0, t1, oj + c, hd, N, 1);                                           \
        for (; c < hd; c++)  /* a head size that is not a multiple of 8 */                                         \
            for (int i = 0; i < N; i++)                                                                            \
                for (long t = t0; t < t1; t++) oj[i * hd + c] += p[i * ldp + t] * V[t * hd + c];                   \
    } while (0)

/* o (n, hd) = n queries' weights P (n rows of ldp) times the values V (rows of hd) of slots [a, b), the slots in
 * pieces of 16 KB of values, so that every pass over a piece's columns after the first reads it from L1 */
static void weigh_queries(const float *P, long ldp, const float *V, long hd, long a, long b, float *o, long n) {
    const long piece = hd < 4096 ? 4096 / hd : 1;
    memset(o, 0, sizeof(float) * n * hd);
    for (long t0 = a; t0 < b; t0 += piece) {
        const long t1 = t0 + piece < b ? t0 + piece : b;
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

/* att (R, nh hd) from the rope'd queries in qkv (R rows of qkv_out; row r's head h at r qkv_out + h hd) and the
 * caches (n_kv, max_len, hd) per sequence, the keys and values of every row already written. One sequence (pads
 * NULL): row r sits at slot pos + r and sees slots 0 .. pos + r. A server's batch (pads): R / T sequences of T
 * rows, sequence s's cache row_stride floats after s - 1's, its row i at slot pos + i seeing slots pads[s] .. (a
 * padding slot, before pads[s], sees itself alone, as model._mask has it). */
void mighty_attention(const float *qkv, long qkv_out, float *att, const float *k_cache, const float *v_cache,
                      long nh, long nkv, long hd, long max_len, long pos, long R, long T, const long *pads,
                      long row_stride, int threads) {
    const long seqs = pads ? R / T : 1, per = pads ? T : R, group = nh / nkv, nq = group * per;
    long stretches = 1;  /* the most any sequence has: its slots from its first (pads[s]) to its last row's */
    for (long s = 0; s < seqs; s++) {
        const long first = pads ? pads[s] : 0, n = (pos + per - first + STRETCH - 1) / STRETCH;
        stretches = n > stretches ? n : stretches;
    }
    const long jobs = seqs * nkv * stretches;
    const float scale = 1.0f / sqrtf((float)hd);
    /* per job and query: the stretch's largest score, the sum of e^(score - it), and the weighted values */
    float *part = malloc(sizeof(float) * (jobs * nq * (hd + 2) + (long)threads * nq * (STRETCH + KEYS)));
    float *top = part, *sum = top + jobs * nq, *out = sum + jobs * nq, *scratch = out + jobs * nq * hd;

    #pragma omp parallel num_threads(threads)
    {
        float *P = scratch + (long)omp_get_thread_num() * nq * (STRETCH + KEYS);
        const long ldp = STRETCH + KEYS;
        #pragma omp for schedule(static)
        for (long job = 0; job < jobs; job++) {
            const long s = job / (nkv * stretches), g = job / stretches % nkv, stretch = job % stretches;
            const long first = pads ? pads[s] : 0, lo = first + stretch * STRETCH;
            const long hi = lo + STRETCH < pos + per ? lo + STRETCH : pos + per;
            const long at = s * row_stride + g * max_len * hd;
            const float *K = k_cache + at, *V = v_cache + at;
            long a[nq], b[nq], A = hi > lo ? hi : lo, B = lo;  /* each query's slots in this stretch; their union */
            const float *q[nq];  /* query j: row j / group, head j % group of this kv head's group */
            for (long j = 0; j < nq; j++) {
                const long slot = pos + j / group;  /* a padding slot (before first) sees itself alone: below */
                q[j] = qkv + (s * per + j / group) * qkv_out + (g * group + j % group) * hd;
                a[j] = lo;
                b[j] = slot < first ? lo : slot + 1 < hi ? slot + 1 : hi;
                if (a[j] < b[j]) {
                    A = a[j] < A ? a[j] : A;
                    B = b[j] > B ? b[j] : B;
                }
            }
            /* the scores, 8 keys at a time for every query that sees any of them (the 8 keys stay in L1); the last
             * keys of the cache, fewer than 8, through a zero-padded copy: every key's score the same arithmetic */
            const __m256 scale8 = _mm256_set1_ps(scale);
            float last[KEYS * hd];
            for (long t = A; t < B; t += KEYS) {
                const float *Kt = K + t * hd;
                if (t + KEYS > max_len) {
                    memset(last, 0, sizeof(last));
                    memcpy(last, Kt, sizeof(float) * (max_len - t) * hd);
                    Kt = last;
                }
                for (long j = 0; j < nq; j++)
                    if (t < b[j])  /* (scores past b[j] are never read) */
                        _mm256_storeu_ps(P + j * ldp + t - lo, _mm256_mul_ps(
                            hd % 8 ? scores8_any(q[j], Kt, hd) : scores8(q[j], Kt, hd), scale8));
            }
            for (long j = 0; j < nq; j++) {
                float *p = P + j * ldp - lo, l = 0.0f;
                top[job * nq + j] = a[j] < b[j] ? exp_shifted(p + a[j], b[j] - a[j], &l) : -INFINITY;
                sum[job * nq + j] = l;
                if (b[j] < B) memset(p + (b[j] > A ? b[j] : A), 0, sizeof(float) * (B - (b[j] > A ? b[j] : A)));
            }
            weigh_queries(P - lo, ldp, V, hd, A, B, out + job * nq * hd, nq);
        }
        /* each query's stretches combined: e^(m_c - M) rescales stretch c's sums to the largest score M (one
         * stretch: M its own, e^0 = 1, so the same bits as its sums divided out) */
        #pragma omp for schedule(static)
        for (long k = 0; k < seqs * nkv * nq; k++) {
            const long s = k / (nkv * nq), g = k / nq % nkv, j = k % nq, first_job = (s * nkv + g) * stretches;
            const long slot = pos + j / group;
            float *dst = att + (s * per + j / group) * nh * hd + (g * group + j % group) * hd;
            if (pads && slot < pads[s]) {  /* a padding slot: softmax of one score, its own value row */
                memcpy(dst, v_cache + s * row_stride + (g * max_len + slot) * hd, sizeof(float) * hd);
                continue;
            }
            float m = -INFINITY, l = 0.0f, w[stretches];
            for (long c = 0; c < stretches; c++)
                if (sum[(first_job + c) * nq + j] > 0.0f && top[(first_job + c) * nq + j] > m)
                    m = top[(first_job + c) * nq + j];
            for (long c = 0; c < stretches; c++) {
                const long at = (first_job + c) * nq + j;
                w[c] = sum[at] > 0.0f ? expf(top[at] - m) : 0.0f;
                l += w[c] * sum[at];
            }
            memset(dst, 0, sizeof(float) * hd);
            for (long c = 0; c < stretches; c++) {
                if (w[c] == 0.0f) continue;
                const float wc = w[c] / l, *o = out + ((first_job + c) * nq + j) * hd;
                for (long d = 0; d < hd; d++) dst[d] += wc * o[d];
            }
        }
    }
    free(part);
}
