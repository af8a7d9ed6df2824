"""A corpus of malformed GGUF files, generated from a valid one (the committed Q8_0 export of the shipped
model, so this runs in the torch-free tier): each must raise a typed error from the Python-side checks
(never a segfault, a hang or a huge allocation). Model-level variants are written from the tiny
reference model (torch tier)."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from helpers.shipped_data import language_file

from tinygptv_edge.runtime.contract import GGUF_FORMAT_VERSION, TINYGPTV_KEYS
from tinygptv_edge.runtime.errors import (
    CheckpointError,
    FormatVersionError,
    GGUFFormatError,
    GGUFModelError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from tinygptv_edge.runtime.language.decoder import Decoder
from tinygptv_edge.runtime.language.gguf_file import GGUFFile, GGUFLimits


@pytest.fixture(scope="module")
def valid():
    path = language_file("Q8_0")
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def tiny_valid(tiny, tmp_path_factory):
    """The tiny model through the exporter (the reference for the test-side writer)."""
    from tinygptv_edge.export.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("bad")
    path = export_gguf(tiny.model, tiny.tokenizer, out / "valid.gguf", "Q8_0").path
    return path, path.read_bytes()


def _key_value_pos(data: bytes, key: str) -> int:
    """Byte position of the u32 value type following metadata key `key`."""
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k)
    return i + 8 + len(k)


def _tensor_info_pos(data: bytes, name: str) -> int:
    """Byte position of the u32 n_dims following tensor name `name` in the tensor table."""
    n = name.encode()
    i = data.index(struct.pack("<Q", len(n)) + n)
    return i + 8 + len(n)


def _patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, pos, value)
    return bytes(b)


def _info_fields(data: bytes, name: str) -> dict[str, int]:
    p = _tensor_info_pos(data, name)
    (n_dims,) = struct.unpack_from("<I", data, p)
    return {"n_dims": p, "dim0": p + 4, "type": p + 4 + 8 * n_dims, "offset": p + 8 + 8 * n_dims}


def corpus(data: bytes) -> dict[str, bytes]:
    """name -> corrupt bytes (all header-level corruptions)."""
    tok = _key_value_pos(data, "tokenizer.ggml.tokens")
    blk = _key_value_pos(data, "tinygptv-phi2.block_count")
    t0 = _info_fields(data, "blk.0.attn_norm.bias")
    t1 = _info_fields(data, "blk.1.attn_norm.bias")
    dup = bytearray(data)
    j = data.index(b"blk.1.attn_norm.bias")
    dup[j + 4] = ord("0")
    dupkey = bytearray(data)
    j = data.index(b"tokenizer.ggml.eos_token_id")
    dupkey[j + 15] = ord("b")  # now a second 'tokenizer.ggml.bos_token_id'
    bad_utf8 = bytearray(data)
    bad_utf8[24 + 8] = 0xFF
    return {
        "empty": b"",
        "header_only_part": data[:10],
        "truncated_in_metadata": data[: tok + 200],
        "truncated_in_tensor_table": data[: _tensor_info_pos(data, "output.bias")],
        "truncated_in_data": data[: len(data) - 100],
        "bad_magic": b"GGUX" + data[4:],
        "bad_version": _patch(data, 4, "I", 99),
        "huge_tensor_count": _patch(data, 8, "Q", 1 << 40),
        "huge_kv_count": _patch(data, 16, "Q", 1 << 62),
        "kv_count_past_end": _patch(data, 16, "Q", 5000),
        "huge_key_length": _patch(data, 24, "Q", 1 << 62),
        "huge_array_length": _patch(data, tok + 8, "Q", 1 << 60),
        "array_length_past_end": _patch(data, tok + 8, "Q", 1 << 23),
        "nested_array": _patch(data, tok + 4, "I", 9),
        "unknown_value_type": _patch(data, blk, "I", 77),
        "bad_utf8_key": bytes(bad_utf8),
        "duplicate_key": bytes(dupkey),
        "duplicate_tensor": bytes(dup),
        "too_many_dims": _patch(data, t0["n_dims"], "I", 7),
        "zero_dim": _patch(data, t0["dim0"], "Q", 0),
        "huge_dim": _patch(data, t0["dim0"], "Q", 1 << 40),
        "unknown_type": _patch(data, t0["type"], "I", 99),
        "offset_past_end": _patch(data, t0["offset"], "Q", 1 << 40),
        "offset_misaligned": _patch(
            data, t0["offset"], "Q", struct.unpack_from("<Q", data, t0["offset"])[0] + 4
        ),
        "overlapping_tensors": _patch(
            data, t1["offset"], "Q", struct.unpack_from("<Q", data, t0["offset"])[0]
        ),
    }


def test_valid_file_parses(valid):
    gf = GGUFFile.open(valid[0])
    assert gf.fields["general.architecture"].value == "tinygptv-phi2"
    assert gf.tensors["blk.0.attn_qkv.weight"].type.name == "Q8_0"
    gf.close()


def test_corpus_raises_format_errors(valid, tmp_path):
    _, data = valid
    for name, bad in corpus(data).items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bad)
        t0 = time.perf_counter()
        with pytest.raises(GGUFFormatError) as e:
            GGUFFile.open(path)
        assert str(path) in str(e.value) or name == "empty", (name, str(e.value))
        with pytest.raises(GGUFFormatError):
            Decoder(path, n_ctx=16)
        assert time.perf_counter() - t0 < 2.0, f"{name} took too long"


def test_error_messages_name_the_problem(valid, tmp_path):
    _, data = valid
    expect = {
        "bad_magic": "bad magic",
        "huge_tensor_count": "exceeds the limit",
        "huge_array_length": "exceeds the limit",
        "array_length_past_end": "truncated",
        "duplicate_tensor": "duplicate tensor 'blk.0.attn_norm.bias'",
        "duplicate_key": "duplicate metadata key",
        "offset_past_end": "runs past the end",
        "overlapping_tensors": "overlap",
        "unknown_type": "unknown ggml type 99",
    }
    c = corpus(data)
    for name, words in expect.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(c[name])
        with pytest.raises(GGUFFormatError, match=words):
            GGUFFile.open(path)


def test_limits_are_configurable(valid):
    with pytest.raises(GGUFFormatError, match="array length"):
        GGUFFile.open(valid[0], GGUFLimits(max_array=100))


def test_missing_file(tmp_path):
    with pytest.raises(GGUFFormatError, match="cannot open"):
        Decoder(tmp_path / "nope.gguf")


def _model_variant(tiny, tmp_path, name, **kw):
    from helpers.decoder_gguf import write_gguf

    return write_gguf(
        tmp_path / f"{name}.gguf", tiny.model.language, tiny.synth.phi2 / "tokenizer.json", **kw
    )


def test_own_writer_agrees_with_exporter(tiny, tmp_path, tiny_valid):
    """The test-side writer (for the bad variants below) follows the same contract as the exporter."""
    ours = GGUFFile.open(_model_variant(tiny, tmp_path, "ours", wtype="Q8_0"))
    theirs = GGUFFile.open(tiny_valid[0])
    assert {n: (t.shape, t.type.name) for n, t in ours.tensors.items()} == {
        n: (t.shape, t.type.name) for n, t in theirs.tensors.items()
    }
    for name in ("blk.1.attn_qkv.weight", "output.bias", "blk.0.attn_k_norm.bias"):
        np.testing.assert_array_equal(ours.tensor_bytes(name), theirs.tensor_bytes(name))
    ours.close()
    theirs.close()


def test_model_level_errors(tiny, tmp_path, tiny_valid):
    phi = tiny.model.language
    E = phi.cfg.hidden
    cases = [
        (
            "other_arch",
            {"arch": "phi2"},
            GGUFModelError,
            "architecture: expected 'tinygptv-phi2', got 'phi2'",
        ),
        ("missing_tensor", {"skip": ("blk.1.ffn_up.weight",)}, MissingKeysError, "blk.1.ffn_up.weight"),
        (
            "wrong_shape",
            {"override": {"blk.0.attn_output.weight": np.zeros((E, E + 32), np.float32)}},
            ShapeMismatchError,
            "blk.0.attn_output.weight",
        ),
        (
            "extra_tensor",
            {"override": {"blk.0.attn_q.weight": np.zeros((E, E), np.float32)}},
            UnexpectedKeysError,
            "blk.0.attn_q.weight",
        ),
        (
            "norm_not_f32",
            {"override": {"output_norm.weight": np.ones(E, np.float16)}},
            GGUFModelError,
            "output_norm.weight.*expected type in \\('F32',\\), got F16",
        ),
    ]
    for name, kw, err, words in cases:
        path = _model_variant(tiny, tmp_path, name, **kw)
        with pytest.raises(err, match=words):
            Decoder(path, n_ctx=16)
        assert issubclass(err, CheckpointError)

    _, data = tiny_valid
    blk = _key_value_pos(data, "tinygptv-phi2.block_count")
    float_type = _patch(data, blk, "I", 6)  # the u32 value now read as a float32: still 4 bytes
    renamed = bytearray(data)
    j = data.index(b"tinygptv-phi2.attention.head_count_kv")
    renamed[j + 36] = ord("X")  # ...head_count_kX
    for name, bad, words in (
        ("key_wrong_type", float_type, "block_count.*expected an integer, got float32"),
        ("key_missing", bytes(renamed), "missing metadata key 'tinygptv-phi2.attention.head_count_kv'"),
    ):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bad)
        with pytest.raises(GGUFModelError, match=words):
            Decoder(path, n_ctx=16)


def test_format_version(tmp_path, valid):
    """A newer file is refused with a typed error that says what to do."""
    _, data = valid
    key = TINYGPTV_KEYS["format_version"]
    pos = _key_value_pos(data, key)
    assert struct.unpack_from("<II", data, pos) == (4, GGUF_FORMAT_VERSION)  # uint32
    with Decoder(valid[0], n_ctx=16) as dec:
        assert dec.format_version == GGUF_FORMAT_VERSION
    newer = tmp_path / "newer.gguf"
    newer.write_bytes(_patch(data, pos + 4, "I", GGUF_FORMAT_VERSION + 1))
    want = (
        f"{newer}: written by format version {GGUF_FORMAT_VERSION + 1}, this runtime reads up to "
        f"{GGUF_FORMAT_VERSION}: upgrade tinygptv-edge"
    )
    with pytest.raises(FormatVersionError) as e:
        Decoder(newer, n_ctx=16)
    assert str(e.value) == want and (e.value.found, e.value.supported) == (GGUF_FORMAT_VERSION + 1, 1)
    zero = tmp_path / "zero.gguf"
    zero.write_bytes(_patch(data, pos + 4, "I", 0))
    with pytest.raises(GGUFModelError, match="format_version: expected a format version >= 1, got 0"):
        Decoder(zero, n_ctx=16)
    as_float = tmp_path / "float.gguf"
    as_float.write_bytes(_patch(data, pos, "I", 6))
    with pytest.raises(GGUFModelError, match="format_version.*expected an integer, got float32"):
        Decoder(as_float, n_ctx=16)


def test_unversioned_file_reads_as_version_1(tiny, tmp_path):
    """Written before versions existed: the test-side writer stores no version key."""
    key = TINYGPTV_KEYS["format_version"]
    old = _model_variant(tiny, tmp_path, "unversioned")
    assert key not in GGUFFile.open(old).fields
    with Decoder(old, n_ctx=16) as dec:
        assert dec.format_version == 1
