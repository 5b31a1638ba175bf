/* IBQ's per-row elementwise work (vqkit/quantizers/softmax_entropy.py derives the
 * formulas; ibq_native.py builds this file with the machine's C compiler and calls it).
 *
 * Eagerly the same work is some 10 passes over a (rows x K) tile in the forward and 17
 * in the backward. Here each row is one or two loops: the row's logits are read from
 * memory once, its two softmaxes (T = 1 and T) are evaluated once each into two K-float
 * row buffers that stay in L1/L2, and the result is written once.
 *
 * Exactness: built with -ffp-contract=off and without -ffast-math, every operation is a
 * single IEEE float operation in the order written, so the vectorised loop body and any
 * scalar remainder give the same bits, and the backward's recomputed 2^a2 is bit for bit
 * the forward's (the sum of each row's gradient is then zero to rounding).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LOG2E 1.4426950408889634f
/* 2^max(x, lo) for x <= 0 and -126 <= lo (the floor softmax_entropy.py passes in):
 * 2^round(x) (exponent bits) times 2^f, |f| <= 1/2, from Cephes' exp2f polynomial
 * (relative error about 1e-7, 1-2 ulp). */
static inline float exp2_clamped(float x, float lo) {
    x = x < lo ? lo : x;
    float n = floorf(x + 0.5f);
    float f = x - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = 1.0f + f * p;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Forward, rows of raw logits s (rows x k) with row maxima m and weights w: a2 = (s - m)
 * log2(e) / T, u = 2^a2 (in ubuf, k floats), z = sum_k u, abar = sum_k u a2 / z, and
 * marg += (w / z) u (the batch marginal's share of the rows). */
void ibq_forward(const float *restrict s, const float *restrict m, const float *restrict w,
                 int64_t rows, int64_t k, float inv_t, float lo, float *restrict z,
                 float *restrict abar, float *restrict marg, float *restrict ubuf) {
    for (int64_t r = 0; r < rows; r++) {
        const float *sr = s + r * k;
        const float mr = m[r];
        float zs = 0.0f, as = 0.0f;
#pragma omp simd reduction(+ : zs, as)
        for (int64_t j = 0; j < k; j++) {
            float a2 = (sr[j] - mr) * LOG2E * inv_t;
            float v = exp2_clamped(a2, lo);
            ubuf[j] = v;
            zs += v;
            as += v * a2;
        }
        z[r] = zs;
        abar[r] = as / zs;
        const float coef = w[r] / zs;
#pragma omp simd
        for (int64_t j = 0; j < k; j++)
            marg[j] += coef * ubuf[j];
    }
}

/* Backward: dL/ds of rows of raw logits s into out (rows x k). gl = g E^T (rows x k) or
 * NULL (no lookup gradient); ent != 0 adds the entropy's, with log_p (k), and per row
 * top (log P of the row's code), a_row, b_row, abar, z2. p1buf and pbuf: k floats each.
 *   lookup:  p1 (gl - r) / z1, p1 = 2^((s - m) log2 e), z1 = sum p1, r = sum p1 gl / z1
 *   entropy: p (A a2 - C) + B p lp, p = 2^(a2), lp = log_p - top, C = A abar + B sum p lp / z2
 */
void ibq_backward(const float *restrict s, const float *restrict gl, const float *restrict m,
                  int64_t rows, int64_t k, float inv_t, float lo, int ent,
                  const float *restrict log_p,
                  const float *restrict top, const float *restrict a_row,
                  const float *restrict b_row, const float *restrict abar,
                  const float *restrict z2, float *restrict out, float *restrict p1buf,
                  float *restrict pbuf) {
    for (int64_t r = 0; r < rows; r++) {
        const float *sr = s + r * k;
        const float *gr = gl ? gl + r * k : NULL;
        float *o = out + r * k;
        const float mr = m[r];
        const float tp = ent ? top[r] : 0.0f;
        float z1 = 0.0f, rs = 0.0f, cs = 0.0f;
        /* one loop per case (lookup and entropy, lookup, entropy): branch-free bodies,
         * so that each vectorises and computes no exponential it does not need */
        if (gr && ent) {
#pragma omp simd reduction(+ : z1, rs, cs)
            for (int64_t j = 0; j < k; j++) {
                float s2 = (sr[j] - mr) * LOG2E;
                float q = exp2_clamped(s2, lo);
                float p = exp2_clamped(s2 * inv_t, lo);
                p1buf[j] = q;
                pbuf[j] = p;
                z1 += q;
                rs += q * gr[j];
                cs += p * (log_p[j] - tp);
            }
        } else if (gr) {
#pragma omp simd reduction(+ : z1, rs)
            for (int64_t j = 0; j < k; j++) {
                float q = exp2_clamped((sr[j] - mr) * LOG2E, lo);
                p1buf[j] = q;
                z1 += q;
                rs += q * gr[j];
            }
        } else {
#pragma omp simd reduction(+ : cs)
            for (int64_t j = 0; j < k; j++) {
                float p = exp2_clamped((sr[j] - mr) * LOG2E * inv_t, lo);
                pbuf[j] = p;
                cs += p * (log_p[j] - tp);
            }
        }
        const float iz1 = gr ? 1.0f / z1 : 0.0f;
        const float rr = rs * iz1;
        const float a = ent ? a_row[r] : 0.0f;
        const float b = ent ? b_row[r] : 0.0f;
        const float c = ent ? a * abar[r] + b * cs / z2[r] : 0.0f;
        if (gr && ent) {
#pragma omp simd
            for (int64_t j = 0; j < k; j++) {
                float a2 = (sr[j] - mr) * LOG2E * inv_t;
                float p = pbuf[j], q = p1buf[j];
                o[j] = p * (a2 * a - c) + b * (p * (log_p[j] - tp)) + (q * gr[j] - q * rr) * iz1;
            }
        } else if (gr) {
#pragma omp simd
            for (int64_t j = 0; j < k; j++) {
                float q = p1buf[j];
                o[j] = (q * gr[j] - q * rr) * iz1;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < k; j++) {
                float a2 = (sr[j] - mr) * LOG2E * inv_t;
                float p = pbuf[j];
                o[j] = p * (a2 * a - c) + b * (p * (log_p[j] - tp));
            }
        }
    }
}
