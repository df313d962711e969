/* AVX-512 helpers shared by sftlab's native kernels (attention_cpu.c, elementwise_cpu.c). */
#ifndef SFTLAB_NATIVE_SIMD_H
#define SFTLAB_NATIVE_SIMD_H

#include <immintrin.h>
#include <stdint.h>

/* 16 values from p[i..], bf16 (widened exactly) or fp32; lanes outside m read as 0. */
static inline __m512 load_f32(const void *p, int bf16, int64_t i, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

/* 16 values to p[i..] (lanes in m), fp32 or rounded to bf16 (nearest even). */
static inline void store_f32(void *p, int bf16, int64_t i, __mmask16 m, __m512 x) {
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)p + i, m, x);
        return;
    }
/* One instruction: round to nearest even, NaN kept (inputs below 1.2e-38 become 0). */
#if defined(__AVX512BF16__) && !defined(SFTLAB_PORTABLE_BF16)
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(x));
#else /* round to nearest even; a NaN gets its quiet bit set, so it stays a NaN after the shift */
    __m512i u = _mm512_castps_si512(x);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
#endif
}

/* exp(x) for x in [-104, 88] (clamped; exp(88) = 1.7e38 stays finite): Cody-Waite reduction to r in
 * [-ln2/2, ln2/2], degree-7 Taylor (relative error < 1e-8 before rounding), scaled by 2^n. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

#endif
