/* The matmul's plain C path: activation quantizing, weight unpacking and the micro-tile, in the
 * order of operations every fast path reproduces bit for bit (native.h says how). It runs on any CPU,
 * is the reference the tests hold the other paths to, and fills the steps a fast path lacks. The
 * plain C of the other ops sits beside them: epilogue.c, attention.c. */
#include "native.h"
#include "unpack.h"

void kq_quantize_plain(const float *x, int blk, int lane, acts *p) {
    for (int k0 = 0; k0 < p->K; k0 += 32) {
        float amax = 0.0f;
        for (int l = 0; l < 32; l++) amax = fmaxf(amax, fabsf(x[k0 + l]));
        const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t w[8];
        int8_t *v = (int8_t *)w;
        int s0 = 0, s1 = 0;
        for (int l = 0; l < 32; l++) {
            v[l] = (int8_t)lrintf(x[k0 + l] * inv); /* nearest even, as the vector conversions */
            if (l < 16) s0 += v[l];
            else s1 += v[l];
        }
        store32(p, k0, blk, lane, dx, s0, s1, w);
    }
}

void kq_unpack_plain(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c, float *a,
                     float *b) {
    unpack_rows(W, row_bytes, type, sub, K, c, a, b);
}

/* ROWS weight rows (codes c, row stride K) x one or two token blocks */
void kq_tile_plain(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                   float res[2][ROWS][TB]) {
    const int K = p->K, G = p->G, ng = K / G;
    for (int j = 0; j < nb; j++) {
        const int8_t *xq = p->q + (size_t)(blk + j) * K * TB;
        const float *dx = p->dx + (size_t)(blk + j) * (K / 32) * TB;
        const float *dq = p->dq + (size_t)(blk + j) * ng * TB;
        for (int r = 0; r < ROWS; r++)
            for (int lane = 0; lane < TB; lane++) {
                float acc = 0.0f;
                for (int g = 0; g < ng; g++) {
                    int32_t s = 0;
                    for (int k = g * G; k < (g + 1) * G; k++)
                        s += c[(size_t)r * K + k] * xq[((size_t)k / 4 * TB + lane) * 4 + (k & 3)];
                    const float scale = a[r * ng + g] * dx[(size_t)(g * G / 32) * TB + lane];
                    acc = fmaf((float)s, scale, acc);
                    acc = fmaf(-b[r * ng + g], dq[(size_t)g * TB + lane], acc);
                }
                res[j][r][lane] = acc;
            }
    }
}
