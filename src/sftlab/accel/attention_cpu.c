/* Causal attention backward for variable-length examples on x86 CPUs with AVX-512 (sftlab).
 *
 * Built and loaded by sftlab/accel/native.py (gcc -O3 -march=native -fopenmp, one library per head dimension:
 * -DHEAD_DIM=N); used by sftlab/accel/attention.py. Why it exists: torch's CPU flash-attention backward runs
 * at ~60-90 GFLOP/s on SFT-length examples (tens to hundreds of tokens), where per-block gemm calls and
 * threads left idle dominate; this kernel works on one whole (example, query head) at a time with register-
 * blocked AVX-512 loops and reaches 2-3.5x its speed at those lengths (measured in benchmarks/README.md).
 *
 * Math (FlashAttention-2's backward, all in fp32): for query rows i and keys j <= i of one example and head,
 *   P = exp(scale * Q K^T - lse),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
 *   dQ = scale * dS K,  dK += scale * dS^T Q.
 * lse is the forward's log-sum-exp of the scaled scores, so P is recomputed exactly as the forward had it.
 *
 * Layout: every tensor is given as (data, head stride, token stride) in elements with contiguous head_dim,
 * bf16 or fp32; the example boundaries as cumulative lengths over one flattened row of tokens. Grouped-query
 * attention: query head h reads key/value head h / (H / G). Work items are (example, query head), longest first
 * under OpenMP's dynamic schedule; with G < H each item's dK/dV go to a per-query-head fp32 scratch that a last
 * pass sums per key/value head in a fixed order, so results do not depend on the thread count or timing.
 */
#define _GNU_SOURCE /* syscall() */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_simd.h"
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && HEAD_DIM % 32 == 0
#define SFTLAB_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<multiple of 16, at most 256>"
#endif
#if HEAD_DIM % 16 != 0 || HEAD_DIM > 256 || HEAD_DIM < 16
#error "HEAD_DIM must be a multiple of 16 between 16 and 256"
#endif

#define D HEAD_DIM
#define DV (D / 16)                /* 16-float vectors per row */
#define RB (DV >= 16 ? 1 : 16 / DV) /* rows per register block: RB * DV accumulators <= 16 */
#define BQ 16                      /* query rows per block */

typedef struct {
    void *data;
    int64_t s_head, s_tok;
    int32_t bf16, unused;
} view_t;

static inline __m512 load16(const void *row, int bf16, int j) { return load_f32(row, bf16, 16 * j, 0xffff); }
static inline void store16(void *row, int bf16, int j, __m512 x) { store_f32(row, bf16, 16 * j, 0xffff, x); }

static inline const void *at(const view_t *v, int64_t h, int64_t t) {
    return (const char *)v->data + (v->s_head * h + v->s_tok * t) * (v->bf16 ? 2 : 4);
}

/* C[r][c] = sum_d A[r][d] * BT[d][c] for r < nr, c < ncp (a multiple of 16). A: rows of D; BT: D rows of ldb. */
static void mm_a_bt(const float *A, int nr, const float *BT, int ldb, int ncp, float *C, int ldc) {
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
        for (int c = 0; c < ncp; c += 64) {
            int nv = ncp - c >= 64 ? 4 : (ncp - c) / 16;
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
            if (nv == 4) {
                for (int d = 0; d < D; d++) {
                    const float *b = BT + (int64_t)d * ldb + c;
                    __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
                           b3 = _mm512_loadu_ps(b + 48);
                    for (int i = 0; i < 4; i++) {
                        __m512 a = _mm512_set1_ps(A[(r + i) * D + d]);
                        acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                        acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
                        acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
                        acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
                    }
                }
            } else {
                for (int d = 0; d < D; d++) {
                    const float *b = BT + (int64_t)d * ldb + c;
                    for (int i = 0; i < 4; i++) {
                        __m512 a = _mm512_set1_ps(A[(r + i) * D + d]);
                        for (int j = 0; j < nv; j++)
                            acc[i][j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(b + 16 * j), acc[i][j]);
                    }
                }
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < nv; j++) _mm512_storeu_ps(C + (int64_t)(r + i) * ldc + c + 16 * j, acc[i][j]);
        }
    }
    for (; r < nr; r++) {
        for (int c = 0; c < ncp; c += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int d = 0; d < D; d++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(A[r * D + d]), _mm512_loadu_ps(BT + (int64_t)d * ldb + c), acc);
            _mm512_storeu_ps(C + (int64_t)r * ldc + c, acc);
        }
    }
}

/* OUT[c][:] += alpha * sum_{r < nr} W[r][c] * X[r][:] for c < nc. W: rows of ldw; X, OUT: rows of D. */
static void mm_wt_x_acc(const float *W, int ldw, int nr, int nc, const float *X, float *OUT, float alpha) {
    __m512 al = _mm512_set1_ps(alpha);
    for (int c = 0; c < nc; c += RB) {
        int m = nc - c < RB ? nc - c : RB;
        __m512 acc[RB][DV];
        for (int i = 0; i < RB; i++)
            for (int j = 0; j < DV; j++) acc[i][j] = _mm512_setzero_ps();
        for (int r = 0; r < nr; r++) {
            __m512 x[DV];
            for (int j = 0; j < DV; j++) x[j] = _mm512_loadu_ps(X + r * D + 16 * j);
            for (int i = 0; i < m; i++) {
                __m512 w = _mm512_set1_ps(W[(int64_t)r * ldw + c + i]);
                for (int j = 0; j < DV; j++) acc[i][j] = _mm512_fmadd_ps(w, x[j], acc[i][j]);
            }
        }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < DV; j++) {
                float *o = OUT + (int64_t)(c + i) * D + 16 * j;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(al, acc[i][j], _mm512_loadu_ps(o)));
            }
    }
}

/* OUT[r][:] = alpha * sum_{c < nc} W[r][c] * Y[c][:] for r < nr. W: rows of ldw; Y, OUT: rows of D. */
static void mm_w_y(const float *W, int ldw, int nr, int nc, const float *Y, float *OUT, float alpha) {
    __m512 al = _mm512_set1_ps(alpha);
    for (int r = 0; r < nr; r += RB) {
        int m = nr - r < RB ? nr - r : RB;
        __m512 acc[RB][DV];
        for (int i = 0; i < RB; i++)
            for (int j = 0; j < DV; j++) acc[i][j] = _mm512_setzero_ps();
        for (int c = 0; c < nc; c++) {
            __m512 y[DV];
            for (int j = 0; j < DV; j++) y[j] = _mm512_loadu_ps(Y + (int64_t)c * D + 16 * j);
            for (int i = 0; i < m; i++) {
                __m512 w = _mm512_set1_ps(W[(int64_t)(r + i) * ldw + c]);
                for (int j = 0; j < DV; j++) acc[i][j] = _mm512_fmadd_ps(w, y[j], acc[i][j]);
            }
        }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < DV; j++)
                _mm512_storeu_ps(OUT + (int64_t)(r + i) * D + 16 * j, _mm512_mul_ps(al, acc[i][j]));
    }
}

static void *aligned(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) ? NULL : p;
}

#ifdef SFTLAB_AMX
/* ---- AMX tiles (CPUs with AMX-BF16, head_dim a multiple of 32): bf16 x bf16 products with fp32 accumulation.
 * Every tile used here is 16 rows x 64 bytes. */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

static void tiles_on(void) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.colsb[i] = 64; c.rows[i] = 16; }
    _tile_loadconfig(&c);
}

/* One row of D values as bf16 (a bf16 source copied, fp32 rounded to nearest even). */
static inline void row_bf16(const void *src, int bf16, uint16_t *dst) {
    if (bf16) {
        memcpy(dst, src, sizeof(uint16_t) * D);
        return;
    }
    for (int j = 0; j < DV; j++)
        _mm256_storeu_si256((__m256i *)(dst + 16 * j),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps((const float *)src + 16 * j)));
}

/* Linux hands out the AMX tile state only on request (once per process; torch's oneDNN asks for it too). */
static int amx_permitted(void) {
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

/* C[r][c] = sum_d A[r][d] B[c][d] for 16 rows r and c < ncp (a multiple of 16). A: 16 bf16 rows of D; BP: B in
 * pairs along d, BP[dp * ldb + c] = (B[c][2dp], B[c][2dp + 1]). Tiles configured (tiles_on). */
static void amx_a_bt(const uint16_t *A, const uint32_t *BP, int ldb, int ncp, float *C, int ldc) {
    for (int c = 0; c < ncp; c += 16) {
        _tile_zero(0);
        for (int dc = 0; dc < D / 32; dc++) {
            _tile_loadd(4, A + dc * 32, D * 2);
            _tile_loadd(5, BP + (int64_t)dc * 16 * ldb + c, ldb * 4);
            _tile_dpbf16ps(0, 4, 5);
        }
        _tile_stored(0, C + c, ldc * 4);
    }
}

/* Row t of a bf16 view as D / 2 pair words, scattered into column t of P (D / 2 rows of ldp words). */
static inline void pairs_column(const view_t *v, int64_t h, int64_t t, uint32_t *P, int ldp, int col) {
    const uint32_t *w = (const uint32_t *)at(v, h, t);
    for (int dp = 0; dp < D / 2; dp++) P[(int64_t)dp * ldp + col] = w[dp];
}
#endif

/* One (example, query head): dQ into its output rows, dK / dV added into dk_acc / dv_acc (L rows of D, fp32). */
static int one_item(int64_t t0, int L, int h, int g, float scale, const view_t *q, const view_t *k, const view_t *v,
                    const view_t *o, const view_t *dout, const float *lse, int64_t lse_sh, const view_t *dq,
                    float *dk_acc, float *dv_acc) {
    int Lp = (L + 15) & ~15;
    float *K = aligned(sizeof(float) * (size_t)L * D), *KT = aligned(sizeof(float) * (size_t)D * Lp),
          *VT = aligned(sizeof(float) * (size_t)D * Lp), *Q = aligned(sizeof(float) * BQ * D),
          *dO = aligned(sizeof(float) * BQ * D), *dQ = aligned(sizeof(float) * BQ * D),
          *P = aligned(sizeof(float) * (size_t)BQ * Lp), *dP = aligned(sizeof(float) * (size_t)BQ * Lp);
    int ok = K && KT && VT && Q && dO && dQ && P && dP;
    if (ok) {
        float tmp[16];
        memset(KT, 0, sizeof(float) * (size_t)D * Lp);
        memset(VT, 0, sizeof(float) * (size_t)D * Lp);
        for (int t = 0; t < L; t++) {
            const void *kr = at(k, g, t0 + t), *vr = at(v, g, t0 + t);
            for (int j = 0; j < DV; j++) {
                __m512 kv = load16(kr, k->bf16, j);
                _mm512_storeu_ps(K + (int64_t)t * D + 16 * j, kv);
                _mm512_storeu_ps(tmp, kv);
                for (int e = 0; e < 16; e++) KT[(int64_t)(16 * j + e) * Lp + t] = tmp[e];
                _mm512_storeu_ps(tmp, load16(vr, v->bf16, j));
                for (int e = 0; e < 16; e++) VT[(int64_t)(16 * j + e) * Lp + t] = tmp[e];
            }
        }
        __m512 sc = _mm512_set1_ps(scale);
        for (int i0 = 0; i0 < L; i0 += BQ) {
            int nr = L - i0 < BQ ? L - i0 : BQ;
            int kend = i0 + nr, kendp = (kend + 15) & ~15; /* keys a row of this block can see */
            float rowdot[BQ], rowlse[BQ];
            for (int r = 0; r < nr; r++) {
                int64_t t = t0 + i0 + r;
                const void *qr = at(q, h, t), *gr = at(dout, h, t), *orow = at(o, h, t);
                __m512 dd = _mm512_setzero_ps();
                for (int j = 0; j < DV; j++) {
                    __m512 gv = load16(gr, dout->bf16, j);
                    _mm512_storeu_ps(Q + r * D + 16 * j, load16(qr, q->bf16, j));
                    _mm512_storeu_ps(dO + r * D + 16 * j, gv);
                    dd = _mm512_fmadd_ps(gv, load16(orow, o->bf16, j), dd);
                }
                rowdot[r] = _mm512_reduce_add_ps(dd);
                rowlse[r] = lse[h * lse_sh + t];
            }
            mm_a_bt(Q, nr, KT, Lp, kendp, P, Lp);
            mm_a_bt(dO, nr, VT, Lp, kendp, dP, Lp);
            for (int r = 0; r < nr; r++) {
                __m512 lr = _mm512_set1_ps(rowlse[r]), dr = _mm512_set1_ps(rowdot[r]);
                int visible = i0 + r + 1; /* keys 0 .. i0 + r */
                for (int c = 0; c < kendp; c += 16) {
                    float *pr = P + (int64_t)r * Lp + c, *dpr = dP + (int64_t)r * Lp + c;
                    __m512 p = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(pr), sc, lr));
                    int n_vis = visible - c;
                    if (n_vis < 16) p = _mm512_maskz_mov_ps(n_vis <= 0 ? 0 : (__mmask16)((1u << n_vis) - 1), p);
                    _mm512_storeu_ps(pr, p);
                    _mm512_storeu_ps(dpr, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dpr), dr)));
                }
            }
            mm_wt_x_acc(P, Lp, nr, kend, dO, dv_acc, 1.f);
            mm_wt_x_acc(dP, Lp, nr, kend, Q, dk_acc, scale);
            mm_w_y(dP, Lp, nr, kend, K, dQ, scale);
            for (int r = 0; r < nr; r++) {
                void *out = (void *)at(dq, h, t0 + i0 + r);
                for (int j = 0; j < DV; j++) store16(out, dq->bf16, j, _mm512_loadu_ps(dQ + r * D + 16 * j));
            }
        }
    }
    free(K); free(KT); free(VT); free(Q); free(dO); free(dQ); free(P); free(dP);
    return ok;
}

#ifdef SFTLAB_AMX
/* Backward of one (example, query head) with AMX tiles (all inputs bf16): the five products as bf16 tile products
 * with fp32 accumulation. q k^T and dO v^T are exact; P and dS are rounded to bf16 for the other three, as torch's
 * bf16 flash backward (and flash-attention on GPUs) does. Query rows in blocks of 32 (a tile's reduction depth). */
static int one_item_amx(int64_t t0, int L, int h, int g, float scale, const view_t *q, const view_t *k,
                        const view_t *v, const view_t *o, const view_t *dout, const float *lse, int64_t lse_sh,
                        const view_t *dq, float *dk_acc, float *dv_acc) {
    int Lp = (L + 31) & ~31;
    uint32_t *KP = aligned(sizeof(uint32_t) * (size_t)(D / 2) * Lp),
             *VP = aligned(sizeof(uint32_t) * (size_t)(D / 2) * Lp),
             *KK = aligned(sizeof(uint32_t) * (size_t)(Lp / 2) * D), *QP = aligned(sizeof(uint32_t) * 16 * D),
             *GP = aligned(sizeof(uint32_t) * 16 * D);
    uint16_t *Qb = aligned(sizeof(uint16_t) * 32 * D), *Gb = aligned(sizeof(uint16_t) * 32 * D),
             *PT = aligned(sizeof(uint16_t) * (size_t)Lp * 32), *ST = aligned(sizeof(uint16_t) * (size_t)Lp * 32),
             *Sb = aligned(sizeof(uint16_t) * 32 * (size_t)Lp);
    float *S = aligned(sizeof(float) * 32 * (size_t)Lp), *dP = aligned(sizeof(float) * 32 * (size_t)Lp),
          *dQ = aligned(sizeof(float) * 32 * D), *dK = aligned(sizeof(float) * (size_t)Lp * D),
          *dV = aligned(sizeof(float) * (size_t)Lp * D);
    int ok = KP && VP && KK && QP && GP && Qb && Gb && PT && ST && Sb && S && dP && dQ && dK && dV;
    if (ok) {
        memset(KP, 0, sizeof(uint32_t) * (size_t)(D / 2) * Lp);
        memset(VP, 0, sizeof(uint32_t) * (size_t)(D / 2) * Lp);
        memset(KK, 0, sizeof(uint32_t) * (size_t)(Lp / 2) * D);
        memset(dK, 0, sizeof(float) * (size_t)Lp * D);
        memset(dV, 0, sizeof(float) * (size_t)Lp * D);
        for (int t = 0; t < L; t++) {
            pairs_column(k, g, t0 + t, KP, Lp, t);
            pairs_column(v, g, t0 + t, VP, Lp, t);
            const uint16_t *kr = (const uint16_t *)at(k, g, t0 + t);
            uint16_t *kk = (uint16_t *)(KK + (int64_t)(t / 2) * D) + (t & 1);
            for (int d = 0; d < D; d++) kk[2 * d] = kr[d]; /* KK[tp][d] = (K[2tp][d], K[2tp+1][d]) */
        }
        tiles_on();
        __m512 sc = _mm512_set1_ps(scale);
        for (int i0 = 0; i0 < L; i0 += 32) {
            int nr = L - i0 < 32 ? L - i0 : 32;
            int kend = i0 + nr, kend16 = (kend + 15) & ~15, kend32 = (kend + 31) & ~31;
            float rowdot[32], rowlse[32];
            for (int r = 0; r < 32; r++) {
                if (r >= nr) {
                    memset(Qb + r * D, 0, sizeof(uint16_t) * D);
                    memset(Gb + r * D, 0, sizeof(uint16_t) * D);
                    rowdot[r] = rowlse[r] = 0.f;
                    continue;
                }
                int64_t t = t0 + i0 + r;
                memcpy(Qb + r * D, at(q, h, t), sizeof(uint16_t) * D);
                memcpy(Gb + r * D, at(dout, h, t), sizeof(uint16_t) * D);
                const void *orow = at(o, h, t);
                __m512 dd = _mm512_setzero_ps();
                for (int j = 0; j < DV; j++)
                    dd = _mm512_fmadd_ps(load16(Gb + r * D, 1, j), load16(orow, o->bf16, j), dd);
                rowdot[r] = _mm512_reduce_add_ps(dd);
                rowlse[r] = lse[h * lse_sh + t];
            }
            for (int rb = 0; rb < 32; rb += 16) {
                amx_a_bt(Qb + rb * D, KP, Lp, kend16, S + (int64_t)rb * Lp, Lp);
                amx_a_bt(Gb + rb * D, VP, Lp, kend16, dP + (int64_t)rb * Lp, Lp);
            }
            /* P and dS in bf16: rows (dS, for dQ) and transposed (P and dS, for dV and dK); zero where masked. */
            for (int r = 0; r < 32; r++) {
                int visible = r < nr ? i0 + r + 1 : 0;
                __m512 lr = _mm512_set1_ps(rowlse[r]), dr = _mm512_set1_ps(rowdot[r]);
                for (int c = 0; c < kend32; c += 16) {
                    int n_vis = visible - c;
                    __mmask16 m = n_vis >= 16 ? 0xffff : n_vis <= 0 ? 0 : (__mmask16)((1u << n_vis) - 1);
                    __m512 p = _mm512_setzero_ps(), ds = _mm512_setzero_ps();
                    if (m) {
                        __m512 sv = _mm512_loadu_ps(S + (int64_t)r * Lp + c);
                        p = _mm512_maskz_mov_ps(m, exp512(_mm512_fmsub_ps(sv, sc, lr)));
                        ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dP + (int64_t)r * Lp + c), dr));
                    }
                    __m256i pb = (__m256i)_mm512_cvtneps_pbh(p), sb = (__m256i)_mm512_cvtneps_pbh(ds);
                    _mm256_storeu_si256((__m256i *)(Sb + (int64_t)r * Lp + c), sb);
                    uint16_t pt[16], st[16];
                    _mm256_storeu_si256((__m256i *)pt, pb);
                    _mm256_storeu_si256((__m256i *)st, sb);
                    for (int e = 0; e < 16; e++) {
                        PT[(int64_t)(c + e) * 32 + r] = pt[e];
                        ST[(int64_t)(c + e) * 32 + r] = st[e];
                    }
                }
            }
            /* Q and dO in pairs of rows: QP[rp][d] = (Q[2rp][d], Q[2rp+1][d]). */
            for (int rp = 0; rp < 16; rp++)
                for (int d = 0; d < D; d++) {
                    QP[rp * D + d] = (uint32_t)Qb[2 * rp * D + d] | ((uint32_t)Qb[(2 * rp + 1) * D + d] << 16);
                    GP[rp * D + d] = (uint32_t)Gb[2 * rp * D + d] | ((uint32_t)Gb[(2 * rp + 1) * D + d] << 16);
                }
            for (int c0 = 0; c0 < kend16; c0 += 16)
                for (int d0 = 0; d0 < D; d0 += 16) {
                    _tile_loadd(0, dV + (int64_t)c0 * D + d0, D * 4);
                    _tile_loadd(1, dK + (int64_t)c0 * D + d0, D * 4);
                    _tile_loadd(4, PT + (int64_t)c0 * 32, 64);
                    _tile_loadd(5, GP + d0, D * 4);
                    _tile_dpbf16ps(0, 4, 5);
                    _tile_loadd(6, ST + (int64_t)c0 * 32, 64);
                    _tile_loadd(7, QP + d0, D * 4);
                    _tile_dpbf16ps(1, 6, 7);
                    _tile_stored(0, dV + (int64_t)c0 * D + d0, D * 4);
                    _tile_stored(1, dK + (int64_t)c0 * D + d0, D * 4);
                }
            for (int rb = 0; rb < 32 && rb < nr; rb += 16)
                for (int d0 = 0; d0 < D; d0 += 16) {
                    _tile_zero(0);
                    for (int kc = 0; kc < kend32; kc += 32) {
                        _tile_loadd(4, Sb + (int64_t)rb * Lp + kc, Lp * 2);
                        _tile_loadd(5, KK + (int64_t)(kc / 2) * D + d0, D * 4);
                        _tile_dpbf16ps(0, 4, 5);
                    }
                    _tile_stored(0, dQ + rb * D + d0, D * 4);
                }
            for (int r = 0; r < nr; r++) {
                void *out = (void *)at(dq, h, t0 + i0 + r);
                for (int j = 0; j < DV; j++)
                    store16(out, dq->bf16, j, _mm512_mul_ps(sc, _mm512_loadu_ps(dQ + r * D + 16 * j)));
            }
        }
        _tile_release();
        for (int64_t e = 0; e < (int64_t)L * D; e += 16) {
            _mm512_storeu_ps(dv_acc + e, _mm512_loadu_ps(dV + e));
            _mm512_storeu_ps(dk_acc + e, _mm512_mul_ps(sc, _mm512_loadu_ps(dK + e)));
        }
    }
    free(KP); free(VP); free(KK); free(QP); free(GP); free(Qb); free(Gb); free(PT); free(ST); free(Sb);
    free(S); free(dP); free(dQ); free(dK); free(dV);
    return ok;
}
#endif

#ifdef SFTLAB_AMX
static int forward_item(int64_t t0, int L, int h, int g, float scale, const view_t *q, const view_t *k,
                        const view_t *v, const view_t *o, float *lse, int64_t lse_sh) {
    int Lp = (L + 31) & ~31;
    /* KP[dp][t] = (K[t][2dp], K[t][2dp+1]) and VP[tp][d] = (V[2tp][d], V[2tp+1][d]): the pair layout tile
     * products read their second operand in. */
    uint32_t *KP = aligned(sizeof(uint32_t) * (size_t)(D / 2) * Lp),
             *VP = aligned(sizeof(uint32_t) * (size_t)(Lp / 2) * D);
    uint16_t *row = aligned(sizeof(uint16_t) * 2 * D), *Qb = aligned(sizeof(uint16_t) * 16 * D),
             *Pb = aligned(sizeof(uint16_t) * 16 * (size_t)Lp);
    float *S = aligned(sizeof(float) * 16 * (size_t)Lp), *O = aligned(sizeof(float) * 16 * D);
    int ok = KP && VP && row && Qb && Pb && S && O;
    if (ok) {
        tiles_on();
        memset(KP, 0, sizeof(uint32_t) * (size_t)(D / 2) * Lp);
        memset(VP, 0, sizeof(uint32_t) * (size_t)(Lp / 2) * D);
        memset(Qb, 0, sizeof(uint16_t) * 16 * D);
        for (int t = 0; t < L; t++) {
            row_bf16(at(k, g, t0 + t), k->bf16, row);
            const uint32_t *w = (const uint32_t *)row;
            for (int dp = 0; dp < D / 2; dp++) KP[(int64_t)dp * Lp + t] = w[dp];
        }
        for (int t = 0; t < L; t += 2) {
            row_bf16(at(v, g, t0 + t), v->bf16, row);
            if (t + 1 < L) row_bf16(at(v, g, t0 + t + 1), v->bf16, row + D);
            else memset(row + D, 0, sizeof(uint16_t) * D);
            uint32_t *dst = VP + (int64_t)(t / 2) * D;
            for (int d = 0; d < D; d++) dst[d] = (uint32_t)row[d] | ((uint32_t)row[D + d] << 16);
        }
        __m512 sc = _mm512_set1_ps(scale);
        for (int i0 = 0; i0 < L; i0 += 16) {
            int nr = L - i0 < 16 ? L - i0 : 16;
            int kend = i0 + nr, kend32 = (kend + 31) & ~31;
            float rowsum[16], rowmax[16];
            for (int r = 0; r < nr; r++) row_bf16(at(q, h, t0 + i0 + r), q->bf16, Qb + r * D);
            if (nr < 16) memset(Qb + nr * D, 0, sizeof(uint16_t) * (16 - nr) * D);
            amx_a_bt(Qb, KP, Lp, kend32, S, Lp);
            for (int r = 0; r < nr; r++) {
                float *sr = S + (int64_t)r * Lp;
                uint16_t *pr = Pb + (int64_t)r * Lp;
                int visible = i0 + r + 1;
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int c = 0; c < kend32; c += 16) {
                    int n_vis = visible - c;
                    __mmask16 m = n_vis >= 16 ? 0xffff : n_vis <= 0 ? 0 : (__mmask16)((1u << n_vis) - 1);
                    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(sr + c));
                }
                float smax = _mm512_reduce_max_ps(mx) * scale;
                __m512 sm = _mm512_set1_ps(smax), sum = _mm512_setzero_ps();
                for (int c = 0; c < kend32; c += 16) {
                    __m512 p = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(sr + c), sc, sm));
                    int n_vis = visible - c;
                    if (n_vis < 16) p = _mm512_maskz_mov_ps(n_vis <= 0 ? 0 : (__mmask16)((1u << n_vis) - 1), p);
                    sum = _mm512_add_ps(sum, p);
                    _mm256_storeu_si256((__m256i *)(pr + c), (__m256i)_mm512_cvtneps_pbh(p));
                }
                rowsum[r] = _mm512_reduce_add_ps(sum);
                rowmax[r] = smax;
            }
            for (int r = nr; r < 16; r++) memset(Pb + (int64_t)r * Lp, 0, sizeof(uint16_t) * kend32);
            for (int db = 0; db < D / 16; db++) {
                _tile_zero(0);
                for (int kc = 0; kc < kend32; kc += 32) {
                    _tile_loadd(4, Pb + kc, Lp * 2);
                    _tile_loadd(5, VP + (int64_t)(kc / 2) * D + db * 16, D * 4);
                    _tile_dpbf16ps(0, 4, 5);
                }
                _tile_stored(0, O + db * 16, D * 4);
            }
            for (int r = 0; r < nr; r++) {
                __m512 inv = _mm512_set1_ps(1.f / rowsum[r]);
                void *out = (void *)at(o, h, t0 + i0 + r);
                for (int j = 0; j < DV; j++)
                    store16(out, o->bf16, j, _mm512_mul_ps(_mm512_loadu_ps(O + r * D + 16 * j), inv));
                lse[h * lse_sh + t0 + i0 + r] = rowmax[r] + logf(rowsum[r]);
            }
        }
        _tile_release();
    }
    free(KP); free(VP); free(row); free(Qb); free(Pb); free(S); free(O);
    return ok;
}
#endif

/* Items (example, query head) in order of decreasing example length, for the dynamic schedule. */
static int *longest_first(int n_seq, int H, const int64_t *cu) {
    int n_items = n_seq * H;
    int *order = malloc(sizeof(int) * (n_items ? n_items : 1));
    if (!order) return NULL;
    for (int i = 0; i < n_items; i++) order[i] = i;
    for (int i = 1; i < n_items; i++) { /* insertion sort, stable: few items */
        int x = order[i], j = i;
        int64_t lx = cu[x / H + 1] - cu[x / H];
        while (j > 0 && cu[order[j - 1] / H + 1] - cu[order[j - 1] / H] < lx) { order[j] = order[j - 1]; j--; }
        order[j] = x;
    }
    return order;
}

/* views: q, k, v, o (o written; H heads). lse: fp32, lse[h * lse_sh + token], written. Returns 0, -1 if memory
 * ran out, -2 where this build or this process cannot use AMX (the caller then uses torch's kernel). */
int sftlab_attention_forward(int n_seq, const int64_t *cu, int H, int G, float scale, const view_t *views,
                             float *lse, int64_t lse_sh) {
#ifdef SFTLAB_AMX
    if (!amx_permitted()) return -2;
    int rep = H / G, n_items = n_seq * H, failed = 0;
    int *order = longest_first(n_seq, H, cu);
    if (!order) return -1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < n_items; it++) {
        int s = order[it] / H, h = order[it] % H;
        int L = (int)(cu[s + 1] - cu[s]);
        if (L > 0 && !forward_item(cu[s], L, h, h / rep, scale, &views[0], &views[1], &views[2], &views[3], lse,
                                   lse_sh)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    free(order);
    return failed ? -1 : 0;
#else
    (void)n_seq; (void)cu; (void)H; (void)G; (void)scale; (void)views; (void)lse; (void)lse_sh;
    return -2;
#endif
}

/* views: q, k, v, o, dout, dq, dk, dv; q / o / dout / dq have H heads, k / v / dk / dv have G. cu: n_seq + 1
 * cumulative lengths. lse: fp32, lse[h * lse_sh + token]. Returns 0, or -1 if memory ran out. */
int sftlab_attention_backward(int n_seq, const int64_t *cu, int H, int G, float scale, const view_t *views,
                              const float *lse, int64_t lse_sh) {
    const view_t *q = &views[0], *k = &views[1], *v = &views[2], *o = &views[3], *dout = &views[4],
                 *dq = &views[5], *dk = &views[6], *dv = &views[7];
    int rep = H / G, n_items = n_seq * H;
    int64_t n_tok = cu[n_seq];
    int *order = longest_first(n_seq, H, cu);
    int amx = 0;
#ifdef SFTLAB_AMX
    amx = q->bf16 && k->bf16 && v->bf16 && dout->bf16 && amx_permitted();
#endif
    (void)amx;
    /* Per query head dK / dV (fp32, H x n_tok x D each), summed per key/value head at the end. Every row
     * belongs to an example (cu covers the row), so every row is zeroed and filled by its item. */
    float *pk = aligned(sizeof(float) * (size_t)H * n_tok * D), *pv = aligned(sizeof(float) * (size_t)H * n_tok * D);
    int failed = !(order && pk && pv);
    if (!failed) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            int s = order[it] / H, h = order[it] % H;
            int64_t t0 = cu[s];
            int L = (int)(cu[s + 1] - t0);
            if (L <= 0) continue;
            float *dka = pk + ((int64_t)h * n_tok + t0) * D, *dva = pv + ((int64_t)h * n_tok + t0) * D;
            memset(dka, 0, sizeof(float) * (size_t)L * D); /* zeroed here, by the thread that fills it */
            memset(dva, 0, sizeof(float) * (size_t)L * D);
            int done;
#ifdef SFTLAB_AMX
            if (amx) done = one_item_amx(t0, L, h, h / rep, scale, q, k, v, o, dout, lse, lse_sh, dq, dka, dva);
            else
#endif
                done = one_item(t0, L, h, h / rep, scale, q, k, v, o, dout, lse, lse_sh, dq, dka, dva);
            if (!done) {
#pragma omp atomic write
                failed = 1;
            }
        }
        if (!failed) {
#pragma omp parallel for schedule(static)
            for (int64_t t = 0; t < n_tok; t++) {
                for (int g = 0; g < G; g++) {
                    for (int j = 0; j < DV; j++) {
                        __m512 sk = _mm512_setzero_ps(), sv = _mm512_setzero_ps();
                        for (int hh = 0; hh < rep; hh++) {
                            int64_t off = ((int64_t)(g * rep + hh) * n_tok + t) * D + 16 * j;
                            sk = _mm512_add_ps(sk, _mm512_loadu_ps(pk + off));
                            sv = _mm512_add_ps(sv, _mm512_loadu_ps(pv + off));
                        }
                        store16((void *)at(dk, g, t), dk->bf16, j, sk);
                        store16((void *)at(dv, g, t), dv->bf16, j, sv);
                    }
                }
            }
        }
    }
    free(order); free(pk); free(pv);
    return failed ? -1 : 0;
}
