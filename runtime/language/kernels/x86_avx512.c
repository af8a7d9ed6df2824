/* The x86-64 AVX512-VNNI path of every op: activation quantizing, Q4_0 unpacking, the micro-tile,
 * Q4_0 in ggml's 8-row repack by its own kernel, the bias + GELU epilogue and prompt attention. Each
 * function carries KQ_AVX512_FN (a target attribute, no -march), so the build runs on any x86-64 and
 * dispatch.c puts these in the table only where kq_cpu_has_avx512vnni(). Each does the plain path's
 * IEEE operations in the same order, so its results equal plain C's bit for bit (native.h says how). */
#include "native.h"

#if KQ_HAVE_AVX512
#include <cpuid.h>
#include <immintrin.h>

#include "unpack.h"

/* Whether the OS saves the AVX-512 registers (XCR0: SSE, AVX, opmask, ZMM halves), as well as the CPU
 * having the instructions. */
static int os_saves_zmm(void) {
    unsigned int eax, ebx, ecx, edx, lo, hi;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 0xe6) == 0xe6;
}

int kq_cpu_has_avx512vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && os_saves_zmm();
}

/* ---- matmul: weights ------------------------------------------------------------------------------ */
/* Q4_0 in plain rows by hand: the compiler leaves unpack.h's byte loop scalar, and at a few dozen
 * tokens a Q4_0 row is unpacked for few products. The scales of up to 64 blocks are gathered first and
 * converted 16 at a time, rather than each block's converted and stored one by one (measured slower:
 * docs/benchmarks.md). (Q4_0 in ggml's 8-row layout runs kq_q40x8_avx512 on this path, and never comes
 * here.) */
KQ_AVX512_FN static void unpack_q40_avx512(const char *W, size_t row_bytes, int K, uint8_t *c, float *a,
                                           float *b) {
    const int nb = K / 32;
    const __m128i m4 = _mm_set1_epi8(15);
    for (int j0 = 0; j0 < nb; j0 += 64) {
        const int n = nb - j0 < 64 ? nb - j0 : 64;
        uint16_t dh[ROWS][64];
        for (int j = j0; j < j0 + n; j++)
            for (int r = 0; r < ROWS; r++) {
                const block_q40 *x = (const block_q40 *)(W + (size_t)r * row_bytes) + j;
                dh[r][j - j0] = x->d;
                const __m128i q = _mm_loadu_si128((const __m128i *)x->qs);
                uint8_t *o = c + (size_t)r * K + 32 * j;
                _mm_storeu_si128((__m128i *)o, _mm_and_si128(q, m4));
                _mm_storeu_si128((__m128i *)(o + 16), _mm_and_si128(_mm_srli_epi16(q, 4), m4));
            }
        /* fp16 -> fp32 is exact either way: vcvtph2ps gives half_to_float's values; 8 d is exact */
        for (int r = 0; r < ROWS; r++)
            for (int i = 0; i < n; i += 16) {
                const __mmask16 k = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
                const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, dh[r] + i));
                _mm512_mask_storeu_ps(a + (size_t)r * nb + j0 + i, k, d);
                _mm512_mask_storeu_ps(b + (size_t)r * nb + j0 + i, k, _mm512_mul_ps(_mm512_set1_ps(8.0f), d));
            }
    }
}

KQ_AVX512_FN void kq_unpack_avx512(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c,
                                   float *a, float *b) {
    if (type == TYPE_Q4_0)
        unpack_q40_avx512(W, row_bytes, K, c, a, b);
    else
        unpack_rows(W, row_bytes, type, sub, K, c, a, b); /* the plain C, compiled for AVX-512 */
}

/* ---- matmul: activations -------------------------------------------------------------------------- */
KQ_AVX512_FN void kq_quantize_avx512(const float *x, int blk, int lane, acts *p) {
    for (int k0 = 0; k0 < p->K; k0 += 32) {
        const __m512 v0 = _mm512_loadu_ps(x + k0), v1 = _mm512_loadu_ps(x + k0 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512 vi = _mm512_set1_ps(inv);
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)),
                      i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
        int32_t w[8];
        _mm_storeu_si128((__m128i *)w, _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(w + 4), _mm512_cvtepi32_epi8(i1));
        store32(p, k0, blk, lane, dx, _mm512_reduce_add_epi32(i0), _mm512_reduce_add_epi32(i1), w);
    }
}

/* ---- matmul: the micro-tile, ROWS weight rows x one or two blocks of 16 tokens ------------------ */
/* One 64-byte load feeds 16 tokens x 4 columns to a vpdpbusd against one row's 4 codes broadcast.
 * NB (blocks of 16 tokens, 1 or 2) and the group size G are constants in each instance below, so the
 * loops over blocks, rows and a group's columns unroll and the sums stay in registers. With a run-time
 * block count GCC kept bookkeeping for each sum in the inner loop, and with the group's loop rolled it
 * spilled and shuffled them; each constant made the matmul faster (docs/benchmarks.md). */
KQ_AVX512_FN static KQ_INLINE void tile_avx512_n(const acts *p, int blk, const uint8_t *c, const float *a,
                                                const float *b, float res[2][ROWS][TB], const int NB,
                                                const int G) {
    const int K = p->K, ng = K / G;
    const int8_t *xq[2];
    const float *dx[2], *dq[2];
    for (int j = 0; j < NB; j++) {
        xq[j] = p->q + (size_t)(blk + j) * K * TB;
        dx[j] = p->dx + (size_t)(blk + j) * (K / 32) * TB;
        dq[j] = p->dq + (size_t)(blk + j) * ng * TB;
    }
    __m512 acc[2][ROWS];
    for (int j = 0; j < NB; j++)
        for (int r = 0; r < ROWS; r++) acc[j][r] = _mm512_setzero_ps();
    /* a few lines of the next tile's weights per group, during the first pass, into L2, where the
     * tile's own streams do not evict them (into L1 did not help). Measured when ggml's 8-row Q4_0 came
     * here, whose unpack otherwise waited on them (docs/benchmarks.md); that layout now runs
     * kq_q40x8_avx512, and this serves plain Q4_0 and the K-quants */
    const size_t pf_per_group = blk == 0 ? (p->pf_len / ng + 63) / 64 * 64 : 0;
    for (int g = 0; g < ng; g++) {
        for (size_t o = g * pf_per_group; o < (g + 1) * pf_per_group && o < p->pf_len; o += 64)
            _mm_prefetch(p->pf + o, _MM_HINT_T1);
        __m512i s[2][ROWS];
        for (int j = 0; j < NB; j++)
            for (int r = 0; r < ROWS; r++) s[j][r] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int k = g * G; k < (g + 1) * G; k += 4) {
            __m512i xv[2];
            for (int j = 0; j < NB; j++) xv[j] = _mm512_load_si512((const void *)(xq[j] + (size_t)k * TB));
            for (int r = 0; r < ROWS; r++) {
                int32_t w4;
                memcpy(&w4, c + (size_t)r * K + k, 4);
                const __m512i wv = _mm512_set1_epi32(w4);
                for (int j = 0; j < NB; j++) s[j][r] = _mm512_dpbusd_epi32(s[j][r], wv, xv[j]);
            }
        }
        for (int j = 0; j < NB; j++) {
            const __m512 dxv = _mm512_load_ps(dx[j] + (size_t)(g * G / 32) * TB);
            const __m512 dqv = _mm512_load_ps(dq[j] + (size_t)g * TB);
            for (int r = 0; r < ROWS; r++) {
                const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(a[r * ng + g]), dxv);
                acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j][r]), scale, acc[j][r]);
                acc[j][r] = _mm512_fnmadd_ps(_mm512_set1_ps(b[r * ng + g]), dqv, acc[j][r]);
            }
        }
    }
    for (int j = 0; j < NB; j++)
        for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(res[j][r], acc[j][r]);
}

KQ_AVX512_FN void kq_tile_avx512(const acts *p, int blk, int nb, const uint8_t *c, const float *a,
                                 const float *b, float res[2][ROWS][TB]) {
    if (p->G == 16)
        nb == 2 ? tile_avx512_n(p, blk, c, a, b, res, 2, 16) : tile_avx512_n(p, blk, c, a, b, res, 1, 16);
    else
        nb == 2 ? tile_avx512_n(p, blk, c, a, b, res, 2, 32) : tile_avx512_n(p, blk, c, a, b, res, 1, 32);
}

/* ---- Q4_0 in ggml's 8-row layout: 16 weight rows in a zmm's lanes, tokens broadcast ------------- */
/* The tile above puts 16 tokens in a zmm and broadcasts one row's codes, so a batch pays for whole
 * blocks of 16 tokens and every row is unpacked to memory and read back. Here a zmm holds 4 columns of 16 rows (two
 * 8-row groups: vpermt2d picks each row's 4 bytes out of two 64-byte loads), unpacked in registers
 * once per pass of up to X8_TT tokens, and each token's 4 activation bytes are broadcast: the
 * products follow the real token count. The per-group update is the tile's, so results are the same
 * bit for bit. */
#define X8_TT 8 /* tokens per pass: 2 x 8 accumulators + codes and constants fit the 32 zmm */

/* One pass: tokens t0..t0 + TT - 1 against a stripe. The first pass unpacks the stripe's codes (8 zmm
 * per 32 columns) and scales into `codes` / `scales`; later passes load them from there (L2). */
KQ_AVX512_FN static KQ_INLINE void x8_pass(const acts *p, const block_q40x8 *A, const block_q40x8 *B, int t0,
                                           float *out, size_t ldo, __mmask16 rows, __m512i *codes, float *scales,
                                           const int TT, const int FIRST) {
    const int K = p->K, nb = K / 32;
    const int8_t *xq[X8_TT];
    const float *dx[X8_TT], *dq[X8_TT];
    for (int i = 0; i < TT; i++) { /* token t's 4 bytes of columns k.. at xq + (k / 4) * TB * 4 */
        const int t = t0 + i, blk = t / TB, lane = t % TB;
        xq[i] = p->q + (size_t)blk * K * TB + 4 * lane;
        dx[i] = p->dx + (size_t)blk * nb * TB + lane;
        dq[i] = p->dq + (size_t)blk * nb * TB + lane;
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i m4 = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
    __m512 acc[X8_TT];
    for (int i = 0; i < TT; i++) acc[i] = _mm512_setzero_ps();
    for (int j = 0; j < nb; j++) {
        __m512i s[X8_TT];
        for (int i = 0; i < TT; i++) s[i] = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) { /* bytes 8h..8h+7 of each row: columns 8h.. (low nibbles), 16 + 8h.. */
            __m512i la, lb;
            if (FIRST) {
                la = _mm512_loadu_si512((const void *)(A[j].qs + 64 * h));
                lb = _mm512_loadu_si512((const void *)(B[j].qs + 64 * h));
            }
            for (int e = 0; e < 2; e++) { /* each row's bytes 8h + 4e .. + 3 */
                __m512i lo, hi;
                __m512i *cj = codes + (size_t)8 * j + 4 * h + 2 * e;
                if (FIRST) {
                    const __m512i q = _mm512_permutex2var_epi32(la, e ? odd : even, lb);
                    /* the repack stores c ^ 8: c = (nibble & 15) ^ 8, one vpternlogd (imm (A & B) ^ C) */
                    lo = _mm512_ternarylogic_epi32(q, m4, eight, 0x6a);
                    hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 4), m4, eight, 0x6a);
                    _mm512_store_si512((void *)cj, lo);
                    _mm512_store_si512((void *)(cj + 1), hi);
                } else {
                    lo = _mm512_load_si512((const void *)cj);
                    hi = _mm512_load_si512((const void *)(cj + 1));
                }
                const size_t klo = (size_t)(8 * j + 2 * h + e) * TB * 4, khi = klo + (size_t)4 * TB * 4;
                for (int i = 0; i < TT; i++) {
                    int32_t x0, x1;
                    memcpy(&x0, xq[i] + klo, 4);
                    memcpy(&x1, xq[i] + khi, 4);
                    s[i] = _mm512_dpbusd_epi32(s[i], lo, _mm512_set1_epi32(x0));
                    s[i] = _mm512_dpbusd_epi32(s[i], hi, _mm512_set1_epi32(x1));
                }
            }
        }
        __m512 a;
        if (FIRST) {
            a = _mm512_cvtph_ps(_mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)A[j].d)),
                _mm_loadu_si128((const __m128i *)B[j].d), 1));
            _mm512_store_ps(scales + (size_t)16 * j, a);
        } else {
            a = _mm512_load_ps(scales + (size_t)16 * j);
        }
        const __m512 b = _mm512_mul_ps(_mm512_set1_ps(8.0f), a);
        for (int i = 0; i < TT; i++) {
            const __m512 scale = _mm512_mul_ps(a, _mm512_set1_ps(dx[i][(size_t)j * TB]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), scale, acc[i]);
            acc[i] = _mm512_fnmadd_ps(b, _mm512_set1_ps(dq[i][(size_t)j * TB]), acc[i]);
        }
    }
    for (int i = 0; i < TT; i++) _mm512_mask_storeu_ps(out + (size_t)(t0 + i) * ldo, rows, acc[i]);
}

#define X8_CASE(n)                                                                                         \
    case n:                                                                                                \
        first ? x8_pass(p, A, B, t0, out, ldo, rows, codes, scales, n, 1)                                  \
              : x8_pass(p, A, B, t0, out, ldo, rows, codes, scales, n, 0);                                 \
        break;

KQ_AVX512_FN static void x8_pass_n(const acts *p, const block_q40x8 *A, const block_q40x8 *B, int t0, int tt,
                                   float *out, size_t ldo, __mmask16 rows, __m512i *codes, float *scales,
                                   int first) {
    switch (tt) { /* TT and FIRST constants in each: the loops unroll and the sums stay in registers */
        X8_CASE(1) X8_CASE(2) X8_CASE(3) X8_CASE(4) X8_CASE(5) X8_CASE(6) X8_CASE(7) default: X8_CASE(8)
    }
}

/* out (T x N) = X W^T for output columns n0..n1 - 1, whole 16-row stripes (kq_rows in matmul.c); the
 * last stripe of N % 16 == 8 rows reads its 8-row group twice and stores half */
KQ_AVX512_FN int kq_q40x8_avx512(const void *W, int N, int K, const float *X, int T, size_t ldx, float *out,
                                 size_t ldo, int n0, int n1) {
    const int nb = K / 32, s0 = n0 / 16, s1 = (n1 + 15) / 16;
    if (s0 >= s1) return 0;
    acts p;
    if (kq_quantize_acts(&p, X, K, T, ldx, 32, kq_quantize_avx512)) return -1;
    const int passes = (T + X8_TT - 1) / X8_TT;
    __m512i *codes = aligned_alloc(64, (size_t)nb * 8 * 64); /* a stripe unpacked: 8 zmm per 32 columns */
    float *scales = aligned_alloc(64, (size_t)nb * 16 * sizeof(float));
    if (!codes || !scales) {
        free(codes), free(scales), kq_free_acts(&p);
        return -1;
    }
    for (int st = s0; st < s1; st++) {
        const block_q40x8 *A = (const block_q40x8 *)W + (size_t)2 * st * nb;
        const int full = 16 * st + 16 <= N;
        const block_q40x8 *B = full ? A + nb : A;
        for (int i = 0; i < passes; i++) { /* near-equal passes: 22 tokens are 8 + 7 + 7 */
            const int t0 = (int)((long)T * i / passes), t1 = (int)((long)T * (i + 1) / passes);
            x8_pass_n(&p, A, B, t0, t1 - t0, out + 16 * st, ldo, full ? 0xffff : 0x00ff, codes, scales, i == 0);
        }
    }
    free(codes), free(scales), kq_free_acts(&p);
    return 0;
}

/* ---- the epilogue: bias + GELU (epilogue.c), 16 columns at a time ------------------------------ */
KQ_AVX512_FN void kq_epilogue_avx512(float *out, size_t ldo, int T, int n0, int n1, const float *bias,
                                     int act) {
    const __m512 lo = _mm512_set1_ps(-10.0f), hi = _mm512_set1_ps(10.0f);
    for (int t = 0; t < T; t++)
        for (int n = n0; n < n1; n += 16) {
            const __mmask16 k = n1 - n >= 16 ? 0xffff : (__mmask16)((1u << (n1 - n)) - 1);
            float *o = out + (size_t)t * ldo + n;
            __m512 y = _mm512_maskz_loadu_ps(k, o);
            if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(k, bias + n));
            if (act == KQ_ACT_GELU) {
                const __m512i idx = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, kq_gelu_table, 4);
                g = _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(y, hi, _CMP_GE_OQ), y);
                y = _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(y, lo, _CMP_LE_OQ), _mm512_setzero_ps());
            }
            _mm512_mask_storeu_ps(o, k, y);
        }
}

/* ---- prompt attention (attention.c), 16 slots or dimensions at a time --------------------------- */
KQ_AVX512_FN static KQ_INLINE __m512 att_exp16(__m512 x) {
    const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(ok, p, n); /* p 2^n, as ldexpf (n is an integer) */
}

/* n rows of D (F16 or F32) from base + j * nb1 -> f32 rows of D */
KQ_AVX512_FN static void att_rows(const char *base, int64_t nb1, int f16, int n, int D, float *dst) {
    for (int j = 0; j < n; j++) {
        const char *src = base + j * nb1;
        for (int d = 0; d < D; d += 16) {
            const __mmask16 k = D - d >= 16 ? 0xffff : (__mmask16)((1u << (D - d)) - 1);
            const __m512 x = f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)src + d))
                                 : _mm512_maskz_loadu_ps(k, (const float *)src + d);
            _mm512_mask_storeu_ps(dst + (size_t)j * D + d, k, x);
        }
    }
}

KQ_AVX512_FN void kq_attn_avx512(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf,
                                 float *sc) {
    /* slots padded to whole groups of ATT_BLOCKS blocks: the extra scores are -inf (weights 0, and a
     * lane sum plus 0 is the same sum), so the results equal the plain path's */
    const int D = a->D, jpad = ATT_JPAD(n);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int h = h0; h < h1; h++) {
        /* K rows converted into vf, then transposed into kt (16 slots of a dimension per gather), so
         * that a step of 16 scores is one load per dimension; then V's rows into vf */
        att_rows(a->k + h * a->k_nb2, a->k_nb1, a->kv_f16, n, D, vf);
        for (int j = 0; j < jpad; j += ATT_LANES) {
            const __mmask16 in = n - j >= 16 ? 0xffff : n > j ? (__mmask16)((1u << (n - j)) - 1) : 0;
            const __m512i rows = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(j)), _mm512_set1_epi32(D));
            for (int d = 0; d < D; d++)
                _mm512_storeu_ps(kt + (size_t)d * jpad + j, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in,
                                 _mm512_add_epi32(rows, _mm512_set1_epi32(d)), vf, 4));
        }
        att_rows(a->v + h * a->v_nb2, a->v_nb1, a->kv_f16, n, D, vf);
        for (int t = 0; t < a->T; t++) {
            const float *q = (const float *)(a->q + t * a->q_nb2 + h * a->q_nb1);
            const uint16_t *m = (const uint16_t *)(a->mask + (size_t)t * a->m_nb1);
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int j0 = 0; j0 < jpad; j0 += ATT_BLOCKS * ATT_LANES) {
                /* ATT_BLOCKS blocks of 16 scores at once: independent fma chains (one chain waited on
                 * the fma latency at every dimension); each score is still one chain in d order */
                __m512 s[ATT_BLOCKS];
                for (int b = 0; b < ATT_BLOCKS; b++) s[b] = _mm512_setzero_ps();
                for (int d = 0; d < D; d++) {
                    const __m512 qd = _mm512_set1_ps(q[d]);
                    for (int b = 0; b < ATT_BLOCKS; b++)
                        s[b] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(kt + (size_t)d * jpad + j0 + ATT_LANES * b), s[b]);
                }
                for (int b = 0; b < ATT_BLOCKS; b++) {
                    const int j = j0 + ATT_LANES * b;
                    const __mmask16 in = n - j >= 16 ? 0xffff : n > j ? (__mmask16)((1u << (n - j)) - 1) : 0;
                    const __m512 mk = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, m + j));
                    const __m512 v = _mm512_mask_add_ps(_mm512_set1_ps(-INFINITY), in,
                                                        _mm512_mul_ps(s[b], _mm512_set1_ps(a->scale)), mk);
                    _mm512_storeu_ps(sc + j, v);
                    mx = _mm512_max_ps(mx, v);
                }
            }
            const __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            __m512 lanes = _mm512_setzero_ps();
            for (int j = 0; j < jpad; j += ATT_LANES) {
                const __m512 e = att_exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j), mxv));
                _mm512_storeu_ps(sc + j, e);
                lanes = _mm512_add_ps(lanes, e);
            }
            float l16[ATT_LANES];
            _mm512_storeu_ps(l16, lanes);
            const __m512 sum = _mm512_set1_ps(att_tree(l16));
            float *o = a->out + ((size_t)t * a->H + h) * D;
            for (int d0 = 0; d0 < D; d0 += ATT_VCHUNK * 16) { /* ATT_VCHUNK chains of 16 dimensions */
                __m512 acc[ATT_VCHUNK];
                for (int c = 0; c < ATT_VCHUNK; c++) acc[c] = _mm512_setzero_ps();
                for (int j = 0; j < n; j++) {
                    const __m512 p = _mm512_set1_ps(sc[j]);
                    for (int c = 0; c < ATT_VCHUNK; c++) {
                        const int d = d0 + 16 * c;
                        const __mmask16 k = D - d >= 16 ? 0xffff : D > d ? (__mmask16)((1u << (D - d)) - 1) : 0;
                        acc[c] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(k, vf + (size_t)j * D + d), acc[c]);
                    }
                }
                for (int c = 0; c < ATT_VCHUNK; c++) {
                    const int d = d0 + 16 * c;
                    const __mmask16 k = D - d >= 16 ? 0xffff : D > d ? (__mmask16)((1u << (D - d)) - 1) : 0;
                    _mm512_mask_storeu_ps(o + d, k, _mm512_div_ps(acc[c], sum));
                }
            }
        }
    }
}

/* ---- decode attention (attention.c, native.h: ATT1_CHUNKS): one query, rows read from the cache --- */
#define ATT1_AHEAD 8 /* slots fetched ahead (prefetches never fault, past the end included) */

/* the cache lines of a head's `bytes` at p (a head's rows are a whole cache row apart: strided) */
KQ_AVX512_FN static KQ_INLINE void att1_prefetch(const char *p, int bytes) {
    for (int o = 0; o < bytes + 63; o += 64) _mm_prefetch(p + (o < bytes ? o : bytes - 1), _MM_HINT_T0);
}
KQ_AVX512_FN static KQ_INLINE __mmask16 att1_mask(int left) {
    return left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
}

/* chunk c (16 dimensions, zeros past D) of an F16 or F32 row */
KQ_AVX512_FN static KQ_INLINE __m512 att1_load(const char *row, int32_t f16, int c, int D) {
    const __mmask16 k = att1_mask(D - 16 * c);
    return f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)row + 16 * c))
               : _mm512_maskz_loadu_ps(k, (const float *)row + 16 * c);
}

/* att_tree of the 16 lanes: l + (l + 8), then + (l + 4), + (l + 2), + (l + 1) */
KQ_AVX512_FN static KQ_INLINE float att1_tree(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

KQ_AVX512_FN void kq_attn1_avx512(const kq_attn_args *a, int h0, int h1, int n, float *sc) {
    const int D = a->D, nc = ATT1_CHUNKS(D), bytes = D * (a->kv_f16 ? 2 : 4);
    const uint16_t *m = (const uint16_t *)a->mask;
    for (int h = h0; h < h1; h++) {
        const float *q = (const float *)(a->q + h * a->q_nb1);
        const char *kh = a->k + h * a->k_nb2, *vh = a->v + h * a->v_nb2;
        __m512 qc[ATT_D_MAX / 16];
        for (int c = 0; c < nc; c++) qc[c] = _mm512_maskz_loadu_ps(att1_mask(D - 16 * c), q + 16 * c);
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const char *row = kh + j * a->k_nb1;
            /* a head's rows are one row of the cache apart: fetch a few slots ahead (strided reads) */
            att1_prefetch(row + ATT1_AHEAD * a->k_nb1, bytes);
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < nc; c++) acc = _mm512_fmadd_ps(qc[c], att1_load(row, a->kv_f16, c, D), acc);
            sc[j] = fmaf(att1_tree(acc), a->scale, half_to_float(m[j]));
            mx = sc[j] > mx ? sc[j] : mx;
        }
        const __m512 mxv = _mm512_set1_ps(mx);
        __m512 lanes = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 e = att_exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j), mxv));
            _mm512_storeu_ps(sc + j, e);
            lanes = _mm512_add_ps(lanes, e);
        }
        if (j < n) { /* the tail: its missing lanes add nothing (the plain path's lanes skip them) */
            const __mmask16 k = att1_mask(n - j);
            const __m512 e = att_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), mxv));
            _mm512_mask_storeu_ps(sc + j, k, e);
            lanes = _mm512_mask_add_ps(lanes, k, lanes, e);
        }
        float l16[ATT_LANES];
        _mm512_storeu_ps(l16, lanes);
        const __m512 sum = _mm512_set1_ps(att_tree(l16));
        float *o = a->out + (size_t)h * D;
        for (int c0 = 0; c0 < nc; c0 += ATT_VCHUNK) { /* ATT_VCHUNK chains of 16 dimensions */
            const int cn = nc - c0 < ATT_VCHUNK ? nc - c0 : ATT_VCHUNK;
            __m512 acc[ATT_VCHUNK];
            for (int c = 0; c < cn; c++) acc[c] = _mm512_setzero_ps();
            for (int jj = 0; jj < n; jj++) {
                const __m512 p = _mm512_set1_ps(sc[jj]);
                const char *row = vh + jj * a->v_nb1;
                att1_prefetch(row + ATT1_AHEAD * a->v_nb1, bytes);
                for (int c = 0; c < cn; c++) acc[c] = _mm512_fmadd_ps(p, att1_load(row, a->kv_f16, c0 + c, D), acc[c]);
            }
            for (int c = 0; c < cn; c++)
                _mm512_mask_storeu_ps(o + 16 * (c0 + c), att1_mask(D - 16 * (c0 + c)), _mm512_div_ps(acc[c], sum));
        }
    }
}
#endif
