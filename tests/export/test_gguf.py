"""GGUF export of the language model: every level re-read, blocks bit-exact against gguf-py's reference
quantizer, K-quants within bound, importance matrix, and each bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("ggml")

from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from tinygptv_edge.export.gguf.export import export_gguf, export_source, qkv_to_gguf  # noqa: E402
from tinygptv_edge.export.gguf.imatrix import collect_imatrix  # noqa: E402
from tinygptv_edge.export.gguf.quant import (  # noqa: E402
    LEVELS,
    Q,
    choose_type,
    fit_type,
    get_level,
    use_more_bits,
)
from tinygptv_edge.export.gguf.source import model_source, single_source  # noqa: E402
from tinygptv_edge.runtime import contract as C  # noqa: E402
from tinygptv_edge.runtime.errors import (  # noqa: E402
    ConfigError,
    ExportError,
    NonFiniteTensorError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from tinygptv_edge.runtime.text.tokenizer import Tokenizer  # noqa: E402

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def read(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def source_arrays(model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in GGUF row order, straight from the reference model."""
    tensors = {t.canonical: t for t in C.language_tensors(model.cfg.language.layers)}
    out = {}
    for k, v in model.language.state_dict().items():
        a = v.float().numpy()
        t = tensors[f"language.{k}"]
        out[t.gguf] = qkv_to_gguf(a, model.cfg.language.heads) if t.qkv else a
    return out


def pixels(cfg, n: int, seed: int = 0) -> list[np.ndarray]:
    S = cfg.vision.image_size
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, S, S)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def wide(tiny):
    """The tiny model widened to hidden 256 and 4 layers, so the K-quants apply (rows % 256 == 0)."""
    from tinygptv_edge.export.model.tinygptv import TinyGPTV

    lang = dataclasses.replace(tiny.cfg.language, hidden=256, intermediate=512, layers=4)
    proj = dataclasses.replace(tiny.cfg.projection, out_features=256)
    cfg = tiny.cfg.replace(language=lang, projection=proj)
    torch.manual_seed(0)
    model = TinyGPTV(cfg).eval()
    with torch.no_grad():
        for p in model.language.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02)
    return model


# ---------------------------------------------------------------------------------------------
# levels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(LEVELS))
def test_every_level_reads_back(tiny, tmp_path, level):
    out = tmp_path / f"lm.{level}.gguf"
    report = export_gguf(tiny.model, tiny.tokenizer, out, level, sha256={"x.pth": "ab" * 32})
    fields, tensors = read(out)
    L = tiny.cfg.language
    assert fields["GGUF.version"] == 3
    assert fields["general.architecture"] == C.GGUF_ARCH
    assert fields[C.GGUF_GENERAL_KEYS["file_type"]] == int(get_level(level).file_type)
    assert fields[C.GGUF_GENERAL_KEYS["level"]] == level
    assert fields[C.GGUF_GENERAL_KEYS["quantization_version"]] == 2
    assert fields[C.gguf_key("block_count")] == L.layers
    assert fields[C.gguf_key("rope_dimension_count")] == L.rotary_dim
    assert fields[C.gguf_key("layer_norm_rms_epsilon")] == pytest.approx(L.post_norm_eps)
    assert json.loads(fields[C.TINYGPTV_KEYS["source_sha256"]]) == {"x.pth": "ab" * 32}
    assert list(tensors) == C.gguf_tensor_names(L.layers)
    for plan in report.tensors:
        t = tensors[plan.name]
        assert Q(t.tensor_type) == plan.qtype
        assert tuple(int(n) for n in reversed(t.shape)) == plan.shape
        if len(plan.shape) == 1:
            assert plan.qtype == Q.F32, plan.name
    assert not list(tmp_path.glob(".*.tmp"))


def test_metadata_tokenizer_and_prompt(tiny, tmp_path):
    out = tmp_path / "lm.gguf"
    export_gguf(tiny.model, tiny.tokenizer, out, "F16")
    fields, _ = read(out)
    K = C.GGUF_TOKENIZER_KEYS
    tokens = fields[K["tokens"]]
    assert len(tokens) == tiny.cfg.language.vocab_size == len(fields[K["token_type"]])
    assert fields[K["model"]] == "gpt2" and fields[K["add_bos"]] is True and fields[K["add_eos"]] is False
    assert fields[K["bos_id"]] == tiny.tokenizer.bos_id and fields[K["eos_id"]] == tiny.tokenizer.eos_id
    assert fields[K["token_type"]][tiny.tokenizer.eos_id] == C.GGUF_TOKEN_TYPE["control"]
    merges = fields[K["merges"]]
    rebuilt = Tokenizer.from_vocab_merges(tokens, merges, fields[K["bos_id"]], fields[K["eos_id"]])
    text = "Human: <Img> What colour is the cat?###Assistant: a red one, héllo\n"
    assert rebuilt.encode(text) == tiny.tokenizer.encode(text)
    P = tiny.cfg.prompt
    assert fields[C.TINYGPTV_KEYS["prompt_user_template"]] == P.user_template
    assert fields[C.TINYGPTV_KEYS["prompt_separator"]] == P.separator
    assert fields[C.TINYGPTV_KEYS["image_tokens"]] == tiny.cfg.num_image_tokens


def test_metadata_has_the_format_version(tiny, tmp_path):
    out = tmp_path / "lm.gguf"
    export_gguf(tiny.model, tiny.tokenizer, out, "F32")
    fields, _ = read(out)
    assert fields[C.TINYGPTV_KEYS["format_version"]] == C.GGUF_FORMAT_VERSION == 1


def test_qkv_rows_are_q_then_k_then_v(tiny, tmp_path):
    out = tmp_path / "lm.gguf"
    export_gguf(tiny.model, tiny.tokenizer, out, "F32")
    _, tensors = read(out)
    L = tiny.cfg.language
    attn = tiny.model.language.layers[1].self_attn.query_key_value
    w = attn.weight.detach().numpy().reshape(L.heads, 3, L.head_dim, L.hidden)  # reference (heads, 3, d)
    b = attn.bias.detach().numpy().reshape(L.heads, 3, L.head_dim)
    gw = np.asarray(tensors["blk.1.attn_qkv.weight"].data).reshape(3, L.heads, L.head_dim, L.hidden)
    gb = np.asarray(tensors["blk.1.attn_qkv.bias"].data).reshape(3, L.heads, L.head_dim)
    for which in range(3):  # q, k, v
        np.testing.assert_array_equal(gw[which], w[:, which])
        np.testing.assert_array_equal(gb[which], b[:, which])


@pytest.mark.parametrize("level", LEGACY)
def test_legacy_blocks_bit_identical_to_gguf_reference(tiny, tmp_path, level):
    out = tmp_path / "lm.gguf"
    export_gguf(tiny.model, tiny.tokenizer, out, level, pure=True)
    _, tensors = read(out)
    src = source_arrays(tiny.model)
    checked = 0
    for name, t in tensors.items():
        if Q(t.tensor_type) == Q.F32:
            continue
        assert Q(t.tensor_type) == Q[level], name
        ref = quantize(src[name], Q[level])
        np.testing.assert_array_equal(np.asarray(t.data).reshape(ref.shape), ref, err_msg=name)
        checked += 1
    assert checked == 2 + 4 * tiny.cfg.language.layers


@pytest.mark.parametrize(("level", "rms"), [("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03)])
def test_kquants_apply_and_dequantize_within_bound(wide, tiny, tmp_path, level, rms):
    out = tmp_path / "lm.gguf"
    report = export_gguf(wide, tiny.tokenizer, out, level)
    assert not report.fallbacks
    _, tensors = read(out)
    src = source_arrays(wide)
    for name, t in tensors.items():
        if len(src[name].shape) == 1:
            continue
        expected = Q.Q6_K if name == "output.weight" else Q[level]
        assert Q(t.tensor_type) == expected, name
        deq = dequantize(t.data, expected).reshape(src[name].shape)
        rel = np.sqrt(((deq - src[name]) ** 2).mean() / (src[name] ** 2).mean())
        assert 0 < rel < rms, (name, rel)


def test_k_mixes_raise_qkv_ffn_down_and_output(wide, tiny, tmp_path):
    n = wide.cfg.language.layers  # 4: more bits on layers 2 and 3
    more = [i for i in range(n) if use_more_bits(i, n)]
    assert more == [2, 3]
    for level, qkv in (("Q4_K_M", Q.Q5_K), ("Q5_K_M", Q.Q6_K)):
        report = export_gguf(wide, tiny.tokenizer, tmp_path / f"{level}.gguf", level)
        types = {t.name: t.qtype for t in report.tensors}
        base = get_level(level).base
        assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == base
        for i in range(n):
            assert types[f"blk.{i}.attn_qkv.weight"] == qkv
            assert types[f"blk.{i}.ffn_down.weight"] == (Q.Q6_K if i in more else base)
            assert types[f"blk.{i}.ffn_up.weight"] == types[f"blk.{i}.attn_output.weight"] == base


SMALL_LEVELS = ("Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ3_S", "IQ2_M")


def phi2_mix(level: str, has_imatrix: bool = True) -> dict[tuple[str, str], int]:
    """(tensor kind, type) -> count at the full model's shapes (32 layers, hidden 2560)."""
    E, F, V, n = 2560, 10240, 51200, 32
    shapes = {"token_embd.weight": (V, E), "output.weight": (V, E)}
    for i in range(n):
        shapes |= {f"blk.{i}.attn_qkv.weight": (3 * E, E), f"blk.{i}.attn_output.weight": (E, E)}
        shapes |= {f"blk.{i}.ffn_up.weight": (F, E), f"blk.{i}.ffn_down.weight": (E, F)}
    out: dict[tuple[str, str], int] = {}
    for name, shape in shapes.items():
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        key = (kind, choose_type(get_level(level), name, shape, n, has_imatrix=has_imatrix).name)
        out[key] = out.get(key, 0) + 1
    return out


def test_small_level_mixes_follow_llama_cpp():
    """llama.cpp's llama_tensor_get_type for Phi-2 (fused qkv counted with attn_v, n_gqa 1)."""
    assert phi2_mix("Q3_K_M") == {
        ("token_embd", "Q3_K"): 1,
        ("output", "Q6_K"): 1,
        ("attn_qkv", "Q5_K"): 2,  # layers 0-1
        ("attn_qkv", "Q4_K"): 30,
        ("attn_output", "Q4_K"): 32,
        ("ffn_up", "Q3_K"): 32,
        ("ffn_down", "Q5_K"): 2,  # the first sixteenth
        ("ffn_down", "Q4_K"): 30,
    }
    assert phi2_mix("Q3_K_S") == {
        ("token_embd", "Q3_K"): 1,
        ("output", "Q6_K"): 1,
        **{(k, "Q3_K"): 32 for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")},
    }
    assert phi2_mix("Q2_K") == {
        ("token_embd", "Q2_K"): 1,
        ("output", "Q6_K"): 1,
        ("attn_qkv", "Q3_K"): 32,
        ("attn_output", "Q3_K"): 32,
        ("ffn_up", "Q2_K"): 32,
        ("ffn_down", "Q3_K"): 32,
    }
    iq4 = {("token_embd", "IQ4_XS"): 1, ("output", "Q6_K"): 1, ("attn_qkv", "IQ4_XS"): 32}
    iq4 |= {("attn_output", "IQ4_XS"): 32, ("ffn_up", "IQ4_XS"): 32}
    assert phi2_mix("IQ4_XS") == iq4 | {("ffn_down", "IQ4_XS"): 32}
    assert phi2_mix("IQ4_XS", has_imatrix=False) == iq4 | {
        ("ffn_down", "Q5_K"): 4,
        ("ffn_down", "IQ4_XS"): 28,
    }
    assert phi2_mix("IQ3_S") == {
        ("token_embd", "IQ3_S"): 1,
        ("output", "Q6_K"): 1,
        **{(k, "IQ3_S"): 32 for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")},
    }
    assert phi2_mix("IQ2_M") == {
        ("token_embd", "IQ3_S"): 1,
        ("output", "Q5_K"): 1,
        ("attn_qkv", "IQ3_S"): 32,
        ("attn_output", "IQ3_S"): 32,
        ("ffn_up", "IQ2_S"): 32,
        ("ffn_down", "IQ3_S"): 4,  # the first eighth
        ("ffn_down", "IQ2_S"): 28,
    }


@pytest.mark.parametrize("level", SMALL_LEVELS)
def test_small_levels_export_with_an_imatrix(wide, tiny, tmp_path, level):
    """Each smaller level on the wide model (rows of 256) with an importance matrix: the planned
    types written (no fallback), verified within BOUNDS; IQ2_M refused without one."""
    pairs = [(pixels(wide.cfg, 1)[0], "What is in the image?"), (None, "Say something about cats.")]
    im = collect_imatrix(wide, tiny.tokenizer, pairs)
    report = export_gguf(wide, tiny.tokenizer, tmp_path / "lm.gguf", level, imatrix=im)
    assert not report.fallbacks and report.imatrix_used
    n = wide.cfg.language.layers
    _, tensors = read(report.path)
    for plan in report.tensors:
        assert Q(tensors[plan.name].tensor_type) == plan.qtype
        want = choose_type(get_level(level), plan.name, plan.shape, n, has_imatrix=True)
        assert plan.qtype == want, plan.name
    assert all(e <= 1.0 for e in report.max_rel_error.values())
    if level == "IQ2_M":
        assert report.type_counts()["IQ2_S"] == 2 * n - sum(
            use_more_bits(i, n) and i < n // 8 for i in range(n)
        )
        with pytest.raises(ExportError, match="needs an importance matrix"):
            export_gguf(wide, tiny.tokenizer, tmp_path / "plain.gguf", level)
        export_gguf(wide, tiny.tokenizer, tmp_path / "pure.gguf", level, pure=True, imatrix=im)


def test_fallback_table():
    assert fit_type(Q.Q4_K, 64) == Q.Q5_0
    assert fit_type(Q.Q5_K, 64) == Q.Q5_1
    assert fit_type(Q.Q6_K, 2560 + 32) == Q.Q8_0
    assert fit_type(Q.Q4_0, 48) == Q.F16
    assert fit_type(Q.Q4_K, 48) == Q.F16
    assert fit_type(Q.Q4_K, 2560) == Q.Q4_K
    assert fit_type(Q.Q3_K, 64) == fit_type(Q.Q2_K, 64) == Q.Q4_0
    assert fit_type(Q.IQ2_S, 64) == fit_type(Q.IQ3_S, 64) == fit_type(Q.IQ4_XS, 96) == Q.IQ4_NL
    assert fit_type(Q.IQ3_S, 48) == Q.F16
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, *range(6, 28, 3), 28, 29, 30, 31]
    with pytest.raises(ConfigError, match="Q3_K"):
        get_level("Q3_K")


def test_threads_give_the_same_blocks():
    from tinygptv_edge.export.gguf.quant import quantize as ggml_quantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 512)).astype(np.float32)
    im = rng.random(512).astype(np.float32)
    for qtype in (Q.Q4_0, Q.Q4_K, Q.Q6_K):
        one = ggml_quantize(x, qtype, im, threads=1)
        np.testing.assert_array_equal(ggml_quantize(x, qtype, im, threads=3), one)
    np.testing.assert_array_equal(ggml_quantize(x, Q.Q8_0, threads=4), quantize(x, Q.Q8_0))


# ---------------------------------------------------------------------------------------------
# importance matrix
# ---------------------------------------------------------------------------------------------


def weighted_error(tensors, src, imatrix) -> dict[str, float]:
    out = {}
    for name, im in imatrix.values.items():
        t = tensors[name]
        deq = dequantize(t.data, Q(t.tensor_type)).reshape(src[name].shape)
        out[name] = float((im * (deq - src[name]).astype(np.float64) ** 2).sum())
    return out


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_imatrix_changes_blocks_and_lowers_weighted_error(tiny, wide, tmp_path, which):
    model = tiny.model if which == "tiny" else wide
    level = "Q4_0" if which == "tiny" else "Q4_K"
    qs = ["What is in the image?", "Describe the colours.", "How many shapes are there?"]
    pairs = list(zip(pixels(model.cfg, 3), qs, strict=True)) + [(None, "Say something about cats.")]
    im = collect_imatrix(model, tiny.tokenizer, pairs, answer_tokens=2)
    assert im.chunks == 4 and set(im.values) == {
        n for n in C.gguf_tensor_names(model.cfg.language.layers) if n.endswith(".weight") and "norm" not in n
    } - {"token_embd.weight"}
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "im.gguf"
    export_gguf(model, tiny.tokenizer, plain, level, pure=True)
    export_gguf(model, tiny.tokenizer, weighted, level, pure=True, imatrix=im)
    fields, t_im = read(weighted)
    _, t_plain = read(plain)
    assert fields["quantize.imatrix.chunks_count"] == 4
    changed = [n for n in im.values if not np.array_equal(t_im[n].data, t_plain[n].data)]
    assert len(changed) == len(im.values)
    src = source_arrays(model)
    e_plain, e_im = weighted_error(t_plain, src, im), weighted_error(t_im, src, im)
    assert sum(e_im.values()) < 0.95 * sum(e_plain.values())
    assert sum(e_im[n] < e_plain[n] for n in im.values) >= 0.8 * len(im.values)


def test_imatrix_counts_image_tokens(tiny):
    from tinygptv_edge.runtime.text.prompt import split_prompt

    q = "What is this?"
    im = collect_imatrix(tiny.model, tiny.tokenizer, [(pixels(tiny.cfg, 1)[0], q)])
    prompt = tiny.cfg.prompt.first_turn(q)
    T = split_prompt(prompt, tiny.tokenizer, 1, add_bos=True).length(tiny.cfg.num_image_tokens)
    assert im.counts["blk.0.attn_qkv.weight"] == im.counts["output.weight"] == T
    assert all(v.shape == (im.values[k].shape[0],) and (v >= 0).all() for k, v in im.values.items())


# ---------------------------------------------------------------------------------------------
# sources and CLI
# ---------------------------------------------------------------------------------------------


def test_single_folder_streams_the_same_tensors(tiny, tiny_single, tmp_path):
    a, b = tmp_path / "model.gguf", tmp_path / "single.gguf"
    export_gguf(tiny.model, tiny.tokenizer, a, "Q8_0")
    src = single_source(tiny_single)
    export_source(src, b, "Q8_0")
    fields, tb = read(b)
    _, ta = read(a)
    assert list(ta) == list(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name].data, tb[name].data, err_msg=name)
    assert set(json.loads(fields[C.TINYGPTV_KEYS["source_sha256"]])) == {"model.safetensors"}


def test_cli_export_with_imatrix(tiny, tiny_single, tmp_path):
    from PIL import Image

    from tinygptv_edge.cli import main

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    prompts = tmp_path / "q.txt"
    prompts.write_text("What is here?\n\nWhat colour?\n")
    dist = tmp_path / "dist"
    assert main(["export-gguf", "--model", str(tiny_single), "--out", str(dist), "-q", "Q8_0"]) == 0
    assert (tmp_path / "dist" / "language.q8_0.gguf").is_file()
    argv = ["export-gguf", "--model", str(tiny_single), "--out", str(tmp_path / "x.gguf"), "-q", "Q4_K_M"]
    assert main([*argv, "--imatrix-images", str(images), "--imatrix-questions", str(prompts)]) == 0
    fields, _ = read(tmp_path / "x.gguf")
    assert fields["quantize.imatrix.chunks_count"] == 2
    assert main([*argv, "--imatrix-images", str(tmp_path / "none")]) == 2  # typed error -> exit 2
    saved = tmp_path / "im.npz"
    assert main([*argv, "--imatrix-images", str(images), "--imatrix-out", str(saved)]) == 0
    first = (tmp_path / "x.gguf").read_bytes()
    assert main([*argv, "--imatrix", str(saved)]) == 0  # reused: the same file
    assert (tmp_path / "x.gguf").read_bytes() == first


def test_cli_from_official_checkpoints(tiny, tmp_path):
    from tinygptv_edge.cli import main

    s = tiny.synth
    argv = ["export-gguf", "--phi2", str(s.phi2), "--eva", str(s.eva), "--blip2", str(s.blip2)]
    tiny.cfg.save(tmp_path / "config.json")
    out = tmp_path / "lm.gguf"
    more = ["--stage-ckpt", str(s.stage), "--config", str(tmp_path / "config.json"), "--out", str(out)]
    assert main([*argv, *more, "-q", "F32"]) == 0
    fields, tensors = read(out)
    hashes = json.loads(fields[C.TINYGPTV_KEYS["source_sha256"]])
    assert {s.stage.name, s.eva.name, s.blip2.name} <= set(hashes)
    src = source_arrays(tiny.model)  # LoRA merged by the loader: the fixture's model exactly
    for name, t in tensors.items():
        np.testing.assert_array_equal(np.asarray(t.data).reshape(src[name].shape), src[name], err_msg=name)
    assert main([*argv[:3], "--out", str(out)]) == 2  # --eva and --blip2 missing


# ---------------------------------------------------------------------------------------------
# bad input: typed errors, nothing half-written, an existing file left as it was
# ---------------------------------------------------------------------------------------------


def assert_clean(folder: Path, keep: dict[str, bytes] | None = None) -> None:
    left = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert left == (keep or {})


def test_unmapped_tensor_name(tiny, tmp_path):
    src = model_source(tiny.model, tiny.tokenizer)
    src.shapes["language.layers.0.self_attn.rotary.inv_freq"] = (4,)
    with pytest.raises(UnexpectedKeysError, match=r"layers\.0\.self_attn\.rotary\.inv_freq"):
        export_source(src, tmp_path / "lm.gguf", "Q4_0")
    assert_clean(tmp_path)


def test_shape_mismatch(tiny, tmp_path):
    from tinygptv_edge.export.model.phi import PhiModel

    other = PhiModel(dataclasses.replace(tiny.cfg.language, intermediate=96))
    with pytest.raises(ShapeMismatchError, match=r"fc1\.weight.*expected shape \(128, 64\), got \(96, 64\)"):
        export_source(model_source(other, tiny.tokenizer, cfg=tiny.cfg), tmp_path / "lm.gguf", "Q4_0")
    assert_clean(tmp_path)


def test_non_finite_weight_keeps_the_old_file(tiny, tmp_path):
    out = tmp_path / "lm.gguf"
    out.write_bytes(b"previous export")
    src = model_source(tiny.model, tiny.tokenizer)
    fetch = src.fetch

    def poisoned(name):
        t = fetch(name).clone()
        if name == "language.layers.1.mlp.fc2.weight":
            t[3, 5] = float("nan")
        return t

    src.fetch = poisoned
    with pytest.raises(NonFiniteTensorError, match=r"layers\.1\.mlp\.fc2\.weight.*1 non-finite"):
        export_source(src, out, "Q4_0")
    assert_clean(tmp_path, {"lm.gguf": b"previous export"})


def test_out_of_fp16_range(tiny, tmp_path):
    src = model_source(tiny.model, tiny.tokenizer)
    fetch = src.fetch
    src.fetch = lambda n: fetch(n) * (1e7 if n == "language.lm_head.weight" else 1)
    with pytest.raises(ExportError, match=r"lm_head\.weight.*fp16 range"):
        export_source(src, tmp_path / "lm.gguf", "F16")
    export_source(src, tmp_path / "lm.gguf", "F32")  # F32 keeps any finite value


def test_unwritable_output(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        export_gguf(tiny.model, tiny.tokenizer, blocker / "lm.gguf", "Q4_0")
    assert_clean(tmp_path, {"file": b"not a folder"})


def test_verification_catches_bad_blocks(tiny, tmp_path, monkeypatch):
    import tinygptv_edge.export.gguf.export as ge

    real = ge.quantize

    def corrupt(data, qtype, imatrix=None, threads=None):
        out = real(data, qtype, imatrix)
        if data.shape == (3 * tiny.cfg.language.hidden, tiny.cfg.language.hidden):
            out = out.copy()
            out[:, : out.shape[1] // 2] = out[::-1, : out.shape[1] // 2]  # rows swapped
        return out

    monkeypatch.setattr(ge, "quantize", corrupt)
    with pytest.raises(ExportError, match="attn_qkv.weight"):
        export_gguf(tiny.model, tiny.tokenizer, tmp_path / "lm.gguf", "Q8_0")
    assert_clean(tmp_path)


def test_bad_imatrix(tiny, tmp_path):
    with pytest.raises(ExportError, match=r"blk\.0\.ffn_down\.weight: expected shape \(128,\)"):
        bad = {"blk.0.ffn_down.weight": np.ones(64)}
        export_gguf(tiny.model, tiny.tokenizer, tmp_path / "lm.gguf", "Q4_0", imatrix=bad)
    assert_clean(tmp_path)
