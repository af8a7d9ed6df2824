/* The matmul op, the same on every path: it checks the weight type and shape, takes this thread's
 * output rows, quantizes the activations, then unpacks ROWS weight rows at a time and runs the tiles
 * over the token blocks, each step through the kq_ops it is given (kq_dispatch in the graph, kq_plain
 * or kq_dispatch when a test names a path). Q4_0 in ggml's 8-row repack goes to the path's own kernel
 * where it has one (q40x8). Also the op as ggml_custom_op_t: the matmul, then the epilogue on the rows
 * this thread wrote. The math, layout and paths: native.h. */
#include "native.h"

/* ---- work split: thread ith of nth takes units [*u0, *u1), as evenly as whole units go ----------- */
void kq_share(int units, int ith, int nth, int *u0, int *u1) {
    const int per = (units + nth - 1) / nth;
    *u0 = ith * per < units ? ith * per : units;
    *u1 = *u0 + per < units ? *u0 + per : units;
}

/* The output columns [*n0, *n1) thread ith of nth computes: whole stripes of the path's Q4_0_X8 kernel
 * or ROWS-row tiles. The matmul and the epilogue after it both take their rows from here. */
void kq_rows(const kq_ops *ops, int type, int N, int ith, int nth, int *n0, int *n1) {
    const int unit = ops->q40x8 && type == TYPE_Q4_0_X8 ? ops->q40x8_rows : ROWS;
    int u0, u1;
    kq_share((N + unit - 1) / unit, ith, nth, &u0, &u1);
    *n0 = u0 * unit < N ? u0 * unit : N;
    *n1 = u1 * unit < N ? u1 * unit : N;
}

/* ---- activations: all T tokens quantized into p's buffers (freed by kq_free_acts) ---------------- */
void kq_free_acts(acts *p) {
    free(p->q);
    free(p->dx);
    free(p->dq);
}

int kq_quantize_acts(acts *p, const float *X, int K, int T, size_t ldx, int G, quantize_fn quantize) {
    p->K = K, p->T = T, p->G = G, p->nblk = (T + TB - 1) / TB;
    p->pf = NULL, p->pf_len = 0;
    const size_t nq = (size_t)p->nblk * K * TB, ndx = (size_t)p->nblk * (K / 32) * TB,
                 ndq = (size_t)p->nblk * (K / G) * TB;
    p->q = aligned_alloc(64, nq);
    p->dx = aligned_alloc(64, ndx * sizeof(float));
    p->dq = aligned_alloc(64, ndq * sizeof(float));
    if (!p->q || !p->dx || !p->dq) {
        kq_free_acts(p);
        return -1;
    }
    memset(p->q, 0, nq); /* padding tokens of the last block: zero codes and scales */
    memset(p->dx, 0, ndx * sizeof(float));
    memset(p->dq, 0, ndq * sizeof(float));
    for (int t = 0; t < T; t++) quantize(X + (size_t)t * ldx, t / TB, t % TB, p);
    return 0;
}

/* ---- one thread's share: out (T x N, row stride ldo) = X (T x K) W^T (W: N rows of K) ---------- */
int kq_matmul(const kq_ops *ops, int type, const void *W, int N, int K, const float *X, int T, size_t ldx,
              float *out, size_t ldo, int ith, int nth) {
    const int q40 = type == TYPE_Q4_0 || type == TYPE_Q4_0_X8;
    if ((!q40 && type != TYPE_Q4_K && type != TYPE_Q5_K && type != TYPE_Q6_K) || K % (q40 ? 32 : QK) ||
        N % (type == TYPE_Q4_0_X8 ? 8 : ROWS) || T <= 0)
        return -2;
    int n0, n1;
    kq_rows(ops, type, N, ith, nth, &n0, &n1);
    if (type == TYPE_Q4_0_X8 && ops->q40x8) return ops->q40x8(W, N, K, X, T, ldx, out, ldo, n0, n1);
    const int G = type == TYPE_Q6_K ? 16 : 32, ng = K / G;
    const size_t row_bytes = q40                  ? (size_t)(K / 32) * sizeof(block_q40)
                             : type == TYPE_Q4_K ? (size_t)(K / QK) * sizeof(block_q4k)
                             : type == TYPE_Q5_K ? (size_t)(K / QK) * sizeof(block_q5k)
                                                 : (size_t)(K / QK) * sizeof(block_q6k);
    const int t0 = n0 / ROWS, t1 = n1 / ROWS;
    if (t0 >= t1) return 0;
    acts p;
    if (kq_quantize_acts(&p, X, K, T, ldx, G, ops->quantize)) return -1;
    uint8_t *c = aligned_alloc(64, (size_t)ROWS * K);
    float *a = malloc(sizeof(float) * ROWS * ng), *b = malloc(sizeof(float) * ROWS * ng);
    if (!c || !a || !b) {
        free(c), free(a), free(b), kq_free_acts(&p);
        return -1;
    }
    float res[2][ROWS][TB];
    const size_t span = (size_t)ROWS * row_bytes;
    for (int tile_i = t0; tile_i < t1; tile_i++) {
        /* Q4_0_X8 comes here on paths without their own kernel for it (AVX-512 runs kq_q40x8_avx512):
         * 8-row groups of the same bytes, two tiles per group. The AVX-512 tile prefetches the next
         * tile, when it is this thread's. */
        if (type == TYPE_Q4_0_X8)
            ops->unpack((const char *)W + (size_t)(tile_i / 2) * 2 * span, row_bytes, type, (tile_i % 2) * ROWS,
                        K, c, a, b);
        else
            ops->unpack((const char *)W + (size_t)tile_i * span, row_bytes, type, 0, K, c, a, b);
        p.pf_len = type != TYPE_Q4_0_X8 && tile_i + 1 < t1 ? span : 0;
        if (p.pf_len) p.pf = (const char *)W + (size_t)(tile_i + 1) * span;
        for (int blk = 0; blk < p.nblk; blk += 2) {
            const int nb = blk + 1 < p.nblk ? 2 : 1;
            ops->tile(&p, blk, nb, c, a, b, res);
            for (int j = 0; j < nb; j++)
                for (int lane = 0; lane < TB; lane++) {
                    const int t = (blk + j) * TB + lane;
                    if (t >= T) break;
                    for (int r = 0; r < ROWS; r++) out[(size_t)t * ldo + tile_i * ROWS + r] = res[j][r][lane];
                }
        }
    }
    free(c), free(a), free(b), kq_free_acts(&p);
    return 0;
}

/* ---- the op as ggml_custom_op_t(dst, ith, nth, userdata), on the path this CPU runs -------------- */
void kq_op(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    kq_args *u = userdata;
    const int rc = kq_matmul(&kq_dispatch, u->type, u->w, u->n, u->k, u->x, u->t, (size_t)u->ldx, u->out,
                             (size_t)u->ldo, ith, nth);
    if (rc) {
        u->status = rc; /* read by the runtime after the graph ran */
        return;
    }
    int n0, n1; /* this thread's columns, just written by it: no other thread touches them */
    kq_rows(&kq_dispatch, u->type, u->n, ith, nth, &n0, &n1);
    kq_epilogue(&kq_dispatch, u->out, (size_t)u->ldo, u->t, n0, n1, u->bias, u->act);
}
