/* The aarch64 NEON dotprod path: the matmul's activation quantizing and micro-tile (sdot by lane, one
 * q register = 4 tokens). Compiled with KQ_NEON_FN (a target attribute, no -march), so the build runs
 * on any aarch64 and dispatch.c puts these in the table only where kq_cpu_has_dotprod(); weight
 * unpacking, the epilogue and attention run the plain C there. Each does the plain path's IEEE
 * operations in the same order, so its results equal plain C's bit for bit (native.h says how). */
#include "native.h"

#if KQ_HAVE_NEON_DOT
#include <arm_neon.h>
#include <sys/auxv.h>

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* Linux arch/arm64 uapi hwcap.h */
#endif

int kq_cpu_has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }

KQ_NEON_FN void kq_quantize_neon(const float *x, int blk, int lane, acts *p) {
    for (int k0 = 0; k0 < p->K; k0 += 32) {
        float32x4_t v[8], m = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(x + k0 + 4 * i);
            m = vmaxq_f32(m, vabsq_f32(v[i]));
        }
        const float amax = vmaxvq_f32(m);
        const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32x4_t q[8];
        for (int i = 0; i < 8; i++) q[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], inv)); /* nearest even */
        const int s0 = vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
        const int s1 = vaddvq_s32(vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])));
        int32_t w[8];
        for (int h = 0; h < 2; h++) { /* |q| <= 127: the saturating narrows are exact */
            const int16x8_t lo = vcombine_s16(vqmovn_s32(q[4 * h]), vqmovn_s32(q[4 * h + 1]));
            const int16x8_t hi = vcombine_s16(vqmovn_s32(q[4 * h + 2]), vqmovn_s32(q[4 * h + 3]));
            vst1q_s8((int8_t *)(w + 4 * h), vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
        }
        store32(p, k0, blk, lane, dx, s0, s1, w);
    }
}

/* 16 codes of each row in one register; sdot by lane L multiplies columns k+4L..k+4L+3 of 4 tokens */
#define KQ_SDOT_STEP(L)                                                                                \
    do {                                                                                               \
        const int8_t *xk = xq + (size_t)(k + 4 * (L)) * TB;                                           \
        const int8x16_t x0 = vld1q_s8(xk), x1 = vld1q_s8(xk + 16), x2 = vld1q_s8(xk + 32),           \
                        x3 = vld1q_s8(xk + 48);                                                        \
        for (int r = 0; r < ROWS; r++) {                                                               \
            s[r][0] = vdotq_laneq_s32(s[r][0], x0, w[r], (L));                                         \
            s[r][1] = vdotq_laneq_s32(s[r][1], x1, w[r], (L));                                         \
            s[r][2] = vdotq_laneq_s32(s[r][2], x2, w[r], (L));                                         \
            s[r][3] = vdotq_laneq_s32(s[r][3], x3, w[r], (L));                                         \
        }                                                                                              \
    } while (0)

KQ_NEON_FN void kq_tile_neon(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                             float res[2][ROWS][TB]) {
    const int K = p->K, G = p->G, ng = K / G;
    for (int j = 0; j < nb; j++) {
        const int8_t *xq = p->q + (size_t)(blk + j) * K * TB;
        const float *dx = p->dx + (size_t)(blk + j) * (K / 32) * TB;
        const float *dq = p->dq + (size_t)(blk + j) * ng * TB;
        float32x4_t acc[ROWS][4];
        for (int r = 0; r < ROWS; r++)
            for (int i = 0; i < 4; i++) acc[r][i] = vdupq_n_f32(0.0f);
        for (int g = 0; g < ng; g++) {
            int32x4_t s[ROWS][4];
            for (int r = 0; r < ROWS; r++)
                for (int i = 0; i < 4; i++) s[r][i] = vdupq_n_s32(0);
            for (int k = g * G; k < (g + 1) * G; k += 16) { /* G is 16 or 32 */
                int8x16_t w[ROWS];
                for (int r = 0; r < ROWS; r++) w[r] = vld1q_s8((const int8_t *)c + (size_t)r * K + k);
                KQ_SDOT_STEP(0);
                KQ_SDOT_STEP(1);
                KQ_SDOT_STEP(2);
                KQ_SDOT_STEP(3);
            }
            for (int i = 0; i < 4; i++) {
                const float32x4_t dxv = vld1q_f32(dx + (size_t)(g * G / 32) * TB + 4 * i);
                const float32x4_t dqv = vld1q_f32(dq + (size_t)g * TB + 4 * i);
                for (int r = 0; r < ROWS; r++) {
                    const float32x4_t scale = vmulq_f32(vdupq_n_f32(a[r * ng + g]), dxv);
                    acc[r][i] = vfmaq_f32(acc[r][i], vcvtq_f32_s32(s[r][i]), scale);
                    acc[r][i] = vfmsq_f32(acc[r][i], vdupq_n_f32(b[r * ng + g]), dqv); /* acc - b dq */
                }
            }
        }
        for (int r = 0; r < ROWS; r++)
            for (int i = 0; i < 4; i++) vst1q_f32(res[j][r] + 4 * i, acc[r][i]);
    }
}
#endif
