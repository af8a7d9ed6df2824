"""The reference model: numerics, KV cache, prompt splicing, greedy decoding (the config contract and
the prompt layout: tests/runtime/test_prompt.py, torch-free)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")


from tinygptv_edge.export.model.phi import KVCache, RMSNorm, apply_rope, gelu_new, rope_cos_sin  # noqa: E402
from tinygptv_edge.runtime.config import ConfigError  # noqa: E402
from tinygptv_edge.runtime.text.prompt import split_prompt  # noqa: E402


def test_gelu_new_and_rmsnorm_match_their_formulas():
    x = torch.linspace(-4, 4, 101)
    ref = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu_new(x), ref)
    torch.testing.assert_close(gelu_new(x), torch.nn.functional.gelu(x, approximate="tanh"))
    n = RMSNorm(8, eps=1e-6)
    y = torch.randn(3, 8)
    torch.testing.assert_close(n(y), y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-6))


def test_rope_rotates_only_the_first_dims_and_is_relative():
    cos, sin = rope_cos_sin(torch.arange(6), 4, 10000.0)
    x = torch.randn(1, 2, 6, 10)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.equal(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    # q.k depends only on the distance between positions
    q, k = torch.randn(4), torch.randn(4)

    def dot(i, j):
        c, s = rope_cos_sin(torch.tensor([i, j]), 4, 10000.0)
        r = apply_rope(torch.stack([q, k])[None, None], c, s)[0, 0]
        return float(r[0] @ r[1])

    assert dot(3, 1) == pytest.approx(dot(7, 5), rel=1e-5)


def test_kv_cache_decode_equals_full_recompute(tiny):
    lm = tiny.model.language
    x = torch.randn(1, 11, tiny.cfg.language.hidden)
    with torch.no_grad():
        full = lm(x)
        cache = lm.new_cache()
        parts = [lm(x[:, :6], cache)] + [lm(x[:, t : t + 1], cache) for t in range(6, 11)]
    assert isinstance(cache, KVCache) and cache.length == 11
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_causal_mask_future_tokens_do_not_matter(tiny):
    lm = tiny.model.language
    x = torch.randn(1, 8, tiny.cfg.language.hidden)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, tiny.cfg.language.hidden)
    with torch.no_grad():
        torch.testing.assert_close(lm(x)[:, :5], lm(y)[:, :5])


def test_vision_tower_shapes_and_batch_independence(tiny):
    S = tiny.cfg.vision.image_size
    px = torch.randn(3, 3, S, S)
    emb = tiny.model.embed_image(px)
    assert emb.shape == (3, tiny.cfg.qformer.num_query_tokens, tiny.cfg.language.hidden)
    torch.testing.assert_close(tiny.model.embed_image(px[1:2])[0], emb[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, 3, 56, 56\)"):
        tiny.model.embed_image(torch.zeros(1, 3, 32, 32))


def test_prompt_splice_puts_bos_first_and_images_at_placeholders(tiny):
    tok = tiny.tokenizer
    seg = split_prompt("A<ImageHere>B C<ImageHere>", tok, 2, add_bos=True)
    assert seg.texts[0][0] == tok.bos_id and seg.texts[2] == ()
    Q, H = tiny.cfg.qformer.num_query_tokens, tiny.cfg.language.hidden
    imgs = [torch.full((Q, H), 1.0), torch.full((Q, H), 2.0)]
    emb = tiny.model.splice(seg, imgs)
    n0, n1 = len(seg.texts[0]), len(seg.texts[1])
    assert emb.shape == (1, seg.length(Q), H)
    assert torch.equal(emb[0, n0 : n0 + Q], imgs[0])
    assert torch.equal(emb[0, n0 + Q + n1 :], imgs[1])
    with pytest.raises(ConfigError, match="2 <ImageHere> slot"):
        split_prompt("A<ImageHere>B<ImageHere>", tok, 1, add_bos=True)


def test_greedy_generate_is_argmax_of_full_recompute(tiny):
    m, tok = tiny.model, tiny.tokenizer
    S = tiny.cfg.vision.image_size
    torch.manual_seed(0)
    embeds = m.prompt_embeds(m.cfg.prompt.first_turn("What colour?"), tok, torch.randn(1, 3, S, S))
    out = m.generate(embeds, 6)
    assert len(out) == 6
    seq = embeds
    for t in out:  # each token is the argmax of a cache-free forward over everything so far
        assert int(m.language(seq)[0, -1].argmax()) == t
        seq = torch.cat([seq, m.language.embed(torch.tensor([[t]]))], dim=1)


def test_max_positions_is_enforced(tiny):
    lm = tiny.model.language
    with pytest.raises(ValueError, match="exceeds max_positions 256"):
        lm(torch.zeros(1, 257, tiny.cfg.language.hidden))
