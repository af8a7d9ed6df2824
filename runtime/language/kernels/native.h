/* The native kernels' shared header: types, block structs, work buffers, the ops' arguments, each
 * path's functions and the dispatch table (kq_ops). Read this first; the files of the folder:
 *
 *   native.h      this header           unpack.h      weight unpacking, inline into each path
 *   dispatch.c    CPU detection; the plain table and the one dispatch table, filled at module load
 *   matmul.c      the matmul op (+ its ggml custom op): checks, each thread's rows, the tile loop
 *   plain.c       the matmul's plain C path: the reference every other path equals bit for bit
 *   x86_avx512.c  x86-64 AVX512-VNNI: every op, and Q4_0 in ggml's 8-row repack by its own kernel
 *   arm_neon.c    aarch64 NEON dotprod: the matmul's activation quantizing and tile
 *   epilogue.c    the bias + GELU op (ggml's GELU table) and its plain C path
 *   attention.c   the attention ops (+ their ggml custom ops) and their plain C paths: a prompt's
 *                 queries, and one decode step's query
 *   module.c      the CPython module `_native` (ops.py is its Python side)
 *
 * The matmul: out (T x N) = X (T x K) W^T for W in Q4_0 (plain rows, or ggml's x86 8-row repack),
 * Q4_K, Q5_K or Q6_K, run as a ggml custom op for prompt batches. ggml-python 0.0.45's ggml computes
 * a Q5_K or Q6_K matmul over a batch one dot product at a time (every weight row unpacked again for
 * every token), and on x86 repacks only Q4_0/Q4_K; this op unpacks each weight row once per call and
 * runs the integer products 16 tokens at a time. Q4_0 in ggml's x86 repack runs a second AVX-512
 * kernel whose cost follows the token count (kq_q40x8_avx512), so that a repacked model keeps ggml's
 * one-token gemv and batches come here, in the same memory. The op then adds the layer's bias and
 * applies GELU where asked (epilogue.c). Why each exists, and what it gained: docs/benchmarks.md.
 *
 * The math (per weight row, per group g of G columns: G = 32 for Q4_0/Q4_K/Q5_K, 16 for Q6_K):
 *     w[k] = a_g * c[k] - b_g            c: unsigned codes (Q4_0/Q4_K 0..15, Q5_K 0..31, Q6_K 0..63)
 *     Q4_K, Q5_K: a_g = d * sc_g, b_g = dmin * m_g;   Q6_K: a_g = d * sc_g, b_g = 32 * a_g;
 *     Q4_0 (one fp16 d per 32 columns): a_g = d, b_g = 8 d
 * Activations x are quantized per 32 columns: x[k] ~ dx * q[k], q int8. Then
 *     sum_k w[k] x[k] = sum_g dx_g * (a_g * sum_{k in g} c[k] q[k] - b_g * sum_{k in g} q[k])
 * with the inner sums in int32 (codes < 64 fit signed and unsigned int8 alike).
 *
 * Layout: a batch of T tokens is cut into blocks of TB = 16 tokens; a block's codes are interleaved
 * as [k/4][16 tokens][4], so 4 columns of 16 tokens are 64 contiguous bytes. A micro-tile is ROWS = 4
 * weight rows x 16 tokens (x 2 blocks on AVX-512).
 *
 * Paths, one result: plain C (always), AVX512-VNNI (x86-64: vpdpbusd, one zmm = 16 tokens), NEON
 * dotprod (aarch64: sdot by lane, one q register = 4 tokens). The fast paths are compiled with
 * function target attributes, not -march, and the one this CPU runs is chosen once when the module
 * loads (kq_dispatch_init fills kq_dispatch), so one build runs on any CPU of its architecture and no
 * op decides again. A path without its own version of a step uses the plain one. Every path does the
 * same IEEE operations in the same order: the integer sums are exact, rounding is to nearest even,
 * and the per-group update is
 *     acc = fma((float)s, a_g * dx, acc);  acc = fma(-b_g, dq, acc)
 * (fmaf in plain C), so the paths agree bit for bit, on x86 and aarch64 alike (tests/kernels/
 * test_kernels.py on this CPU; tests/kernels/test_kernel_paths.py runs tests/kernels/harness.c under
 * emulated CPUs).
 */
#ifndef TINYGPTV_NATIVE_H
#define TINYGPTV_NATIVE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- which fast paths this compiler builds ------------------------------------------------------ */
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 8)
#define KQ_HAVE_AVX512 1
#define KQ_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
#else
#define KQ_HAVE_AVX512 0
#endif

/* NEON dotprod with GCC >= 10 only (tested with GCC 12); other compilers build the plain path alone. */
#if defined(__aarch64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 10
#define KQ_HAVE_NEON_DOT 1
/* GCC's arm_neon.h declares sdot under this target; any CPU with dotprod is ARMv8.2 or later */
#define KQ_NEON_FN __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define KQ_HAVE_NEON_DOT 0
#endif

#define KQ_INLINE inline __attribute__((always_inline)) /* so each path's callers get their own code */

enum { KQ_PLAIN = 0, KQ_AVX512_VNNI = 1, KQ_NEON_DOTPROD = 2, KQ_NPATHS = 3 };
extern const char *const kq_path_names[KQ_NPATHS]; /* "plain", "avx512vnni", "neon-dotprod" */
extern const int kq_compiled[KQ_NPATHS];           /* which of them this build holds */

/* ---- weight types and blocks ------------------------------------------------------------------- */
#define QK 256      /* K-quant super-block */
#define TB 16       /* tokens per block (one zmm of int32 / float lanes, four NEON q registers) */
#define ROWS 4      /* weight rows per micro-tile */
#define TYPE_Q4_0 2 /* ggml_type ids */
#define TYPE_Q4_0_X8 (0x100 | TYPE_Q4_0) /* not a ggml type: Q4_0 in ggml's x86 8-row repack */
#define TYPE_Q4_K 12
#define TYPE_Q5_K 13
#define TYPE_Q6_K 14

/* Q4_0 in ggml's x86 repack (block_q4_0x8, make_block_q4_0x8 in ggml-cpu/repack.cpp): per 32
 * columns the 8 rows' fp16 scales, then their 16 bytes of nibbles in 8-byte chunks (chunk i: row
 * i % 8, bytes 8 * (i / 8)..), each byte XOR 0x88. */
typedef struct { uint16_t d; uint8_t qs[16]; } block_q40;
typedef struct { uint16_t d[8]; uint8_t qs[128]; } block_q40x8;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4k;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5k;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6k;

static inline float half_to_float(uint16_t h) {
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

/* ---- activations: int8 per 32 columns, interleaved per block of TB tokens ---------------------- */
typedef struct {
    int K, T, nblk, G;
    int8_t *q;  /* nblk x [K/4][TB][4] */
    float *dx;  /* nblk x [K/32][TB]: scale of each 32 columns */
    float *dq;  /* nblk x [K/G][TB]: dx * sum of the group's codes */
    const char *pf; /* weight bytes the next unpack reads that this one did not, fetched into L2 ... */
    size_t pf_len;  /* ... while a tile runs (AVX-512 path; 0: none) */
} acts;

/* Where 32 quantized columns k0.. of one token go: dx, dq (one or two groups), 8 words of codes. */
static inline void store32(acts *p, int k0, int blk, int lane, float dx, int s0, int s1, const int32_t w[8]) {
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

/* ---- the ops' arguments, as the runtime fills them (ops.py mirrors both as ctypes structs) ------ */
enum { KQ_ACT_NONE = 0, KQ_ACT_GELU = 1 };

typedef struct { /* the matmul op: filled by the runtime once the graph's buffers are allocated */
    int32_t type, n, k, t;
    const void *w;
    const float *x;
    float *out;
    int64_t ldx, ldo; /* in floats */
    int32_t status;
    const float *bias; /* n floats added to each output row, or NULL */
    int32_t act;       /* KQ_ACT_NONE or KQ_ACT_GELU, after the bias */
} kq_args;

typedef struct { /* the attention ops (prompt, and decode: T = 1) */
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

/* attention: scores in lanes of 16, summed in a fixed tree by every path */
#define ATT_LANES 16
#define ATT_D_MAX 256
#define ATT_BLOCKS 4 /* AVX-512: blocks of 16 scores computed together */
#define ATT_VCHUNK 5 /* AVX-512: 16-dimension chunks of the V sum computed together (Phi-2: D = 80) */
#define ATT_JPAD(n) (((n) + ATT_BLOCKS * ATT_LANES - 1) / (ATT_BLOCKS * ATT_LANES) * (ATT_BLOCKS * ATT_LANES))

/* The decode attention (one query per head, T = 1), defined so that 16- and 4-lane SIMD compute it
 * directly from the cache rows, with no converted copies:
 *     s_j = fma(dot(q, K_j), scale, mask_j)   dot: 16 lanes, lane l the fma chain over dimensions
 *                                             l, l + 16, ... (zeros past D), summed by att_tree
 *     e_j = att_exp(s_j - max s);  sum = att_tree(lanes), lane l the sum of e_j over j = l mod 16
 *     o[d] = (the fma chain over slots j = 0.. of e_j K.. V_j[d]) / sum
 * (the prompt op takes its dot products in dimension order instead, 16 slots at a time) */
#define ATT1_CHUNKS(D) (((D) + ATT_LANES - 1) / ATT_LANES) /* 16-dimension chunks of a head */

/* the sum of 16 lanes: l + (l + 8), + (l + 4), + (l + 2), + (l + 1), as every path does it */
static KQ_INLINE float att_tree(float *s) {
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) s[l] += s[l + w];
    return s[0];
}

/* ---- the steps each path implements ------------------------------------------------------------ */
/* one token's K activations -> int8 codes and scales in block blk, lane `lane` of p */
typedef void (*quantize_fn)(const float *x, int blk, int lane, acts *p);
/* ROWS weight rows (row stride row_bytes; Q4_0_X8: rows sub.. of the 8-row group at W) -> codes c
 * (ROWS x K) and per-group a, b (ROWS x K/G) */
typedef void (*unpack_fn)(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c, float *a,
                          float *b);
/* ROWS rows of codes (row stride K) x nb (1 or 2) token blocks from blk -> res[j][r][lane] */
typedef void (*tile_fn)(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                        float res[2][ROWS][TB]);
/* out (T x N) = X W^T for W in TYPE_Q4_0_X8, output columns n0..n1 - 1 (whole 16-row stripes):
 * 0, or -1 out of memory */
typedef int (*q40x8_fn)(const void *W, int N, int K, const float *X, int T, size_t ldx, float *out,
                        size_t ldo, int n0, int n1);
/* out[t][n] += bias[n] (bias may be NULL), then GELU if act, for tokens 0..T - 1, columns n0..n1 - 1 */
typedef void (*epilogue_fn)(float *out, size_t ldo, int T, int n0, int n1, const float *bias, int act);
/* the attention of heads h0..h1 - 1 over slots 0..n - 1; kt: D x ATT_JPAD(n), vf: n x D, sc:
 * ATT_JPAD(n) floats of scratch */
typedef void (*attn_fn)(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf, float *sc);
/* the decode attention (T = 1) of heads h0..h1 - 1 over slots 0..n - 1; sc: n floats of scratch */
typedef void (*attn1_fn)(const kq_attn_args *a, int h0, int h1, int n, float *sc);

/* ---- the dispatch table: one path's functions for every op -------------------------------------- */
typedef struct {
    const char *name;      /* kq_path_names[id] */
    int id;                /* KQ_PLAIN, KQ_AVX512_VNNI or KQ_NEON_DOTPROD */
    quantize_fn quantize;  /* matmul: activations */
    unpack_fn unpack;      /* matmul: weights */
    tile_fn tile;          /* matmul: the micro-tile */
    q40x8_fn q40x8;        /* matmul of TYPE_Q4_0_X8 by its own kernel, or NULL: unpack + tile */
    int q40x8_rows;        /* the rows of one unit of its work split (q40x8 only) */
    epilogue_fn epilogue;  /* bias + GELU */
    attn_fn attention;     /* prompt attention */
    attn1_fn attention1;   /* decode attention (one query) */
    int attention1_own;    /* 1: attention1 is this path's own (not the plain one) */
} kq_ops;

extern const kq_ops kq_plain; /* the plain C reference of every op (dispatch.c) */
extern kq_ops kq_dispatch;    /* what this CPU runs: filled once, when the module loads */
void kq_dispatch_init(void);  /* detects the CPU, fills kq_dispatch, builds the GELU table */
const kq_ops *kq_ops_named(const char *name); /* kq_plain or kq_dispatch by name; NULL: not run here */

/* plain.c, epilogue.c, attention.c: the plain C steps */
void kq_quantize_plain(const float *x, int blk, int lane, acts *p);
void kq_unpack_plain(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c, float *a,
                     float *b);
void kq_tile_plain(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                   float res[2][ROWS][TB]);
void kq_epilogue_plain(float *out, size_t ldo, int T, int n0, int n1, const float *bias, int act);
void kq_attn_plain(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf, float *sc);
void kq_attn1_plain(const kq_attn_args *a, int h0, int h1, int n, float *sc);

#if KQ_HAVE_AVX512 /* x86_avx512.c */
int kq_cpu_has_avx512vnni(void);
void kq_quantize_avx512(const float *x, int blk, int lane, acts *p);
void kq_unpack_avx512(const char *W, size_t row_bytes, int type, int sub, int K, uint8_t *c, float *a,
                      float *b);
void kq_tile_avx512(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                    float res[2][ROWS][TB]);
int kq_q40x8_avx512(const void *W, int N, int K, const float *X, int T, size_t ldx, float *out, size_t ldo,
                    int n0, int n1);
void kq_epilogue_avx512(float *out, size_t ldo, int T, int n0, int n1, const float *bias, int act);
void kq_attn_avx512(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf, float *sc);
void kq_attn1_avx512(const kq_attn_args *a, int h0, int h1, int n, float *sc);
#define KQ_Q40X8_ROWS 16 /* kq_q40x8_avx512 works on stripes of 16 rows */
#endif

#if KQ_HAVE_NEON_DOT /* arm_neon.c */
int kq_cpu_has_dotprod(void);
void kq_quantize_neon(const float *x, int blk, int lane, acts *p);
void kq_tile_neon(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                  float res[2][ROWS][TB]);
void kq_attn1_neon(const kq_attn_args *a, int h0, int h1, int n, float *sc);
#endif

/* ---- the ops (thread ith of nth; ops: kq_plain, kq_dispatch) ------------------------------------ */
/* matmul.c: out (T x N, row stride ldo) = X (T x K, row stride ldx) W^T for this thread's rows:
 * 0, -1 out of memory, -2 a type or shape the op does not take */
int kq_matmul(const kq_ops *ops, int type, const void *W, int N, int K, const float *X, int T, size_t ldx,
              float *out, size_t ldo, int ith, int nth);
void kq_rows(const kq_ops *ops, int type, int N, int ith, int nth, int *n0, int *n1);
void kq_share(int units, int ith, int nth, int *u0, int *u1);
int kq_quantize_acts(acts *p, const float *X, int K, int T, size_t ldx, int G, quantize_fn quantize);
void kq_free_acts(acts *p);
void kq_op(void *dst, int ith, int nth, void *userdata); /* the matmul + epilogue as ggml_custom_op_t */

/* epilogue.c: columns n0..n1 - 1 of tokens 0..T - 1 (nothing to do without bias and act) */
void kq_epilogue(const kq_ops *ops, float *out, size_t ldo, int T, int n0, int n1, const float *bias,
                 int act);
void kq_init_gelu(void);
extern float kq_gelu_table[1 << 16];

/* attention.c: 0, -1 out of memory, -2 bad arguments */
int kq_attention(const kq_ops *ops, const kq_attn_args *a, int ith, int nth);
void kq_attn_op(void *dst, int ith, int nth, void *userdata); /* as ggml_custom_op_t */
int kq_attention1(const kq_ops *ops, const kq_attn_args *a, int ith, int nth); /* T must be 1 */
void kq_attn1_op(void *dst, int ith, int nth, void *userdata);                  /* as ggml_custom_op_t */

#endif
