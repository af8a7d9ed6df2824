"""The one-per-fact tables of runtime/: the language tensor table and the ggml type registry, held
against what they describe (the reference model, ggml, gguf-py)."""

from __future__ import annotations

import pytest

from tinygptv_edge.runtime import contract as C
from tinygptv_edge.runtime.language import ggml_types as G


def test_tensor_table_matches_the_reference_model(tiny):
    """Canonical names and shapes are exactly PhiModel's parameters; roles follow the module kinds."""
    torch = pytest.importorskip("torch")
    L = tiny.cfg.language
    want = C.language_shapes(L.layers, L.hidden, L.intermediate, L.vocab_size, L.heads, canonical=True)
    got = {f"language.{k}": tuple(v.shape) for k, v in tiny.model.language.state_dict().items()}
    assert got == want
    modules = dict(tiny.model.language.named_modules())
    for t in C.language_tensors(L.layers):
        owner = modules[t.canonical.removeprefix("language.").rpartition(".")[0]]
        kind = {C.EMBEDDING: torch.nn.Embedding, C.MATMUL: torch.nn.Linear}.get(t.role)
        if kind is not None:
            assert isinstance(owner, kind), t
        elif t.role == C.BIAS:
            assert isinstance(owner, torch.nn.Linear) and t.canonical.endswith(".bias"), t
        else:
            assert not isinstance(owner, torch.nn.Linear | torch.nn.Embedding), t


def test_tensor_table_names_and_order():
    names = C.gguf_tensor_names(2)
    assert names[:5] == [
        "token_embd.weight",
        "output_norm.weight",
        "output_norm.bias",
        "output.weight",
        "output.bias",
    ]
    assert len(names) == 5 + 2 * 15 and len(set(names)) == len(names)
    assert names[5] == "blk.0.attn_norm.weight" and names[-1] == "blk.1.ffn_down.bias"
    assert [t.gguf for t in C.language_tensors(1) if t.qkv] == [
        "blk.0.attn_qkv.weight",
        "blk.0.attn_qkv.bias",
    ]
    shapes = C.language_shapes(1, n_embd=8, n_ff=32, n_vocab=50, n_head=2)
    assert shapes["blk.0.attn_qkv.weight"] == (24, 8) and shapes["blk.0.attn_q_norm.bias"] == (4,)
    assert shapes["blk.0.ffn_down.weight"] == (8, 32) and shapes["token_embd.weight"] == (50, 8)


def test_tensor_table_refuses_inconsistent_rows():
    with pytest.raises(ValueError, match="role"):
        C.LanguageTensor("x.weight", "language.x.weight", ("E",), "weights")
    with pytest.raises(ValueError, match="per block"):
        C.LanguageTensor("blk.{i}.x.weight", "language.x.weight", ("E",), C.NORM)
    with pytest.raises(ValueError, match="matmul tensor with shape"):
        C.LanguageTensor("x.weight", "language.x.weight", ("E",), C.MATMUL)


def test_ggml_types_match_ggml_and_gguf_py():
    gguf = pytest.importorskip("gguf")
    from tinygptv_edge.runtime.language.ggml_runtime import load_ggml

    ggml = load_ggml()
    for type_id, t in G.GGML_TYPES.items():
        assert getattr(ggml, f"GGML_TYPE_{t.name}") == type_id
        assert ggml.ggml_blck_size(type_id) == t.block and ggml.ggml_type_size(type_id) == t.nbytes, t
        q = gguf.GGMLQuantizationType(type_id)
        assert q.name == t.name and gguf.GGML_QUANT_SIZES[q] == (t.block, t.nbytes)
    assert set(G.WEIGHT_TYPES) <= set(G.TYPE_IDS) and set(G.K_QUANTS) <= set(G.WEIGHT_TYPES)
    assert all(G.BY_NAME[n].block == G.QK_K for n in G.K_QUANTS)


def test_hparam_table_covers_config_and_decoder_fields():
    """Every key is written from a LanguageConfig attribute and read into an HParams field (all of them)."""
    import dataclasses

    from tinygptv_edge.runtime.config import LanguageConfig
    from tinygptv_edge.runtime.language.decoder_model import HParams

    L = LanguageConfig()
    assert all(hasattr(L, h.config) and h.kind in ("uint32", "float32") for h in C.GGUF_HPARAMS.values())
    read = [h.hparams for h in C.GGUF_HPARAMS.values() if h.hparams]
    assert sorted(read) == sorted(f.name for f in dataclasses.fields(HParams))
    for h in C.GGUF_HPARAMS.values():
        assert isinstance(getattr(L, h.config), int if h.kind == "uint32" else float), h
    assert C.gguf_key("head_count") == "tinygptv-phi2.attention.head_count"
