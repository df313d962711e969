/* Memory-bound layer pieces in one pass each (sftlab): the gated MLP's silu(gate) * up, the rotary embedding and
 * RMSNorm, forward and backward.
 *
 * Built and loaded by sftlab/accel/native.py; used by sftlab/accel/swiglu.py, rotary.py and norm.py. Each of
 * these is several torch ops, every one a full pass over the activations (plus dispatch); here each direction is
 * one pass, parallel over rows with OpenMP (torch's threads).
 *
 * Gated MLP. In torch these are seven
 * separate passes per layer and step over (tokens x intermediate) tensors (silu, mul; in backward silu again,
 * the product again, two muls and silu_backward), each reading and writing the whole tensor. Here the forward
 * is one pass, and the backward one pass for the product (the down projection's weight gradients read it) and
 * one for both input gradients. Everything is computed in fp32 and rounded once to the tensors' dtype (bf16 or
 * fp32), where torch under bf16 rounds silu(gate) before multiplying: results agree to within one rounding.
 *
 * silu(g) = g * s, s = 1 / (1 + exp(-g));  d silu / dg = s * (1 + g * (1 - s)).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "native_simd.h"

#define BLOCK 2048 /* elements per OpenMP work item */


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
            __m512 g = load_f32(gate, bf16, i, m), u = load_f32(up, bf16, i, m);
            store_f32(out, bf16, i, m, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), u));
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
            __m512 g = load_f32(gate, bf16, i, m), d = load_f32(grad, bf16, i, m), s = sigmoid(g);
            if (grad_up) store_f32(grad_up, bf16, i, m, _mm512_mul_ps(d, _mm512_mul_ps(g, s)));
            if (grad_gate) {
                __m512 u = load_f32(up, bf16, i, m), one = _mm512_set1_ps(1.f);
                __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
                store_f32(grad_gate, bf16, i, m, _mm512_mul_ps(_mm512_mul_ps(d, u), dsilu));
            }
        }
    }
    return 0;
}

/* ---- Rotary embedding: out = x * cos + rotate_half(x) * sin, per head, with h = D / 2:
 *   out[:h] = x[:h] c[:h] - x[h:] s[:h],   out[h:] = x[h:] c[h:] + x[:h] s[h:];
 * backward (the transposed rotation): dx[:h] = g[:h] c[:h] + g[h:] s[h:],  dx[h:] = g[h:] c[h:] - g[:h] s[:h].
 * x / out / g / dx: (token, head) rows of D at the given strides (elements), bf16 or fp32; cos / sin: fp32 rows
 * of D per token (shared by the heads). fp32 arithmetic, one rounding. D / 2 a multiple of 16. */
int sftlab_rotary(int64_t n_tok, int heads, int D, int transpose, const void *x, int x_bf16, int64_t x_sh,
                  int64_t x_st, const float *cos, const float *sin, int64_t cs_st, void *out, int out_bf16,
                  int64_t out_sh, int64_t out_st) {
    int h = D / 2;
    if (h % 16) return -1;
    __mmask16 all = 0xffff;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n_tok; t++) {
        const float *c = cos + t * cs_st, *sn = sin + t * cs_st;
        for (int hd = 0; hd < heads; hd++) {
            const char *xr = (const char *)x + (x_sh * hd + x_st * t) * (x_bf16 ? 2 : 4);
            char *orow = (char *)out + (out_sh * hd + out_st * t) * (out_bf16 ? 2 : 4);
            for (int i = 0; i < h; i += 16) {
                __m512 x1 = load_f32(xr, x_bf16, i, all), x2 = load_f32(xr, x_bf16, i + h, all);
                __m512 c1 = _mm512_loadu_ps(c + i), c2 = _mm512_loadu_ps(c + i + h);
                __m512 s1 = _mm512_loadu_ps(sn + i), s2 = _mm512_loadu_ps(sn + i + h);
                __m512 o1, o2;
                if (!transpose) {
                    o1 = _mm512_fnmadd_ps(x2, s1, _mm512_mul_ps(x1, c1));
                    o2 = _mm512_fmadd_ps(x1, s2, _mm512_mul_ps(x2, c2));
                } else {
                    o1 = _mm512_fmadd_ps(x2, s2, _mm512_mul_ps(x1, c1));
                    o2 = _mm512_fnmadd_ps(x1, s1, _mm512_mul_ps(x2, c2));
                }
                store_f32(orow, out_bf16, i, all, o1);
                store_f32(orow, out_bf16, i + h, all, o2);
            }
        }
    }
    return 0;
}

/* ---- RMSNorm, fp32: y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) per row of H; backward
 * dx = rstd * (g w) - x * rstd^3 * mean(g w x), dw = sum over rows of g x rstd. Rows contiguous. */
static inline float row_sum(const float *a, const float *b, int H) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= H; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < H) {
        __mmask16 m = (__mmask16)((1u << (H - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

int sftlab_rms_norm_forward(int64_t rows, int H, const float *x, const float *w, float eps, float *y, float *rstd) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * H;
        float *yr = y + r * H;
        float rs = 1.f / sqrtf(row_sum(xr, xr, H) / H + eps);
        rstd[r] = rs;
        __m512 vr = _mm512_set1_ps(rs);
        for (int i = 0; i < H; i += 16) {
            __mmask16 m = tail(i, H);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), vr);
            v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i));
            _mm512_mask_storeu_ps(yr + i, m, v);
        }
    }
    return 0;
}

/* grad_x (may be NULL) per row; grad_w (may be NULL) summed over rows: each thread sums its (static) share of rows,
 * and the shares are added in thread order, so the result depends only on the thread count. */
int sftlab_rms_norm_backward(int64_t rows, int H, const float *x, const float *w, const float *rstd,
                             const float *g, float *grad_x, float *grad_w) {
    int nthr = omp_get_max_threads();
    float *part = grad_w ? calloc((size_t)nthr * H, sizeof(float)) : NULL;
    if (grad_w && !part) return -1;
#pragma omp parallel num_threads(nthr)
    {
        int me = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t lo = rows * me / n, hi = rows * (me + 1) / n;
        float *acc = part ? part + (int64_t)me * H : NULL;
        for (int64_t r = lo; r < hi; r++) {
            const float *xr = x + r * H, *gr = g + r * H;
            __m512 vr = _mm512_set1_ps(rstd[r]);
            if (grad_x) {
                /* mean(g w x) */
                __m512 dacc = _mm512_setzero_ps();
                for (int i = 0; i < H; i += 16) {
                    __mmask16 m = tail(i, H);
                    __m512 gw = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gr + i), _mm512_maskz_loadu_ps(m, w + i));
                    dacc = _mm512_fmadd_ps(gw, _mm512_maskz_loadu_ps(m, xr + i), dacc);
                }
                float rs = rstd[r];
                __m512 coef = _mm512_set1_ps(-_mm512_reduce_add_ps(dacc) * rs * rs * rs / H);
                float *dx = grad_x + r * H;
                for (int i = 0; i < H; i += 16) {
                    __mmask16 m = tail(i, H);
                    __m512 gw = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gr + i), _mm512_maskz_loadu_ps(m, w + i));
                    __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr + i), coef, _mm512_mul_ps(gw, vr));
                    _mm512_mask_storeu_ps(dx + i, m, v);
                }
            }
            if (acc) {
                for (int i = 0; i < H; i += 16) {
                    __mmask16 m = tail(i, H);
                    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gr + i), _mm512_maskz_loadu_ps(m, xr + i));
                    v = _mm512_mul_ps(v, vr);
                    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), v));
                }
            }
        }
    }
    if (grad_w) {
        for (int i = 0; i < H; i++) {
            float sum = 0.f;
            for (int t = 0; t < nthr; t++) sum += part[(int64_t)t * H + i];
            grad_w[i] = sum;
        }
        free(part);
    }
    return 0;
}
