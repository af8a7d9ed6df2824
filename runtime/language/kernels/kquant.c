/* Batched Q4_K / Q5_K / Q6_K matmul for prompt processing, run as a ggml custom op.
 *
 * ggml-python 0.0.45's ggml computes a Q5_K or Q6_K matmul over a batch one dot product at a time
 * (ggml_vec_dot_q5_K_q8_K): every weight row is unpacked again for every token. On x86 it repacks
 * only Q4_0/Q4_K for batches, so in a Q4_K_M model the Q5_K attn_qkv and Q6_K ffn_down weights
 * (42% of the prefill work) took 58% of the prompt time. This kernel unpacks each weight row once
 * per call and runs the integer products 16 tokens at a time.
 *
 * Q4_K weights, repacked by ggml on x86, take this path only when not repacked (repack=False).
 *
 * Q4_0 in ggml's x86 repack has a second AVX-512 kernel whose cost follows the token count (x8_matmul
 * below). The op also adds the layer's bias and applies GELU where asked, in its own pass over the
 * outputs it wrote (the epilogue, the same numbers as ggml's add and gelu).
 *
 * Q4_0 (w = d * (c - 8), one fp16 d per 32 columns) is the same math with a_g = d, b_g = 8 d, and is
 * read in either of two layouts: plain rows of block_q4_0 (TYPE_Q4_0), or ggml's x86 repack
 * (TYPE_Q4_0_X8: block_q4_0x8, eight rows interleaved 8 bytes at a time, nibbles XOR 0x88; see
 * make_block_q4_0x8 in ggml-cpu/repack.cpp), so that a repacked model keeps ggml's one-token gemv
 * and batches come here, in the same memory. ggml's own Q4_0 gemm ran at about 60 G multiply-adds/s
 * per thread inside a full-size prompt (80% of its time) on the AVX512-VNNI machine this was written
 * on; prompts through this file ran 1.8x-2.7x faster at 2-128 tokens (docs/benchmarks.md).
 *
 * The math (per weight row, per group g of G columns: G = 32 for Q4_0/Q4_K/Q5_K, 16 for Q6_K):
 *     w[k] = a_g * c[k] - b_g            c: unsigned codes (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63)
 *     Q4_K, Q5_K: a_g = d * sc_g, b_g = dmin * m_g;   Q6_K: a_g = d * sc_g, b_g = 32 * a_g
 * Activations x are quantized per 32 columns: x[k] ~ dx * q[k], q int8. Then
 *     sum_k w[k] x[k] = sum_g dx_g * (a_g * sum_{k in g} c[k] q[k] - b_g * sum_{k in g} q[k])
 * with the inner sums in int32 (codes < 64 fit signed and unsigned int8 alike).
 *
 * Layout: a batch of T tokens is cut into blocks of 16 tokens; a block's codes are interleaved as
 * [k/4][16 tokens][4], so 4 columns of 16 tokens are 64 contiguous bytes. A micro-tile is 4 weight
 * rows x 16 tokens (x 2 blocks on AVX-512).
 *
 * Three paths, one result: plain C (always), AVX512-VNNI (x86-64: vpdpbusd, one zmm = 16 tokens),
 * NEON dotprod (aarch64: sdot by lane, one q register = 4 tokens). The fast paths are compiled with
 * function target attributes, not -march, and picked at run time by CPU detection (kq_detect), so
 * one build runs on any CPU of its architecture. Every path does the same IEEE operations in the
 * same order: the integer sums are exact, rounding is to nearest even, and the per-group update is
 *     acc = fma((float)s, a_g * dx, acc);  acc = fma(-b_g, dq, acc)
 * (fmaf in plain C), so the paths agree bit for bit, on x86 and aarch64 alike (tests/kernels/test_kquant.py,
 * tests/kernels/test_kquant_paths.py).
 */
#ifndef KQ_NO_PYTHON /* tests/kernels/kquant_harness.c includes this file without Python */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 8)
#include <cpuid.h>
#include <immintrin.h>
#define KQ_HAVE_AVX512 1
#define KQ_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
#else
#define KQ_HAVE_AVX512 0
#endif

/* NEON dotprod with GCC >= 10 only (tested with GCC 12); other compilers build the plain path alone. */
#if defined(__aarch64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 10
#include <arm_neon.h>
#include <sys/auxv.h>
#define KQ_HAVE_NEON_DOT 1
/* GCC's arm_neon.h declares sdot under this target; any CPU with dotprod is ARMv8.2 or later */
#define KQ_NEON_FN __attribute__((target("arch=armv8.2-a+dotprod")))
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* Linux arch/arm64 uapi hwcap.h */
#endif
#else
#define KQ_HAVE_NEON_DOT 0
#endif

#define KQ_INLINE inline __attribute__((always_inline)) /* so the per-path wrappers get their own code */

enum { KQ_PLAIN = 0, KQ_AVX512_VNNI = 1, KQ_NEON_DOTPROD = 2, KQ_NPATHS = 3 };
static const char *const kq_path_names[KQ_NPATHS] = {"plain", "avx512vnni", "neon-dotprod"};
static const int kq_compiled[KQ_NPATHS] = {1, KQ_HAVE_AVX512, KQ_HAVE_NEON_DOT};

#if KQ_HAVE_AVX512
/* Whether the OS saves the AVX-512 registers (XCR0: SSE, AVX, opmask, ZMM halves), as well as the CPU
 * having the instructions. */
static int os_saves_zmm(void) {
    unsigned int eax, ebx, ecx, edx, lo, hi;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 0xe6) == 0xe6;
}
#endif

/* The fastest path this CPU runs. */
static int kq_detect(void) {
#if KQ_HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && os_saves_zmm())
        return KQ_AVX512_VNNI;
#endif
#if KQ_HAVE_NEON_DOT
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) return KQ_NEON_DOTPROD;
#endif
    return KQ_PLAIN;
}

#define QK 256      /* K-quant super-block */
#define TB 16       /* tokens per block (one zmm of int32 / float lanes, four NEON q registers) */
#define ROWS 4      /* weight rows per micro-tile */
#define TYPE_Q4_0 2 /* ggml_type ids */
#define TYPE_Q4_0_X8 (0x100 | TYPE_Q4_0) /* not a ggml type: Q4_0 in ggml's x86 8-row repack */
#define TYPE_Q4_K 12
#define TYPE_Q5_K 13
#define TYPE_Q6_K 14

typedef struct { uint16_t d; uint8_t qs[16]; } block_q40;
typedef struct { uint16_t d[8]; uint8_t qs[128]; } block_q40x8;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4k;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5k;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6k;

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits;
    if (exp == 0) {
        const float f = ldexpf((float)man, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- weights: one super-block -> 256 codes and per-group (a, b) ------------------------------ */
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

typedef void (*unpack_fn)(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c, float *a,
                          float *b);

static void unpack_plain(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c, float *a,
                         float *b) {
    unpack_rows(W, row_bytes, type, sub, K, c, a, b);
}

#if KQ_HAVE_AVX512 /* the same C, vectorized for AVX-512 (about 10% of a Q4_K call at 64 tokens) */
/* Q4_0 in plain rows by hand: the compiler leaves the byte loop above scalar, and at 16-64 tokens a
 * Q4_0 row is unpacked for few products. The scales of up to 64 blocks are gathered first and
 * converted 16 at a time: converting and storing each block's 4 one by one was a third of the unpack.
 * (Q4_0 in ggml's 8-row layout runs x8_matmul on this path, and never comes here.) */
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

KQ_AVX512_FN static void unpack_avx512(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c,
                                       float *a, float *b) {
    if (type == TYPE_Q4_0)
        unpack_q40_avx512(W, row_bytes, K, c, a, b);
    else
        unpack_rows(W, row_bytes, type, sub, K, c, a, b);
}
#endif

/* ---- activations: int8 per 32 columns, interleaved per block of TB tokens ---------------------- */
typedef struct {
    int K, T, nblk, G;
    int8_t *q;  /* nblk x [K/4][TB][4] */
    float *dx;  /* nblk x [K/32][TB]: scale of each 32 columns */
    float *dq;  /* nblk x [K/G][TB]: dx * sum of the group's codes */
    const char *pf; /* weight bytes the next unpack reads that this one did not, fetched into L2 ... */
    size_t pf_len;  /* ... while a tile runs (AVX-512 path; 0: none) */
} acts;

static void free_acts(acts *p) {
    free(p->q);
    free(p->dx);
    free(p->dq);
}

/* Where 32 quantized columns k0.. of one token go: dx, dq (one or two groups), 8 words of codes. */
static void store32(acts *p, int k0, int blk, int lane, float dx, int s0, int s1, const int32_t w[8]) {
    const int K = p->K, G = p->G;
    p->dx[((size_t)blk * (K / 32) + k0 / 32) * TB + lane] = dx;
    float *dq = p->dq + ((size_t)blk * (K / G) + k0 / G) * TB + lane;
    if (G == 16) {
        dq[0] = dx * (float)s0;
        dq[TB] = dx * (float)s1;
    } else {
        dq[0] = dx * (float)(s0 + s1);
    }
    int32_t *q = (int32_t *)(p->q + (size_t)blk * K * TB) + (size_t)(k0 / 4) * TB + lane; /* [k/4][TB][4] */
    for (int i = 0; i < 8; i++) q[(size_t)i * TB] = w[i];
}

typedef void (*quantize_fn)(const float *x, int blk, int lane, acts *p); /* one token, K columns */

static void quantize_plain(const float *x, int blk, int lane, acts *p) {
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

#if KQ_HAVE_AVX512
KQ_AVX512_FN static void quantize_avx512(const float *x, int blk, int lane, acts *p) {
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
#endif

#if KQ_HAVE_NEON_DOT
KQ_NEON_FN static void quantize_neon(const float *x, int blk, int lane, acts *p) {
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
#endif

static int quantize_acts(acts *p, const float *X, int K, int T, size_t ldx, int G, quantize_fn quantize) {
    p->K = K, p->T = T, p->G = G, p->nblk = (T + TB - 1) / TB;
    p->pf = NULL, p->pf_len = 0;
    const size_t nq = (size_t)p->nblk * K * TB, ndx = (size_t)p->nblk * (K / 32) * TB,
                 ndq = (size_t)p->nblk * (K / G) * TB;
    p->q = aligned_alloc(64, nq);
    p->dx = aligned_alloc(64, ndx * sizeof(float));
    p->dq = aligned_alloc(64, ndq * sizeof(float));
    if (!p->q || !p->dx || !p->dq) {
        free_acts(p);
        return -1;
    }
    memset(p->q, 0, nq); /* padding tokens of the last block: zero codes and scales */
    memset(p->dx, 0, ndx * sizeof(float));
    memset(p->dq, 0, ndq * sizeof(float));
    for (int t = 0; t < T; t++) quantize(X + (size_t)t * ldx, t / TB, t % TB, p);
    return 0;
}

/* ---- micro-kernels: ROWS weight rows (codes c, row stride K) x one or two token blocks --------- */
typedef void (*tile_fn)(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                        float res[2][ROWS][TB]);

static void tile_plain(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
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

#if KQ_HAVE_AVX512
/* One 64-byte load feeds 16 tokens x 4 columns to a vpdpbusd against one row's 4 codes broadcast.
 * NB (blocks of 16 tokens, 1 or 2) and the group size G are constants in each instance below, so the
 * loops over blocks, rows and a group's columns unroll and the sums stay in registers. With a run-time
 * block count GCC kept bookkeeping for each sum in the inner loop, and with the group's loop rolled it
 * spilled and shuffled them: one 2560 x 10240 Q4_0 matmul at 22 tokens took 8.2 ms, then 7.9 with
 * NB constant (other changes between), 6.6 with G too (docs/benchmarks.md). */
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
     * here, whose unpack otherwise waited on them (one 2560 x 10240 matmul 7.8 -> 7.3 ms at 22 tokens);
     * that layout now runs x8_matmul, and this serves plain Q4_0 and the K-quants */
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

KQ_AVX512_FN static void tile_avx512(const acts *p, int blk, int nb, const uint8_t *c, const float *a,
                                     const float *b, float res[2][ROWS][TB]) {
    if (p->G == 16)
        nb == 2 ? tile_avx512_n(p, blk, c, a, b, res, 2, 16) : tile_avx512_n(p, blk, c, a, b, res, 1, 16);
    else
        nb == 2 ? tile_avx512_n(p, blk, c, a, b, res, 2, 32) : tile_avx512_n(p, blk, c, a, b, res, 1, 32);
}
#endif

/* ---- work split: thread ith of nth takes units [*u0, *u1), as evenly as whole units go ----------- */
static void kq_share(int units, int ith, int nth, int *u0, int *u1) {
    const int per = (units + nth - 1) / nth;
    *u0 = ith * per < units ? ith * per : units;
    *u1 = *u0 + per < units ? *u0 + per : units;
}

/* The output columns [*n0, *n1) thread ith of nth computes: whole 16-row stripes (x8_matmul) or
 * ROWS-row tiles. The matmul and the epilogue after it both take their rows from here. */
static void kq_rows(int type, int N, int ith, int nth, int path, int *n0, int *n1) {
    const int unit = KQ_HAVE_AVX512 && path == KQ_AVX512_VNNI && type == TYPE_Q4_0_X8 ? 16 : ROWS;
    int u0, u1;
    kq_share((N + unit - 1) / unit, ith, nth, &u0, &u1);
    *n0 = u0 * unit < N ? u0 * unit : N;
    *n1 = u1 * unit < N ? u1 * unit : N;
}

#if KQ_HAVE_AVX512
/* ---- Q4_0 in ggml's 8-row layout: 16 weight rows in a zmm's lanes, tokens broadcast ------------- */
/* The tile above puts 16 tokens in a zmm and broadcasts one row's codes, so a 22-token batch pays for
 * 32 and every row is unpacked to memory and read back. Here a zmm holds 4 columns of 16 rows (two
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

/* out (T x N) = X W^T for this thread's 16-row stripes; the last stripe of N % 16 == 8 rows reads its
 * 8-row group twice and stores half */
KQ_AVX512_FN static int x8_matmul(const void *W, int N, int K, const float *X, int T, size_t ldx, float *out,
                                  size_t ldo, int ith, int nth) {
    int n0, n1;
    kq_rows(TYPE_Q4_0_X8, N, ith, nth, KQ_AVX512_VNNI, &n0, &n1);
    const int nb = K / 32, s0 = n0 / 16, s1 = (n1 + 15) / 16;
    if (s0 >= s1) return 0;
    acts p;
    if (quantize_acts(&p, X, K, T, ldx, 32, quantize_avx512)) return -1;
    const int passes = (T + X8_TT - 1) / X8_TT;
    __m512i *codes = aligned_alloc(64, (size_t)nb * 8 * 64); /* a stripe unpacked: 8 zmm per 32 columns */
    float *scales = aligned_alloc(64, (size_t)nb * 16 * sizeof(float));
    if (!codes || !scales) {
        free(codes), free(scales), free_acts(&p);
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
    free(codes), free(scales), free_acts(&p);
    return 0;
}
#endif

#if KQ_HAVE_NEON_DOT
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

KQ_NEON_FN static void tile_neon(const acts *p, int blk, int nb, const uint8_t *c, const float *a,
                                 const float *b, float res[2][ROWS][TB]) {
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

/* ---- epilogue: out += bias, then GELU as ggml computes it -------------------------------------- */
/* Fused into the op so that a prompt's linear layers make no ggml_add / ggml_gelu passes over their
 * outputs (4% of a 22-token full-size prefill). The add is the same fp32 add. GELU is ggml's
 * GGML_GELU_FP16 form: 0 at x <= -10, x at x >= 10, else a table of the tanh form at each fp16 value,
 * rounded to fp16, looked up at fp16(x) (round to nearest even, as vcvtps2ph and ggml do). */
enum { KQ_ACT_NONE = 0, KQ_ACT_GELU = 1 };
static float kq_gelu_table[1 << 16];

static uint16_t float_to_half(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* 65520 and up round to infinity */
    uint32_t h, rem, half;
    if (ax < 0x38800000) { /* below 2^-14: a subnormal half (or zero), in units of 2^-24 */
        if (ax < 0x33000000) return (uint16_t)sign; /* below 2^-25: zero */
        const uint32_t m = (ax & 0x7fffff) | 0x800000;
        const int shift = 126 - (int)(ax >> 23); /* 14..24 */
        h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    } else {
        h = (ax >> 13) - (112u << 10), rem = ax & 0x1fff, half = 0x1000;
    }
    if (rem > half || (rem == half && (h & 1))) h++; /* a carry into the exponent is right too */
    return (uint16_t)(sign | h);
}

/* 0.5 x (1 + tanh(sqrt(2 / pi) x (1 + 0.044715 x^2))), the inner sum fused as GCC fuses ggml's (with
 * FMA): equal to ggml's table at every fp16 value on x86-64 (tests/kernels/test_kquant.py) */
static void kq_init_gelu(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) {
        const float x = half_to_float((uint16_t)i);
        const float inner = fmaf(0.044715f * x, x, 1.0f);
        const float g = 0.5f * x * (1.0f + tanhf(0.79788456080286535587989211986876f * x * inner));
        kq_gelu_table[i] = half_to_float(float_to_half(g));
    }
}

static KQ_INLINE float gelu_lookup(float x) {
    return x <= -10.0f ? 0.0f : x >= 10.0f ? x : kq_gelu_table[float_to_half(x)];
}

/* columns n0..n1 - 1 of tokens 0..T - 1 */
static void epilogue_plain(float *out, size_t ldo, int T, int n0, int n1, const float *bias, int act) {
    for (int t = 0; t < T; t++)
        for (int n = n0; n < n1; n++) {
            float y = out[(size_t)t * ldo + n];
            if (bias) y += bias[n];
            out[(size_t)t * ldo + n] = act == KQ_ACT_GELU ? gelu_lookup(y) : y;
        }
}

#if KQ_HAVE_AVX512
KQ_AVX512_FN static void epilogue_avx512(float *out, size_t ldo, int T, int n0, int n1, const float *bias,
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
#endif

static void kq_epilogue(float *out, size_t ldo, int T, int n0, int n1, const float *bias, int act, int path) {
    if (!bias && act == KQ_ACT_NONE) return;
#if KQ_HAVE_AVX512
    if (path == KQ_AVX512_VNNI) {
        epilogue_avx512(out, ldo, T, n0, n1, bias, act);
        return;
    }
#endif
    (void)path;
    epilogue_plain(out, ldo, T, n0, n1, bias, act);
}

/* ---- prompt attention: softmax(scale q K^T + mask) V per head and query --------------------------- */
/* For a prompt's queries on x86, instead of ggml's flash attention, whose tiled kernel needs 64
 * queries (a 22-token prompt was padded to 64 and ggml_pad copied them one float at a time: 11% of
 * its prefill). Each query is computed alone, in a fixed order, so its result does not depend on the
 * batch. Per head: K and V rows up to the last slot any query sees are converted to fp32 once (K
 * transposed), then for each query: 16 scores at a time, each a sequential fma over the head's
 * dimensions; the mask added; a full softmax (max, exp, a sum of 16 lanes reduced in a fixed tree);
 * the V rows summed with those weights, one fma per slot, in slot order; divided by the sum. The plain
 * C path does the same operations in the same order, with the same exp, so the paths agree bit for
 * bit. */
typedef struct {
    int32_t D, H, T, n_kv; /* head dim, heads, queries, cache slots in the views */
    int32_t kv_f16;        /* K and V elements: 1 F16, 0 F32 */
    const char *q;         /* F32; query t, head h at q + t * q_nb2 + h * q_nb1 */
    int64_t q_nb1, q_nb2;
    const char *k, *v; /* slot j, head h at k + j * k_nb1 + h * k_nb2 (bytes) */
    int64_t k_nb1, k_nb2, v_nb1, v_nb2;
    const char *mask; /* F16 rows: query t's at mask + t * m_nb1, 0 or -inf per slot */
    int64_t m_nb1;
    float *out; /* F32 (D, H, T) contiguous */
    float scale;
    int32_t status;
} kq_attn_args;

#define ATT_LANES 16
#define ATT_D_MAX 256
#define ATT_BLOCKS 4 /* AVX-512: blocks of 16 scores computed together */
#define ATT_VCHUNK 5 /* AVX-512: 16-dimension chunks of the V sum computed together (Phi-2: D = 80) */
#define ATT_JPAD(n) (((n) + ATT_BLOCKS * ATT_LANES - 1) / (ATT_BLOCKS * ATT_LANES) * (ATT_BLOCKS * ATT_LANES))

/* e^x for x <= 0 (a score minus the row's max): 2^n e^r with n = round(x / ln 2) and a degree-6
 * Taylor polynomial on |r| <= ln(2) / 2 (relative error ~2e-7); 0 below -87 (and for -inf) */
static KQ_INLINE float att_exp(float x) {
    if (!(x >= -87.0f)) return 0.0f;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187045e-06f, r);
    float p = 1.0f / 720.0f;
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    return ldexpf(p, (int)n);
}

static KQ_INLINE float att_load(const char *base, int32_t f16, int i) {
    return f16 ? half_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* one past the last slot any of the T queries sees */
static int att_slots(const kq_attn_args *a) {
    int n = 0;
    for (int t = 0; t < a->T; t++) {
        const uint16_t *m = (const uint16_t *)(a->mask + (size_t)t * a->m_nb1);
        int j = a->n_kv;
        while (j > n && m[j - 1] == 0xfc00) j--; /* fp16 -inf */
        n = j > n ? j : n;
    }
    return n;
}

/* the sum of 16 lanes: l + (l + 8), + (l + 4), + (l + 2), + (l + 1), as both paths do it */
static KQ_INLINE float att_tree(float *s) {
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) s[l] += s[l + w];
    return s[0];
}

/* heads h0..h1 - 1; kt: D x jpad, vf: n x D, sc: jpad floats of scratch */
static void attn_plain(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf, float *sc) {
    const int D = a->D, jpad = (n + ATT_LANES - 1) / ATT_LANES * ATT_LANES;
    for (int h = h0; h < h1; h++) {
        for (int j = 0; j < jpad; j++)
            for (int d = 0; d < D; d++)
                kt[(size_t)d * jpad + j] = j < n ? att_load(a->k + j * a->k_nb1 + h * a->k_nb2, a->kv_f16, d) : 0.0f;
        for (int j = 0; j < n; j++)
            for (int d = 0; d < D; d++) vf[(size_t)j * D + d] = att_load(a->v + j * a->v_nb1 + h * a->v_nb2, a->kv_f16, d);
        for (int t = 0; t < a->T; t++) {
            const float *q = (const float *)(a->q + t * a->q_nb2 + h * a->q_nb1);
            const uint16_t *m = (const uint16_t *)(a->mask + (size_t)t * a->m_nb1);
            float mx = -INFINITY, lanes[ATT_LANES] = {0};
            for (int j = 0; j < jpad; j++) {
                float s = 0.0f;
                for (int d = 0; d < D; d++) s = fmaf(q[d], kt[(size_t)d * jpad + j], s);
                s = j < n ? s * a->scale + half_to_float(m[j]) : -INFINITY;
                sc[j] = s;
                mx = s > mx ? s : mx;
            }
            for (int j = 0; j < jpad; j++) {
                sc[j] = att_exp(sc[j] - mx);
                lanes[j % ATT_LANES] += sc[j];
            }
            const float sum = att_tree(lanes);
            float *o = a->out + ((size_t)t * a->H + h) * D;
            for (int d = 0; d < D; d++) {
                float acc = 0.0f;
                for (int j = 0; j < n; j++) acc = fmaf(sc[j], vf[(size_t)j * D + d], acc);
                o[d] = acc / sum;
            }
        }
    }
}

#if KQ_HAVE_AVX512
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

KQ_AVX512_FN static void attn_avx512(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf,
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
#endif

/* thread ith of nth: heads split evenly; status -1 when out of memory, -2 on bad arguments */
static int kq_attention(const kq_attn_args *a, int ith, int nth, int path) {
    if (a->D <= 0 || a->D > ATT_D_MAX || a->H <= 0 || a->T <= 0 || a->n_kv <= 0) return -2;
    int h0, h1;
    kq_share(a->H, ith, nth, &h0, &h1);
    if (h0 >= h1) return 0;
    const int n = att_slots(a);
    if (n == 0) return -2; /* a query that sees nothing */
    const size_t jpad = (size_t)ATT_JPAD(n); /* enough for both paths */
    float *kt = aligned_alloc(64, (jpad * a->D * sizeof(float) + 63) / 64 * 64);
    float *vf = aligned_alloc(64, ((size_t)n * a->D * sizeof(float) + 63) / 64 * 64);
    float *sc = aligned_alloc(64, jpad * sizeof(float));
    if (!kt || !vf || !sc) {
        free(kt), free(vf), free(sc);
        return -1;
    }
#if KQ_HAVE_AVX512
    if (path == KQ_AVX512_VNNI)
        attn_avx512(a, h0, h1, n, kt, vf, sc);
    else
#endif
        attn_plain(a, h0, h1, n, kt, vf, sc);
    (void)path;
    free(kt), free(vf), free(sc);
    return 0;
}

/* ---- one thread's share: out (T x N, row stride ldo) = X (T x K) W^T (W: N rows of K) ---------- */
static int kq_matmul(int type, const void *W, int N, int K, const float *X, int T, size_t ldx, float *out,
                     size_t ldo, int ith, int nth, int path) {
    const int q40 = type == TYPE_Q4_0 || type == TYPE_Q4_0_X8;
    if ((!q40 && type != TYPE_Q4_K && type != TYPE_Q5_K && type != TYPE_Q6_K) || K % (q40 ? 32 : QK) ||
        N % (type == TYPE_Q4_0_X8 ? 8 : ROWS) || T <= 0)
        return -2;
    quantize_fn quantize = quantize_plain;
    unpack_fn unpack = unpack_plain;
    tile_fn tile = tile_plain;
#if KQ_HAVE_AVX512
    if (path == KQ_AVX512_VNNI) quantize = quantize_avx512, unpack = unpack_avx512, tile = tile_avx512;
#endif
#if KQ_HAVE_NEON_DOT
    if (path == KQ_NEON_DOTPROD) quantize = quantize_neon, tile = tile_neon;
#endif
#if KQ_HAVE_AVX512
    if (path == KQ_AVX512_VNNI && type == TYPE_Q4_0_X8) return x8_matmul(W, N, K, X, T, ldx, out, ldo, ith, nth);
#endif
    const int G = type == TYPE_Q6_K ? 16 : 32, ng = K / G;
    const size_t row_bytes = q40                  ? (size_t)(K / 32) * sizeof(block_q40)
                             : type == TYPE_Q4_K ? (size_t)(K / QK) * sizeof(block_q4k)
                             : type == TYPE_Q5_K ? (size_t)(K / QK) * sizeof(block_q5k)
                                                 : (size_t)(K / QK) * sizeof(block_q6k);
    int n0, n1;
    kq_rows(type, N, ith, nth, path, &n0, &n1);
    const int t0 = n0 / ROWS, t1 = n1 / ROWS;
    if (t0 >= t1) return 0;
    acts p;
    if (quantize_acts(&p, X, K, T, ldx, G, quantize)) return -1;
    uint8_t *c = aligned_alloc(64, (size_t)ROWS * K);
    float *a = malloc(sizeof(float) * ROWS * ng), *b = malloc(sizeof(float) * ROWS * ng);
    if (!c || !a || !b) {
        free(c), free(a), free(b), free_acts(&p);
        return -1;
    }
    float res[2][ROWS][TB];
    const size_t span = (size_t)ROWS * row_bytes;
    for (int tile_i = t0; tile_i < t1; tile_i++) {
        /* Q4_0_X8 comes here on the plain path only (AVX-512 runs x8_matmul): 8-row groups of the same
         * bytes, two tiles per group. The AVX-512 tile prefetches the next tile, when it is this
         * thread's. */
        if (type == TYPE_Q4_0_X8)
            unpack((const char *)W + (size_t)(tile_i / 2) * 2 * span, row_bytes, type, (tile_i % 2) * ROWS, K, c,
                   a, b);
        else
            unpack((const char *)W + (size_t)tile_i * span, row_bytes, type, 0, K, c, a, b);
        p.pf_len = type != TYPE_Q4_0_X8 && tile_i + 1 < t1 ? span : 0;
        if (p.pf_len) p.pf = (const char *)W + (size_t)(tile_i + 1) * span;
        for (int blk = 0; blk < p.nblk; blk += 2) {
            const int nb = blk + 1 < p.nblk ? 2 : 1;
            tile(&p, blk, nb, c, a, b, res);
            for (int j = 0; j < nb; j++)
                for (int lane = 0; lane < TB; lane++) {
                    const int t = (blk + j) * TB + lane;
                    if (t >= T) break;
                    for (int r = 0; r < ROWS; r++) out[(size_t)t * ldo + tile_i * ROWS + r] = res[j][r][lane];
                }
        }
    }
    free(c), free(a), free(b), free_acts(&p);
    return 0;
}

/* ---- the ggml custom op: ggml_custom_op_t(dst, ith, nth, userdata) ---------------------------- */
typedef struct { /* filled by the runtime once the graph's buffers are allocated */
    int32_t type, n, k, t;
    const void *w;
    const float *x;
    float *out;
    int64_t ldx, ldo; /* in floats */
    int32_t status;
    const float *bias; /* n floats added to each output row, or NULL */
    int32_t act;       /* KQ_ACT_NONE or KQ_ACT_GELU, after the bias */
} kq_args;

static int kq_active = KQ_PLAIN; /* set once from kq_detect() when the module loads */

static int path_runs(int path) { return path == KQ_PLAIN || path == kq_active; }

static void kq_op(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    kq_args *u = userdata;
    const int rc = kq_matmul(u->type, u->w, u->n, u->k, u->x, u->t, (size_t)u->ldx, u->out, (size_t)u->ldo,
                             ith, nth, kq_active);
    if (rc) {
        u->status = rc; /* read by the runtime after the graph ran */
        return;
    }
    int n0, n1; /* this thread's columns, just written by it: no other thread touches them */
    kq_rows(u->type, u->n, ith, nth, kq_active, &n0, &n1);
    kq_epilogue(u->out, (size_t)u->ldo, u->t, n0, n1, u->bias, u->act, kq_active);
}

static void kq_attn_op(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    kq_attn_args *a = userdata;
    const int rc = kq_attention(a, ith, nth, kq_active);
    if (rc) a->status = rc;
}

/* ---- Python: op_address(), matmul(...) for the tests, PATH / SUPPORTED / COMPILED -------------- */
#ifndef KQ_NO_PYTHON

static PyObject *py_op_address(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromVoidPtr((void *)kq_op);
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int type, n, k, t, path = -1;
    unsigned long long w, x, out;
    Py_ssize_t ldx, ldo;
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKiiKinKns", &type, &w, &n, &k, &x, &t, &ldx, &out, &ldo, &name)) return NULL;
    for (int i = 0; i < KQ_NPATHS; i++)
        if (!strcmp(name, kq_path_names[i])) path = i;
    if (path < 0 || !path_runs(path)) {
        PyErr_Format(PyExc_ValueError, "kquant path: expected 'plain' or '%s' (what this CPU runs), got '%s'",
                     kq_path_names[kq_active], name);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kq_matmul(type, (const void *)(uintptr_t)w, n, k, (const float *)(uintptr_t)x, t, (size_t)ldx,
                   (float *)(uintptr_t)out, (size_t)ldo, 0, 1, path);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_Format(PyExc_ValueError, "unsupported matmul: type %d, %d rows of %d, %d tokens", type, n, k, t);
        return NULL;
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_attn_op_address(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromVoidPtr((void *)kq_attn_op);
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    unsigned long long p;
    const char *name;
    int path = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "Ks", &p, &name)) return NULL;
    for (int i = 0; i < KQ_NPATHS; i++)
        if (!strcmp(name, kq_path_names[i])) path = i;
    if (path < 0 || !path_runs(path)) {
        PyErr_Format(PyExc_ValueError, "attention: unknown path '%s'", name);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kq_attention((const kq_attn_args *)(uintptr_t)p, 0, 1, path);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "attention: bad arguments (head size, counts, or a query seeing no slot)");
        return NULL;
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_epilogue(PyObject *self, PyObject *args) {
    int t, n, act, path = -1;
    unsigned long long out, bias;
    Py_ssize_t ldo;
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "KniiKis", &out, &ldo, &t, &n, &bias, &act, &name)) return NULL;
    for (int i = 0; i < KQ_NPATHS; i++)
        if (!strcmp(name, kq_path_names[i])) path = i;
    if (path < 0 || !path_runs(path) || (act != KQ_ACT_NONE && act != KQ_ACT_GELU)) {
        PyErr_Format(PyExc_ValueError, "epilogue: unknown path '%s' or activation %d", name, act);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kq_epilogue((float *)(uintptr_t)out, (size_t)ldo, t, 0, n, (const float *)(uintptr_t)bias, act, path);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* the names of the paths i with mask[i], as a tuple */
static PyObject *path_tuple(const int *mask) {
    PyObject *list = PyList_New(0), *tuple;
    for (int i = 0; list && i < KQ_NPATHS; i++) {
        if (!mask[i]) continue;
        PyObject *s = PyUnicode_FromString(kq_path_names[i]);
        if (!s || PyList_Append(list, s)) Py_CLEAR(list);
        Py_XDECREF(s);
    }
    if (!list) return NULL;
    tuple = PyList_AsTuple(list);
    Py_DECREF(list);
    return tuple;
}

static PyMethodDef methods[] = {
    {"op_address", py_op_address, METH_NOARGS, "Address of the ggml custom op (ggml_custom_op_t)."},
    {"attn_op_address", py_attn_op_address, METH_NOARGS, "Address of the prompt attention custom op."},
    {"attention", py_attention, METH_VARARGS,
     "attention(args_address, path): the prompt attention of a kq_attn_args struct on one thread."},
    {"epilogue", py_epilogue, METH_VARARGS,
     "epilogue(out, ldo, t, n, bias, act, path): out[:t, :n] += bias (0: none), then GELU if act == 1."},
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(type, w, n, k, x, t, ldx, out, ldo, path): out = x @ dequant(w).T on one thread, with the\n"
     "named path ('plain' or PATH)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    kq_active = kq_detect();
    kq_init_gelu();
    int runs[KQ_NPATHS];
    for (int i = 0; i < KQ_NPATHS; i++) runs[i] = path_runs(i);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *compiled = path_tuple(kq_compiled), *supported = path_tuple(runs);
    const int bad = !compiled || !supported || PyModule_AddObjectRef(m, "COMPILED", compiled) ||
                    PyModule_AddObjectRef(m, "SUPPORTED", supported) ||
                    PyModule_AddStringConstant(m, "PATH", kq_path_names[kq_active]) ||
                    PyModule_AddIntConstant(m, "ROWS", ROWS) || PyModule_AddIntConstant(m, "QK", QK) ||
                    PyModule_AddIntConstant(m, "Q4_0_X8", TYPE_Q4_0_X8) ||
                    PyModule_AddIntConstant(m, "ACT_GELU", KQ_ACT_GELU);
    Py_XDECREF(compiled);
    Py_XDECREF(supported);
    if (bad) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
#endif
