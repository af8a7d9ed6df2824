"""Issue #19 on the export side: checkpoints, configs, calibration images and staged outputs."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from helpers.hostile import GiB, run_limited  # noqa: E402
from PIL import Image  # noqa: E402

from tinygptv_edge.cli import main  # noqa: E402
from tinygptv_edge.export.checkpoints.loaders import load_phi2, load_tinygptv, phi2_config  # noqa: E402
from tinygptv_edge.export.checkpoints.safeio import load_pickle, tensor_dict  # noqa: E402
from tinygptv_edge.export.checkpoints.single import load_single  # noqa: E402
from tinygptv_edge.export.staging import clean_stale, stage_file  # noqa: E402
from tinygptv_edge.runtime.errors import (  # noqa: E402
    CheckpointError,
    ImageTooLargeError,
    ShapeMismatchError,
    TinyGPTVError,
)

# ---------------------------------------------------------------------------------------------
# Phi-2 config.json, checkpoints
# ---------------------------------------------------------------------------------------------

GOOD_PHI = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


@pytest.mark.parametrize(
    "body, words",
    [
        ("[1, 2]", "expected a JSON object, got list"),
        ("null", "expected a JSON object, got NoneType"),
        ('"text"', "expected a JSON object, got str"),
        ("{", "cannot read Phi-2 config"),
        (b"\xff\xfe{}", "cannot read Phi-2 config"),
        ({k: v for k, v in GOOD_PHI.items() if k != "hidden_size"}, "missing config key 'hidden_size'"),
        ({**GOOD_PHI, "hidden_size": "64"}, "hidden_size: expected an integer, got '64'"),
        ({**GOOD_PHI, "hidden_size": None}, "missing config key 'hidden_size'"),
        ({**GOOD_PHI, "num_hidden_layers": True}, "num_hidden_layers: expected an integer"),
        ({**GOOD_PHI, "num_attention_heads": 0}, "heads: expected a positive integer"),
        ({**GOOD_PHI, "partial_rotary_factor": float("nan")}, "partial_rotary_factor"),
        ({**GOOD_PHI, "rope_theta": float("inf")}, "rope_theta"),
        ({**GOOD_PHI, "layer_norm_eps": [1e-5]}, "layer_norm_eps: expected a number"),
        ({"n_embd": 64, "n_head": 0, "n_layer": 2, "vocab_size": 512}, "heads"),
        ({"n_embd": 64, "n_head": 4, "vocab_size": 512}, "missing config key 'n_layer'"),
    ],
)
def test_bad_phi2_config_json(tmp_path, body, words):
    path = tmp_path / "config.json"
    if isinstance(body, dict):
        path.write_text(json.dumps(body))
    elif isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body)
    with pytest.raises(CheckpointError, match=words):
        phi2_config(tmp_path)


def test_good_phi2_config_still_reads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GOOD_PHI))
    assert phi2_config(tmp_path).layers == 2


def test_stage_model_that_is_a_tensor_and_non_string_keys(tmp_path):
    cases = {
        "tensor.pth": ({"model": torch.zeros(3)}, "'model': expected a dict of tensors .* got Tensor"),
        "list.pth": ({"model": [torch.zeros(3)]}, "got list"),
        "intkeys.pth": (
            {"model": {1: torch.zeros(3)}},
            "expected tensor names \\(strings\\) as keys, got (int )?1",
        ),
        "mixed.pth": ({"model": {"a": torch.zeros(1), (1, 2): torch.zeros(1)}}, "got (tuple )?\\(1, 2\\)"),
    }
    for name, (obj, words) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=words):
            tensor_dict(load_pickle(tmp_path / name), tmp_path / name, wrapper="model")
    torch.save({3: torch.zeros(1), "a": torch.zeros(1)}, tmp_path / "top.pth")
    with pytest.raises(CheckpointError, match="expected a dict with key 'model'|strings"):
        tensor_dict(load_pickle(tmp_path / "top.pth"), tmp_path / "top.pth", wrapper="model")


def test_stage_checkpoint_with_a_tensor_model_through_the_loader(tiny, tmp_path):
    stage = tmp_path / "stage.pth"
    torch.save({"model": torch.zeros(4)}, stage)
    s = tiny.synth
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_tinygptv(phi2=s.phi2, eva=s.eva, blip2=s.blip2, stage=stage, cfg=tiny.cfg)


@pytest.mark.parametrize("positions", [15, 17, 0, 2])
def test_pos_embed_that_is_not_a_square_grid(tiny, tmp_path, positions):
    sd = tensor_dict(load_pickle(tiny.synth.eva), tiny.synth.eva)
    width = sd["pos_embed"].shape[-1]
    sd["pos_embed"] = torch.zeros(1, 1 + positions, width)
    eva = tmp_path / "eva.pth"
    torch.save(sd, eva)
    s = tiny.synth
    with pytest.raises(ShapeMismatchError, match="pos_embed"):
        load_tinygptv(phi2=s.phi2, eva=eva, blip2=s.blip2, stage=s.stage, cfg=tiny.cfg)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_tensors_are_refused(tiny_single, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_single, folder)
    sd = load_file(str(folder / "model.safetensors"))
    name = next(k for k in sd if k.endswith("lm_head.weight"))
    sd[name] = torch.ones_like(sd[name], dtype=dtype)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"expected a floating-point tensor, got {dtype}"):
        load_single(folder)


def _single_with(tiny_single, folder, change) -> str:
    """A copy of the tiny single folder with `change(state_dict)` applied; the changed tensor's name."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_single, folder)
    sd = load_file(str(folder / "model.safetensors"))
    name = change(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return name


def _command(kind: str, folder, tmp_path) -> list[str]:
    if kind == "export-gguf":
        return ["export-gguf", "--model", str(folder), "--out", str(tmp_path / "out"), "-q", "F32"]
    return ["reference", "--model", str(folder), "--prompt", "what is it?", "--max-new-tokens", "2"]


@pytest.mark.parametrize("command", ["export-gguf", "reference"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_norm_refused_by_both_commands(tiny_single, tmp_path, capsys, command, dtype):
    """export-gguf streams a single folder without building the model: it used to export (and 'verify')
    an int32 or bool norm cast to float; both commands now take tensors through one check."""

    def change(sd):
        sd["llama_model.model.final_layernorm.weight"] = torch.ones_like(
            sd["llama_model.model.final_layernorm.weight"], dtype=dtype
        )
        return "language.final_layernorm.weight"

    folder = tmp_path / "model"
    name = _single_with(tiny_single, folder, change)
    assert main(_command(command, folder, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{name} in {folder / 'model.safetensors'}: expected a floating-point tensor, got {dtype}" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _list_twice(path, name: str) -> None:
    """Rewrite a safetensors header so `name` is listed twice (the same entry both times)."""
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    items = [json.dumps(k) + ":" + json.dumps(v) for k, v in header.items()]
    items.append(json.dumps(name) + ":" + json.dumps(header[name]))
    text = ("{" + ",".join(items) + "}").encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize("command", ["export-gguf", "reference"])
def test_tensor_listed_twice_in_the_header_refused_by_both_commands(tiny_single, tmp_path, capsys, command):
    from safetensors import safe_open

    folder = tmp_path / "model"
    shutil.copytree(tiny_single, folder)
    weights = folder / "model.safetensors"
    name = "llama_model.model.final_layernorm.weight"
    _list_twice(weights, name)
    with safe_open(str(weights), framework="pt") as f:  # safetensors itself reads it: the check is ours
        assert list(f.keys()).count(name) == 1
    assert main(_command(command, folder, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{weights}: header: expected each tensor name (and field) once, found {name!r} (2 times)" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "blob, words",
    [
        (b"\x01\x02", "expected a safetensors header length (8 bytes), found a file of 2 bytes"),
        ((10**12).to_bytes(8, "little") + b"{}", "header length: expected at most 2 bytes"),
        ((2).to_bytes(8, "little") + b"[]", "header: expected a JSON object, found list"),
        ((3).to_bytes(8, "little") + b"{\xff}", "header is not JSON"),
    ],
)
def test_safetensors_header_checked_before_it_is_read(tmp_path, blob, words):
    from tinygptv_edge.export.checkpoints.safeio import safetensors_keys

    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        safetensors_keys(path)


@pytest.mark.parametrize(
    "part, field, value",
    [("language", "layers", 10**8), ("vision", "depth", 10**8), ("qformer", "layers", 10**7)],
)
def test_config_layer_counts_bounded_by_the_tensors(tiny_single, tmp_path, part, field, value):
    folder = tmp_path / "model"
    shutil.copytree(tiny_single, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[part][field] = value
    if part == "vision":
        cfg[part]["stored_depth"] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    code = f"""
from tinygptv_edge.export.checkpoints.single import load_single
from tinygptv_edge.export.gguf.source import single_source
from tinygptv_edge.runtime.errors import CheckpointError
for fn in (load_single, single_source):
    try:
        fn({str(folder)!r})
        print("accepted")
    except CheckpointError as e:
        print("typed:", e)
"""
    res = run_limited(code, mem=3 * GiB, timeout=120)  # torch alone maps ~1 GB of address space
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    expect = 2 if part == "language" else 1  # single_source reads the language model only
    assert sum(f"config {part}." in ln and f"= {value}: expected at most" in ln for ln in lines) == expect


@pytest.mark.parametrize("part, field", [("vision", "depth"), ("qformer", "layers"), ("language", "layers")])
def test_official_files_with_a_config_of_1e8_layers(tiny, part, field):
    import dataclasses

    changes = {field: 10**8, **({"stored_depth": 10**8} if part == "vision" else {})}
    sub = dataclasses.replace(getattr(tiny.cfg, part), **changes)
    cfg = tiny.cfg.replace(**{part: sub})
    s = tiny.synth
    with pytest.raises(CheckpointError, match=f"config {part}.{field} = 100000000: expected at most"):
        load_tinygptv(phi2=s.phi2, eva=s.eva, blip2=s.blip2, stage=s.stage, cfg=cfg)


def test_phi2_folder_with_1e8_layers(tiny, tmp_path):
    folder = tmp_path / "phi2"
    shutil.copytree(tiny.synth.phi2, folder)
    cfg = json.loads((folder / "config.json").read_text())
    key = "num_hidden_layers" if "num_hidden_layers" in cfg else "n_layer"
    cfg[key] = 10**8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="language.layers = 100000000: expected at most 2"):
        load_phi2(folder)


# ---------------------------------------------------------------------------------------------
# calibration and importance-matrix images: the runtime's caps
# ---------------------------------------------------------------------------------------------


def _big_png(path, size) -> None:
    Image.new("L", size).save(path)  # zeros compress to a few KB


def test_calibration_images_get_the_pixel_cap(tmp_path):
    from tinygptv_edge.export.onnx.calib_data import load_image

    for size in ((6000, 5500), (20000, 100)):  # 33 MP over the 32 MP cap; a 200:1 strip
        path = tmp_path / f"{size[0]}.png"
        _big_png(path, size)
        with pytest.raises(ImageTooLargeError, match=f"{size[0]}"):
            load_image(path)


def test_decompression_bomb_among_imatrix_images(tiny_single, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (30, 40)).save(images / "0.png")
    _big_png(images / "1.png", (6000, 5500))
    argv = ["export-gguf", "--model", str(tiny_single), "--out", str(tmp_path / "x.gguf"), "-q", "Q4_K_M"]
    assert main([*argv, "--imatrix-images", str(images)]) == 2
    err = capsys.readouterr().err
    assert "1.png" in err and "over the cap" in err
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------
# staged outputs of a killed export
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staged_files_are_removed_by_the_next_export(tiny, tmp_path, caplog):
    from tinygptv_edge.export.gguf.export import export_gguf

    dead, live = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".language.q8_0.gguf.{dead}.deadbeef.tmp"
    stale_file.write_bytes(b"half a GGUF")
    stale_dir = tmp_path / f".vision.fp32.onnx.{dead}.cafebabe.tmp"
    (stale_dir / "raw").mkdir(parents=True)
    running = tmp_path / f".other.gguf.{live}.0badf00d.tmp"
    running.write_bytes(b"being written")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    with caplog.at_level(logging.WARNING, logger="tinygptv_edge.export"):
        export_gguf(tiny.model, tiny.tokenizer, tmp_path / "language.q8_0.gguf", "Q8_0")
    assert not stale_file.exists() and not stale_dir.exists()
    assert running.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        [running.name, unrelated.name]
    )
    text = caplog.text
    assert stale_file.name in text and stale_dir.name in text and f"pid {dead}" in text


def test_a_killed_export_leaves_what_the_next_one_removes(tmp_path):
    """A real SIGKILL while a file is staged, then a new stage in the same folder."""
    code = (
        "import sys, time\n"
        "from tinygptv_edge.export.staging import stage_file\n"
        f"p = stage_file({str(tmp_path / 'out.gguf')!r})\n"
        "print(p, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    staged = proc.stdout.readline().strip()
    assert os.path.exists(staged)
    proc.kill()
    proc.wait()
    tmp = stage_file(tmp_path / "out.gguf")
    assert not os.path.exists(staged) and tmp.exists()
    assert clean_stale(tmp_path) == []  # ours is alive


def test_all_errors_above_are_typed():
    assert issubclass(CheckpointError, TinyGPTVError) and issubclass(ImageTooLargeError, TinyGPTVError)


@pytest.mark.parametrize("n", [0, 100000, True])
def test_export_thread_counts_are_bounded(n):
    import numpy as np

    from tinygptv_edge.export.gguf.quant import Q, quantize
    from tinygptv_edge.export.train.loop import TrainConfig
    from tinygptv_edge.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="threads: expected an integer in 1.."):
        quantize(np.zeros((4, 32), np.float32), Q.Q8_0, threads=n)
    with pytest.raises(ConfigError, match="threads"):
        TrainConfig(threads=n)
