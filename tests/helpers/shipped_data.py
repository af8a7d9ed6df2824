"""The runtime (no torch) on the committed exports of the shipped model, against the reference's goldens.

tests/data/ is written by `make test-data` (tests/data/make.py); this module only reads it, so it runs
wherever the runtime installs (x86, emulated or real aarch64). It is imported by
tests/runtime/test_shipped_exports.py and run by .ci/aarch64.sh to record the numbers:

    python tests/helpers/shipped_data.py --out measure.json      # every measurement below, as JSON
    python tests/helpers/shipped_data.py --demo-question  # the demo's question (for `tinygptv-edge run`)
    python tests/helpers/shipped_data.py --check-demo run.json  # exit 1 unless run.json has the golden answer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from functools import cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"
VISION_FILES = ("vision.fp32.onnx", "vision.int8.onnx", "vision.int8-arm.onnx")
GGUF_LEVELS = ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_S", "Q2_K", "IQ4_XS")  # the last three: 2 GB boards
# (vision, language) pairs whose greedy answers must equal the reference's: FP32 vision with each
# level, each INT8 graph with the demo's Q4_0, and the x86 INT8 graph with the 2 GB boards' Q3_K_S
ANSWER_PAIRS = (
    *(("vision.fp32.onnx", level) for level in GGUF_LEVELS),
    ("vision.int8.onnx", "Q4_0"),
    ("vision.int8-arm.onnx", "Q4_0"),
    ("vision.int8.onnx", "Q3_K_S"),
)
N_THREADS = 2


def language_file(level: str) -> Path:
    return DATA / f"language.{level.lower()}.gguf"


@cache
def manifest() -> dict:
    return json.loads((DATA / "goldens.json").read_text())


@cache
def goldens() -> dict[str, np.ndarray]:
    with np.load(DATA / "goldens.npz") as z:
        return {k: z[k] for k in z.files}


def check_files() -> list[str]:
    """Problems with the committed files (missing, other size or hash, e.g. a Git LFS pointer)."""
    problems = []
    for name, want in manifest()["files"].items():
        path = DATA / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.stat().st_size != want["bytes"] or got != want["sha256"]:
            problems.append(
                f"{path}: expected {want['bytes']} bytes sha256 {want['sha256'][:12]}, got {got[:12]}"
            )
    return problems


def images() -> list[str]:
    """The held-out images (test split: in neither training nor calibration), tests/data-relative."""
    return manifest()["held_out_images"]


def cosine(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))


@cache  # computed once per process: the tests and measure() share them
def vision(name: str) -> dict:
    """Embeddings of every held-out image by the ONNX graph `name` vs the reference's: cosine of each
    image's flattened (Q, H) embedding (min, mean over the images: the exporter's INT8 check), the
    lowest cosine of a single embedding row, and max |difference| over the reference's max |value|."""
    from tinygptv_edge.runtime.vision.encoder import VisionEncoder
    from tinygptv_edge.runtime.vision.images import load_image
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    g = goldens()
    cos, rows, rel = [], [], []
    with VisionEncoder(DATA / name, n_threads=N_THREADS) as enc:
        for image in images():
            want = g[f"embeds/{image}"]
            got = enc.embed(preprocess(load_image(DATA / image), enc.preprocess_cfg)[None])[0]
            cos.append(float(cosine(got, want)))
            rows.append(float(cosine(got, want, axis=-1).min()))
            rel.append(float(np.abs(got - want).max() / np.abs(want).max()))
    return {
        "min_cosine": min(cos),
        "mean_cosine": float(np.mean(cos)),
        "min_row_cosine": min(rows),
        "max_rel_diff": max(rel),
        "images": len(cos),
    }


def prompt_embeds(dec, question: str, image: str) -> np.ndarray:
    """The first-turn prompt as the pipeline lays it out: token embeddings from the decoder, the
    reference's image embeddings in the image slot (so only the language kernels are compared)."""
    from tinygptv_edge.runtime.text.prompt import split_prompt

    seg = split_prompt(
        dec.prompt.first_turn(question, with_image=True), dec.tokenizer, 1, add_bos=dec.prompt.add_bos
    )
    img = goldens()[f"embeds/{image}"]
    parts = [dec.embed_tokens(list(seg.texts[0])), img, dec.embed_tokens(list(seg.texts[1]))]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


@cache
def logits(level: str) -> dict:
    """Last-position logits of every golden prompt by the GGUF at `level` vs the reference's (F32):
    max |difference| over the reference's logit range, and how often the argmax agrees."""
    from tinygptv_edge.runtime.language.decoder import Decoder

    g = goldens()
    rel, top1, prompt_ok = [], 0, True
    qs = manifest()["questions"]
    with Decoder(language_file(level), n_ctx=256, n_threads=N_THREADS) as dec:
        for n, q in enumerate(qs):
            dec.reset()
            emb = prompt_embeds(dec, q["question"], q["image"])
            prompt_ok &= emb.shape[0] == q["prompt_tokens"]
            got = dec.eval_embeddings(emb)
            want = g[f"logits/{n}"]
            rel.append(float(np.abs(got - want).max() / (want.max() - want.min())))
            top1 += int(np.argmax(got) == np.argmax(want))
    return {"max_rel_diff": max(rel), "top1_agree": top1 / len(qs), "prompt_lengths_match": bool(prompt_ok)}


@cache
def answers(vision_name: str, level: str) -> dict:
    """Greedy answers of the whole pipeline (image file in, text out) vs the reference's."""
    from tinygptv_edge.runtime.pipeline import Pipeline
    from tinygptv_edge.runtime.sampling import GREEDY

    greedy = GREEDY.replace(max_new_tokens=manifest()["max_new_tokens"])
    wrong = []
    qs = manifest()["questions"]
    with Pipeline(DATA / vision_name, language_file(level), n_ctx=256, n_threads=N_THREADS) as pipe:
        for q in qs:
            got = pipe.ask(q["question"], DATA / q["image"], greedy)
            if got.text != q["answer"]:
                wrong.append(
                    {"question": q["question"], "image": q["image"], "want": q["answer"], "got": got.text}
                )
    return {"matched": len(qs) - len(wrong), "total": len(qs), "wrong": wrong}


def cpu_features() -> dict:
    """What ggml was built with (its compile-time flags), and the machine."""
    from tinygptv_edge.runtime.language.ggml_runtime import load_ggml

    ggml = load_ggml()
    feats = {}
    for n in ("neon", "arm_fma", "fp16_va", "dotprod", "matmul_int8", "sve", "avx2", "avx512", "avx512_vnni"):
        fn = getattr(ggml, f"ggml_cpu_has_{n}", None)
        if fn is not None:
            feats[n] = int(fn())
    return {"machine": platform.machine(), "ggml": feats}


def measure() -> dict:
    return {
        "cpu": cpu_features(),
        "files_ok": not check_files(),
        "vision": {name: vision(name) for name in VISION_FILES},
        "logits": {level: logits(level) for level in GGUF_LEVELS},
        "answers": {f"{v} + {lvl}": answers(v, lvl) for v, lvl in ANSWER_PAIRS},
    }


def demo() -> dict:
    return next(q for q in manifest()["questions"] if q["image"] == "images/example.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the measurements as JSON here (and print them)")
    p.add_argument("--demo-question", action="store_true", help="print the demo's question")
    p.add_argument("--check-demo", metavar="RUN_JSON", help="`tinygptv-edge run --json` output to check")
    args = p.parse_args(argv)
    if args.demo_question:
        print(demo()["question"])
        return 0
    if args.check_demo:
        got = json.loads(Path(args.check_demo).read_text().strip().splitlines()[-1])
        want = demo()["answer"]
        ok = got.get("answer") == want
        print(f"demo answer {got.get('answer')!r}, reference {want!r}: {'same' if ok else 'DIFFERENT'}")
        return 0 if ok else 1
    result = measure()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    wrong = sum(len(a["wrong"]) for a in result["answers"].values())
    return 0 if result["files_ok"] and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
