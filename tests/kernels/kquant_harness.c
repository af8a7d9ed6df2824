/* runtime/language/kernels/kquant.c without Python, for running its paths under emulation (tests/kernels/test_kquant_paths.py).
 *
 *     kquant_harness IN OUT
 * prints the path the CPU gets (`path=NAME`) and the compiled ones, then for each case of IN
 * (int32 type, n, k, t; n rows of type's blocks; t x k float32) writes to OUT the plain path's output
 * (t x n float32) followed by the detected path's. Exit status 0, or 1 with a message on stderr.
 */
#define KQ_NO_PYTHON
#include <stdio.h>

#include <stdlib.h>

#include "native.h"

static size_t block_bytes(int type) {
    return type == TYPE_Q4_K ? sizeof(block_q4k) : type == TYPE_Q5_K ? sizeof(block_q5k) : sizeof(block_q6k);
}

static int fail(const char *what) {
    fprintf(stderr, "kquant_harness: %s\n", what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) return fail("usage: kquant_harness IN OUT");
    kq_dispatch_init();
    printf("path=%s\ncompiled=", kq_dispatch.name);
    for (int i = 0; i < KQ_NPATHS; i++)
        if (kq_compiled[i]) printf("%s%s", i ? "," : "", kq_path_names[i]);
    printf("\n");
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return fail("cannot open IN or OUT");
    int32_t h[4];
    int cases = 0;
    while (fread(h, sizeof h, 1, in) == 1) {
        const int type = h[0], n = h[1], k = h[2], t = h[3];
        if ((type != TYPE_Q4_K && type != TYPE_Q5_K && type != TYPE_Q6_K) || n <= 0 || k <= 0 || k % QK ||
            t <= 0 || n > 4096 || k > 16384 || t > 4096)
            return fail("bad case header");
        const size_t wbytes = (size_t)n * (k / QK) * block_bytes(type), xn = (size_t)t * k, on = (size_t)t * n;
        void *w = malloc(wbytes);
        float *x = malloc(xn * sizeof(float)), *o = malloc(2 * on * sizeof(float));
        if (!w || !x || !o) return fail("out of memory");
        if (fread(w, 1, wbytes, in) != wbytes || fread(x, sizeof(float), xn, in) != xn)
            return fail("truncated case");
        if (kq_matmul(&kq_plain, type, w, n, k, x, t, k, o, n, 0, 1) ||
            kq_matmul(&kq_dispatch, type, w, n, k, x, t, k, o + on, n, 0, 1))
            return fail("matmul failed");
        if (fwrite(o, sizeof(float), 2 * on, out) != 2 * on) return fail("cannot write OUT");
        free(w), free(x), free(o);
        cases++;
    }
    if (fclose(out)) return fail("cannot write OUT");
    fclose(in);
    printf("cases=%d\n", cases);
    return 0;
}
