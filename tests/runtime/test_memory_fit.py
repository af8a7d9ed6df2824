"""A memory budget in numbers (runtime/memory_plan.py, runtime/memory_fit.py): sizes as users write them,
the vision file with its external data, and every language level's size and low-memory peak computed
from a GGUF header (the tiny model's exports)."""

from __future__ import annotations

import shutil

import pytest

from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.memory_plan import (
    BUDGET_KV_TYPES,
    GIB,
    MIB,
    kv_bytes_per_position,
    low_memory_need,
    parse_size,
    plan_memory,
    vision_file_bytes,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.5G", 3 * GIB // 2),
        ("1.5GiB", 3 * GIB // 2),
        ("1.5gb", 3 * GIB // 2),
        ("1500M", 1500 * MIB),
        ("800MB", 800 * MIB),
        ("800 MiB", 800 * MIB),
        ("64K", 64 * 1024),
        (".5G", GIB // 2),
        ("2048", 2048),
        ("1T", 1024**4),
    ],
)
def test_parse_size_reads_binary_units(text, expected):
    assert parse_size(text, "--memory-budget") == expected


@pytest.mark.parametrize("text", ["", "G", "1.5X", "-1G", "1.5 G B", "1iB", "0", "0.0001", "1e3M", "nan"])
def test_parse_size_names_the_flag_expected_and_got(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text, "--memory-budget")
    msg = str(e.value)
    assert msg.startswith("--memory-budget: expected") and repr(text) in msg


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny model's FP32 vision graph and its language model at four levels."""
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.export.onnx.export import export_vision

    out = tmp_path_factory.mktemp("fit")
    export_vision(tiny.model, out)
    langs = {lv: export_gguf(tiny.model, tiny.tokenizer, out / f"l.{lv}.gguf", lv).path for lv in
             ("F32", "F16", "Q8_0", "Q4_0")}  # fmt: skip
    return out / "vision.fp32.onnx", langs


def test_vision_size_counts_its_external_data_file(files, tmp_path):
    vision, langs = files
    v = tmp_path / "vision.onnx"
    shutil.copy(vision, v)
    before = plan_memory("auto", v, langs["Q8_0"], available=1 << 40)
    assert vision_file_bytes(v) == v.stat().st_size == before.vision_bytes
    (tmp_path / "vision.onnx.data").write_bytes(b"\0" * (8 * MIB))  # the weights, stored beside the graph
    after = plan_memory("auto", v, langs["Q8_0"], available=1 << 40)
    assert after.vision_bytes == v.stat().st_size + 8 * MIB == vision_file_bytes(v)
    assert after.resident_need - before.resident_need == 8 * MIB
    per_pos, trained = kv_bytes_per_position(langs["Q8_0"])
    assert after.low_memory_need == low_memory_need(
        after.vision_bytes, after.language_bytes, per_pos, trained
    )
    assert after.low_memory_need > before.low_memory_need  # the 8 MiB graph now outweighs the tiny GGUF


def test_level_sizes_from_one_header_match_the_exported_files(files):
    from tinygptv_edge.runtime.memory_fit import LEVEL_TYPES, estimate_level_bytes

    _, langs = files
    est = estimate_level_bytes(langs["Q8_0"])
    assert list(est) == list(LEVEL_TYPES)
    for level, path in langs.items():  # no mix rules at these levels: the computed size is the file's
        assert est[level] == path.stat().st_size, level
    assert est == estimate_level_bytes(langs["F32"])  # whichever level the header comes from
    assert est["F32"] > est["F16"] > est["Q8_0"] > est["Q4_0"] >= est["Q2_K"]  # tiny rows: Q2_K -> Q4_0


def test_level_tables_are_the_exporters():
    pytest.importorskip("gguf")
    from tinygptv_edge.calib.levels import LANGUAGE_LEVELS
    from tinygptv_edge.export.gguf import quant as Q
    from tinygptv_edge.runtime.language.ggml_types import LAST_RESORT
    from tinygptv_edge.runtime.language.ggml_types import ROW_FALLBACK as FALLBACK
    from tinygptv_edge.runtime.memory_fit import LEVEL_TYPES, tensor_type

    assert set(LEVEL_TYPES) == {lv.ftype for lv in LANGUAGE_LEVELS.values()}  # the report's levels
    for name, (base, output) in LEVEL_TYPES.items():
        level = Q.LEVELS[name]
        assert base == level.base.name, name
        assert output == (level.output.name if level.quantized and base != "Q8_0" else base), name
    assert {a.name: b.name for a, b in Q.FALLBACK.items()} == FALLBACK and Q.LAST_RESORT.name == LAST_RESORT
    # tensors of several row lengths (numpy order): the exporter's type without the bumps (pure), and its
    # output rule for output.weight
    shapes = {"output.weight": (96, 64), "blk.0.attn_qkv.weight": (64, 192), "blk.0.attn_norm.weight": (64,),
              "token_embd.weight": (256, 64), "blk.1.ffn_down.weight": (512, 256)}  # fmt: skip
    for name in LEVEL_TYPES:
        for t, numpy_shape in shapes.items():
            want = Q.choose_type(Q.LEVELS[name], t, numpy_shape, 32, pure=t != "output.weight")
            assert tensor_type(name, t, tuple(reversed(numpy_shape))) == want.name, (name, t)
    with pytest.raises(ConfigError, match="language level: expected one of"):
        tensor_type("Q9", "output.weight", (64, 96))


def test_what_fits_prices_every_level_and_kv_type(files, tmp_path):
    from tinygptv_edge.runtime.memory_fit import LEVEL_TYPES, estimate_level_bytes, what_fits

    vision, langs = files
    lang = langs["Q8_0"]
    plan = plan_memory("auto", vision, lang, available=1 << 40)
    sizes = estimate_level_bytes(lang)
    # MemAvailable just under the predicted resident need: auto picks low-memory, which fits
    f = what_fits(vision, lang, plan.resident_need - 1, 4 * GIB)
    assert f["mem_total_bytes"] == 4 * GIB and f["mem_available_bytes"] == plan.resident_need - 1
    assert (
        f["resident_need_bytes"] == plan.resident_need and f["low_memory_need_bytes"] == plan.low_memory_need
    )
    assert f["fits_resident"] is False and f["fits_low_memory"] is True and f["auto_mode"] == "low-memory"
    assert [lv["level"] for lv in f["levels"]] == list(LEVEL_TYPES)
    for lv in f["levels"]:
        assert lv["language_bytes"] == sizes[lv["level"]]
        peaks = lv["low_memory_peak_bytes"]
        assert set(peaks) == set(BUDGET_KV_TYPES) and peaks["q4_0"] <= peaks["q8_0"] <= peaks["f16"]
        for kv, p in peaks.items():
            per_pos, trained = kv_bytes_per_position(lang, kv)
            assert p == low_memory_need(plan.vision_bytes, sizes[lv["level"]], per_pos, trained)
            assert lv["fits"][kv] is (p <= plan.resident_need - 1)
    # with a vision graph smaller than every GGUF (only its size is read), a board between two levels'
    # peaks: the smaller levels fit, the larger do not
    small = tmp_path / "small.onnx"
    small.write_bytes(b"\x08\x07" + b"\0" * 1022)
    by = {
        lv["level"]: lv["low_memory_peak_bytes"]["f16"] for lv in what_fits(small, lang, None, None)["levels"]
    }
    assert by["F32"] > by["F16"] > by["Q8_0"] > by["Q4_0"]
    mid = what_fits(small, lang, by["Q8_0"], None)
    fits = {lv["level"]: lv["fits"]["f16"] for lv in mid["levels"]}
    assert fits["Q4_0"] is fits["Q8_0"] is True and fits["F16"] is fits["F32"] is False
    assert mid["mem_total_bytes"] is None
    unknown = what_fits(vision, lang, None, None)
    if unknown["mem_available_bytes"] is None:  # no /proc/meminfo here: nothing is claimed to fit
        assert all(v is None for lv in unknown["levels"] for v in lv["fits"].values())
