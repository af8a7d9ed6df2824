/* The attention ops, their plain C paths, and the ops as ggml_custom_op_t (x86_avx512.c and
 * arm_neon.c hold the SIMD paths).
 *
 * Prompt attention: for a prompt's queries on x86, instead of ggml's flash attention, whose tiled
 * kernel needs 64 queries (a shorter prompt is padded to 64, and ggml_pad copies them one float at a
 * time; what that cost: docs/benchmarks.md). Each query is computed alone, in a fixed order, so its
 * result does not depend on the batch. Per head: K and V rows up to the last slot any query sees are
 * converted to fp32 once (K transposed), then for each query: 16 scores at a time, each a sequential
 * fma over the head's dimensions; the mask added; a full softmax (max, exp, a sum of 16 lanes reduced
 * in a fixed tree); the V rows summed with those weights, one fma per slot, in slot order; divided by
 * the sum. The plain C path does the same operations in the same order, with the same exp, so the
 * paths agree bit for bit.
 *
 * Decode attention (one query per head, a generated token's step): ggml's one-query flash attention
 * rounds q and its running V sum to fp16 and, for Phi-2's head of 80, runs 16 of every 80 dimensions
 * in a scalar loop; at 1500 cached positions it took most of a step (docs/decoder.md, where the time
 * goes). This op reads each cached row once, straight from the cache (F16 or F32), with fp32
 * arithmetic laid out for SIMD lanes (native.h, ATT1_CHUNKS); heads are split between threads. */
#include "native.h"

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

/* a head's 16-dimension chunk c of row `base` (F16 or F32), zeros past D */
static KQ_INLINE void att_chunk(const char *base, int32_t f16, int c, int D, float x[ATT_LANES]) {
    for (int l = 0; l < ATT_LANES; l++) {
        const int d = ATT_LANES * c + l;
        x[l] = d < D ? att_load(base, f16, d) : 0.0f;
    }
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

/* heads h0..h1 - 1; kt: D x jpad, vf: n x D, sc: jpad floats of scratch */
void kq_attn_plain(const kq_attn_args *a, int h0, int h1, int n, float *kt, float *vf, float *sc) {
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

/* the decode attention's plain C path (native.h: the definition every path computes) */
void kq_attn1_plain(const kq_attn_args *a, int h0, int h1, int n, float *sc) {
    const int D = a->D, nc = ATT1_CHUNKS(D);
    const uint16_t *m = (const uint16_t *)a->mask;
    for (int h = h0; h < h1; h++) {
        const float *q = (const float *)(a->q + h * a->q_nb1);
        const char *kh = a->k + h * a->k_nb2, *vh = a->v + h * a->v_nb2;
        float qc[ATT_D_MAX / ATT_LANES][ATT_LANES], x[ATT_LANES], mx = -INFINITY, lanes[ATT_LANES] = {0};
        for (int c = 0; c < nc; c++)
            for (int l = 0; l < ATT_LANES; l++) qc[c][l] = ATT_LANES * c + l < D ? q[ATT_LANES * c + l] : 0.0f;
        for (int j = 0; j < n; j++) {
            float acc[ATT_LANES] = {0};
            for (int c = 0; c < nc; c++) {
                att_chunk(kh + j * a->k_nb1, a->kv_f16, c, D, x);
                for (int l = 0; l < ATT_LANES; l++) acc[l] = fmaf(qc[c][l], x[l], acc[l]);
            }
            sc[j] = fmaf(att_tree(acc), a->scale, half_to_float(m[j]));
            mx = sc[j] > mx ? sc[j] : mx;
        }
        for (int j = 0; j < n; j++) {
            sc[j] = att_exp(sc[j] - mx);
            lanes[j % ATT_LANES] += sc[j];
        }
        const float sum = att_tree(lanes);
        float *o = a->out + (size_t)h * D;
        for (int d = 0; d < D; d++) {
            float acc = 0.0f;
            for (int j = 0; j < n; j++) acc = fmaf(sc[j], att_load(vh + j * a->v_nb1, a->kv_f16, d), acc);
            o[d] = acc / sum;
        }
    }
}

/* both ops' checks and work split: thread ith of nth gets heads h0..h1 - 1 over slots 0..n - 1;
 * 1: work to do, 0: none for this thread, -2: bad arguments (a query that sees nothing among them) */
static int att_plan(const kq_attn_args *a, int ith, int nth, int *h0, int *h1, int *n) {
    if (a->D <= 0 || a->D > ATT_D_MAX || a->H <= 0 || a->T <= 0 || a->n_kv <= 0) return -2;
    kq_share(a->H, ith, nth, h0, h1);
    if (*h0 >= *h1) return 0;
    *n = att_slots(a);
    return *n == 0 ? -2 : 1;
}

/* thread ith of nth: heads split evenly; -1 when out of memory, -2 on bad arguments */
int kq_attention(const kq_ops *ops, const kq_attn_args *a, int ith, int nth) {
    int h0, h1, n;
    const int plan = att_plan(a, ith, nth, &h0, &h1, &n);
    if (plan <= 0) return plan;
    const size_t jpad = (size_t)ATT_JPAD(n); /* enough for both paths */
    float *kt = aligned_alloc(64, (jpad * a->D * sizeof(float) + 63) / 64 * 64);
    float *vf = aligned_alloc(64, ((size_t)n * a->D * sizeof(float) + 63) / 64 * 64);
    float *sc = aligned_alloc(64, jpad * sizeof(float));
    if (!kt || !vf || !sc) {
        free(kt), free(vf), free(sc);
        return -1;
    }
    ops->attention(a, h0, h1, n, kt, vf, sc);
    free(kt), free(vf), free(sc);
    return 0;
}

/* the op as ggml_custom_op_t(dst, ith, nth, userdata), on the path this CPU runs */
void kq_attn_op(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    kq_attn_args *a = userdata;
    const int rc = kq_attention(&kq_dispatch, a, ith, nth);
    if (rc) a->status = rc;
}

/* the decode attention, thread ith of nth: heads split evenly; -1 when out of memory, -2 on bad
 * arguments (T other than 1 among them) */
int kq_attention1(const kq_ops *ops, const kq_attn_args *a, int ith, int nth) {
    if (a->T != 1) return -2;
    int h0, h1, n;
    const int plan = att_plan(a, ith, nth, &h0, &h1, &n);
    if (plan <= 0) return plan;
    float *sc = malloc((size_t)n * sizeof(float));
    if (!sc) return -1;
    ops->attention1(a, h0, h1, n, sc);
    free(sc);
    return 0;
}

void kq_attn1_op(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    kq_attn_args *a = userdata;
    const int rc = kq_attention1(&kq_dispatch, a, ith, nth);
    if (rc) a->status = rc;
}
