"""Regenerate tests/data/: small exports of the shipped model and the PyTorch reference's golden outputs.

    make test-data        (the export extra is needed: torch, onnx, gguf)

Writes, from export/default_model/ (what `make demo` exports):
  vision.fp32.onnx, vision.int8.onnx (preset x86-vnni), vision.int8-arm.onnx (preset arm)
      by `tinygptv-edge export-onnx` (32 calibration-split images of the synthetic VQA generator)
  language.q4_0.gguf, language.q8_0.gguf, language.q4_k_m.gguf   by `tinygptv-edge export-gguf`
  images/test_NNNNN.png   held-out images (the generator's test split: never seen in training or calibration)
  images/example.png      the demo image (a copy of export/data/example.png)
  goldens.npz             the reference's image embeddings (embeds/<image>) and last-position logits of
                          each first-turn prompt (logits/<n>), both float32
  goldens.json            the question list with the reference's greedy answers, and a manifest (size and
                          sha256 of every file, the model's sha256, versions) that the tests check

The torch-free tier (tests/helpers/shipped_data.py, tests/runtime/test_shipped_exports.py) compares
the runtime with these on any CPU. Run again whenever the model, the exporters or the formats change;
the x86 test `test_goldens_match_the_shipped_model` fails while the data lags behind the shipped model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
N_IMAGES = 16  # held-out test-split images (embeddings)
N_QUESTION_IMAGES = 6  # the first few of them get questions
MAX_NEW_TOKENS = 32  # the reference's default (export/reference/answer.py)
GGUF_LEVELS = ("Q4_0", "Q8_0", "Q4_K_M", "Q3_K_S", "Q2_K", "IQ4_XS")  # the small levels: 2 GB boards
DEMO_QUESTION = "What colour is the circle?"  # the README's demo (Makefile DEMO_QUESTION)
FORMAT = 1  # of goldens.json


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def questions(vqa) -> list[dict]:
    """Two questions of different kinds per held-out image (kinds rotate over the images), then the demo."""
    out = []
    for i in range(N_QUESTION_IMAGES):
        s = vqa.sample("test", i)
        for j in (i, i + 3):
            qa = s.qas[j % len(s.qas)]
            out.append({"image": f"images/test_{i:05d}.png", "question": qa.question, "truth": qa.answer})
    out.append({"image": "images/example.png", "question": DEMO_QUESTION, "truth": None})
    return out


def held_out() -> list[str]:
    return [f"images/test_{i:05d}.png" for i in range(N_IMAGES)]


def export_all(tmp: Path) -> dict[str, Path]:
    """The exports, made by the project's own commands with their defaults."""
    from tinygptv_edge.cli import main

    files = {}
    for preset, name in (("x86-vnni", "vision.int8.onnx"), ("arm", "vision.int8-arm.onnx")):
        out = tmp / preset
        if main(["export-onnx", "--out", str(out), "--preset", preset]) != 0:
            raise SystemExit(f"export-onnx --preset {preset} failed")
        files[name] = out / "vision.int8.onnx"
        files["vision.fp32.onnx"] = out / "vision.fp32.onnx"  # the same graph both times
    for level in GGUF_LEVELS:
        name = f"language.{level.lower()}.gguf"
        if main(["export-gguf", "--level", level, "--out", str(tmp / name)]) != 0:
            raise SystemExit(f"export-gguf --level {level} failed")
        files[name] = tmp / name
    return files


def goldens(qs: list[dict], out: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The reference's embeddings, last logits and greedy answers (first turn, as the runtime builds it)."""
    import torch

    from tinygptv_edge.export.checkpoints.default import default_model_dir, load_default
    from tinygptv_edge.runtime.text.prompt import split_prompt
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer
    from tinygptv_edge.runtime.vision.images import load_image
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    model, _ = load_default()
    model.eval()
    tok = Tokenizer.from_file(default_model_dir())
    cfg = model.cfg
    arrays: dict[str, np.ndarray] = {}
    records = []

    def embed(image: str):
        pixels = torch.from_numpy(preprocess(load_image(out / image), cfg.preprocess))[None]
        with torch.no_grad():
            return model.embed_image(pixels)

    for image in held_out():
        arrays[f"embeds/{image}"] = embed(image)[0].numpy().astype(np.float32)
    for n, q in enumerate(qs):
        emb = embed(q["image"])
        arrays[f"embeds/{q['image']}"] = emb[0].numpy().astype(np.float32)
        with torch.no_grad():
            prompt = cfg.prompt.first_turn(q["question"], with_image=True)
            embeds = model.splice(split_prompt(prompt, tok, 1, add_bos=cfg.prompt.add_bos), [emb[0]])
            logits = model.language(embeds, model.language.new_cache())[0, -1]
            arrays[f"logits/{n}"] = logits.numpy().astype(np.float32)
            ids = model.generate(embeds, MAX_NEW_TOKENS, (tok.eos_id,), tok, cfg.prompt.separator)
        text = tok.decode(ids).split(cfg.prompt.separator)[0].strip()
        records.append({**q, "answer": text, "answer_ids": ids, "prompt_tokens": int(embeds.shape[1])})
        print(f"{q['question']!r} -> {text!r} (truth {q['truth']!r})")
    return arrays, records


def main() -> int:
    import onnxruntime
    import torch

    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.train import vqa

    try:
        from importlib.metadata import version

        ggml_version = version("ggml-python")
    except Exception:  # noqa: BLE001 - only recorded for information
        ggml_version = "unknown"
    out = HERE
    (out / "images").mkdir(exist_ok=True)
    for i in range(N_IMAGES):
        vqa.sample("test", i).image.save(out / "images" / f"test_{i:05d}.png", format="PNG")
    shutil.copyfile(ROOT / "export" / "data" / "example.png", out / "images" / "example.png")
    qs = questions(vqa)
    with tempfile.TemporaryDirectory(prefix=".make-", dir=out) as tmp:
        files = export_all(Path(tmp))
        for name, path in files.items():
            os.replace(path, out / name)
    arrays, records = goldens(qs, out)
    tmp_npz = out / ".goldens.tmp.npz"
    np.savez_compressed(tmp_npz, **arrays)
    os.replace(tmp_npz, out / "goldens.npz")
    tracked = sorted([*files, "goldens.npz", *(f"images/{p.name}" for p in (out / "images").glob("*.png"))])
    manifest = {
        "format": FORMAT,
        "made_by": "tests/data/make.py (make test-data)",
        "model_sha256": sha256(default_model_dir() / "model.safetensors"),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "ggml-python": ggml_version,
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "held_out_images": held_out(),
        "files": {n: {"bytes": (out / n).stat().st_size, "sha256": sha256(out / n)} for n in tracked},
        "questions": records,
    }
    tmp_json = out / ".goldens.tmp.json"
    tmp_json.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_json, out / "goldens.json")
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(tracked)} files ({total / 2**20:.1f} MiB) and goldens.json to {out}")
    shutil.rmtree(out / "calib-images", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
