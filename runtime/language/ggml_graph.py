"""The TinyGPT-V Phi-2 forward as a ggml graph (reference: export/model/phi.py).

One graph serves every call with the same (input kind, T new positions, n_kv attended slots, all
logits or last): where the tokens go in the cache, their positions and the causal mask are input
tensors, so a graph is built once and reused for the next 256 positions of decoding.

    ids (T) -get_rows-> x (E, T)    or    embeddings (E, T)
    per layer i:                                                    /blk.i/...
        h    = LayerNorm(x) * w + b                                 attn_norm
        qkv  = W_qkv h + b                  (3E, T) rows (3, H, D)  attn_qkv
        q, k = LayerNorm_D(q), LayerNorm_D(k)   one op on (D, 2H, T)   attn_q_norm, attn_k_norm
        q, k = rope_neox(q, pos), rope_neox(k, pos)   first n_rot dims, one op
        cache_k[:, slots] <- k ;  cache_v[:, slots] <- v            (rows by position; a quantized
                                                                     cache pads each head to whole blocks)
        a    = softmax(K^T q / sqrt(D) + mask) over n_kv slots      fp32 accumulators (see below)
        o    = RMSNorm(W_o (V a) + b_o) * w                         attn_output, attn_post_norm
        f    = W_down gelu_tanh(W_up h + b_up) + b_down             ffn_up, ffn_down
        x    = x + o + f
    logits = W_out (LayerNorm(x[:, rows]) * w + b) + b_out          (n_vocab, R)

A prompt graph (`prompt`: every batch of a decoder call of more than one position) computes each
query alone, the same way in any batch, so a prompt position gets the same output in a batch of 58
as in one of 2 (runtime/prefix_cache.py relies on it). On x86 with AVX-512 that is the native kernels'
attention op (`KQuantOps.attention`: fp32, a full softmax per query, no padding). Elsewhere it is
ggml's fused flash-attention op as tiled fp32 GEMMs over 64 queries x 64 slots, skipping whole masked
tiles; ggml tiles only from 64 queries on, so shorter batches are padded with zero queries whose mask
rows are all -inf. One-position calls (decode steps) run the native kernels' one-query attention
(`KQuantOps.attention(decode=True)`: fp32, each cached row read once, heads split between threads)
where the CPU's path has one (AVX-512, NEON dotprod) and the cache is F16/F32; elsewhere ggml's
one-query flash attention, whose q and V sum are fp16. When only the last position's logits are
wanted, the last layer computes its attention output and FFN for that position alone (its keys and
values are still written for all T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .decoder_model import HParams
from .ggml_runtime import KVCache, Weights, new_context
from .kernels.ops import KQuantOps, takes

NODES_PER_LAYER = 64  # with the head padding of a quantized KV cache
FA_TILE_Q = 64  # GGML_FA_TILE_Q (ggml-cpu/common.h): ggml's flash attention tiles >= this many queries


@dataclass
class Graph:
    """A built graph and its input/output tensors; `galloc` owns the intermediate buffer."""

    ctx: int
    gf: object
    galloc: int
    inp: object  # token ids (I32, T) or embeddings (F32, E x T)
    pos: object  # I32 (T,)
    k_idx: object  # I64 (T,): cache slot of each new position
    mask: object  # F16 (n_kv, mask_rows(T, prompt)): 0 where query t may attend slot j, -inf elsewhere
    out: object  # F32 logits (n_vocab, R)
    rows: int
    kq: KQuantOps | None = None  # runtime/language/kernels/ matmul nodes (bound after allocation)


def build_graph(
    ggml,
    hp: HParams,
    w: Weights,
    kv: KVCache,
    T: int,
    n_kv: int,
    embeddings: bool,
    all_logits: bool,
    prompt: bool,
) -> Graph:
    E, H, D = hp.n_embd, hp.n_head, hp.head_dim
    size = NODES_PER_LAYER * hp.n_layer + 64
    ctx = new_context(ggml, size + 16, size)
    g = ggml.ggml_new_graph_custom(ctx, size, False)
    t = w.tensors
    f32 = ggml.GGML_TYPE_F32

    def name(x, s: str):
        ggml.ggml_set_name(x, s.encode()[:63])
        return x

    def layer_norm(x, wn: str, bn: str, eps: float):
        return ggml.ggml_add(ctx, ggml.ggml_mul(ctx, ggml.ggml_norm(ctx, x, eps), t[wn]), t[bn])

    own_attention = prompt and w.kquant_attention and not kv.quantized  # the native kernels', unpadded
    own_decode = not prompt and T == 1 and w.kquant_decode_attention and not kv.quantized
    kq = KQuantOps(ggml) if w.kquant or own_attention or own_decode else None

    def linear(x, wn: str, bn: str, gelu: bool = False):
        """W x + b, then GELU if asked: through our kernels in one node (bias and GELU in the op,
        the same numbers as ggml's add and gelu), or through ggml's mul_mat, add and gelu."""
        if kq is not None and wn in w.kquant and takes(w.kquant[wn], x.contents.ne[1], prompt):
            return kq.matmul(ctx, t[wn], x, w.kquant[wn], bias=t[bn], gelu=gelu)
        y = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, t[wn], x), t[bn])
        return ggml.ggml_gelu(ctx, y) if gelu else y

    if embeddings:
        inp = ggml.ggml_new_tensor_2d(ctx, f32, E, T)
        x = inp
    else:
        inp = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I32, T)
        x = ggml.ggml_get_rows(ctx, t["token_embd.weight"], inp)  # (E, T)
    pos = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I32, T)
    k_idx = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I64, T)
    mask = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F16, n_kv, mask_rows(T, prompt))
    for x_in, s in ((inp, "inp"), (pos, "inp_pos"), (k_idx, "inp_k_idx"), (mask, "mask")):
        name(x_in, s)
        ggml.ggml_set_input(x_in)

    scale = 1.0 / math.sqrt(D)
    dk = kv.head_dim_kv  # D, or D padded to whole blocks of a quantized cache (KVCache)
    head_nb = ggml.ggml_row_size(kv.type_id, dk)  # bytes of one head in a cache row
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        h = name(
            layer_norm(x, p + "attn_norm.weight", p + "attn_norm.bias", hp.eps_norm), f"/blk.{i}/attn_norm"
        )
        qkv = name(linear(h, p + "attn_qkv.weight", p + "attn_qkv.bias"), f"/blk.{i}/attn_qkv")  # (3E, T)
        nb1 = qkv.contents.nb[1]
        # q and k heads side by side (D, 2H, T): one LayerNorm (q's weights on the first H heads,
        # k's on the next H: `w.qk_norms`) and one rope for both, fewer ops than two of each
        qk = ggml.ggml_view_3d(ctx, qkv, D, 2 * H, T, D * 4, nb1, 0)
        wn, bn = w.qk_norms[i]
        qk = ggml.ggml_add(ctx, ggml.ggml_mul(ctx, ggml.ggml_norm(ctx, qk, hp.eps_qk), wn), bn)
        qk = name(_rope(ggml, ctx, qk, pos, hp), f"/blk.{i}/qk_rope")  # (D, 2H, T) contiguous
        k = ggml.ggml_view_2d(ctx, qk, E, T, 2 * E * 4, E * 4)  # (E, T), rows strided
        v = ggml.ggml_view_2d(ctx, qkv, E, T, nb1, 2 * E * 4)  # (E, T)
        if dk != D:  # heads padded with zeros to whole blocks: (dk * H, T)
            k = ggml.ggml_view_3d(ctx, qk, D, H, T, D * 4, 2 * E * 4, E * 4)
            v = ggml.ggml_view_3d(ctx, qkv, D, H, T, D * 4, nb1, 2 * E * 4)
            k, v = (
                ggml.ggml_reshape_2d(ctx, ggml.ggml_pad(ctx, a, dk - D, 0, 0, 0), dk * H, T) for a in (k, v)
            )

        # write the new keys/values into their cache slots; the attention reads through these nodes
        ck = ggml.ggml_set_rows(ctx, kv.k[i], k, k_idx)
        cv = ggml.ggml_set_rows(ctx, kv.v[i], v, k_idx)
        K = ggml.ggml_view_3d(ctx, ck, dk, n_kv, H, ck.contents.nb[1], head_nb, 0)  # (dk, n_kv, H)
        V = ggml.ggml_view_3d(ctx, cv, dk, n_kv, H, cv.contents.nb[1], head_nb, 0)  # (dk, n_kv, H)

        # queries from position t0 on (the last layer of a last-logits call needs only the last one)
        t0 = T - 1 if i == hp.n_layer - 1 and not all_logits else 0
        q = ggml.ggml_view_3d(ctx, qk, D, H, T - t0, D * 4, 2 * E * 4, t0 * 2 * E * 4)  # (D, H, T')
        if t0:
            h, x = (
                ggml.ggml_view_2d(ctx, a, a.contents.ne[0], 1, a.contents.nb[1], t0 * a.contents.nb[1])
                for a in (h, x)
            )
        if (own_attention or own_decode) and kq is not None:  # runtime/language/kernels/: each query
            m = ggml.ggml_view_2d(ctx, mask, n_kv, T - t0, mask.contents.nb[1], t0 * mask.contents.nb[1])
            o = kq.attention(ctx, q, K, V, m, scale, decode=own_decode)  # alone, T' of them: (D, H, T')
        else:
            n_q = max(T - t0, FA_TILE_Q) if prompt else T - t0  # queries the kernel sees, padding included
            if n_q > T - t0 or dk != D:  # zero queries (their mask rows are -inf), zero head dims
                q = ggml.ggml_pad(ctx, q, dk - D, 0, n_q - (T - t0), 0)
            m = ggml.ggml_view_2d(ctx, mask, n_kv, n_q, mask.contents.nb[1], t0 * mask.contents.nb[1])
            qh = ggml.ggml_permute(ctx, q, 0, 2, 1, 3)  # (dk, n_q, H)
            o = ggml.ggml_flash_attn_ext(ctx, qh, K, V, m, scale, 0.0, 0.0)  # (dk, H, n_q)
            ggml.ggml_flash_attn_ext_set_prec(o, ggml.GGML_PREC_F32)
            if dk != D:  # drop the padded head dims
                o = ggml.ggml_view_3d(ctx, o, D, H, T - t0, o.contents.nb[1], o.contents.nb[2], 0)
                o = ggml.ggml_cont(ctx, o)
        o = name(ggml.ggml_view_2d(ctx, o, E, T - t0, E * 4, 0), f"/blk.{i}/attn")  # (E, T'), no padding
        o = linear(o, p + "attn_output.weight", p + "attn_output.bias")
        o = ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, o, hp.eps_rms), t[p + "attn_post_norm.weight"])
        o = name(o, f"/blk.{i}/attn_post_norm")

        f = linear(h, p + "ffn_up.weight", p + "ffn_up.bias", gelu=True)
        f = name(linear(f, p + "ffn_down.weight", p + "ffn_down.bias"), f"/blk.{i}/ffn_down")
        x = name(ggml.ggml_add(ctx, ggml.ggml_add(ctx, x, o), f), f"/blk.{i}/out")

    rows = T if all_logits else 1
    x = layer_norm(x, "output_norm.weight", "output_norm.bias", hp.eps_norm)
    out = name(linear(x, "output.weight", "output.bias"), "logits")  # (n_vocab, rows)
    ggml.ggml_set_output(out)
    ggml.ggml_build_forward_expand(g, out)

    galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_cpu_buffer_type())
    if not ggml.ggml_gallocr_alloc_graph(galloc, g):
        ggml.ggml_gallocr_free(galloc)
        ggml.ggml_free(ctx)
        raise MemoryError(f"cannot allocate the compute buffer of a {T}-token graph")
    if kq is not None:
        kq.bind()
    used = kq if kq and (kq.nodes or kq.attn) else None
    return Graph(ctx, g, galloc, inp, pos, k_idx, mask, out, rows, used)


def mask_rows(T: int, prompt: bool) -> int:
    """Rows of a T-position graph's mask: one per query, and for a prompt FA_TILE_Q - 1 more of -inf,
    so that any run of queries from t0 on can be padded to a whole tile."""
    return T + FA_TILE_Q - 1 if prompt else T


def _rope(ggml, ctx, x, pos, hp: HParams):
    """NeoX rotate-half on the first n_rot dims of each head; the rest pass through."""
    return ggml.ggml_rope_ext(
        ctx, x, pos, None, hp.n_rot, ggml.GGML_ROPE_TYPE_NEOX, 0, hp.rope_base, 1.0, 0.0, 1.0, 0.0, 0.0
    )


def free_graph(ggml, g: Graph) -> None:
    ggml.ggml_gallocr_free(g.galloc)
    ggml.ggml_free(g.ctx)
