/* Weight unpacking: one K-quant super-block -> 256 codes and per-group (a, b); Q4_0 rows, plain or in
 * ggml's x86 8-row repack. Always-inline functions in a header, so that each path's unpack (plain.c,
 * and x86_avx512.c for the K-quants) compiles its own copy under its own target. The math and the
 * block layouts: native.h. */
#ifndef TINYGPTV_UNPACK_H
#define TINYGPTV_UNPACK_H

#include "native.h"

static KQ_INLINE void scale_min_k4(const uint8_t *s, float d, float dmin, float *a, float *b) {
    for (int j = 0; j < 8; j++) { /* 6-bit scale and min of each 32-group, packed in 12 bytes */
        const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        a[j] = d * sc;
        b[j] = dmin * m;
    }
}

static KQ_INLINE void unpack_q4k(const block_q4k *x, uint8_t *c, float *a, float *b) {
    scale_min_k4(x->scales, half_to_float(x->d), half_to_float(x->dmin), a, b);
    for (int j = 0; j < 4; j++) { /* 64 columns per 32 bytes: low nibbles, then high */
        const uint8_t *lo = x->qs + 32 * j;
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = lo[l] & 15;
            c[64 * j + 32 + l] = lo[l] >> 4;
        }
    }
}

static KQ_INLINE void unpack_q5k(const block_q5k *x, uint8_t *c, float *a, float *b) {
    scale_min_k4(x->scales, half_to_float(x->d), half_to_float(x->dmin), a, b);
    for (int j = 0; j < 4; j++) { /* as Q4_K, plus the fifth bit: bit 2j / 2j+1 of qh */
        const uint8_t *lo = x->qs + 32 * j;
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = (lo[l] & 15) | (((x->qh[l] >> (2 * j)) & 1) << 4);
            c[64 * j + 32 + l] = (lo[l] >> 4) | (((x->qh[l] >> (2 * j + 1)) & 1) << 4);
        }
    }
}

static KQ_INLINE void unpack_q6k(const block_q6k *x, uint8_t *c, float *a, float *b) {
    const float d = half_to_float(x->d);
    for (int h = 0; h < 2; h++) { /* two halves of 128: 64 bytes of nibbles, 32 of 2-bit pairs */
        const uint8_t *lo = x->ql + 64 * h, *hi = x->qh + 32 * h;
        uint8_t *o = c + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (lo[l] & 15) | ((hi[l] & 3) << 4);
            o[32 + l] = (lo[32 + l] & 15) | (((hi[l] >> 2) & 3) << 4);
            o[64 + l] = (lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4);
            o[96 + l] = (lo[32 + l] >> 4) | (((hi[l] >> 6) & 3) << 4);
        }
        for (int g = 0; g < 8; g++) {
            a[8 * h + g] = d * x->scales[8 * h + g];
            b[8 * h + g] = 32.0f * a[8 * h + g];
        }
    }
}

/* 32 codes of Q4_0: 16 bytes, columns l (low nibble) and l + 16 (high) */
static KQ_INLINE void unpack_q40(const uint8_t *qs, uint8_t *c) {
    for (int l = 0; l < 16; l++) {
        c[l] = qs[l] & 15;
        c[l + 16] = qs[l] >> 4;
    }
}

/* Q4_0: plain rows (row stride row_bytes), or row `sub + r` of an 8-row group of block_q40x8 */
static KQ_INLINE void unpack_rows_q40(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c,
                                      float *a, float *b) {
    const int nb = K / 32;
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < nb; j++) {
            float d;
            uint8_t qs[16];
            if (type == TYPE_Q4_0) {
                const block_q40 *x = (const block_q40 *)(W + (size_t)r * row_bytes) + j;
                d = half_to_float(x->d);
                memcpy(qs, x->qs, 16);
            } else {
                const block_q40x8 *x = (const block_q40x8 *)W + j;
                const int i = sub + r;
                d = half_to_float(x->d[i]);
                for (int l = 0; l < 8; l++) { /* bytes 0-7 are chunk i, bytes 8-15 chunk i + 8 */
                    qs[l] = x->qs[8 * i + l] ^ 0x88;
                    qs[8 + l] = x->qs[64 + 8 * i + l] ^ 0x88;
                }
            }
            unpack_q40(qs, c + (size_t)r * K + 32 * j);
            a[r * nb + j] = d;
            b[r * nb + j] = 8.0f * d;
        }
}

/* ROWS rows of weights (row stride row_bytes) -> codes c (ROWS x K) and per-group a, b (ROWS x K/G) */
static KQ_INLINE void unpack_rows(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c,
                                  float *a, float *b) {
    if (type == TYPE_Q4_0 || type == TYPE_Q4_0_X8) {
        unpack_rows_q40(W, row_bytes, type, sub, K, c, a, b);
        return;
    }
    const int nsb = K / QK, ng = K / (type == TYPE_Q6_K ? 16 : 32);
    for (int r = 0; r < ROWS; r++) {
        const char *row = W + (size_t)r * row_bytes;
        for (int sb = 0; sb < nsb; sb++) {
            uint8_t *cr = c + (size_t)r * K + sb * QK;
            if (type == TYPE_Q4_K)
                unpack_q4k((const block_q4k *)row + sb, cr, a + r * ng + sb * 8, b + r * ng + sb * 8);
            else if (type == TYPE_Q5_K)
                unpack_q5k((const block_q5k *)row + sb, cr, a + r * ng + sb * 8, b + r * ng + sb * 8);
            else
                unpack_q6k((const block_q6k *)row + sb, cr, a + r * ng + sb * 16, b + r * ng + sb * 16);
        }
    }
}

#endif
