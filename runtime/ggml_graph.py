"""The TinyGPT-V Phi-2 forward as a ggml graph (reference: export/model/phi.py).

One graph serves every call with the same (input kind, T new positions, n_kv attended slots, all
logits or last): where the tokens go in the cache, their positions and the causal mask are input
tensors, so a graph is built once and reused for the next 256 positions of decoding.

    ids (T) -get_rows-> x (E, T)    or    embeddings (E, T)
    per layer i:                                                    /blk.i/...
        h    = LayerNorm(x) * w + b                                 attn_norm
        qkv  = W_qkv h + b                  (3E, T) rows (3, H, D)  attn_qkv
        q, k = LayerNorm_D(q), LayerNorm_D(k)   (D, H, T), shared   attn_q_norm, attn_k_norm
        q, k = rope_neox(q, pos), rope_neox(k, pos)   first n_rot dims
        cache_k[:, slots] <- k ;  cache_v[slots, :] <- v            (V stored transposed)
        a    = softmax(K^T q / sqrt(D) + mask) over n_kv slots      fp32 scores
        o    = RMSNorm(W_o (V a) + b_o) * w                         attn_output, attn_post_norm
        f    = W_down gelu_tanh(W_up h + b_up) + b_down             ffn_up, ffn_down
        x    = x + o + f
    logits = W_out (LayerNorm(x[:, rows]) * w + b) + b_out          (n_vocab, R)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .decoder_model import HParams
from .ggml_runtime import KVCache, Weights, new_context

NODES_PER_LAYER = 48


@dataclass
class Graph:
    """A built graph and its input/output tensors; `galloc` owns the intermediate buffer."""

    ctx: int
    gf: object
    galloc: int
    inp: object  # token ids (I32, T) or embeddings (F32, E x T)
    pos: object  # I32 (T,)
    k_idx: object  # I64 (T,): cache slot of each new position
    v_idx: object  # I64 (E*T,): slot * 1 + channel * n_ctx in the transposed V cache
    mask: object  # F32 (n_kv, T)
    out: object  # F32 logits (n_vocab, R)
    rows: int


def build_graph(
    ggml, hp: HParams, w: Weights, kv: KVCache, T: int, n_kv: int, embeddings: bool, all_logits: bool
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

    def linear(x, wn: str, bn: str):
        return ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, t[wn], x), t[bn])

    if embeddings:
        inp = ggml.ggml_new_tensor_2d(ctx, f32, E, T)
        x = inp
    else:
        inp = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I32, T)
        x = ggml.ggml_get_rows(ctx, t["token_embd.weight"], inp)  # (E, T)
    pos = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I32, T)
    k_idx = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I64, T)
    v_idx = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_I64, E * T)
    mask = ggml.ggml_new_tensor_2d(ctx, f32, n_kv, T)
    for x_in, s in (
        (inp, "inp"),
        (pos, "inp_pos"),
        (k_idx, "inp_k_idx"),
        (v_idx, "inp_v_idx"),
        (mask, "mask"),
    ):
        name(x_in, s)
        ggml.ggml_set_input(x_in)

    scale = 1.0 / math.sqrt(D)
    kv_es = ggml.ggml_type_size(kv.type_id)
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        h = name(
            layer_norm(x, p + "attn_norm.weight", p + "attn_norm.bias", hp.eps_norm), f"/blk.{i}/attn_norm"
        )
        qkv = name(linear(h, p + "attn_qkv.weight", p + "attn_qkv.bias"), f"/blk.{i}/attn_qkv")  # (3E, T)
        nb1 = qkv.contents.nb[1]
        q = ggml.ggml_view_3d(ctx, qkv, D, H, T, D * 4, nb1, 0)  # (D, H, T)
        k = ggml.ggml_view_3d(ctx, qkv, D, H, T, D * 4, nb1, E * 4)
        v = ggml.ggml_view_3d(ctx, qkv, D, H, T, D * 4, nb1, 2 * E * 4)
        q = layer_norm(q, p + "attn_q_norm.weight", p + "attn_q_norm.bias", hp.eps_qk)
        k = layer_norm(k, p + "attn_k_norm.weight", p + "attn_k_norm.bias", hp.eps_qk)
        q = _rope(ggml, ctx, q, pos, hp)
        k = name(_rope(ggml, ctx, k, pos, hp), f"/blk.{i}/k")

        # write the new keys/values into their cache slots; the attention reads through these nodes
        ck = ggml.ggml_set_rows(ctx, kv.k[i], ggml.ggml_reshape_2d(ctx, k, E, T), k_idx)
        v_rows = ggml.ggml_reshape_2d(ctx, ggml.ggml_cont(ctx, v), 1, E * T)  # one value per row
        cv = ggml.ggml_set_rows(ctx, ggml.ggml_reshape_2d(ctx, kv.v[i], 1, E * kv.n_ctx), v_rows, v_idx)

        K = ggml.ggml_view_3d(ctx, ck, D, n_kv, H, ck.contents.nb[1], D * kv_es, 0)  # (D, n_kv, H)
        Vt = ggml.ggml_view_3d(ctx, cv, n_kv, D, H, kv.n_ctx * kv_es, kv.n_ctx * D * kv_es, 0)  # (n_kv, D, H)
        qh = ggml.ggml_permute(ctx, q, 0, 2, 1, 3)  # (D, T, H)
        kq = ggml.ggml_mul_mat(ctx, K, qh)  # (n_kv, T, H)
        ggml.ggml_mul_mat_set_prec(kq, ggml.GGML_PREC_F32)
        kq = name(ggml.ggml_soft_max_ext(ctx, kq, mask, scale, 0.0), f"/blk.{i}/attn_probs")
        o = ggml.ggml_mul_mat(ctx, Vt, kq)  # (D, T, H)
        o = ggml.ggml_cont_2d(ctx, ggml.ggml_permute(ctx, o, 0, 2, 1, 3), E, T)  # (E, T)
        o = linear(o, p + "attn_output.weight", p + "attn_output.bias")
        o = ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, o, hp.eps_rms), t[p + "attn_post_norm.weight"])
        o = name(o, f"/blk.{i}/attn_post_norm")

        f = ggml.ggml_gelu(ctx, linear(h, p + "ffn_up.weight", p + "ffn_up.bias"))
        f = name(linear(f, p + "ffn_down.weight", p + "ffn_down.bias"), f"/blk.{i}/ffn_down")
        x = name(ggml.ggml_add(ctx, ggml.ggml_add(ctx, x, o), f), f"/blk.{i}/out")

    rows = T if all_logits else 1
    if not all_logits and T > 1:
        x = ggml.ggml_view_2d(ctx, x, E, 1, x.contents.nb[1], (T - 1) * x.contents.nb[1])
    x = layer_norm(x, "output_norm.weight", "output_norm.bias", hp.eps_norm)
    out = name(linear(x, "output.weight", "output.bias"), "logits")  # (n_vocab, rows)
    ggml.ggml_set_output(out)
    ggml.ggml_build_forward_expand(g, out)

    galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_cpu_buffer_type())
    if not ggml.ggml_gallocr_alloc_graph(galloc, g):
        ggml.ggml_gallocr_free(galloc)
        ggml.ggml_free(ctx)
        raise MemoryError(f"cannot allocate the compute buffer of a {T}-token graph")
    return Graph(ctx, g, galloc, inp, pos, k_idx, v_idx, mask, out, rows)


def _rope(ggml, ctx, x, pos, hp: HParams):
    """NeoX rotate-half on the first n_rot dims of each head; the rest pass through."""
    return ggml.ggml_rope_ext(
        ctx, x, pos, None, hp.n_rot, ggml.GGML_ROPE_TYPE_NEOX, 0, hp.rope_base, 1.0, 0.0, 1.0, 0.0, 0.0
    )


def free_graph(ggml, g: Graph) -> None:
    ggml.ggml_gallocr_free(g.galloc)
    ggml.ggml_free(g.ctx)
