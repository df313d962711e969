/* The gated MLP's elementwise part, silu(gate) * up, and its gradients, in one pass each (sftlab).
 *
 * Built and loaded by sftlab/train/native.py; used by sftlab/train/swiglu.py. Why: in torch these are seven
 * separate passes per layer and step over (tokens x intermediate) tensors (silu, mul; in backward silu again,
 * the product again, two muls and silu_backward), each reading and writing the whole tensor. Here the forward
 * is one pass, and the backward one pass for the product (the down projection's weight gradients read it) and
 * one for both input gradients. Everything is computed in fp32 and rounded once to the tensors' dtype (bf16 or
 * fp32), where torch under bf16 rounds silu(gate) before multiplying: results agree to within one rounding.
 *
 * silu(g) = g * s, s = 1 / (1 + exp(-g));  d silu / dg = s * (1 + g * (1 - s)).
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define BLOCK 2048 /* elements per OpenMP work item */

static inline __m512 load(const void *p, int bf16, int64_t i, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static inline void store(void *p, int bf16, int64_t i, __mmask16 m, __m512 x) {
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)p + i, m, x);
        return;
    }
#if defined(__AVX512BF16__) && !defined(SFTLAB_PORTABLE_BF16) /* one instruction: round to nearest even, NaN kept (inputs below 1.2e-38 become 0) */
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

/* exp(x) for x in [-104, 88] (clamped): Cody-Waite reduction, degree-7 Taylor, 2^n by scalef. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.f)); /* exp(88) = 1.7e38: finite, so 1 / (1 + e) stays a number */
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

/* 1 / (1 + exp(-g)): reciprocal estimate (14 bits) and one Newton step (~28 bits), cheaper than a division. */
static inline __m512 sigmoid(__m512 g) {
    __m512 one = _mm512_set1_ps(1.f);
    __m512 den = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 r = _mm512_rcp14_ps(den);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
}

static inline __mmask16 tail(int64_t i, int64_t end) {
    int64_t left = end - i;
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* out = silu(gate) * up over n elements; all three tensors contiguous, bf16 or fp32 (same dtype). */
int sftlab_swiglu_forward(int64_t n, const void *gate, const void *up, void *out, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t end = b + BLOCK < n ? b + BLOCK : n;
        for (int64_t i = b; i < end; i += 16) {
            __mmask16 m = tail(i, end);
            __m512 g = load(gate, bf16, i, m), u = load(up, bf16, i, m);
            store(out, bf16, i, m, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), u));
        }
    }
    return 0;
}

/* grad_gate = grad * up * silu'(gate), grad_up = grad * silu(gate); either output may be NULL (not needed). */
int sftlab_swiglu_backward(int64_t n, const void *gate, const void *up, const void *grad, void *grad_gate,
                            void *grad_up, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t end = b + BLOCK < n ? b + BLOCK : n;
        for (int64_t i = b; i < end; i += 16) {
            __mmask16 m = tail(i, end);
            __m512 g = load(gate, bf16, i, m), d = load(grad, bf16, i, m), s = sigmoid(g);
            if (grad_up) store(grad_up, bf16, i, m, _mm512_mul_ps(d, _mm512_mul_ps(g, s)));
            if (grad_gate) {
                __m512 u = load(up, bf16, i, m), one = _mm512_set1_ps(1.f);
                __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
                store(grad_gate, bf16, i, m, _mm512_mul_ps(_mm512_mul_ps(d, u), dsilu));
            }
        }
    }
    return 0;
}
