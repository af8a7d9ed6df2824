/* Batched Q4_K / Q5_K / Q6_K matmul for prompt processing, run as a ggml custom op.
 *
 * ggml-python 0.0.45's ggml computes a Q5_K or Q6_K matmul over a batch one dot product at a time
 * (ggml_vec_dot_q5_K_q8_K): every weight row is unpacked again for every token. On x86 it repacks
 * only Q4_0/Q4_K for batches, so in a Q4_K_M model the Q5_K attn_qkv and Q6_K ffn_down weights
 * (42% of the prefill work) took 58% of the prompt time. This kernel unpacks each weight row once
 * per call and runs the integer products with AVX512-VNNI across 16 tokens at a time.
 *
 * Q4_K weights, repacked by ggml on x86, take this path only when not repacked (repack=False).
 *
 * The math (per weight row, per group g of G columns: G = 32 for Q4_K/Q5_K, 16 for Q6_K):
 *     w[k] = a_g * c[k] - b_g            c: unsigned codes (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63)
 *     Q4_K, Q5_K: a_g = d * sc_g, b_g = dmin * m_g;   Q6_K: a_g = d * sc_g, b_g = 32 * a_g
 * Activations x are quantized per 32 columns: x[k] ~ dx * q[k], q int8. Then
 *     sum_k w[k] x[k] = sum_g dx_g * (a_g * sum_{k in g} c[k] q[k] - b_g * sum_{k in g} q[k])
 * with the inner sums in int32 (vpdpbusd: unsigned codes times signed q).
 *
 * Layout: a batch of T tokens is cut into blocks of 16 tokens; a block's codes are interleaved as
 * [k/4][16 tokens][4], so one 64-byte load feeds 16 tokens x 4 columns to a vpdpbusd against one
 * weight row's 4 codes broadcast. A micro-tile is 4 weight rows x 32 tokens.
 *
 * Without AVX512-VNNI the same math runs in plain C, quantization included (the tests run both
 * paths; without VNNI the runtime keeps ggml's own kernel, see FAST).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define KQ_FAST 1
#else
#define KQ_FAST 0
#endif

#define QK 256      /* K-quant super-block */
#define TB 16       /* tokens per block (one zmm of int32 / float lanes) */
#define ROWS 4      /* weight rows per micro-tile */
#define TYPE_Q4_K 12 /* ggml_type ids */
#define TYPE_Q5_K 13
#define TYPE_Q6_K 14

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
static void scale_min_k4(const uint8_t *s, float d, float dmin, float *a, float *b) {
    for (int j = 0; j < 8; j++) { /* 6-bit scale and min of each 32-group, packed in 12 bytes */
        const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        a[j] = d * sc;
        b[j] = dmin * m;
    }
}

static void unpack_q4k(const block_q4k *x, uint8_t *c, float *a, float *b) {
    scale_min_k4(x->scales, half_to_float(x->d), half_to_float(x->dmin), a, b);
    for (int j = 0; j < 4; j++) { /* 64 columns per 32 bytes: low nibbles, then high */
        const uint8_t *lo = x->qs + 32 * j;
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = lo[l] & 15;
            c[64 * j + 32 + l] = lo[l] >> 4;
        }
    }
}

static void unpack_q5k(const block_q5k *x, uint8_t *c, float *a, float *b) {
    scale_min_k4(x->scales, half_to_float(x->d), half_to_float(x->dmin), a, b);
    for (int j = 0; j < 4; j++) { /* as Q4_K, plus the fifth bit: bit 2j / 2j+1 of qh */
        const uint8_t *lo = x->qs + 32 * j;
        for (int l = 0; l < 32; l++) {
            c[64 * j + l] = (lo[l] & 15) | (((x->qh[l] >> (2 * j)) & 1) << 4);
            c[64 * j + 32 + l] = (lo[l] >> 4) | (((x->qh[l] >> (2 * j + 1)) & 1) << 4);
        }
    }
}

static void unpack_q6k(const block_q6k *x, uint8_t *c, float *a, float *b) {
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

/* ---- activations: int8 per 32 columns, interleaved per block of TB tokens ---------------------- */
typedef struct {
    int K, T, nblk, G;
    int8_t *q;  /* nblk x [K/4][TB][4] */
    float *dx;  /* nblk x [K/32][TB]: scale of each 32 columns */
    float *dq;  /* nblk x [K/G][TB]: dx * sum of the group's codes */
} acts;

static void free_acts(acts *p) {
    free(p->q);
    free(p->dx);
    free(p->dq);
}

#if KQ_FAST
/* 32 values of one token: the same rounding as the plain loop below (nearest even) */
static inline void quantize32_fast(const float *x, int K, int G, int k0, int blk, int lane, acts *p) {
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 vi = _mm512_set1_ps(inv);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
    p->dx[((size_t)blk * (K / 32) + k0 / 32) * TB + lane] = dx;
    const int s0 = _mm512_reduce_add_epi32(i0), s1 = _mm512_reduce_add_epi32(i1);
    float *dq = p->dq + ((size_t)blk * (K / G) + k0 / G) * TB + lane;
    if (G == 16) {
        dq[0] = dx * (float)s0;
        dq[TB] = dx * (float)s1;
    } else {
        dq[0] = dx * (float)(s0 + s1);
    }
    int32_t w[8]; /* 4 codes per word; word k/4 of this token sits at [k/4][TB][4] */
    _mm_storeu_si128((__m128i *)w, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(w + 4), _mm512_cvtepi32_epi8(i1));
    int32_t *q = (int32_t *)(p->q + (size_t)blk * K * TB) + (size_t)(k0 / 4) * TB + lane;
    for (int i = 0; i < 8; i++) q[(size_t)i * TB] = w[i];
}
#endif

static int quantize_acts(acts *p, const float *X, int K, int T, size_t ldx, int G, int fast) {
    p->K = K, p->T = T, p->G = G, p->nblk = (T + TB - 1) / TB;
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
    for (int t = 0; t < T; t++) {
        const float *x = X + (size_t)t * ldx;
        const int blk = t / TB, lane = t % TB;
        int8_t *q = p->q + (size_t)blk * K * TB;
        for (int k0 = 0; k0 < K; k0 += 32) {
#if KQ_FAST
            if (fast) {
                quantize32_fast(x + k0, K, G, k0, blk, lane, p);
                continue;
            }
#endif
            float amax = 0.0f;
            for (int l = 0; l < 32; l++) amax = fmaxf(amax, fabsf(x[k0 + l]));
            const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t v[32];
            for (int l = 0; l < 32; l++) v[l] = (int8_t)lrintf(x[k0 + l] * inv);
            p->dx[((size_t)blk * (K / 32) + k0 / 32) * TB + lane] = dx;
            for (int g = 0; g < 32 / G; g++) {
                int s = 0;
                for (int l = 0; l < G; l++) s += v[g * G + l];
                p->dq[((size_t)blk * (K / G) + k0 / G + g) * TB + lane] = dx * (float)s;
            }
            for (int l = 0; l < 32; l++) q[((size_t)(k0 + l) / 4 * TB + lane) * 4 + ((k0 + l) & 3)] = v[l];
        }
    }
    return 0;
}

/* ---- micro-kernels: ROWS weight rows (codes c, row stride K) x one or two token blocks --------- */
#if KQ_FAST
static void tile_fast(const acts *p, int blk, int nb, const uint8_t *c, const float *a, const float *b,
                      float res[2][ROWS][TB]) {
    const int K = p->K, G = p->G, ng = K / G;
    const int8_t *xq[2];
    const float *dx[2], *dq[2];
    for (int j = 0; j < nb; j++) {
        xq[j] = p->q + (size_t)(blk + j) * K * TB;
        dx[j] = p->dx + (size_t)(blk + j) * (K / 32) * TB;
        dq[j] = p->dq + (size_t)(blk + j) * ng * TB;
    }
    __m512 acc[2][ROWS];
    for (int j = 0; j < 2; j++)
        for (int r = 0; r < ROWS; r++) acc[j][r] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512i s[2][ROWS];
        for (int j = 0; j < 2; j++)
            for (int r = 0; r < ROWS; r++) s[j][r] = _mm512_setzero_si512();
        for (int k = g * G; k < (g + 1) * G; k += 4) {
            __m512i xv[2];
            for (int j = 0; j < nb; j++) xv[j] = _mm512_load_si512((const void *)(xq[j] + (size_t)k * TB));
            for (int r = 0; r < ROWS; r++) {
                int32_t w4;
                memcpy(&w4, c + (size_t)r * K + k, 4);
                const __m512i wv = _mm512_set1_epi32(w4);
                for (int j = 0; j < nb; j++) s[j][r] = _mm512_dpbusd_epi32(s[j][r], wv, xv[j]);
            }
        }
        for (int j = 0; j < nb; j++) {
            const __m512 dxv = _mm512_load_ps(dx[j] + (size_t)(g * G / 32) * TB);
            const __m512 dqv = _mm512_load_ps(dq[j] + (size_t)g * TB);
            for (int r = 0; r < ROWS; r++) {
                const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(a[r * ng + g]), dxv);
                acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j][r]), scale, acc[j][r]);
                acc[j][r] = _mm512_fnmadd_ps(_mm512_set1_ps(b[r * ng + g]), dqv, acc[j][r]);
            }
        }
    }
    for (int j = 0; j < nb; j++)
        for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(res[j][r], acc[j][r]);
}
#endif

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
                    acc += (float)s * a[r * ng + g] * dx[(size_t)(g * G / 32) * TB + lane];
                    acc -= b[r * ng + g] * dq[(size_t)g * TB + lane];
                }
                res[j][r][lane] = acc;
            }
    }
}

/* ---- one thread's share: out (T x N, row stride ldo) = X (T x K) W^T (W: N rows of K) ---------- */
static int matmul(int type, const void *W, int N, int K, const float *X, int T, size_t ldx, float *out,
                  size_t ldo, int ith, int nth, int fast) {
    if ((type != TYPE_Q4_K && type != TYPE_Q5_K && type != TYPE_Q6_K) || K % QK || N % ROWS || T <= 0) return -2;
    const int G = type == TYPE_Q6_K ? 16 : 32, ng = K / G, nsb = K / QK;
    const size_t block = type == TYPE_Q4_K ? sizeof(block_q4k) : type == TYPE_Q5_K ? sizeof(block_q5k) : sizeof(block_q6k);
    const size_t row_bytes = (size_t)nsb * block;
    const int ntiles = N / ROWS, per = (ntiles + nth - 1) / nth;
    const int t0 = ith * per, t1 = t0 + per < ntiles ? t0 + per : ntiles;
    if (t0 >= t1) return 0;
    acts p;
    if (quantize_acts(&p, X, K, T, ldx, G, fast)) return -1;
    uint8_t *c = aligned_alloc(64, (size_t)ROWS * K);
    float *a = malloc(sizeof(float) * ROWS * ng), *b = malloc(sizeof(float) * ROWS * ng);
    if (!c || !a || !b) {
        free(c), free(a), free(b), free_acts(&p);
        return -1;
    }
    float res[2][ROWS][TB];
    for (int tile = t0; tile < t1; tile++) {
        for (int r = 0; r < ROWS; r++) {
            const char *row = (const char *)W + (size_t)(tile * ROWS + r) * row_bytes;
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
        for (int blk = 0; blk < p.nblk; blk += 2) {
            const int nb = blk + 1 < p.nblk ? 2 : 1;
#if KQ_FAST
            if (fast) tile_fast(&p, blk, nb, c, a, b, res);
            else
#endif
                tile_plain(&p, blk, nb, c, a, b, res);
            for (int j = 0; j < nb; j++)
                for (int lane = 0; lane < TB; lane++) {
                    const int t = (blk + j) * TB + lane;
                    if (t >= T) break;
                    for (int r = 0; r < ROWS; r++) out[(size_t)t * ldo + tile * ROWS + r] = res[j][r][lane];
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
} kq_args;

static void kq_op(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    kq_args *u = userdata;
    const int rc = matmul(u->type, u->w, u->n, u->k, u->x, u->t, (size_t)u->ldx, u->out, (size_t)u->ldo, ith,
                          nth, KQ_FAST);
    if (rc) u->status = rc; /* read by the runtime after the graph ran */
}

/* ---- Python: op_address(), matmul(...) for the tests, FAST ------------------------------------ */
static PyObject *py_op_address(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromVoidPtr((void *)kq_op);
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int type, n, k, t, fast;
    unsigned long long w, x, out;
    Py_ssize_t ldx, ldo;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKiiKinKnp", &type, &w, &n, &k, &x, &t, &ldx, &out, &ldo, &fast)) return NULL;
    if (fast && !KQ_FAST) {
        PyErr_SetString(PyExc_ValueError, "this build has no AVX512-VNNI kernel");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = matmul(type, (const void *)(uintptr_t)w, n, k, (const float *)(uintptr_t)x, t, (size_t)ldx,
                (float *)(uintptr_t)out, (size_t)ldo, 0, 1, fast);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_Format(PyExc_ValueError, "unsupported matmul: type %d, %d rows of %d, %d tokens", type, n, k, t);
        return NULL;
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"op_address", py_op_address, METH_NOARGS, "Address of the ggml custom op (ggml_custom_op_t)."},
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(type, w, n, k, x, t, ldx, out, ldo, fast): out = x @ dequant(w).T, one thread."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kquant", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kquant(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "FAST", KQ_FAST) || PyModule_AddIntConstant(m, "ROWS", ROWS) ||
        PyModule_AddIntConstant(m, "QK", QK)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
