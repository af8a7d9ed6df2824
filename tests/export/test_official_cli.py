"""Official files -> CLI commands only -> the runtime answers as the reference does (issue #14).

A tiny TinyGPT-V with non-default sizes (vision heads, language width) and a LoRA rank other than 64 is
written in the official formats by `tinygptv-edge synth --config`; `export-onnx` and `export-gguf`
convert it with a config that says nothing of the LoRA rank (so 64 by default: the rank must come from
the tensor shapes) nor of the prompt (so the stage's template). The runtime's greedy tokens must equal
those of `tinygptv-edge reference` on the official prompt path: no BOS.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinygptv_edge.runtime.config import LanguageConfig, ProjectionConfig, tiny_config

pytest.importorskip("torch", reason="synth and the exporters need the export extra")

QUESTION = "what is in the picture?"
N_TOKENS = 12


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tinygptv-edge")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tinygptv_edge"]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{' '.join(args[:1])} failed:\n{r.stdout}\n{r.stderr}"
    return r


def odd_config():
    """Not the tiny preset: 2 vision heads, language hidden 96 / head_dim 24, LoRA rank 8, alpha 16."""
    cfg = tiny_config(3)
    lang = LanguageConfig(
        vocab_size=512, hidden=96, layers=2, heads=4, intermediate=192, max_positions=256,
        partial_rotary_factor=0.5,
    )  # fmt: skip
    return cfg.replace(
        name="tinygptv-odd",
        vision=dataclasses.replace(cfg.vision, heads=2),
        projection=ProjectionConfig(in_features=32, mid_features=80, out_features=96),
        language=lang,
        lora=dataclasses.replace(cfg.lora, r=8, alpha=16.0),
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    work = tmp_path_factory.mktemp("official-cli")
    cfg = odd_config()
    cfg.save(work / "synth.json")
    export_cfg = cfg.to_dict()
    del export_cfg["lora"], export_cfg["prompt"]  # rank from the shapes, template from the stage
    (work / "export.json").write_text(json.dumps(export_cfg))
    # seed 2: a model whose greedy answer changes from the first token when a BOS is put in front
    cli("synth", "--config", str(work / "synth.json"), "--out", str(work / "src"), "--seed", "2")
    src = work / "src"
    official = [
        "--phi2", str(src / "phi-2"), "--eva", str(src / "eva_vit_g.pth"),
        "--blip2", str(src / "blip2_pretrained_flant5xxl.pth"),
        "--stage-ckpt", str(src / "TinyGPT-V_for_Stage3.pth"), "--config", str(work / "export.json"),
    ]  # fmt: skip
    dist = work / "dist"
    onnx = cli("export-onnx", *official, "--out", str(dist), "--no-int8")
    gguf = cli("export-gguf", *official, "--out", str(dist), "-q", "F32")
    image = work / "photo.png"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(image)
    ask = ["--image", str(image), "--prompt", QUESTION, "--max-new-tokens", str(N_TOKENS), "--json"]
    ref = cli("reference", *official, *ask)
    with_bos = json.loads(cli("reference", *official, *ask, "--bos").stdout)["token_ids"]
    return dist, image, onnx.stdout, gguf.stdout, ref, with_bos


def test_summary_reports_lora_rank_alpha_and_no_bos(converted):
    import onnx

    from tinygptv_edge.export.onnx.export import read_metadata
    from tinygptv_edge.runtime.contract import ONNX_META, TINYGPTV_KEYS
    from tinygptv_edge.runtime.language.gguf_file import GGUFFile

    dist, _, onnx_out, gguf_out, ref, _ = converted
    for text in (onnx_out, gguf_out, ref.stderr):
        assert "LoRA rank 8 (from the tensor shapes), alpha 16 (from the config), scale 2" in text
        assert "BOS before the first turn: no" in text
    assert "tokenizer.ggml.add_bos_token): False" in gguf_out
    # one set of hashed input files whatever the command: Phi-2 weights, eva, blip2, stage file
    meta = read_metadata(onnx.load(str(dist / "vision.fp32.onnx"), load_external_data=False))
    gf = GGUFFile.open(dist / "language.f32.gguf")
    try:
        gguf_hashes = json.loads(gf.fields[TINYGPTV_KEYS["source_sha256"]].value)
    finally:
        gf.close()
    assert json.loads(meta[ONNX_META["source_sha256"]]) == gguf_hashes
    assert sorted(gguf_hashes) == sorted(
        ["model.safetensors", "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "TinyGPT-V_for_Stage3.pth"]
    )


def test_runtime_greedy_tokens_equal_the_reference_without_bos(converted):
    from tinygptv_edge.runtime.pipeline import Pipeline
    from tinygptv_edge.runtime.sampling import GREEDY

    dist, image, _, _, ref, with_bos = converted
    want = json.loads(ref.stdout)["token_ids"]
    assert len(want) == N_TOKENS and with_bos[0] != want[0]  # the test can tell the two paths apart
    with Pipeline(dist / "vision.fp32.onnx", dist / "language.f32.gguf", n_threads=1) as pipe:
        assert pipe.prompt.add_bos is False  # read from tokenizer.ggml.add_bos_token
        assert pipe.prompt.system and pipe.prompt.assistant_prefix == "Assistant: "  # stage 3 template
        ans = pipe.ask(QUESTION, image, GREEDY.replace(max_new_tokens=N_TOKENS))
    assert ans.stop == "max_new_tokens" and list(ans.token_ids) == want
