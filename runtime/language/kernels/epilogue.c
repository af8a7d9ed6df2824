/* The matmul op's epilogue: out += bias, then GELU as ggml computes it; its plain C path and the GELU
 * table every path looks up (x86_avx512.c holds the AVX-512 one).
 *
 * Fused into the op so that a prompt's linear layers make no ggml_add / ggml_gelu passes over their
 * outputs (what that saved: docs/benchmarks.md). The add is the same fp32 add. GELU is ggml's
 * GGML_GELU_FP16 form: 0 at x <= -10, x at x >= 10, else a table of the tanh form at each fp16 value,
 * rounded to fp16, looked up at fp16(x) (round to nearest even, as vcvtps2ph and ggml do). */
#include "native.h"

float kq_gelu_table[1 << 16];

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
 * FMA): equal to ggml's table at every fp16 value on x86-64 (tests/kernels/test_kernels.py) */
void kq_init_gelu(void) {
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
void kq_epilogue_plain(float *out, size_t ldo, int T, int n0, int n1, const float *bias, int act) {
    for (int t = 0; t < T; t++)
        for (int n = n0; n < n1; n++) {
            float y = out[(size_t)t * ldo + n];
            if (bias) y += bias[n];
            out[(size_t)t * ldo + n] = act == KQ_ACT_GELU ? gelu_lookup(y) : y;
        }
}

void kq_epilogue(const kq_ops *ops, float *out, size_t ldo, int T, int n0, int n1, const float *bias,
                 int act) {
    if (!bias && act == KQ_ACT_NONE) return;
    ops->epilogue(out, ldo, T, n0, n1, bias, act);
}
