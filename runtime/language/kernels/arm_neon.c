/* The aarch64 NEON dotprod path: the matmul's activation quantizing and micro-tile (sdot by lane, one
 * q register = 4 tokens), and the decode attention (four q registers = the 16 lanes native.h defines).
 * Compiled with KQ_NEON_FN (a target attribute, no -march), so the build runs on any aarch64 and
 * dispatch.c puts these in the table only where kq_cpu_has_dotprod(); weight unpacking, the epilogue
 * and prompt attention run the plain C there. Each does the plain path's IEEE
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

/* ---- decode attention (attention.c, native.h: ATT1_CHUNKS) ---------------------------------------- */
/* dimensions d..d + 3 of an F16 or F32 row, zeros past D (fp16 -> fp32 is exact, as half_to_float) */
KQ_NEON_FN static KQ_INLINE float32x4_t att1_ld4(const char *row, int32_t f16, int d, int D) {
    if (d + 4 <= D)
        return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)row + d)))
                   : vld1q_f32((const float *)row + d);
    float x[4];
    for (int i = 0; i < 4; i++)
        x[i] = d + i >= D ? 0.0f : f16 ? half_to_float(((const uint16_t *)row)[d + i]) : ((const float *)row)[d + i];
    return vld1q_f32(x);
}

/* att_exp of 4 lanes: the same operations (rint: nearest even; p 2^n exact or rounded once, as ldexpf) */
KQ_NEON_FN static KQ_INLINE float32x4_t att1_exp4(float32x4_t x) {
    const uint32x4_t ok = vcgeq_f32(x, vdupq_n_f32(-87.0f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmaq_f32(x, n, vdupq_n_f32(-0.693145751953125f));
    r = vfmaq_f32(r, n, vdupq_n_f32(-1.428606765330187045e-06f));
    float32x4_t p = vdupq_n_f32(1.0f / 720.0f);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    /* x in [-87, 0]: n in [-126, 0], so 2^n is a normal float */
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(vbslq_f32(ok, n, vdupq_n_f32(0.0f))), vdupq_n_s32(127)), 23);
    return vbslq_f32(ok, vmulq_f32(p, vreinterpretq_f32_s32(e)), vdupq_n_f32(0.0f));
}

#define ATT1_NEON_VCH 8 /* 4-dimension chains of the V sum computed together */

KQ_NEON_FN void kq_attn1_neon(const kq_attn_args *a, int h0, int h1, int n, float *sc) {
    const int D = a->D, nc = ATT1_CHUNKS(D), nd4 = (D + 3) / 4;
    const uint16_t *m = (const uint16_t *)a->mask;
    for (int h = h0; h < h1; h++) {
        const char *q = a->q + h * a->q_nb1, *kh = a->k + h * a->k_nb2, *vh = a->v + h * a->v_nb2;
        float32x4_t qc[ATT_D_MAX / 4];
        for (int i = 0; i < 4 * nc; i++) qc[i] = att1_ld4(q, 0, 4 * i, D);
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const char *row = kh + j * a->k_nb1;
            float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
            for (int c = 0; c < nc; c++)
                for (int i = 0; i < 4; i++) acc[i] = vfmaq_f32(acc[i], qc[4 * c + i], att1_ld4(row, a->kv_f16, 16 * c + 4 * i, D));
            const float32x4_t t = vaddq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3])); /* +8, +4 */
            const float32x2_t u = vadd_f32(vget_low_f32(t), vget_high_f32(t));                    /* +2 */
            sc[j] = fmaf(vget_lane_f32(u, 0) + vget_lane_f32(u, 1), a->scale, half_to_float(m[j]));
            mx = sc[j] > mx ? sc[j] : mx;
        }
        float32x4_t lanes[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
        int j = 0;
        for (; j + 16 <= n; j += 16)
            for (int i = 0; i < 4; i++) {
                const float32x4_t e = att1_exp4(vsubq_f32(vld1q_f32(sc + j + 4 * i), vdupq_n_f32(mx)));
                vst1q_f32(sc + j + 4 * i, e);
                lanes[i] = vaddq_f32(lanes[i], e);
            }
        float l16[ATT_LANES];
        for (int i = 0; i < 4; i++) vst1q_f32(l16 + 4 * i, lanes[i]);
        for (; j < n; j++) { /* the tail: lane j mod 16, as the plain path adds it */
            sc[j] = vgetq_lane_f32(att1_exp4(vdupq_n_f32(sc[j] - mx)), 0);
            l16[j % ATT_LANES] += sc[j];
        }
        const float sum = att_tree(l16);
        float *o = a->out + (size_t)h * D;
        for (int c0 = 0; c0 < nd4; c0 += ATT1_NEON_VCH) {
            const int cn = nd4 - c0 < ATT1_NEON_VCH ? nd4 - c0 : ATT1_NEON_VCH;
            float32x4_t acc[ATT1_NEON_VCH];
            for (int c = 0; c < ATT1_NEON_VCH; c++) acc[c] = vdupq_n_f32(0.0f);
            for (int jj = 0; jj < n; jj++) {
                const char *row = vh + jj * a->v_nb1;
                for (int c = 0; c < cn; c++)
                    acc[c] = vfmaq_f32(acc[c], vdupq_n_f32(sc[jj]), att1_ld4(row, a->kv_f16, 4 * (c0 + c), D));
            }
            for (int c = 0; c < cn; c++) {
                const int d = 4 * (c0 + c);
                float y[4];
                vst1q_f32(y, vdivq_f32(acc[c], vdupq_n_f32(sum)));
                for (int i = 0; i < 4 && d + i < D; i++) o[d + i] = y[i];
            }
        }
    }
}
#endif
