/* The dispatch table: which function each op runs on this CPU. kq_plain is the plain C reference of
 * every op; kq_dispatch, the one table the ops run from, starts as kq_plain and takes the fast path's
 * functions where kq_dispatch_init() (called once, when the module loads) finds the CPU runs it. No op
 * checks the CPU again. A path without its own version of a step keeps the plain one (NEON: weight
 * unpacking, the epilogue, prompt attention). */
#include "native.h"

const char *const kq_path_names[KQ_NPATHS] = {"plain", "avx512vnni", "neon-dotprod"};
const int kq_compiled[KQ_NPATHS] = {1, KQ_HAVE_AVX512, KQ_HAVE_NEON_DOT};

const kq_ops kq_plain = {
    .name = "plain",
    .id = KQ_PLAIN,
    .quantize = kq_quantize_plain,
    .unpack = kq_unpack_plain,
    .tile = kq_tile_plain,
    .q40x8 = NULL, /* Q4_0_X8 through unpack + tile */
    .q40x8_rows = 0,
    .epilogue = kq_epilogue_plain,
    .attention = kq_attn_plain,
    .attention1 = kq_attn1_plain,
    .attention1_own = 0,
};

kq_ops kq_dispatch;

void kq_dispatch_init(void) {
    kq_dispatch = kq_plain;
#if KQ_HAVE_AVX512
    if (kq_cpu_has_avx512vnni()) {
        kq_dispatch.name = kq_path_names[KQ_AVX512_VNNI];
        kq_dispatch.id = KQ_AVX512_VNNI;
        kq_dispatch.quantize = kq_quantize_avx512;
        kq_dispatch.unpack = kq_unpack_avx512;
        kq_dispatch.tile = kq_tile_avx512;
        kq_dispatch.q40x8 = kq_q40x8_avx512;
        kq_dispatch.q40x8_rows = KQ_Q40X8_ROWS;
        kq_dispatch.epilogue = kq_epilogue_avx512;
        kq_dispatch.attention = kq_attn_avx512;
        kq_dispatch.attention1 = kq_attn1_avx512;
        kq_dispatch.attention1_own = 1;
    }
#endif
#if KQ_HAVE_NEON_DOT
    if (kq_cpu_has_dotprod()) {
        kq_dispatch.name = kq_path_names[KQ_NEON_DOTPROD];
        kq_dispatch.id = KQ_NEON_DOTPROD;
        kq_dispatch.quantize = kq_quantize_neon;
        kq_dispatch.tile = kq_tile_neon;
        kq_dispatch.attention1 = kq_attn1_neon;
        kq_dispatch.attention1_own = 1;
    }
#endif
    kq_init_gelu();
}

const kq_ops *kq_ops_named(const char *name) {
    if (!strcmp(name, kq_plain.name)) return &kq_plain;
    if (!strcmp(name, kq_dispatch.name)) return &kq_dispatch;
    return NULL;
}
