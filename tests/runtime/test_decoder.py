"""The ggml decoder against the torch reference (export/model/phi.py) on tiny models.

Layers of checks: F32 logits within 1e-3 of the logit range and 32 greedy tokens identical; F16/Q8_0/
Q4_0 (and K-quants at hidden 256) close by KL divergence and top-1 agreement; embeddings input equals
token input; KV-cache decoding equals a full recompute; truncate/reset rewind the cache.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from helpers.decoder_gguf import randomize_norms  # noqa: E402
from helpers.decoder_ref import greedy_dec, greedy_ref, kl_top1, ref_logits, text_imatrix  # noqa: E402
from helpers.wide import WIDE_LEVELS, wide_source  # noqa: E402

from tinygptv_edge.export.gguf.export import export_gguf, export_source  # noqa: E402
from tinygptv_edge.export.gguf.source import model_source  # noqa: E402
from tinygptv_edge.runtime.errors import ConfigError, ContextOverflowError  # noqa: E402
from tinygptv_edge.runtime.language.decoder import Decoder  # noqa: E402
from tinygptv_edge.runtime.language.ggml_runtime import kv_row_nbytes  # noqa: E402

LEVELS = ("F32", "F16", "Q8_0", "Q4_0")
PROMPT = [50, 7, 300, 12, 99, 4, 250, 31, 8, 77, 140, 3, 200, 45, 18, 2]


@pytest.fixture(scope="module")
def phi(tiny):
    return tiny.model.language


@pytest.fixture(scope="module")
def gguf_files(tiny, tmp_path_factory):
    """The tiny model through the real exporter (issue 4), at each level the tests use."""
    out = tmp_path_factory.mktemp("dec")
    return {t: export_gguf(tiny.model, tiny.tokenizer, out / f"tiny.{t}.gguf", t).path for t in LEVELS}


def test_f32_parity_and_greedy(phi, gguf_files):
    ref = ref_logits(phi, PROMPT)
    with Decoder(gguf_files["F32"], n_ctx=128, n_threads=2, kv_type="f32") as dec:
        got = dec.eval_tokens(PROMPT, all_logits=True)
        assert got.shape == ref.shape
        err = np.abs(got - ref).max() / (ref.max() - ref.min())
        assert err <= 1e-3, f"max abs diff {err:.2e} of the logit range"
        dec.reset()
        assert greedy_dec(dec, PROMPT[:4], 32) == greedy_ref(phi, PROMPT[:4], 32)


def test_f16_kv_close(phi, gguf_files):
    ref = ref_logits(phi, PROMPT)
    with Decoder(gguf_files["F32"], n_ctx=128, n_threads=2) as dec:
        got = dec.eval_tokens(PROMPT, all_logits=True)
    assert np.abs(got - ref).max() / (ref.max() - ref.min()) <= 5e-3
    kl, top1 = kl_top1(ref, got)
    assert kl < 1e-4 and top1 == 1.0


@pytest.mark.parametrize(
    ("wtype", "max_kl", "min_top1"), [("F16", 1e-4, 1.0), ("Q8_0", 1e-3, 0.9), ("Q4_0", 0.05, 0.6)]
)
def test_quantized_close(phi, gguf_files, wtype, max_kl, min_top1):
    with Decoder(gguf_files["F32"], n_ctx=64, n_threads=2) as dec:
        base = dec.eval_tokens(PROMPT, all_logits=True)
    with Decoder(gguf_files[wtype], n_ctx=64, n_threads=2) as dec:
        got = dec.eval_tokens(PROMPT, all_logits=True)
        if wtype == "Q4_0":
            assert dec.repacked, "Q4_0 weights should go to the repack buffer on this CPU"
    kl, top1 = kl_top1(base, got)
    assert kl <= max_kl and top1 >= min_top1, (wtype, kl, top1)


def test_wide_f32_and_kquants(wide):
    model, files = wide
    ref = ref_logits(model, PROMPT)
    with Decoder(files["F32"], n_ctx=64, n_threads=2, kv_type="f32") as dec:
        got = dec.eval_tokens(PROMPT, all_logits=True)
    assert np.abs(got - ref).max() / (ref.max() - ref.min()) <= 1e-3
    for wtype in WIDE_LEVELS[1:]:
        with Decoder(files[wtype], n_ctx=64, n_threads=2) as dec:
            q = dec.eval_tokens(PROMPT, all_logits=True)
        kl, top1 = kl_top1(got, q)
        assert kl <= 0.05 and top1 >= 0.6, (wtype, kl, top1)


# the smaller levels on the wide model with an importance matrix from 64 random tokens: KL against the
# reference and top-1 agreement over PROMPT, tolerances about 3x / 0.2 off what was measured when written
SMALL = [
    ("Q3_K_M", 0.02, 0.5),
    ("Q3_K_S", 0.03, 0.35),
    ("Q2_K", 0.075, 0.2),
    ("IQ4_XS", 0.012, 0.5),
    ("IQ3_S", 0.04, 0.45),
    ("IQ2_M", 0.04, 0.45),
]


@pytest.fixture(scope="module")
def wide_small(tiny, tmp_path_factory):
    """`wide_source` (hidden 256: every matmul at the level's types) exported at the smaller levels."""
    model, src = wide_source(tiny, seed=0)
    im = text_imatrix(model, np.random.default_rng(5).integers(0, model.cfg.vocab_size, 64).tolist())
    out = tmp_path_factory.mktemp("small")
    files = {lv: export_source(src, out / f"wide.{lv}.gguf", lv, imatrix=im) for lv, _, _ in SMALL}
    return model, files


@pytest.mark.parametrize(("level", "max_kl", "min_top1"), SMALL)
def test_small_levels_close(wide_small, level, max_kl, min_top1):
    model, files = wide_small
    report = files[level]
    assert not report.fallbacks
    with Decoder(report.path, n_ctx=64, n_threads=2) as dec:
        got = dec.eval_tokens(PROMPT, all_logits=True)
    kl, top1 = kl_top1(ref_logits(model, PROMPT), got)
    assert kl <= max_kl and top1 >= min_top1, (level, kl, top1)


@pytest.fixture(scope="module")
def long_ctx(tiny, tmp_path_factory):
    """A 1024-position context: long enough for each flash-attention path (see test below)."""
    from tinygptv_edge.export.model.phi import PhiModel

    lang = dataclasses.replace(tiny.model.language.cfg, max_positions=1024)
    torch.manual_seed(1)
    model = PhiModel(lang).eval()
    randomize_norms(model)
    src = model_source(model, tiny.tokenizer, cfg=tiny.cfg.replace(language=lang))
    return model, export_source(src, tmp_path_factory.mktemp("long") / "long.F32.gguf", "F32").path


@pytest.mark.parametrize(("kv_type", "tol"), [("f32", 1e-3), ("f16", 5e-3)])
def test_attention_paths_match_reference(long_ctx, kv_type, tol):
    """ggml's flash attention runs three ways: tiled GEMMs for a prompt (>= 64 queries, or fewer padded
    to 64; fully masked 64x64 tiles skipped), one query at a time for a decode step, and split over
    the cache for a decode step attending >= 512 slots. Each against the reference; the last-logits
    graph (whose last layer computes only the last position) against the all-logits one."""
    model, path = long_ctx
    ids = np.random.default_rng(2).integers(0, model.cfg.vocab_size, 600).tolist()
    ref = ref_logits(model, ids)
    span = ref.max() - ref.min()
    with Decoder(path, n_ctx=1024, n_threads=2, kv_type=kv_type, n_batch=150) as dec:
        got = dec.eval_tokens(ids[:150], all_logits=True)  # tiled: 150 queries, 3 tiles of 64
        assert np.abs(got - ref[:150]).max() / span <= tol
        dec.reset()
        last = dec.eval_tokens(ids[:150])  # one query in the last layer: fp16 V sums at f16
        np.testing.assert_allclose(last, got[-1], rtol=0, atol=(1e-5 if kv_type == "f32" else tol) * span)
        dec.eval_tokens(ids[150:590])  # batches of 150, 150, 140: tiled, the cache partly filled
        steps = np.stack([dec.eval_tokens([t]) for t in ids[590:]])  # n_kv 768: split over the cache
        assert np.abs(steps - ref[590:]).max() / span <= tol
        dec.truncate(40)
        few = dec.eval_tokens(ids[40:60], all_logits=True)  # 20 queries: padded to one tile
        assert np.abs(few - ref[40:60]).max() / span <= tol


# KL against the F16 cache over a 580-position prompt (batches of 150) and 20 decode steps on the long
# model (head_dim 16, padded to one block of 32); the measured values are in docs/decoder.md
@pytest.mark.parametrize(("kv_type", "max_kl", "min_top1"), [("q8_0", 1e-5, 0.97), ("q4_0", 1e-3, 0.9)])
def test_quantized_kv_close(long_ctx, kv_type, max_kl, min_top1):
    _, path = long_ctx
    ids = np.random.default_rng(2).integers(0, 512, 600).tolist()
    out = {}
    for kv in ("f16", kv_type):
        with Decoder(path, n_ctx=1024, n_threads=2, kv_type=kv, n_batch=150) as dec:
            prompt = dec.eval_tokens(ids[:580], all_logits=True)
            steps = np.stack([dec.eval_tokens([t]) for t in ids[580:]])
            out[kv] = np.concatenate([prompt, steps])
            hp = dec.hparams  # head_dim 16 padded to 32: this cache's rows are larger than F16's
            assert dec.kv_row_bytes == 2 * hp.n_layer * kv_row_nbytes(kv, hp.n_head, hp.head_dim)
    kl, top1 = kl_top1(out["f16"], out[kv_type])
    assert kl <= max_kl and top1 >= min_top1, (kv_type, kl, top1)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_growing_cache_equals_a_full_one(long_ctx, kv_type):
    """A cache allocated for 64 positions grows (256, then 512) and gives the numbers of one allocated
    in full; rows read from it continue in a fresh small decoder, written past its allocation."""
    _, path = long_ctx
    ids = np.random.default_rng(4).integers(0, 512, 300).tolist()
    runs = {}
    for alloc in (None, 64):
        with Decoder(path, n_ctx=1024, n_threads=2, kv_type=kv_type, n_ctx_alloc=alloc) as dec:
            assert dec.n_ctx_alloc == (1024 if alloc is None else 256)
            prompt = dec.eval_tokens(ids[:250], all_logits=True)
            steps = np.stack([dec.eval_tokens([t]) for t in ids[250:270]])  # grows at position 256
            assert dec.n_ctx_alloc == (1024 if alloc is None else 512)
            runs[alloc] = np.concatenate([prompt, steps])
            rows = dec.read_kv(0, 270).copy()
    np.testing.assert_array_equal(runs[64], runs[None])
    with Decoder(path, n_ctx=1024, n_threads=2, kv_type=kv_type, n_ctx_alloc=64) as dec:
        dec.write_kv(rows, 0)  # 270 positions into a cache of 256: grows first
        assert dec.n_past == 270 and dec.n_ctx_alloc == 512
        cont = np.stack([dec.eval_tokens([t]) for t in ids[270:280]])
    with Decoder(path, n_ctx=1024, n_threads=2, kv_type=kv_type) as dec:
        dec.eval_tokens(ids[:250])
        for t in ids[250:270]:
            dec.eval_tokens([t])
        want = np.stack([dec.eval_tokens([t]) for t in ids[270:280]])
    np.testing.assert_array_equal(cont, want)


def test_embeddings_equal_tokens(gguf_files):
    for wtype in ("F32", "Q4_0"):
        with Decoder(gguf_files[wtype], n_ctx=64, n_threads=2) as dec:
            a = dec.eval_tokens(PROMPT, all_logits=True)
            emb = dec.embed_tokens(PROMPT)
            assert emb.shape == (len(PROMPT), dec.n_embd) and emb.dtype == np.float32
            dec.reset()
            b = dec.eval_embeddings(emb, all_logits=True)
        np.testing.assert_array_equal(a, b)


def test_embed_tokens_matches_reference(phi, gguf_files):
    with Decoder(gguf_files["F32"], n_ctx=16) as dec:
        np.testing.assert_array_equal(
            dec.embed_tokens(PROMPT), phi.embed_tokens.weight.detach().numpy()[PROMPT]
        )


@pytest.mark.parametrize("wtype", ["F32", "Q8_0", "Q4_0"])
def test_cache_decode_equals_recompute(gguf_files, wtype):
    with Decoder(gguf_files[wtype], n_ctx=64, n_threads=2, n_batch=5) as dec:
        full = dec.eval_tokens(PROMPT, all_logits=True)  # batches of 5, 5, 5, 1, all of them a prompt
        dec.reset()
        step = np.stack([dec.eval_tokens([t]) for t in PROMPT])  # decode steps: the one-query kernel
        assert dec.n_past == len(PROMPT)
        # the two attention kernels differ by fp16 rounding (q and the V sum): the reference's f16 bound
        np.testing.assert_allclose(step, full, rtol=0, atol=5e-3 * (full.max() - full.min()))
        # a prompt position is the same in any batch: rewound and evaluated again from 6, or the last
        # two alone (what a prompt restored from the prefix cache evaluates)
        dec.reset()
        dec.eval_tokens(PROMPT)  # the cache as the prompt left it, not as the decode steps did
        for start in (6, len(PROMPT) - 2):
            dec.truncate(start)
            np.testing.assert_array_equal(dec.eval_tokens(PROMPT[start:], all_logits=True), full[start:])
            dec.truncate(start)
            np.testing.assert_array_equal(dec.eval_tokens(PROMPT[start:]), full[-1])


def test_mixed_embeddings_and_tokens(phi, gguf_files):
    """An 'image' block of embeddings between token pieces, as the pipeline feeds it."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, phi.cfg.hidden)).astype(np.float32) * 0.1
    head, tail = PROMPT[:5], PROMPT[5:9]
    with torch.no_grad():
        embeds = torch.cat(
            [phi.embed(torch.tensor(head)), torch.from_numpy(img), phi.embed(torch.tensor(tail))]
        )
        ref = phi(embeds[None])[0, -1].numpy()
    with Decoder(gguf_files["F32"], n_ctx=64, kv_type="f32") as dec:
        dec.eval_tokens(head)
        dec.eval_embeddings(img)
        got = dec.eval_tokens(tail)
    assert np.abs(got - ref).max() / (ref.max() - ref.min()) <= 1e-3


def test_metadata_read(tiny, gguf_files):
    with Decoder(gguf_files["Q4_0"], n_ctx=32) as dec:
        assert (dec.n_embd, dec.n_vocab, dec.n_ctx, dec.image_tokens) == (
            64,
            tiny.cfg.language.vocab_size,
            32,
            4,
        )
        assert dec.prompt == tiny.cfg.prompt
        text = "Human: hello   there###\n\n  <|endoftext|> x"
        assert dec.tokenizer.encode(text) == tiny.tokenizer.encode(text)
        assert dec.tokenizer.bos_id == tiny.tokenizer.bos_id


def test_context_and_argument_errors(gguf_files):
    with Decoder(gguf_files["F32"], n_ctx=16) as dec:
        dec.eval_tokens(PROMPT[:10])
        with pytest.raises(ContextOverflowError, match="10 cached \\+ 7 new"):
            dec.eval_tokens(PROMPT[:7])
        assert dec.n_past == 10
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            dec.eval_tokens([dec.n_vocab])
        with pytest.raises(ConfigError, match="expected shape"):
            dec.eval_embeddings(np.zeros((2, 3), np.float32))
        with pytest.raises(ConfigError, match="NaN"):
            dec.eval_embeddings(np.full((1, dec.n_embd), np.nan, np.float32))
        with pytest.raises(ConfigError, match="truncate"):
            dec.truncate(11)
    with pytest.raises(ConfigError, match="trained context"):
        Decoder(gguf_files["F32"], n_ctx=100000)
    with pytest.raises(ConfigError, match="kv_type"):
        Decoder(gguf_files["F32"], kv_type="q8")
    with pytest.raises(ConfigError, match="n_ctx_alloc"):
        Decoder(gguf_files["F32"], n_ctx_alloc=0)
