/* Test-only: the AVX-512 intrinsics the kernels use, written out lane by lane after Intel's definitions, so that
 * the AVX-512 paths of gemv.c, gguf_blocks.c and sparse24.c run (slowly, correctly) on a CPU without AVX-512.
 * Built by tests/test_kernels.py as `cc ... -include tests/emulated_avx512.h`, never in the shipped library.
 *
 * After <immintrin.h> (whose include guard makes the kernels' own include a no-op), each intrinsic and the
 * 512-bit types are renamed to the versions below, and every `target(...)` attribute becomes AVX2's, so that
 * the compiler emits no AVX-512 instruction anywhere. Only what the kernels call is here: a kernel that starts
 * using another intrinsic fails to build this way, with the missing name in the error. */
#ifndef MIGHTY_EMULATED_AVX512_H
#define MIGHTY_EMULATED_AVX512_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define target(isa) target("avx2,fma,f16c")

typedef union {
    float f[16];
    int32_t i32[16];
    uint32_t u32[16];
    int16_t i16[32];
    uint16_t u16[32];
    int8_t i8[64];
    uint8_t u8[64];
} emu512;

#define __m512 emu512
#define __m512i emu512
#define EMU static inline __attribute__((unused, target("f16c")))
#define LANES(n) for (int l = 0; l < (n); l++)

EMU emu512 emu_zero(void) { emu512 r; memset(&r, 0, sizeof r); return r; }
EMU emu512 emu_set1_ps(float a) { emu512 r; LANES(16) r.f[l] = a; return r; }
EMU emu512 emu_set1_epi32(int a) { emu512 r; LANES(16) r.i32[l] = a; return r; }
EMU emu512 emu_set1_epi8(char a) { emu512 r; LANES(64) r.i8[l] = (int8_t)a; return r; }
EMU emu512 emu_setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7, int a8, int a9, int a10,
                          int a11, int a12, int a13, int a14, int a15) {
    const int32_t a[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
    emu512 r;
    memcpy(r.i32, a, sizeof a);
    return r;
}
EMU emu512 emu_loadu(const void *p) { emu512 r; memcpy(&r, p, 64); return r; }
EMU void emu_storeu_ps(void *p, emu512 a) { memcpy(p, &a, 64); }
EMU emu512 emu_maskz_loadu_ps(__mmask16 k, const void *p) {  /* lanes outside the mask are not read */
    emu512 r = emu_zero();
    LANES(16) if (k >> l & 1) memcpy(&r.f[l], (const float *)p + l, 4);
    return r;
}
EMU emu512 emu_maskz_loadu_epi32(__mmask16 k, const void *p) {  /* the same for 32-bit integers */
    emu512 r = emu_zero();
    LANES(16) if (k >> l & 1) memcpy(&r.u32[l], (const uint32_t *)p + l, 4);
    return r;
}
EMU void emu_mask_storeu_ps(void *p, __mmask16 k, emu512 a) {
    LANES(16) if (k >> l & 1) memcpy((float *)p + l, &a.f[l], 4);
}

EMU emu512 emu_add_ps(emu512 a, emu512 b) { LANES(16) a.f[l] += b.f[l]; return a; }
EMU emu512 emu_sub_ps(emu512 a, emu512 b) { LANES(16) a.f[l] -= b.f[l]; return a; }
EMU emu512 emu_mul_ps(emu512 a, emu512 b) { LANES(16) a.f[l] *= b.f[l]; return a; }
EMU emu512 emu_fmadd_ps(emu512 a, emu512 b, emu512 c) { LANES(16) a.f[l] = fmaf(a.f[l], b.f[l], c.f[l]); return a; }
EMU emu512 emu_fnmadd_ps(emu512 a, emu512 b, emu512 c) { LANES(16) a.f[l] = fmaf(-a.f[l], b.f[l], c.f[l]); return a; }
EMU emu512 emu_fmsub_ps(emu512 a, emu512 b, emu512 c) { LANES(16) a.f[l] = fmaf(a.f[l], b.f[l], -c.f[l]); return a; }
EMU emu512 emu_maskz_mov_ps(__mmask16 k, emu512 a) { LANES(16) if (!(k >> l & 1)) a.f[l] = 0.0f; return a; }
EMU emu512 emu_add_epi32(emu512 a, emu512 b) { LANES(16) a.u32[l] += b.u32[l]; return a; }
EMU emu512 emu_and(emu512 a, emu512 b) { LANES(16) a.u32[l] &= b.u32[l]; return a; }
EMU emu512 emu_or(emu512 a, emu512 b) { LANES(16) a.u32[l] |= b.u32[l]; return a; }
EMU emu512 emu_mask_or_epi32(emu512 src, __mmask16 k, emu512 a, emu512 b) {
    LANES(16) if (k >> l & 1) src.u32[l] = a.u32[l] | b.u32[l];
    return src;
}
EMU emu512 emu_slli_epi16(emu512 a, unsigned n) { LANES(32) a.u16[l] = n > 15 ? 0 : a.u16[l] << n; return a; }
EMU emu512 emu_srli_epi16(emu512 a, unsigned n) { LANES(32) a.u16[l] = n > 15 ? 0 : a.u16[l] >> n; return a; }
EMU emu512 emu_slli_epi32(emu512 a, unsigned n) { LANES(16) a.u32[l] = n > 31 ? 0 : a.u32[l] << n; return a; }
EMU emu512 emu_srli_epi32(emu512 a, unsigned n) { LANES(16) a.u32[l] = n > 31 ? 0 : a.u32[l] >> n; return a; }
EMU emu512 emu_srlv_epi32(emu512 a, emu512 n) {
    LANES(16) a.u32[l] = n.u32[l] > 31 ? 0 : a.u32[l] >> n.u32[l];
    return a;
}

EMU emu512 emu_cvtepi32_ps(emu512 a) { emu512 r; LANES(16) r.f[l] = (float)a.i32[l]; return r; }
/* a 128- or 256-bit register's `lanes` elements of type `elem`, each converted into lane l of `field` */
#define EMU_WIDEN(name, source, elem, lanes, field, convert) \
    EMU emu512 name(source a) {                               \
        elem v[lanes];                                        \
        emu512 r;                                             \
        memcpy(v, &a, sizeof v);                              \
        LANES(lanes) r.field[l] = convert(v[l]);              \
        return r;                                             \
    }
EMU_WIDEN(emu_cvtepi8_epi16, __m256i, int8_t, 32, i16, )
EMU_WIDEN(emu_cvtepi8_epi32, __m128i, int8_t, 16, i32, )
EMU_WIDEN(emu_cvtepu8_epi32, __m128i, uint8_t, 16, i32, )
EMU_WIDEN(emu_cvtepu16_epi32, __m256i, uint16_t, 16, i32, )
EMU_WIDEN(emu_cvtph_ps, __m256i, uint16_t, 16, f, _cvtsh_ss)

/* VNNI: each 32-bit lane plus four products of unsigned bytes of a and signed bytes of b (dpbusd), or two
 * products of signed 16-bit halves (dpwssd); the sums wrap, as the instructions' do */
EMU emu512 emu_dpbusd_epi32(emu512 acc, emu512 a, emu512 b) {
    LANES(16) {
        int32_t s = 0;
        for (int k = 4 * l; k < 4 * l + 4; k++) s += (int32_t)a.u8[k] * b.i8[k];
        acc.u32[l] += (uint32_t)s;
    }
    return acc;
}
EMU emu512 emu_dpwssd_epi32(emu512 acc, emu512 a, emu512 b) {
    LANES(16) acc.u32[l] += (uint32_t)(a.i16[2 * l] * b.i16[2 * l]) + (uint32_t)(a.i16[2 * l + 1] * b.i16[2 * l + 1]);
    return acc;
}

/* lane l: element idx & 15 of a, or of b where bit 4 of idx is set */
EMU emu512 emu_permutex2var_ps(emu512 a, emu512 idx, emu512 b) {
    emu512 r;
    LANES(16) r.f[l] = (idx.u32[l] & 16 ? b : a).f[idx.u32[l] & 15];
    return r;
}

/* GCC's order: the two halves of 8, then of 4, then (0 + 2, 1 + 3), then those two */
EMU float emu_reduce_add_ps(emu512 a) {
    float h8[8], h4[4];
    for (int l = 0; l < 8; l++) h8[l] = a.f[8 + l] + a.f[l];
    for (int l = 0; l < 4; l++) h4[l] = h8[4 + l] + h8[l];
    const float t0 = h4[0] + h4[2], t1 = h4[1] + h4[3];
    return t0 + t1;
}

/* exp16's and attention's (kernels.h, attention.c) */
EMU emu512 emu_min_ps(emu512 a, emu512 b) { LANES(16) a.f[l] = a.f[l] < b.f[l] ? a.f[l] : b.f[l]; return a; }
EMU emu512 emu_max_ps(emu512 a, emu512 b) { LANES(16) a.f[l] = a.f[l] > b.f[l] ? a.f[l] : b.f[l]; return a; }
EMU emu512 emu_round_nearest_ps(emu512 a) { LANES(16) a.f[l] = nearbyintf(a.f[l]); return a; }
EMU emu512 emu_cvtps_epi32(emu512 a) {  /* MXCSR's rounding (to nearest even); out of range: 0x80000000 */
    emu512 r;
    LANES(16) r.i32[l] = a.f[l] > -2147483648.0f && a.f[l] < 2147483648.0f ? (int32_t)nearbyintf(a.f[l]) : INT32_MIN;
    return r;
}
EMU float emu_reduce_max_ps(emu512 a) {
    float m = a.f[0];
    LANES(16) m = a.f[l] > m ? a.f[l] : m;
    return m;
}
EMU __m256 emu_low8(emu512 a) { return _mm256_loadu_ps(a.f); }
EMU __m256d emu_half_pd(emu512 a, int i) { return _mm256_loadu_pd((const double *)(a.f + 8 * (i & 1))); }

EMU emu512 emu_div_ps(emu512 a, emu512 b) { LANES(16) a.f[l] /= b.f[l]; return a; }
EMU emu512 emu_abs_ps(emu512 a) { LANES(16) a.f[l] = fabsf(a.f[l]); return a; }
EMU __m128i emu_cvtsepi32_epi8(emu512 a) {  /* saturating to -128..127 */
    int8_t r[16];
    LANES(16) r[l] = (int8_t)(a.i32[l] > 127 ? 127 : a.i32[l] < -128 ? -128 : a.i32[l]);
    return _mm_loadu_si128((const __m128i *)r);
}
EMU int emu_reduce_add_epi32(emu512 a) {
    uint32_t s = 0;
    LANES(16) s += a.u32[l];
    return (int)s;
}

EMU emu512 emu_maskz_div_ps(__mmask16 k, emu512 a, emu512 b) {
    LANES(16) a.f[l] = k >> l & 1 ? a.f[l] / b.f[l] : 0.0f;
    return a;
}
EMU __mmask16 emu_cmp_gt_mask(emu512 a, emu512 b) {  /* _CMP_GT_OQ: ordered, so NaN compares false */
    __mmask16 k = 0;
    LANES(16) k |= (__mmask16)((a.f[l] > b.f[l]) << l);
    return k;
}

#define _mm512_div_ps emu_div_ps
#define _mm512_maskz_div_ps emu_maskz_div_ps
#define _mm512_cmp_ps_mask(a, b, imm) emu_cmp_gt_mask(a, b)  /* (the kernels compare with _CMP_GT_OQ only) */
#define _mm512_abs_ps emu_abs_ps
#define _mm512_cvtsepi32_epi8 emu_cvtsepi32_epi8
#define _mm512_reduce_add_epi32 emu_reduce_add_epi32
#define _mm512_min_ps emu_min_ps
#define _mm512_max_ps emu_max_ps
#define _mm512_roundscale_ps(a, imm) emu_round_nearest_ps(a)  /* (the kernels pass nearest, no exceptions) */
#define _mm512_cvtps_epi32 emu_cvtps_epi32
#define _mm512_reduce_max_ps emu_reduce_max_ps
#define _mm512_castps512_ps256 emu_low8
#define _mm512_castps_pd(a) (a)
#define _mm512_extractf64x4_pd emu_half_pd
#define _mm512_setzero_ps emu_zero
#define _mm512_setzero_si512 emu_zero
#define _mm512_set1_ps emu_set1_ps
#define _mm512_set1_epi32 emu_set1_epi32
#define _mm512_set1_epi8 emu_set1_epi8
#undef _mm512_setr_epi32  /* a macro in GCC's header */
#define _mm512_setr_epi32 emu_setr_epi32
#define _mm512_loadu_ps emu_loadu
#define _mm512_loadu_si512 emu_loadu
#define _mm512_storeu_ps emu_storeu_ps
#define _mm512_maskz_loadu_ps emu_maskz_loadu_ps
#define _mm512_maskz_loadu_epi32 emu_maskz_loadu_epi32
#define _mm512_mask_storeu_ps emu_mask_storeu_ps
#define _mm512_add_ps emu_add_ps
#define _mm512_sub_ps emu_sub_ps
#define _mm512_mul_ps emu_mul_ps
#define _mm512_fmadd_ps emu_fmadd_ps
#define _mm512_fmsub_ps emu_fmsub_ps
#define _mm512_fnmadd_ps emu_fnmadd_ps
#define _mm512_maskz_mov_ps emu_maskz_mov_ps
#define _mm512_add_epi32 emu_add_epi32
#define _mm512_and_si512 emu_and
#define _mm512_or_si512 emu_or
#define _mm512_mask_or_epi32 emu_mask_or_epi32
#define _mm512_slli_epi16 emu_slli_epi16
#define _mm512_srli_epi16 emu_srli_epi16
#define _mm512_slli_epi32 emu_slli_epi32
#define _mm512_srli_epi32 emu_srli_epi32
#define _mm512_srlv_epi32 emu_srlv_epi32
#define _mm512_castsi512_ps(a) (a)
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
#define _mm512_cvtepi8_epi16 emu_cvtepi8_epi16
#define _mm512_cvtepi8_epi32 emu_cvtepi8_epi32
#define _mm512_cvtepu8_epi32 emu_cvtepu8_epi32
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define _mm512_cvtph_ps emu_cvtph_ps
#define _mm512_dpbusd_epi32 emu_dpbusd_epi32
#define _mm512_dpwssd_epi32 emu_dpwssd_epi32
#define _mm512_permutex2var_ps emu_permutex2var_ps
#define _mm512_reduce_add_ps emu_reduce_add_ps

#endif
