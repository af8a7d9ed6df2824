/* Every op of runtime/language/kernels/ on every path this CPU runs, without Python: linked with the
 * folder's .c files except module.c, cross-compiled and run under emulated CPUs by
 * tests/kernels/test_kernel_paths.py.
 *
 *     harness IN OUT
 * prints the path the CPU gets (`path=NAME`) and the compiled ones; then for each case of IN writes
 * to OUT three outputs: the plain path's (kq_plain), the detected path's (kq_dispatch), and the
 * detected path's again split over HARNESS_THREADS threads as ggml runs the op (the custom ops kq_op,
 * kq_attn_op and kq_attn1_op, called for each ith in turn; the epilogue by column ranges); it prints
 * `cases=N` and the count per op. Exit status 0, or 1 with a message on stderr.
 *
 * A case is 8 int32 (op and its sizes) and its inputs, all little-endian:
 *   op 0, matmul:    type, n, k, t;  n rows of type's blocks (TYPE_Q4_0_X8: ggml's 8-row repack);
 *                    x (t x k float32)                                   -> out (t x n float32)
 *   op 1, epilogue:  t, n, act, has_bias;  out (t x n float32); bias (n float32) if has_bias
 *                                                                        -> out + bias, GELU if act
 *   op 2, attention: D, H, T, n_kv, kv_f16, q_heads, m_rows;  scale (float32);
 *                    q (T x q_heads x D float32: head h of query t at [t][h]);
 *                    k, v (n_kv x H x D, F16 or F32); mask (m_rows x n_kv F16: query t's row t)
 *                                                                        -> out (T x H x D float32)
 *   op 3, decode attention: as op 2, T = 1
 */
#include <stdio.h>
#include <stdlib.h>

#include "native.h"

enum { OP_MATMUL = 0, OP_EPILOGUE = 1, OP_ATTENTION = 2, OP_ATTENTION1 = 3, N_OPS = 4 };
#define HARNESS_THREADS 3
static const char *const op_names[N_OPS] = {"matmul", "epilogue", "attention", "attention1"};

static int fail(const char *what) {
    fprintf(stderr, "harness: %s\n", what);
    return 1;
}

static size_t row_bytes(int type, int k) {
    switch (type) {
    case TYPE_Q4_0:
    case TYPE_Q4_0_X8: return (size_t)(k / 32) * sizeof(block_q40);
    case TYPE_Q4_K: return (size_t)(k / QK) * sizeof(block_q4k);
    case TYPE_Q5_K: return (size_t)(k / QK) * sizeof(block_q5k);
    case TYPE_Q6_K: return (size_t)(k / QK) * sizeof(block_q6k);
    default: return 0;
    }
}

/* n bytes from `in` into a fresh buffer (NULL: truncated or out of memory) */
static void *read_new(FILE *in, size_t n) {
    void *p = malloc(n ? n : 1);
    if (p && fread(p, 1, n, in) != n) {
        free(p);
        return NULL;
    }
    return p;
}

/* one case's three outputs (3 x on floats at o, in harness order): 0, or 1 on failure */
static int run_case(FILE *in, const int32_t h[8], float **o, size_t *on) {
    const kq_ops *paths[2] = {&kq_plain, &kq_dispatch};
    if (h[0] == OP_MATMUL) {
        const int type = h[1], n = h[2], k = h[3], t = h[4];
        if (!row_bytes(type, k) || n <= 0 || k <= 0 || t <= 0 || n > 4096 || k > 16384 || t > 4096)
            return fail("bad matmul case");
        void *w = read_new(in, (size_t)n * row_bytes(type, k));
        float *x = read_new(in, (size_t)t * k * sizeof(float));
        *on = (size_t)t * n;
        *o = malloc(3 * *on * sizeof(float));
        if (!w || !x || !*o) return fail("truncated case or out of memory");
        for (int i = 0; i < 2; i++)
            if (kq_matmul(paths[i], type, w, n, k, x, t, k, *o + i * *on, n, 0, 1)) return fail("matmul failed");
        kq_args u = {.type = type, .n = n, .k = k, .t = t, .w = w, .x = x, .out = *o + 2 * *on, .ldx = k, .ldo = n};
        for (int ith = 0; ith < HARNESS_THREADS; ith++) kq_op(NULL, ith, HARNESS_THREADS, &u);
        if (u.status) return fail("the matmul op failed");
        free(w), free(x);
        return 0;
    }
    if (h[0] == OP_EPILOGUE) {
        const int t = h[1], n = h[2], act = h[3], has_bias = h[4];
        if (t <= 0 || n <= 0 || (size_t)t * n > ((size_t)1 << 24) || (act != KQ_ACT_NONE && act != KQ_ACT_GELU))
            return fail("bad epilogue case");
        *on = (size_t)t * n;
        float *y = read_new(in, *on * sizeof(float)), *bias = has_bias ? read_new(in, (size_t)n * sizeof(float)) : NULL;
        *o = malloc(3 * *on * sizeof(float));
        if (!y || (has_bias && !bias) || !*o) return fail("truncated case or out of memory");
        for (int i = 0; i < 3; i++) {
            memcpy(*o + i * *on, y, *on * sizeof(float));
            if (i < 2) kq_epilogue(paths[i], *o + i * *on, n, t, 0, n, bias, act);
        }
        for (int ith = 0; ith < HARNESS_THREADS; ith++) {
            int n0, n1;
            kq_share(n, ith, HARNESS_THREADS, &n0, &n1);
            kq_epilogue(&kq_dispatch, *o + 2 * *on, n, t, n0, n1, bias, act);
        }
        free(y), free(bias);
        return 0;
    }
    if (h[0] == OP_ATTENTION || h[0] == OP_ATTENTION1) {
        const int decode = h[0] == OP_ATTENTION1;
        const int D = h[1], H = h[2], T = h[3], n_kv = h[4], f16 = h[5], qh = h[6], m_rows = h[7];
        if (D <= 0 || H <= 0 || T <= 0 || n_kv <= 0 || qh < H || m_rows < T || D > 4096 || H > 256 || T > 4096 ||
            n_kv > 65536)
            return fail("bad attention case");
        const size_t es = f16 ? 2 : 4, kv = (size_t)n_kv * H * D * es;
        float scale;
        if (fread(&scale, sizeof scale, 1, in) != 1) return fail("truncated case");
        char *q = read_new(in, (size_t)T * qh * D * 4), *k = read_new(in, kv), *v = read_new(in, kv);
        char *mask = read_new(in, (size_t)m_rows * n_kv * 2);
        *on = (size_t)T * H * D;
        *o = malloc(3 * *on * sizeof(float));
        if (!q || !k || !v || !mask || !*o) return fail("truncated case or out of memory");
        kq_attn_args a = {.D = D, .H = H, .T = T, .n_kv = n_kv, .kv_f16 = f16, .q = q, .q_nb1 = (int64_t)D * 4,
                          .q_nb2 = (int64_t)qh * D * 4, .k = k, .v = v, .k_nb1 = (int64_t)H * D * es,
                          .k_nb2 = (int64_t)D * es, .v_nb1 = (int64_t)H * D * es, .v_nb2 = (int64_t)D * es,
                          .mask = mask, .m_nb1 = (int64_t)n_kv * 2, .scale = scale};
        for (int i = 0; i < 2; i++) {
            a.out = *o + i * *on;
            if ((decode ? kq_attention1 : kq_attention)(paths[i], &a, 0, 1)) return fail("attention failed");
        }
        a.out = *o + 2 * *on;
        for (int ith = 0; ith < HARNESS_THREADS; ith++) (decode ? kq_attn1_op : kq_attn_op)(NULL, ith, HARNESS_THREADS, &a);
        if (a.status) return fail("the attention op failed");
        free(q), free(k), free(v), free(mask);
        return 0;
    }
    return fail("unknown op");
}

int main(int argc, char **argv) {
    if (argc != 3) return fail("usage: harness IN OUT");
    kq_dispatch_init();
    printf("path=%s\ncompiled=", kq_dispatch.name);
    for (int i = 0; i < KQ_NPATHS; i++)
        if (kq_compiled[i]) printf("%s%s", i ? "," : "", kq_path_names[i]);
    printf("\n");
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return fail("cannot open IN or OUT");
    int32_t h[8];
    int cases = 0, per_op[N_OPS] = {0};
    while (fread(h, sizeof h, 1, in) == 1) {
        float *o = NULL;
        size_t on = 0;
        if (run_case(in, h, &o, &on)) return 1;
        if (fwrite(o, sizeof(float), 3 * on, out) != 3 * on) return fail("cannot write OUT");
        free(o);
        per_op[h[0]]++;
        cases++;
    }
    if (fclose(out)) return fail("cannot write OUT");
    fclose(in);
    printf("cases=%d\n", cases);
    for (int i = 0; i < N_OPS; i++) printf("%s=%d\n", op_names[i], per_op[i]);
    return 0;
}
