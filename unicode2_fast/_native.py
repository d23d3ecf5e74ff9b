"""Compiled CPU loops for the hot paths that torch's eager ops run as many memory passes.

``row_adamw_fp32`` -- ``u2.SparseRowAdamW``'s row update. The C2 step touches a few thousand
rows of a 500K x 1152 table; torch's eager ops make one pass over the touched rows per operation
(about fifteen for AdamW: three gathers, the element-wise update, three scatters), each into a
temporary, so the step is bound by memory traffic, not arithmetic. The loop does it in one
pass, in place: each touched element of the parameter and both moments is read once and
written once. It uses the element-wise formulas of ``sparse_adamw._row_adamw_torch``, in the
same order. The compiler may not contract anything into an FMA (``-ffp-contract=off``); the two
multiply-adds that torch's vectorised CPU kernels fuse (lerp, addcmul) are written as ``fmaf``,
so both moments come out as torch's vectorised loop computes them. The parameter can differ by
an ulp: torch's vectorised fp32 ``sqrt`` (Sleef) is not always correctly rounded, ``sqrtf`` is
(tested against the torch path and ``torch.optim.AdamW`` at rtol 1e-6).

``filter_epilogue`` -- one block of ``u2.nearest``'s int8 / int8x2 filter after its integer
GEMMs: the int32 sum of the two levels, the scaling, the l2 terms and the minima of groups of
64 columns, in one pass instead of five torch passes over the (queries x 2,048) block. The
filter's error bound covers the fp32 roundings of these steps in either order.

Rows are split over ``torch.get_num_threads()`` OpenMP threads; each row is owned by one
thread, so results do not depend on the thread count. The library asks for ``libgomp.so.1``,
which torch has already loaded: it runs on torch's own OpenMP threads. (A separate Python
thread pool competed with torch's threads, which spin a while after each parallel region.)

The source below is compiled once per machine with the C compiler (``$CC``, else ``cc``) into
``$UNICODE2_FAST_CACHE_DIR`` (default ``~/.cache/unicode2_fast``) and loaded with ctypes; the
file name hashes the source, the flags, the compiler's version and the CPU's feature flags
(``-march=native``), and it is written to a temporary file and renamed, so concurrent processes
never load a half-written library. Where no compiler works, :func:`available` is False, one
warning says why, and the callers keep their torch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import torch

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <float.h>

/* AdamW on rows ids[0:rows] of p / m / v (row length d), in place, on `threads` OpenMP threads.
   g: the rows' gradients, in the order of ids. neg_step[i] = -lr / (1 - beta1^t_i),
   bc2[i] = sqrt(1 - beta2^t_i). */
void row_adamw_f32(float *restrict p, float *restrict m, float *restrict v, const int64_t *ids,
                   const float *restrict g, const float *neg_step, const float *bc2, int64_t rows,
                   int64_t d, float decay, float w1, float beta2, float w2, float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = ids[i];
        float *restrict pr = p + r * d;
        float *restrict mr = m + r * d;
        float *restrict vr = v + r * d;
        const float *restrict gr = g + i * d;
        const float ns = neg_step[i], b = bc2[i];
        for (int64_t j = 0; j < d; ++j) {
            const float gj = gr[j];
            float mm = mr[j];
            /* torch.lerp(m, g, w1), fused as torch's vectorised CPU kernel does */
            mm = w1 < 0.5f ? fmaf(w1, gj - mm, mm) : fmaf(-(1.0f - w1), gj - mm, gj);
            /* v.mul_(beta2).addcmul_(g, g, value=w2): torch fuses (w2 * g) * g + v */
            const float vv = fmaf(w2 * gj, gj, vr[j] * beta2);
            /* sqrt(v) / bc2 + eps, then p + (m * neg_step) / denom */
            const float den = sqrtf(vv) / b + eps;
            pr[j] = pr[j] * decay + (mm * ns) / den;
            mr[j] = mm;
            vr[j] = vv;
        }
    }
}

/* The epilogue of one block of u2.nearest's int8 / int8x2 filter, in one pass per row:
   dots = lo + base * hi (int32, exact; lo NULL: dots = hi), approx = float(dots) * cscale[j],
   then csq[j] + approx * neg[i] (l2; csq NULL: approx * neg[i]), stored in approx, and the
   minimum of every group of `width` consecutive columns (the last one may be short) in minima.
   The same operations in the same order as the torch path (the multiply-add fused, as torch's
   vectorised addcmul fuses it); the filter's error bound covers their fp32 roundings. */
void filter_epilogue(const int32_t *hi, const int32_t *lo, int32_t base, int64_t m, int64_t w,
                     const float *cscale, const float *csq, const float *neg, float *approx,
                     float *minima, int64_t width, int threads) {
    const int64_t groups = (w + width - 1) / width;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < m; ++i) {
        const int32_t *h = hi + i * w;
        const int32_t *l = lo ? lo + i * w : 0;
        float *a = approx + i * w;
        float *mn = minima + i * groups;
        const float ni = neg[i];
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t j0 = g * width, j1 = j0 + width < w ? j0 + width : w;
            float best = INFINITY;
            for (int64_t j = j0; j < j1; ++j) {
                const int32_t dot = l ? l[j] + base * h[j] : h[j];
                const float f = (float)dot * cscale[j];
                const float value = csq ? fmaf(f, ni, csq[j]) : f * ni;
                a[j] = value;
                best = value < best ? value : best;
            }
            mn[g] = best;
        }
    }
}

/* out[i] = sqrt(sum_j v[i,j]^2) (center NULL) or sum_j (v[i,j] - center[j])^2 (center given),
   accumulated in double from fp32 rows, in one pass with no float64 copy of v */
void row_sums_f64(const float *v, int64_t n, int64_t d, const double *center, double *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
        const float *r = v + i * d;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        if (center) {
            for (; j + 8 <= d; j += 8)
                for (int l = 0; l < 8; ++l) { const double t = (double)r[j + l] - center[j + l]; acc[l] += t * t; }
            for (; j < d; ++j) { const double t = (double)r[j] - center[j]; acc[0] += t * t; }
        } else {
            for (; j + 8 <= d; j += 8)
                for (int l = 0; l < 8; ++l) { const double t = (double)r[j + l]; acc[l] += t * t; }
            for (; j < d; ++j) { const double t = (double)r[j]; acc[0] += t * t; }
        }
        const double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        out[i] = center ? sum : sqrt(sum);
    }
}

/* sums[ids[i], :] += (double)x[i, :] for i = 0 .. n-1 in that order (torch's index_add_ on float64
   rows adds in the same order: the sums are bit for bit its), no float64 copy of x; the threads
   split the columns (a column's sum is one thread's, in row order) */
void cluster_sums_f64(const float *x, int64_t n, int64_t d, int64_t ldx, const int64_t *ids, double *sums,
                      int threads) {
    /* one contiguous column range per thread, a multiple of 16 columns: each row's slice is one stream */
    const int64_t width = ((d + threads - 1) / threads + 15) / 16 * 16;
    const int64_t tasks = (d + width - 1) / width;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t j0 = t * width, j1 = j0 + width < d ? j0 + width : d;
        for (int64_t i = 0; i < n; ++i) {
            const float *r = x + i * ldx;
            double *s = sums + ids[i] * d;
            for (int64_t j = j0; j < j1; ++j) s[j] += (double)r[j];
        }
    }
}

/* ---- u2.nearest's bf16 scan (l2): AVX-512 BF16 dot products, fp32 accumulation ---- */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define BF16_SCAN 1
#else
#define BF16_SCAN 0
#endif
#include <string.h>

int bf16_scan_available(void) { return BF16_SCAN; }

static inline uint16_t bf16_round(float f) {  /* round to nearest even (finite f) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Rows i < n of out (npad, dp): bf16(fl32(x[i] - center)) (center NULL: x[i]), zero padded to dp
   columns; rows n <= i < npad all zero. norm[i] = ||fl32(x[i] - center)||, resid[i] = the norm of
   that row less its bf16 rounding, both summed in double (the products of fp32 values are exact). */
/* one element of a packed row: its bf16 rounding into *o, its square and its rounding error's
   square added to a2 / e2 (inlined with a constant has_center: a loop the compiler vectorises) */
static inline void pack_one(float a, uint16_t *o, double *a2, double *e2) {
    const uint16_t h = bf16_round(a);
    const uint32_t u = (uint32_t)h << 16;
    float hf;
    memcpy(&hf, &u, 4);
    const float e = a - hf;  /* exact: a and its rounding share the exponent range */
    *o = h;
    *a2 += (double)a * a;
    *e2 += (double)e * e;
}

static inline void pack_row(const float *r, const float *center, const int has_center, int64_t d, int64_t dp,
                            uint16_t *o, double *norm, double *resid) {
    double a2[16] = {0}, e2[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= d; j += 16)
        for (int l = 0; l < 16; ++l)
            pack_one(has_center ? r[j + l] - center[j + l] : r[j + l], o + j + l, a2 + l, e2 + l);
    for (; j < d; ++j)
        pack_one(has_center ? r[j] - center[j] : r[j], o + j, a2 + (j & 15), e2 + (j & 15));
    for (j = d; j < dp; ++j) o[j] = 0;
    for (int l = 0; l < 8; ++l) { a2[l] += a2[l + 8]; e2[l] += e2[l + 8]; }
    *norm = sqrt(((a2[0] + a2[1]) + (a2[2] + a2[3])) + ((a2[4] + a2[5]) + (a2[6] + a2[7])));
    *resid = sqrt(((e2[0] + e2[1]) + (e2[2] + e2[3])) + ((e2[4] + e2[5]) + (e2[6] + e2[7])));
}

/* Rows i < n of out (npad, dp): bf16(fl32(x[i] - center)) (center NULL: x[i]), zero padded to dp
   columns; rows n <= i < npad all zero. norm[i] = ||fl32(x[i] - center)||, resid[i] = the norm of
   that row less its bf16 rounding, both summed in double (the products of fp32 values are exact;
   sixteen partial sums: any order errs by far less than the callers' SUM64 allowance). */
void bf16_pack_rows(const float *x, int64_t n, int64_t d, int64_t ldx, const float *center, uint16_t *out,
                    int64_t dp, int64_t npad, double *norm, double *resid, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < npad; ++i) {
        uint16_t *o = out + i * dp;
        if (i >= n) { memset(o, 0, (size_t)dp * sizeof(uint16_t)); continue; }
        if (center) pack_row(x + i * ldx, center, 1, d, dp, o, norm + i, resid + i);
        else pack_row(x + i * ldx, center, 0, d, dp, o, norm + i, resid + i);
    }
}

#define SCAN_ROWS 6     /* queries per register tile (6 x 64 codewords: 24 accumulators) */
#define SCAN_BLOCK 96   /* queries per thread block: their bf16 rows and a panel stay in L2 */

/* Append codeword j (lower bound lo) to a query's list; when full, drop entries above the
   current upper bound; -1 when it stays full (the caller's exact fallback takes the query). */
static inline void scan_push(int32_t *c, float *cl, int32_t *count, int cap, int32_t j, float lo, float upper) {
    if (*count < 0) return;
    if (*count == cap) {
        int32_t w = 0;
        for (int32_t t = 0; t < cap; ++t)
            if (cl[t] <= upper) { c[w] = c[t]; cl[w] = cl[t]; ++w; }
        *count = w;
        if (w == cap) { *count = -1; return; }
    }
    c[*count] = j;
    cl[*count] = lo;
    ++*count;
}

/* The candidates of each query i < n (q: (npad, dp) bf16 rows from bf16_pack_rows, npad a multiple
   of SCAN_ROWS) against the codebook panels (npanels, dp / 2, 64) of bf16 pairs: codeword
   j = 64 p + l has v_ij = csq[j] - 2 <q_i, b_j> (fp32), and its exact objective within
   e_ij = aq[i] pw[j] + rq[i] qw[j] + sw[j] of it (padding: csq inf, weights 0). Every j whose lower
   bound v - e reaches the least upper bound v + e over all codewords, in ascending j, goes to
   cand[i, :count[i]] (count -1: more than cap). Returns -1 where the CPU lacks AVX-512 BF16. */
int bf16_scan_l2(const uint16_t *q, int64_t n, int64_t dp, const uint32_t *panels, int64_t npanels,
                 const float *csq, const float *pw, const float *qw, const float *sw, const float *aq,
                 const float *rq, int32_t *cand, float *cand_lo, int32_t *count, int cap, int threads) {
#if BF16_SCAN
    const int64_t steps = dp / 2;
    const int64_t blocks = (n + SCAN_BLOCK - 1) / SCAN_BLOCK;
    const __m512 slack = _mm512_set1_ps(0x1p-23f);
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t r0 = blk * SCAN_BLOCK, r1 = r0 + SCAN_BLOCK < n ? r0 + SCAN_BLOCK : n;
        float upper[SCAN_BLOCK];
        for (int64_t i = r0; i < r1; ++i) { upper[i - r0] = INFINITY; count[i] = 0; }
        for (int64_t p = 0; p < npanels; ++p) {
            const uint32_t *panel = panels + p * steps * 64;
            for (int64_t t0 = r0; t0 < r1; t0 += SCAN_ROWS) {
                const uint16_t *qt = q + t0 * dp;
                __m512 acc[SCAN_ROWS][4];
                for (int r = 0; r < SCAN_ROWS; ++r)
                    for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_ps();
                for (int64_t t = 0; t < steps; ++t) {
                    const uint32_t *b = panel + t * 64;
                    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
                    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 16);
                    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 32);
                    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(b + 48);
                    for (int r = 0; r < SCAN_ROWS; ++r) {
                        int32_t pair;
                        memcpy(&pair, qt + r * dp + 2 * t, 4);
                        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
                        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
                        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
                    }
                }
                for (int r = 0; r < SCAN_ROWS && t0 + r < r1; ++r) {
                    const int64_t i = t0 + r;
                    const __m512 ai = _mm512_set1_ps(aq[i]), ri = _mm512_set1_ps(rq[i]);
                    __m512 lo[4], up[4];
                    for (int s = 0; s < 4; ++s) {
                        const int64_t j = p * 64 + s * 16;
                        const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(csq + j), _mm512_add_ps(acc[r][s], acc[r][s]));
                        __m512 e = _mm512_add_ps(_mm512_mul_ps(ai, _mm512_loadu_ps(pw + j)),
                                                 _mm512_add_ps(_mm512_mul_ps(ri, _mm512_loadu_ps(qw + j)),
                                                               _mm512_loadu_ps(sw + j)));
                        /* widened for the fp32 roundings of e and of v +- e (all terms >= 0) */
                        e = _mm512_add_ps(e, _mm512_mul_ps(_mm512_add_ps(_mm512_and_ps(v, sign), e), slack));
                        up[s] = _mm512_add_ps(v, e);
                        lo[s] = _mm512_sub_ps(v, e);
                    }
                    const float u = _mm512_reduce_min_ps(_mm512_min_ps(_mm512_min_ps(up[0], up[1]), _mm512_min_ps(up[2], up[3])));
                    float *best = &upper[i - r0];
                    if (u < *best) *best = u;
                    const __m512 bound = _mm512_set1_ps(*best);
                    for (int s = 0; s < 4; ++s) {
                        __mmask16 m = _mm512_cmp_ps_mask(lo[s], bound, _CMP_LE_OQ);
                        if (!m) continue;
                        float lows[16];
                        _mm512_storeu_ps(lows, lo[s]);
                        while (m) {
                            const int bit = __builtin_ctz(m);
                            m &= m - 1;
                            scan_push(cand + i * cap, cand_lo + i * cap, count + i, cap, (int32_t)(p * 64 + s * 16 + bit),
                                      lows[bit], *best);
                        }
                    }
                }
            }
        }
        for (int64_t i = r0; i < r1; ++i) {  /* the final upper bound: drop what it excludes */
            if (count[i] < 0) continue;
            int32_t *c = cand + i * cap, w = 0;
            float *cl = cand_lo + i * cap;
            for (int32_t t = 0; t < count[i]; ++t)
                if (cl[t] <= upper[i - r0]) { c[w] = c[t]; cl[w] = cl[t]; ++w; }
            count[i] = w;
        }
    }
    return 0;
#else
    (void)q; (void)n; (void)dp; (void)panels; (void)npanels; (void)csq; (void)pw; (void)qw; (void)sw; (void)aq;
    (void)rq; (void)cand; (void)cand_lo; (void)count; (void)cap; (void)threads;
    return -1;
#endif
}

/* sum_j (a_j - b_j)^2 in double from fp32 rows (exact differences of the widened values, exact
   squares' roundings as torch's): 32 partial sums, four vector accumulators that keep the adds'
   latency off the critical path */
static inline double sq_dist_f64(const float *a, const float *b, int64_t d) {
    double acc[32] = {0};
    int64_t j = 0;
    for (; j + 32 <= d; j += 32)
        for (int l = 0; l < 32; ++l) { const double u = (double)a[j + l] - (double)b[j + l]; acc[l] += u * u; }
    for (; j + 8 <= d; j += 8)
        for (int l = 0; l < 8; ++l) { const double u = (double)a[j + l] - (double)b[j + l]; acc[l] += u * u; }
    for (; j < d; ++j) { const double u = (double)a[j] - (double)b[j]; acc[j & 7] += u * u; }
    for (int l = 0; l < 16; ++l) acc[l] += acc[l + 16];
    for (int l = 0; l < 8; ++l) acc[l] += acc[l + 8];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* For each query i with count[i] > 0: of its candidates (codebook rows ids[cand[i, t]], or
   cand[i, t] with ids NULL), the one with the least float64 sum_j (x_ij - c_j)^2 from the fp32
   rows (sq_dist_f64's partial sums), the lowest id on ties: out_id[i], out_dist[i].
   The differences and squares are the single IEEE operations torch computes too; only the order
   of the sum differs, which moves a sum of d non-negative terms by less than its gamma_d share.
   near[i] = 1 where another candidate's sum is within `margin` times the best one (a summation
   order could rank them the other way) or where the best sum's fp32 rounding is that close to a
   boundary: the caller re-ranks those rows in torch's order. */
void rerank_l2_f64(const float *x, int64_t ldx, const float *c, int64_t ldc, int64_t n, int64_t d, const int64_t *ids,
                   const int32_t *cand, const int32_t *count, int cap, double margin, int64_t *out_id, double *out_dist,
                   int8_t *near, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
        near[i] = 0;
        if (count[i] <= 0) continue;
        const float *xr = x + i * ldx;
        int64_t best_id = -1;
        double best = INFINITY, second = INFINITY;
        for (int32_t t = 0; t < count[i]; ++t) {
            const int64_t id = ids ? ids[cand[(int64_t)i * cap + t]] : cand[(int64_t)i * cap + t];
            const float *cr = c + id * ldc;
            const double s = sq_dist_f64(xr, cr, d);
            if (s < best || (s == best && id < best_id)) { second = best; best = s; best_id = id; }
            else if (s < second) second = s;
        }
        out_id[i] = best_id;
        out_dist[i] = best;
        /* near: a second candidate within the margin, or a best sum that another order could
           round to another fp32 distance (the margin's square root spans any order's sum) */
        const double spread = sqrt(margin);
        near[i] = second <= best * margin || (float)(best / spread) != (float)(best * spread);
    }
}
/* ---- u2.nearest's direct l2 scan for small codebooks: fp32 differences, certified in float64 ---- */
/* the direct scan's vectors: one register wide (GCC / clang vector extensions; a wider type
   than the CPU's registers is lowered piecewise, an order of magnitude slower: measured) */
#if defined(__AVX512F__)
#define VLANES 16
#elif defined(__AVX__)
#define VLANES 8
#else
#define VLANES 4
#endif
/* queries per tile: their DIRECT_ROWS x DIRECT_PARTS accumulators, the codeword vectors, a broadcast
   and a difference fill the 16 (AVX2) or 32 (AVX-512) vector registers (AVX2: 12 accumulators, 8
   loads per 96 products instead of 6 per 64 with 4 rows) */
#define DIRECT_ROWS (VLANES == 4 ? 4 : 6)
typedef float vf32 __attribute__((vector_size(4 * VLANES)));
typedef int32_t vi32 __attribute__((vector_size(4 * VLANES)));
typedef float vf32u __attribute__((vector_size(4 * VLANES), aligned(4), may_alias));  /* unaligned vector access */
/* (a memcpy into a vector array went through the stack as 16-byte pieces: a store-forwarding
   stall on every step, 4.5x slower on AVX2) */
static inline vf32 vload(const float *p) { return *(const vf32u *)p; }
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
/* lane-wise mask ? a : b (mask lanes all ones or zero, as vector comparisons give) */
static inline vf32 vselect(vi32 mask, vf32 a, vf32 b) {
    return (vf32)(((vi32)a & mask) | ((vi32)b & ~mask));
}
/* bit l set where lane l of a is <= lim */
static inline uint32_t vmask_le(vf32 a, float lim) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)a, _mm512_set1_ps(lim), _CMP_LE_OQ);
#elif defined(__AVX__)
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, _mm256_set1_ps(lim), _CMP_LE_OQ));
#else
    uint32_t m = 0;
    for (int l = 0; l < VLANES; ++l) m |= (uint32_t)(a[l] <= lim) << l;
    return m;
#endif
}
/* bit l set where lane l of a is >= lim */
static inline uint32_t vmask_ge(vf32 a, float lim) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)a, _mm512_set1_ps(lim), _CMP_GE_OQ);
#elif defined(__AVX__)
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, _mm256_set1_ps(lim), _CMP_GE_OQ));
#else
    uint32_t m = 0;
    for (int l = 0; l < VLANES; ++l) m |= (uint32_t)(a[l] >= lim) << l;
    return m;
#endif
}
/* acc + v v with one rounding where the CPU fuses it (its add pipes take the subtractions: the
   loop then runs at the fp32 GEMM's element rate on CPUs with separate add units), else two */
static inline vf32 vfma(vf32 v, vf32 acc) {
#if defined(__AVX512F__)
    return (vf32)_mm512_fmadd_ps((__m512)v, (__m512)v, (__m512)acc);
#elif defined(__FMA__)
    return (vf32)_mm256_fmadd_ps((__m256)v, (__m256)v, (__m256)acc);
#else
    return acc + v * v;
#endif
}
/* v in every lane, broadcast from memory (as (vf32){0} + v it was a scalar add of zero -- not an
   identity for v = -0 -- and a register shuffle per use: half the dot-product loop's rate on AVX2) */
static inline vf32 vsplat(float v) {
#if defined(__AVX512F__)
    return (vf32)_mm512_set1_ps(v);
#elif defined(__AVX__)
    return (vf32)_mm256_set1_ps(v);
#else
    return (vf32){v, v, v, v};
#endif
}
/* acc + a b, fused where the CPU has FMA */
static inline vf32 vfma2(vf32 a, vf32 b, vf32 acc) {
#if defined(__AVX512F__)
    return (vf32)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
    return (vf32)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b;
#endif
}
#define DIRECT_PANEL 16  /* codewords per panel: 16 / VLANES vectors of fp32 sums per query */
#define DIRECT_PARTS (DIRECT_PANEL / VLANES)
#define DIRECT_MAX_K 4096  /* (the per-tile sums: 6 x 4,112 floats, 99 KB of a thread's stack) */
#define DIRECT_NEAR_CAP 64

/* A query's near-tie list for the caller's ranking in torch's order, where `flag`: the kept
   candidates (value[t], which[t], t < min(kept, DIRECT_NEAR_CAP)) whose value is <= `within`, into
   list; returns their count, -1 where more than DIRECT_NEAR_CAP were kept, 0 without `flag`. */
static inline int32_t near_list(int flag, int64_t kept, const double *value, const int32_t *which, double within,
                                int32_t *list) {
    if (!flag) return 0;
    if (kept > DIRECT_NEAR_CAP) return -1;
    int32_t w = 0;
    for (int64_t t = 0; t < kept; ++t)
        if (value[t] <= within) list[w++] = which[t];
    return w;
}

/* panels (npanels, d, DIRECT_PANEL): codeword j = 16 p + l at panels[(p d + t) 16 + l] = c[j, t]
   (padding: zero; its sums are never read) */
void direct_pack(const float *c, int64_t ldc, int64_t k, int64_t d, float *panels) {
    const int64_t npanels = (k + DIRECT_PANEL - 1) / DIRECT_PANEL;
    for (int64_t p = 0; p < npanels; ++p)
        for (int64_t t = 0; t < d; ++t)
            for (int l = 0; l < DIRECT_PANEL; ++l) {
                const int64_t j = p * DIRECT_PANEL + l;
                panels[(p * d + t) * DIRECT_PANEL + l] = j < k ? c[j * ldc + t] : 0.0f;
            }
}

/* Exact l2 nearest codewords of the queries x (n rows) among the k <= DIRECT_MAX_K rows of c.
   s_ij = the fp32 sum over t of fl32(x_it - c_jt)^2 (a fused or a separate multiply-add per term):
   all terms are non-negative, so |s - f| <= g f + a (f the exact squared distance, g the relative
   bound of d + 3 roundings, a the subnormal roundings' absolute bound), unlike the dot-product form
   whose error grows with ||x|| ||c||. Every j with s_j / (1 + g) - a <= s_min / (1 - g) + a is a
   candidate (all of them where s_min overflowed), widened by the float64 ranking's own error: the
   candidates are ranked by sq_dist_f64 from the original rows (lowest index on ties) into out_id /
   out_dist. Where another candidate is within `margin` of the best or the best's fp32 rounding is
   that close to a boundary (see rerank_l2_f64), near[i, :count[i]] lists the candidates within the
   margin, which the caller ranks again in torch's order (count -1: more than DIRECT_NEAR_CAP
   candidates, the caller ranks every codeword); count[i] = 0 elsewhere. Returns how many rows have
   count[i] != 0. Takes d < 2^20. */
int64_t direct_l2(const float *x, int64_t ldx, const float *c, int64_t ldc, const float *panels, int64_t n,
                  int64_t k, int64_t d, double margin, int64_t *out_id, double *out_dist, int32_t *near,
                  int32_t *count, int threads) {
    int64_t flagged = 0;
    const int64_t npanels = (k + DIRECT_PANEL - 1) / DIRECT_PANEL;
    const int64_t tiles = (n + DIRECT_ROWS - 1) / DIRECT_ROWS;
    const double u = 0x1p-24, g = 1.01 * (d + 3) * u / (1.0 - (d + 3) * u), a = (d + 1) * 0x1p-149;
    /* h: the float64 ranking's own error (sq_dist_f64 errs by gamma_d relative): its argmin's exact
       distance is within 1 + h of the least one; 2^-40 covers the roundings of the limit itself */
    const double h = 2.02 * (d + 2) * 0x1p-53;
    const double spread = sqrt(margin), grow = (1.0 + g) * (1.0 + h) / (1.0 - g) * (1.0 + 0x1p-40);
    const vf32 vinf = (vf32){0} + INFINITY;
    const vi32 all_valid = (vi32){0} - 1;
    vi32 last_valid[DIRECT_PARTS];
    for (int part = 0; part < DIRECT_PARTS; ++part)
        for (int l = 0; l < VLANES; ++l)
            last_valid[part][l] = (npanels - 1) * DIRECT_PANEL + part * VLANES + l < k ? -1 : 0;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+:flagged)
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t i0 = tile * DIRECT_ROWS;
        const float *xr[DIRECT_ROWS];
        for (int r = 0; r < DIRECT_ROWS; ++r) xr[r] = x + (i0 + r < n ? i0 + r : n - 1) * ldx;
        float sums[DIRECT_ROWS][DIRECT_MAX_K + DIRECT_PANEL];
        vf32 low[DIRECT_ROWS];  /* lane-wise minima of the row's sums (no scalar chain of k compares) */
        for (int r = 0; r < DIRECT_ROWS; ++r) low[r] = vinf;
        for (int64_t p = 0; p < npanels; ++p) {
            const float *panel = panels + p * d * DIRECT_PANEL;
            vf32 acc[DIRECT_ROWS][DIRECT_PARTS];
            for (int r = 0; r < DIRECT_ROWS; ++r)
                for (int part = 0; part < DIRECT_PARTS; ++part) acc[r][part] = (vf32){0};
            for (int64_t t = 0; t < d; ++t) {
                vf32 ct[DIRECT_PARTS];
                for (int part = 0; part < DIRECT_PARTS; ++part) ct[part] = vload(panel + t * DIRECT_PANEL + part * VLANES);
                for (int r = 0; r < DIRECT_ROWS; ++r) {
                    const float xv = xr[r][t];
                    for (int part = 0; part < DIRECT_PARTS; ++part) acc[r][part] = vfma(xv - ct[part], acc[r][part]);
                }
            }
            for (int r = 0; r < DIRECT_ROWS; ++r)
                for (int part = 0; part < DIRECT_PARTS; ++part) {
                    /* padding codewords: inf */
                    const vf32 v = vselect(p == npanels - 1 ? last_valid[part] : all_valid, acc[r][part], vinf);
                    low[r] = vselect(v < low[r], v, low[r]);
                    *(vf32u *)(sums[r] + p * DIRECT_PANEL + part * VLANES) = v;
                }
        }
        for (int r = 0; r < DIRECT_ROWS && i0 + r < n; ++r) {
            const int64_t i = i0 + r;
            const float *s = sums[r];
            float smin = INFINITY;
            for (int l = 0; l < VLANES; ++l) smin = low[r][l] < smin ? low[r][l] : smin;
            /* (an overflowed minimum keeps every codeword) */
            const double limit = isfinite(smin) ? ((double)smin + a) * grow + a * (1.0 + 0x1p-40) : INFINITY;
            float flimit = (float)limit;  /* the largest float <= limit: s <= flimit iff (double)s <= limit */
            if ((double)flimit > limit) flimit = nextafterf(flimit, -INFINITY);
            /* a limit past fp32's range keeps the sums that overflowed to inf too: their exact distance
               may still be below the winner's (the bound holds only for sums that did not overflow) */
            if (limit > FLT_MAX) flimit = INFINITY;
            int64_t best_id = 0, kept = 0;
            double best = INFINITY, second = INFINITY, value[DIRECT_NEAR_CAP];
            int32_t which[DIRECT_NEAR_CAP];
            for (int64_t j0 = 0; j0 < npanels * DIRECT_PANEL; j0 += VLANES) {
                for (uint32_t m = vmask_le(vload(s + j0), flimit); m; m &= m - 1) {  /* ascending j */
                    const int64_t j = j0 + __builtin_ctz(m);
                    if (j >= k) break;  /* padding (inf: reached only by an infinite limit) */
                    const double e = sq_dist_f64(xr[r], c + j * ldc, d);
                    if (kept < DIRECT_NEAR_CAP) { value[kept] = e; which[kept] = (int32_t)j; }
                    ++kept;
                    if (e < best) { second = best; best = e; best_id = j; }
                    else if (e < second) second = e;
                }
            }
            out_id[i] = best_id;
            out_dist[i] = best;
            count[i] = near_list(second <= best * margin || (float)(best / spread) != (float)(best * spread),
                                 kept, value, which, best * margin, near + i * DIRECT_NEAR_CAP);
            flagged += count[i] != 0;
        }
    }
    return flagged;
}

/* Exact ip / cos nearest codewords (the least -<x, c> or -cos(x, c)) among the k <= DIRECT_MAX_K
   codewords. The scanned rows -- the queries x and the panels' codewords as given for ip, both over
   their float64 norms and rounded to fp32 for cos (the queries here, in a per-thread scratch) --
   give s_ij = the fp32 sum of fused products, within e_ij = g ||xs_i|| cb[j] + a of the exact
   <xs_i, cs_j> (g: the d-term sum's bound and, for cos, the normalised rows' roundings; cb[j] >=
   ||cs_j||; a: subnormal roundings), and e_ij <= E_i = g ||xs_i|| max cb + a. So the exact optimum
   is at least smax_i - E_i, and every j with s_j >= smax_i - 2 E_i - (the float64 ranking's margin)
   is a candidate (every codeword where a sum is NaN or infinite, or the bound is); the candidates are ranked by the
   float64 objective from the original rows c: -sum_t x_t c_t (ip) or that over ||x|| cnorm[j] (cos),
   the lowest index on ties, into out_id / out_obj. dev bounds how far two float64 evaluations of
   one objective can differ (times ||x|| max cnorm for ip); where another candidate is within 2 dev
   of the best, or the returned fp32 distance (obj for ip, 1 + obj for cos) could round the other
   way, near[i, :count[i]] lists the candidates within 2 dev (count -1: more than DIRECT_NEAR_CAP)
   for the caller's ranking in torch's order. Returns how many rows have count[i] != 0, or -1 where
   the scratch memory could not be had. */
int64_t direct_dot(const float *x, int64_t ldx, const float *c, int64_t ldc, const double *cnorm,
                   const float *panels, const float *cb, int64_t n, int64_t k, int64_t d, double g, double dev,
                   int cosine, int64_t *out_id, double *out_obj, int32_t *near, int32_t *count, int threads) {
    int64_t flagged = 0, failed = 0;
    const int64_t npanels = (k + DIRECT_PANEL - 1) / DIRECT_PANEL;
    const int64_t tiles = (n + DIRECT_ROWS - 1) / DIRECT_ROWS;
    const double a = (d + 1) * 0x1p-149, grow = 1.0 + 0x1p-40;
    double cmax = 0.0, cbmax = 0.0;
    for (int64_t j = 0; j < k; ++j) {
        cmax = cnorm[j] > cmax ? cnorm[j] : cmax;
        cbmax = cb[j] > cbmax ? cb[j] : cbmax;
    }
    const vf32 vninf = (vf32){0} - INFINITY;
    const vi32 all_valid = (vi32){0} - 1;
    vi32 last_valid[DIRECT_PARTS];
    for (int part = 0; part < DIRECT_PARTS; ++part)
        for (int l = 0; l < VLANES; ++l)
            last_valid[part][l] = (npanels - 1) * DIRECT_PANEL + part * VLANES + l < k ? -1 : 0;
    #pragma omp parallel num_threads(threads) reduction(+:flagged, failed)
    {
        float *scratch = cosine ? (float *)malloc((size_t)DIRECT_ROWS * (size_t)d * sizeof(float)) : NULL;
        float *zeros = (float *)calloc((size_t)d, sizeof(float));  /* (norms as distances to the origin) */
        if ((cosine && !scratch) || !zeros) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t tile = 0; tile < tiles; ++tile) {
            if ((cosine && !scratch) || !zeros) continue;
            const int64_t i0 = tile * DIRECT_ROWS;
            const float *xr[DIRECT_ROWS];
            double xn[DIRECT_ROWS], xb[DIRECT_ROWS];  /* ||x_i||, and >= ||xs_i|| */
            for (int r = 0; r < DIRECT_ROWS; ++r) {
                const float *xo = x + (i0 + r < n ? i0 + r : n - 1) * ldx;
                xn[r] = sqrt(sq_dist_f64(xo, zeros, d));
                if (cosine) {
                    /* x_t times the float64 reciprocal of ||x||: within 2^-52 of the quotient before the
                       fp32 rounding (the bound's 2.1 u allows for both) */
                    float *u = scratch + r * d;
                    const double inv = 1.0 / xn[r];
                    for (int64_t t = 0; t < d; ++t) u[t] = (float)((double)xo[t] * inv);
                    xr[r] = u;
                    xb[r] = sqrt(sq_dist_f64(u, zeros, d)) * grow;
                } else {
                    xr[r] = xo;
                    xb[r] = xn[r] * grow;
                }
            }
            float sums[DIRECT_ROWS][DIRECT_MAX_K + DIRECT_PANEL];
            vf32 high[DIRECT_ROWS];  /* lane-wise maxima of the row's sums */
            vi32 nan[DIRECT_ROWS];
            for (int r = 0; r < DIRECT_ROWS; ++r) { high[r] = vninf; nan[r] = (vi32){0}; }
            for (int64_t p = 0; p < npanels; ++p) {
                const float *panel = panels + p * d * DIRECT_PANEL;
                vf32 acc[DIRECT_ROWS][DIRECT_PARTS];
                for (int r = 0; r < DIRECT_ROWS; ++r)
                    for (int part = 0; part < DIRECT_PARTS; ++part) acc[r][part] = (vf32){0};
                for (int64_t t = 0; t < d; ++t) {
                    vf32 ct[DIRECT_PARTS];
                    for (int part = 0; part < DIRECT_PARTS; ++part) ct[part] = vload(panel + t * DIRECT_PANEL + part * VLANES);
                    for (int r = 0; r < DIRECT_ROWS; ++r) {
                        const vf32 xv = vsplat(xr[r][t]);
                        for (int part = 0; part < DIRECT_PARTS; ++part) acc[r][part] = vfma2(xv, ct[part], acc[r][part]);
                    }
                }
                for (int r = 0; r < DIRECT_ROWS; ++r)
                    for (int part = 0; part < DIRECT_PARTS; ++part) {
                        /* padding codewords: -inf (never the maximum, never a candidate) */
                        const vf32 v = vselect(p == npanels - 1 ? last_valid[part] : all_valid, acc[r][part], vninf);
                        high[r] = vselect(v > high[r], v, high[r]);
                        /* NaN, or a sum that overflowed to -inf (later terms could have brought the
                           exact value back): the row keeps every codeword */
                        nan[r] |= (vi32)(v != v) | ((vi32)(v == vninf) & (p == npanels - 1 ? last_valid[part] : all_valid));
                        *(vf32u *)(sums[r] + p * DIRECT_PANEL + part * VLANES) = v;
                    }
            }
            for (int r = 0; r < DIRECT_ROWS && i0 + r < n; ++r) {
                const int64_t i = i0 + r;
                const float *s = sums[r], *xo = x + i * ldx;
                float smax = -INFINITY;
                int bad = 0;
                for (int l = 0; l < VLANES; ++l) { smax = high[r][l] > smax ? high[r][l] : smax; bad |= nan[r][l] != 0; }
                /* margin: how far the float64 ranking's values can move (its argmin's exact objective
                   is within it of the least one, so the bounds widen by it too) */
                const double margin = cosine ? dev : dev * xn[r] * cmax * grow;
                const double spread = 2.0 * (g * xb[r] * cbmax * grow + a) * grow + margin * grow;
                /* (a spread that is not finite: a norm bound past fp32's range, 0 x inf for a zero query) */
                const int all = bad || !isfinite(smax) || !isfinite(spread);
                const double limit = all ? -INFINITY : ((double)smax - spread) - fabs((double)smax) * 0x1p-40;
                float flimit = (float)limit;  /* the least float >= limit: s >= flimit iff (double)s >= limit */
                if ((double)flimit < limit) flimit = nextafterf(flimit, INFINITY);
                if (all || limit < -FLT_MAX) flimit = -INFINITY;
                int64_t best_id = 0, kept = 0;
                double best = INFINITY, second = INFINITY, value[DIRECT_NEAR_CAP];
                int32_t which[DIRECT_NEAR_CAP];
                for (int64_t j0 = 0; j0 < npanels * DIRECT_PANEL; j0 += VLANES) {
                    uint32_t m = all ? (1u << VLANES) - 1 : vmask_ge(vload(s + j0), flimit);
                    for (; m; m &= m - 1) {  /* ascending j */
                        const int64_t j = j0 + __builtin_ctz(m);
                        if (j >= k) break;  /* padding */
                        const float *cr = c + j * ldc;
                        double acc64[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                        int64_t t = 0;
                        for (; t + 8 <= d; t += 8)
                            for (int l = 0; l < 8; ++l) acc64[l] += (double)xo[t + l] * cr[t + l];
                        for (; t < d; ++t) acc64[0] += (double)xo[t] * cr[t];
                        double e = -(((acc64[0] + acc64[1]) + (acc64[2] + acc64[3])) + ((acc64[4] + acc64[5]) + (acc64[6] + acc64[7])));
                        if (cosine) e /= xn[r] * cnorm[j];
                        if (kept < DIRECT_NEAR_CAP) { value[kept] = e; which[kept] = (int32_t)j; }
                        ++kept;
                        if (e < best) { second = best; best = e; best_id = j; }
                        else if (e < second) second = e;
                    }
                }
                out_id[i] = best_id;
                out_obj[i] = best;
                const double lo = cosine ? 1.0 + (best - margin) : best - margin;
                const double hi = cosine ? 1.0 + (best + margin) : best + margin;
                /* (margin 0: a zero query, whose objectives are all exactly 0 in any order, so its
                   ties -- flat black patches: every codeword -- need no second ranking) */
                count[i] = near_list((margin > 0.0 && second <= best + 2.0 * margin) || (float)lo != (float)hi,
                                     kept, value, which, best + 2.0 * margin, near + i * DIRECT_NEAR_CAP);
                flagged += count[i] != 0;
            }
        }
        free(scratch);
        free(zeros);
    }
    return failed ? -1 : flagged;
}

/* ---- u2.nearest's flat scan past its fp32 GEMM: running minimum and kept candidates per query ---- */
/* One (rows x cols) block of fp32 dot products g (row stride ldg) of queries against the scanned
   codewords col0 .. col0 + cols - 1: objective v = sq[j] - coef g (l2: coef 2 and sq the codewords'
   fp32 squared norms, as torch.addmm evaluates it; ip / cos: sq NULL, v = -g). Per query i:
   best[i], the least v so far (+inf before the first block), and every codeword with
   v <= best[i] + margin[i] + 16 u64 (|best[i]| + offset[i] + margin[i]) (the threshold rounded up
   to fp32) in cand_v / cand_c[i * cap ...], count[i] of them; count[i] = -1 once more than cap
   lay within that threshold at the end of a block (the caller settles that query another way).
   Entries past the threshold are dropped as best falls. Each row is owned by one thread: results do not depend on the count. */
void gemm_keep(const float *g, int64_t ldg, int64_t rows, int64_t cols, int64_t col0, const float *sq, float coef,
               const double *margin, const double *offset, double *best, float *cand_v, int64_t *cand_c,
               int32_t *count, int32_t cap, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *gr = g + i * ldg;
        vf32 m = vsplat(INFINITY);
        int64_t j = 0;
        if (sq) {
            const vf32 cv = vsplat(coef);
            for (; j + VLANES <= cols; j += VLANES) {
                vf32 v = vload(sq + j) - cv * vload(gr + j);
                m = vselect((vi32)(v < m), v, m);
            }
        } else {
            for (; j + VLANES <= cols; j += VLANES) {
                vf32 v = -vload(gr + j);
                m = vselect((vi32)(v < m), v, m);
            }
        }
        float least = INFINITY;
        for (int l = 0; l < VLANES; ++l) least = m[l] < least ? m[l] : least;
        for (; j < cols; ++j) {
            float v = sq ? sq[j] - coef * gr[j] : -gr[j];
            least = v < least ? v : least;
        }
        double b = best[i] < (double)least ? best[i] : (double)least;
        best[i] = b;
        double t = b + margin[i];
        t += 16.0 * (DBL_EPSILON / 2) * (fabs(b) + fabs(offset[i]) + fabs(margin[i]));
        float tf = (float)t;
        if ((double)tf < t) tf = nextafterf(tf, INFINITY);
        int32_t c = count[i];
        if (c > cap) c = -1;  /* (a count past the list: never written, treated as overflowed) */
        if (c < 0) { count[i] = c; continue; }
        float *cv_row = cand_v + i * cap;
        int64_t *cc_row = cand_c + i * cap;
        int32_t w = 0;  /* the kept entries still within the (lower) threshold */
        for (int32_t e = 0; e < c; ++e)
            if (cv_row[e] <= tf) { cv_row[w] = cv_row[e]; cc_row[w] = cc_row[e]; ++w; }
        c = w;
        j = 0;
        for (; j + VLANES <= cols && c >= 0; j += VLANES) {
            vf32 v = sq ? vload(sq + j) - vsplat(coef) * vload(gr + j) : -vload(gr + j);
            uint32_t hit = vmask_le(v, tf);
            while (hit && c >= 0) {
                int l = __builtin_ctz(hit);
                hit &= hit - 1;
                if (c == cap) { c = -1; break; }
                cv_row[c] = v[l]; cc_row[c] = col0 + j + l; ++c;
            }
        }
        for (; j < cols && c >= 0; ++j) {
            float v = sq ? sq[j] - coef * gr[j] : -gr[j];
            if (v <= tf) {
                if (c == cap) { c = -1; break; }
                cv_row[c] = v; cc_row[c] = col0 + j; ++c;
            }
        }
        count[i] = c;
    }
}
"""

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp")
#: below this many elements a call runs on one thread (waking the others costs more)
PARALLEL_ELEMENTS = 1 << 16
COMPILE_TIMEOUT_S = 120

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None


def cache_dir() -> str:
    """Where the compiled library is kept: ``$UNICODE2_FAST_CACHE_DIR``, else ``~/.cache/unicode2_fast``."""
    configured = os.environ.get("UNICODE2_FAST_CACHE_DIR")
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unicode2_fast")


def _compiler() -> list:
    """The C compiler command: ``$CC`` split as a shell would (``ccache gcc``), else ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: list) -> str:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = "\n".join([SOURCE, " ".join(FLAGS), version, _cpu_flags(), platform.machine()])
    return os.path.join(cache_dir(), f"native-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    path = _library_path(compiler)
    if os.path.exists(path):
        try:
            return _bind(ctypes.CDLL(path))
        except OSError:  # a cached file that does not load here (another glibc, damaged): rebuild it
            os.remove(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as work:
            source = os.path.join(work, "native.c")
            with open(source, "w") as f:
                f.write(SOURCE)
            built = os.path.join(work, "native.so")
            # a compiler without OpenMP (Apple's clang) still builds the loop, single-threaded
            for flags in (FLAGS, tuple(flag for flag in FLAGS if flag != "-fopenmp")):
                run = subprocess.run([*compiler, *flags, source, "-o", built, "-lm"], capture_output=True, text=True,
                                     timeout=COMPILE_TIMEOUT_S)
                if run.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{' '.join(compiler)} failed ({run.returncode}): {run.stderr.strip()[-500:]}")
            os.replace(built, path)  # atomic: another process sees no file or the whole library
    return _bind(ctypes.CDLL(path))


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the loops' C signatures on a loaded library."""
    library.row_adamw_f32.argtypes = [_P] * 7 + [_I] * 2 + [_F] * 5 + [ctypes.c_int]
    library.row_adamw_f32.restype = None
    library.filter_epilogue.argtypes = [_P, _P, ctypes.c_int32, _I, _I, _P, _P, _P, _P, _P, _I, ctypes.c_int]
    library.filter_epilogue.restype = None
    library.row_sums_f64.argtypes = [_P, _I, _I, _P, _P, ctypes.c_int]
    library.row_sums_f64.restype = None
    library.cluster_sums_f64.argtypes = [_P, _I, _I, _I, _P, _P, ctypes.c_int]
    library.cluster_sums_f64.restype = None
    library.bf16_scan_available.argtypes = []
    library.bf16_scan_available.restype = ctypes.c_int
    library.bf16_pack_rows.argtypes = [_P, _I, _I, _I, _P, _P, _I, _I, _P, _P, ctypes.c_int]
    library.bf16_pack_rows.restype = None
    library.bf16_scan_l2.argtypes = [_P, _I, _I, _P, _I] + [_P] * 9 + [ctypes.c_int] * 2
    library.bf16_scan_l2.restype = ctypes.c_int
    library.rerank_l2_f64.argtypes = [_P, _I, _P, _I, _I, _I, _P, _P, _P, ctypes.c_int, ctypes.c_double, _P, _P, _P,
                                      ctypes.c_int]
    library.rerank_l2_f64.restype = None
    library.direct_pack.argtypes = [_P, _I, _I, _I, _P]
    library.direct_pack.restype = None
    library.direct_l2.argtypes = [_P, _I, _P, _I, _P, _I, _I, _I, ctypes.c_double, _P, _P, _P, _P, ctypes.c_int]
    library.direct_l2.restype = ctypes.c_int64
    library.direct_dot.argtypes = [_P, _I, _P, _I, _P, _P, _P, _I, _I, _I, ctypes.c_double, ctypes.c_double,
                                   ctypes.c_int, _P, _P, _P, _P, ctypes.c_int]
    library.direct_dot.restype = ctypes.c_int64
    library.gemm_keep.argtypes = [_P, _I, _I, _I, _I, _P, _F, _P, _P, _P, _P, _P, _P, ctypes.c_int32, ctypes.c_int]
    library.gemm_keep.restype = None
    return library


def _load() -> Optional[ctypes.CDLL]:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
                _failure = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"unicode2_fast: the compiled CPU loops are unavailable ({_failure}); SparseRowAdamW and "
                    f"u2.nearest's CPU filters use their slower torch paths. "
                    f"Set CC to a working C compiler, or UNICODE2_FAST_CACHE_DIR to a writable folder.",
                    RuntimeWarning, stacklevel=3,
                )
    return _library


def available() -> bool:
    """Whether the compiled loops load (compiles them on the first call, about half a second)."""
    return _load() is not None


def failure() -> Optional[str]:
    """Why the loops are unavailable (None when they loaded or were not tried yet)."""
    return _failure


def _threads(rows: int, row_elements: int) -> int:
    """OpenMP threads for a call: torch's intra-op thread count, one for small calls."""
    return 1 if rows * row_elements < PARALLEL_ELEMENTS else max(1, min(torch.get_num_threads(), rows))


def _require(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if tensor.device.type != "cpu" or tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"native loops need a contiguous CPU {dtype} {name}, got {tensor.dtype} on "
                         f"{tensor.device} (contiguous: {tensor.is_contiguous()})")


def row_adamw_fp32(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_ids: torch.Tensor,
                   grad_rows: torch.Tensor, neg_step: torch.Tensor, bias_correction2_sqrt: torch.Tensor, *,
                   decay: float, beta1: float, beta2: float, eps: float) -> None:
    """AdamW on the **unique** rows ``row_ids`` of ``param`` / ``exp_avg`` / ``exp_avg_sq``, in place.

    Shapes: param and moments (K, d) fp32 contiguous; row_ids (U,) int64 in [0, K), no repeats
    (rows are split over threads: a repeated id would be written by two of them);
    grad_rows (U, d) fp32; neg_step and bias_correction2_sqrt (U,) fp32, per row.
    ``decay``: 1 - lr * weight_decay (1.0 applies none).
    """
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    for tensor, dtype, name in ((param, torch.float32, "param"), (exp_avg, torch.float32, "exp_avg"),
                                (exp_avg_sq, torch.float32, "exp_avg_sq"), (row_ids, torch.int64, "row_ids"),
                                (grad_rows, torch.float32, "grad_rows"), (neg_step, torch.float32, "neg_step"),
                                (bias_correction2_sqrt, torch.float32, "bias_correction2_sqrt")):
        _require(tensor, dtype, name)
    rows, d = grad_rows.shape
    k = param.shape[0]
    if (param.dim() != 2 or param.shape[1] != d or exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape
            or row_ids.shape != (rows,) or neg_step.shape != (rows,) or bias_correction2_sqrt.shape != (rows,)):
        raise ValueError("row_adamw_fp32: inconsistent shapes")
    if rows and (int(row_ids.min()) < 0 or int(row_ids.max()) >= k):
        raise ValueError(f"row_adamw_fp32: row ids outside [0, {k})")
    pointers = [t.data_ptr() for t in (param, exp_avg, exp_avg_sq, row_ids, grad_rows, neg_step,
                                       bias_correction2_sqrt)]
    library.row_adamw_f32(*pointers, rows, d, decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, _threads(rows, d))



def filter_epilogue(hi: torch.Tensor, lo: Optional[torch.Tensor], base: int, cscale: torch.Tensor,
                    csq: Optional[torch.Tensor], neg: torch.Tensor, approx: torch.Tensor, minima: torch.Tensor,
                    width: int) -> None:
    """One block of u2.nearest's integer filter, finished in one pass (see the C source).

    Shapes: hi, lo (m, w) int32 contiguous (lo None: int8, else int8x2 with ``base`` = X2_BASE);
    cscale, csq (w,) fp32 (csq None: ip / cos); neg (m,) fp32; approx (m, w) fp32 out; minima
    (m, ceil(w / width)) fp32 out.
    """
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    checks = [(hi, torch.int32, "hi"), (cscale, torch.float32, "cscale"), (neg, torch.float32, "neg"),
              (approx, torch.float32, "approx"), (minima, torch.float32, "minima")]
    checks += [(t, dtype, name) for t, dtype, name in ((lo, torch.int32, "lo"), (csq, torch.float32, "csq"))
               if t is not None]
    for tensor, dtype, name in checks:
        _require(tensor, dtype, name)
    m, w = hi.shape
    if approx.shape != (m, w) or (lo is not None and lo.shape != (m, w)) or cscale.shape != (w,) \
            or neg.shape != (m,) or minima.shape != (m, -(-w // width)) or (csq is not None and csq.shape != (w,)):
        raise ValueError(f"filter_epilogue: inconsistent shapes for a ({m}, {w}) block")
    pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    library.filter_epilogue(hi.data_ptr(), pointer(lo), base, m, w, cscale.data_ptr(), pointer(csq), neg.data_ptr(),
                            approx.data_ptr(), minima.data_ptr(), width, _threads(m, w))


def row_norms_f64(v: torch.Tensor, center: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """(n,) float64 row norms of fp32 rows ``v: (n, d)`` (``center`` None), or squared distances
    from the float64 ``center: (d,)``, summed in float64 in one pass; None where the loops are
    unavailable or ``v`` is not a contiguous fp32 CPU tensor (the caller uses torch)."""
    if v.dtype != torch.float32 or v.device.type != "cpu" or v.dim() != 2:
        return None  # (checked first: other tensors never compile the loops)
    library = _load()
    if library is None:
        return None
    v = v.contiguous()
    n, d = v.shape
    out = torch.empty(n, dtype=torch.float64)
    if center is not None:
        center = center.to(torch.float64).contiguous()
        if center.shape != (d,):
            raise ValueError(f"row_norms_f64: center of shape {tuple(center.shape)} for rows of length {d}")
    library.row_sums_f64(v.data_ptr(), n, d, None if center is None else center.data_ptr(), out.data_ptr(),
                         _threads(n, d))
    return out


def cluster_sums_f64(x: torch.Tensor, ids: torch.Tensor, sums: torch.Tensor) -> bool:
    """``sums.index_add_(0, ids, x.double())`` for fp32 rows ``x: (n, d)`` (unit column stride) into
    contiguous float64 ``sums: (k, d)``, ids (n,) int64 in [0, k): the same sums bit for bit, in one
    pass with no float64 copy of x. False (nothing done) where the loops are unavailable or the
    tensors are not of that kind (the caller uses torch)."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1
            or ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous()
            or sums.dtype != torch.float64 or not sums.is_contiguous() or sums.device.type != "cpu"):
        return False
    library = _load()
    if library is None:
        return False
    n, d = x.shape
    if ids.shape != (n,) or sums.dim() != 2 or sums.shape[1] != d:
        raise ValueError(f"cluster_sums_f64: rows {tuple(x.shape)}, ids {tuple(ids.shape)}, sums {tuple(sums.shape)}")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= sums.shape[0]):
        raise ValueError(f"cluster_sums_f64: ids outside [0, {sums.shape[0]})")
    if n and d:
        library.cluster_sums_f64(x.data_ptr(), n, d, x.stride(0), ids.data_ptr(), sums.data_ptr(),
                                 _threads(n, d) if d >= 128 else 1)
    return True


def norms64(v: torch.Tensor) -> torch.Tensor:
    """(R,) float64 norms of the rows of ``v: (R, d)``: :func:`row_norms_f64` for fp32 rows, torch's
    float64 norm otherwise (which casts the rows first: ~30x slower on fp32 rows)."""
    out = row_norms_f64(v)
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64) if out is None else out


def sq_dist64(v: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(R,) float64 squared distances of the rows of ``v: (R, d)`` from ``center: (d,)``, in float64."""
    out = row_norms_f64(v, center)
    return (v.double() - center.double()).pow(2).sum(dim=1) if out is None else out


def bf16_scan_available() -> bool:
    """Whether the compiled loops include the bf16 scan (a CPU with AVX-512 BF16, seen by
    ``-march=native`` at compile time)."""
    library = _load()
    return library is not None and bool(library.bf16_scan_available())


def bf16_pack_rows(x: torch.Tensor, center: Optional[torch.Tensor], out: torch.Tensor, norm: torch.Tensor,
                   resid: torch.Tensor) -> None:
    """Rows of ``x: (n, d)`` fp32 (row stride free, unit column stride) less ``center: (d,)`` fp32,
    rounded to bf16 into ``out: (npad, dp)`` int16 (npad >= n, dp >= d, zero padding), with their
    float64 norms and bf16 rounding-error norms in ``norm`` / ``resid: (npad,)`` float64."""
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    n, d = x.shape
    npad, dp = out.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or (d > 1 and x.stride(1) != 1):
        raise ValueError(f"bf16_pack_rows: x must be CPU fp32 rows with unit column stride, got {x.dtype} {x.stride()}")
    for tensor, dtype, name in ((out, torch.int16, "out"), (norm, torch.float64, "norm"), (resid, torch.float64, "resid")):
        _require(tensor, dtype, name)
    if center is not None:
        _require(center, torch.float32, "center")
    if npad < n or dp < d or norm.shape != (npad,) or resid.shape != (npad,) or (center is not None and center.shape != (d,)):
        raise ValueError("bf16_pack_rows: inconsistent shapes")
    library.bf16_pack_rows(x.data_ptr(), n, d, x.stride(0), None if center is None else center.data_ptr(), out.data_ptr(),
                           dp, npad, norm.data_ptr(), resid.data_ptr(), _threads(npad, dp))


def bf16_scan_l2(q: torch.Tensor, n: int, panels: torch.Tensor, csq: torch.Tensor, pw: torch.Tensor, qw: torch.Tensor,
                 sw: torch.Tensor, aq: torch.Tensor, rq: torch.Tensor, cand: torch.Tensor, cand_lo: torch.Tensor,
                 count: torch.Tensor) -> None:
    """The candidates of the first ``n`` rows of ``q: (npad, dp)`` (bf16 as int16, dp even, npad a multiple
    of 6) against ``panels: (P, dp / 2, 64)`` int32 (bf16 pairs) into ``cand`` / ``cand_lo:
    (n, cap)`` and ``count: (n,)`` (-1: more than cap); see the C source for the bound.
    csq, pw, qw, sw: (64 P,) fp32 per codeword; aq, rq: (n,) fp32 per query."""
    library = _load()
    if library is None or not library.bf16_scan_available():
        raise RuntimeError("the bf16 scan needs the native loops on a CPU with AVX-512 BF16")
    npad, dp = q.shape
    panel_count = panels.shape[0]
    checks = [(q, torch.int16, "q"), (panels, torch.int32, "panels"), (cand, torch.int32, "cand"),
              (cand_lo, torch.float32, "cand_lo"), (count, torch.int32, "count")]
    checks += [(t, torch.float32, name) for t, name in ((csq, "csq"), (pw, "pw"), (qw, "qw"), (sw, "sw"), (aq, "aq"),
                                                        (rq, "rq"))]
    for tensor, dtype, name in checks:
        _require(tensor, dtype, name)
    cap = cand.shape[1] if cand.dim() == 2 else 0
    if (npad % 6 or npad < n or dp % 2 or panels.shape[1:] != (dp // 2, 64) or cap < 1
            or any(t.shape != (64 * panel_count,) for t in (csq, pw, qw, sw))
            or any(t.shape != (n,) for t in (aq, rq, count)) or cand.shape[0] != n or cand_lo.shape != cand.shape):
        raise ValueError("bf16_scan_l2: inconsistent shapes")
    library.bf16_scan_l2(q.data_ptr(), n, dp, panels.data_ptr(), panel_count, csq.data_ptr(), pw.data_ptr(), qw.data_ptr(),
                         sw.data_ptr(), aq.data_ptr(), rq.data_ptr(), cand.data_ptr(), cand_lo.data_ptr(), count.data_ptr(),
                         cap, _threads(n, 64 * panel_count * dp // 64))


def rerank_l2_f64(x: torch.Tensor, codebook: torch.Tensor, ids: Optional[torch.Tensor], cand: torch.Tensor,
                  count: torch.Tensor, out_id: torch.Tensor, out_dist: torch.Tensor, near: torch.Tensor,
                  margin: float) -> None:
    """For each row i of ``x: (n, d)`` fp32 with ``count[i] > 0``: of the codebook rows
    ``ids[cand[i, :count[i]]]`` (``cand`` itself when ids is None), the least float64 squared
    distance and, among ties, the lowest id, into ``out_id`` (n,) int64 / ``out_dist`` (n,) float64;
    ``near`` (n,) int8: 1 where a second candidate's distance is within ``margin`` times the best."""
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    n, d = x.shape
    for tensor, name in ((x, "x"), (codebook, "codebook")):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or (d > 1 and tensor.stride(1) != 1):
            raise ValueError(f"rerank_l2_f64: {name} must be CPU fp32 rows with unit column stride")
    for tensor, dtype, name in ((cand, torch.int32, "cand"), (count, torch.int32, "count"), (out_id, torch.int64, "out_id"),
                                (out_dist, torch.float64, "out_dist"), (near, torch.int8, "near")):
        _require(tensor, dtype, name)
    if ids is not None:
        _require(ids, torch.int64, "ids")
    if codebook.shape[1] != d or cand.shape[0] != n or any(t.shape != (n,) for t in (count, out_id, out_dist, near)):
        raise ValueError("rerank_l2_f64: inconsistent shapes")
    library.rerank_l2_f64(x.data_ptr(), x.stride(0), codebook.data_ptr(), codebook.stride(0), n, d,
                          None if ids is None else ids.data_ptr(), cand.data_ptr(), count.data_ptr(), cand.shape[1],
                          margin, out_id.data_ptr(), out_dist.data_ptr(), near.data_ptr(), _threads(n, 8 * d))


#: the direct scan's largest codebook (DIRECT_MAX_K in the C source: its per-tile sums live on the stack)
DIRECT_MAX_K = 4096
DIRECT_PANEL = 16
#: near-tie candidates listed per query (DIRECT_NEAR_CAP in the C source)
DIRECT_NEAR_CAP = 64


def direct_pack(codebook: torch.Tensor) -> torch.Tensor:
    """``codebook: (K, d)`` CPU fp32 as the direct scan reads it: (ceil(K / 16), d, 16) panels."""
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    k, d = codebook.shape
    if codebook.dtype != torch.float32 or codebook.device.type != "cpu" or (d > 1 and codebook.stride(1) != 1):
        raise ValueError("direct_pack: the codebook must be CPU fp32 rows with unit column stride")
    if not 0 < k <= DIRECT_MAX_K:
        raise ValueError(f"direct_pack: the direct scan takes 1 .. {DIRECT_MAX_K} codewords, got {k}")
    panels = torch.empty((-(-k // DIRECT_PANEL), d, DIRECT_PANEL), dtype=torch.float32)
    library.direct_pack(codebook.data_ptr(), codebook.stride(0), k, d, panels.data_ptr())
    return panels


def direct_l2(x: torch.Tensor, codebook: torch.Tensor, panels: torch.Tensor, margin: float,
              near: Optional[torch.Tensor] = None):
    """Exact l2 nearest codewords of ``x: (n, d)`` in ``codebook: (K, d)`` (CPU fp32, unit column
    stride; ``panels`` from :func:`direct_pack` of it): ``(ids (n,) int64, squared distances (n,)
    float64, near (n, DIRECT_NEAR_CAP) int32, count (n,) int32, flagged)``, the lowest id on ties.
    Rows with ``count > 0`` (``flagged`` of them, with the next) have near ties (within ``margin``, see
    :func:`rerank_l2_f64`) among ``near[i, :count[i]]``; ``count == -1``: among more codewords than
    that (rank them all). ``near``: a contiguous (n, DIRECT_NEAR_CAP) int32 buffer to write into."""
    library, n, k, d, near = _direct_inputs("direct_l2", x, codebook, panels, near)
    ids = torch.empty(n, dtype=torch.int64)
    dist = torch.empty(n, dtype=torch.float64)
    count = torch.empty(n, dtype=torch.int32)
    flagged = 0
    if n:
        flagged = library.direct_l2(x.data_ptr(), x.stride(0), codebook.data_ptr(), codebook.stride(0), panels.data_ptr(),
                                    n, k, d, margin, ids.data_ptr(), dist.data_ptr(), near.data_ptr(), count.data_ptr(),
                                    _threads(n, k * d))
    return ids, dist, near, count, flagged


def direct_dot(x: torch.Tensor, codebook: torch.Tensor, cnorm: torch.Tensor, panels: torch.Tensor,
               bound: torch.Tensor, g: float, dev: float, cosine: bool, near: Optional[torch.Tensor] = None):
    """Exact ip / cos nearest codewords (the least -<x, c> or -cos(x, c)) of ``x: (n, d)`` among the
    rows of ``codebook: (K, d)`` (the original fp32 rows, unit column stride). ``panels``
    (:func:`direct_pack`): the codewords the fp32 scan reads (normalised for cos), ``bound: (K,)``
    fp32 >= their norms, ``cnorm: (K,)`` float64 norms of ``codebook``'s rows, ``g`` the scan's
    relative bound, ``dev`` the float64 evaluations' (see the C source). Returns ``(ids, objective
    (n,) float64, near, count, flagged)`` as :func:`direct_l2`."""
    library, n, k, d, near = _direct_inputs("direct_dot", x, codebook, panels, near)
    _require(cnorm, torch.float64, "cnorm")
    _require(bound, torch.float32, "bound")
    if cnorm.shape != (k,) or bound.shape != (k,):
        raise ValueError("direct_dot: cnorm and bound must be (K,)")
    ids = torch.empty(n, dtype=torch.int64)
    obj = torch.empty(n, dtype=torch.float64)
    count = torch.empty(n, dtype=torch.int32)
    flagged = 0
    if n:
        flagged = library.direct_dot(x.data_ptr(), x.stride(0), codebook.data_ptr(), codebook.stride(0), cnorm.data_ptr(),
                                     panels.data_ptr(), bound.data_ptr(), n, k, d, g, dev, int(cosine), ids.data_ptr(),
                                     obj.data_ptr(), near.data_ptr(), count.data_ptr(), _threads(n, k * d))
        if flagged < 0:
            raise MemoryError(f"direct_dot: no scratch memory for {d}-element rows")
    return ids, obj, near, count, flagged


def _direct_inputs(op: str, x: torch.Tensor, codebook: torch.Tensor, panels: torch.Tensor, near: Optional[torch.Tensor]):
    """The direct scans' shared checks: (library, n, K, d, near), ``near`` a new (n, DIRECT_NEAR_CAP)
    int32 buffer where none is given."""
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    n, d = x.shape
    k = codebook.shape[0]
    for tensor, name in ((x, "x"), (codebook, "codebook")):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or (d > 1 and tensor.stride(1) != 1):
            raise ValueError(f"{op}: {name} must be CPU fp32 rows with unit column stride")
    if codebook.shape[1] != d or panels.shape != (-(-k // DIRECT_PANEL), d, DIRECT_PANEL) or not panels.is_contiguous():
        raise ValueError(f"{op}: a ({k}, {codebook.shape[1]}) codebook, panels {tuple(panels.shape)}, "
                         f"for ({n}, {d}) queries")
    if not 0 < k <= DIRECT_MAX_K or d >= 1 << 20:
        raise ValueError(f"{op}: the direct scan takes 1 .. {DIRECT_MAX_K} codewords and d < 2^20, got {k}, {d}")
    if near is None:
        near = torch.empty((n, DIRECT_NEAR_CAP), dtype=torch.int32)
    elif near.shape != (n, DIRECT_NEAR_CAP) or near.dtype != torch.int32 or not near.is_contiguous():
        raise ValueError(f"{op}: near must be a contiguous ({n}, {DIRECT_NEAR_CAP}) int32 buffer")
    return library, n, k, d, near


def gemm_keep(g: torch.Tensor, col0: int, sq: Optional[torch.Tensor], coef: float, margin: torch.Tensor,
              offset: torch.Tensor, best: torch.Tensor, cand_v: torch.Tensor, cand_c: torch.Tensor,
              count: torch.Tensor) -> None:
    """One block ``g: (rows, cols)`` fp32 dot products (unit column stride) of the flat scan's GEMM,
    folded into the running state of its queries, in place: ``best (rows,)`` float64 least objective
    (``sq[j] - coef g`` for l2, ``-g`` with ``sq`` None), ``cand_v / cand_c (rows, cap)`` fp32 / int64
    the codewords (``col0 + j``) within ``margin (rows,)`` (float64) of it, ``count (rows,)`` int32
    their number, -1 past ``cap`` (see the C source)."""
    library = _load()
    if library is None:
        raise RuntimeError(f"the native loops are unavailable: {_failure}")
    rows, cols = g.shape
    if g.dtype != torch.float32 or (cols > 1 and g.stride(1) != 1):
        raise ValueError("gemm_keep: g must be fp32 with unit column stride")
    cap = cand_v.shape[1] if cand_v.dim() == 2 else -1
    for tensor, dtype, shape, name in ((margin, torch.float64, (rows,), "margin"), (offset, torch.float64, (rows,), "offset"),
                                       (best, torch.float64, (rows,), "best"), (cand_v, torch.float32, (rows, cap), "cand_v"),
                                       (cand_c, torch.int64, (rows, cap), "cand_c"), (count, torch.int32, (rows,), "count")):
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"gemm_keep: {name} must be a contiguous {dtype} tensor of shape {shape}")
    if sq is not None and (sq.dtype != torch.float32 or sq.shape != (cols,) or not sq.is_contiguous()):
        raise ValueError(f"gemm_keep: sq must be a contiguous fp32 tensor of shape ({cols},)")
    if rows and cols:
        library.gemm_keep(g.data_ptr(), g.stride(0), rows, cols, col0, None if sq is None else sq.data_ptr(), coef,
                          margin.data_ptr(), offset.data_ptr(), best.data_ptr(), cand_v.data_ptr(), cand_c.data_ptr(),
                          count.data_ptr(), cap, _threads(rows, cols))
