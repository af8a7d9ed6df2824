"""Fuzz targets for tests/runtime/test_fuzz.py, run in a subprocess capped by RLIMIT_AS (test code only).

    python tests/helpers/fuzz_worker.py TARGET SEED_FILE EXAMPLES

Each target mutates valid bytes (a GGUF, an ONNX graph's metadata, a config.json, image files) with
hypothesis and feeds them to the runtime. Allowed outcomes: a `TinyGPTVError`, or a valid result
(finite logits, finite pixels of the right shape, a config that validates). Anything else (another
exception type, a crash, a hang past the deadline) fails the run. Prints `typed=N accepted=M`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinygptv_edge.runtime.errors import TinyGPTVError

INTERESTING = [
    0,
    1,
    2,
    7,
    8,
    255,
    256,
    2**15,
    2**16 - 1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**63,
    2**64 - 1,
]
COUNTS = {"typed": 0, "accepted": 0}
SAMPLES: dict[str, str] = {}  # error type -> one message, printed to stderr at the end
WORK = Path(tempfile.mkdtemp(prefix="fuzz-"))


def outcome(fn) -> None:
    """Run one example: a typed error or a valid result; anything else propagates to hypothesis."""
    try:
        fn()
    except TinyGPTVError as e:
        COUNTS["typed"] += 1
        SAMPLES.setdefault(type(e).__name__, str(e)[:300])
        return
    COUNTS["accepted"] += 1


def byte_ops(size: int, focus: int) -> st.SearchStrategy:
    """1-4 edits: set a byte, write an interesting u32/u64, truncate; positions mostly below `focus`."""
    pos = st.one_of(st.integers(0, max(0, focus - 1)), st.integers(0, max(0, size - 1)))
    op = st.one_of(
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("int"), pos, st.sampled_from(INTERESTING), st.sampled_from([4, 8])),
        st.tuples(st.just("cut"), st.integers(0, size)),
    )
    return st.lists(op, min_size=1, max_size=4)


def apply(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        if op[0] == "byte" and op[1] < len(b):
            b[op[1]] = op[2]
        elif op[0] == "int" and op[1] + op[3] <= len(b):
            b[op[1] : op[1] + op[3]] = (op[2] % (1 << (8 * op[3]))).to_bytes(op[3], "little")
        elif op[0] == "cut":
            del b[op[1] :]
    return bytes(b)


def run(test, examples: int) -> None:
    settings(
        max_examples=examples,
        deadline=timedelta(seconds=10),  # generous: the CI machine is shared
        derandomize=True,  # the same examples on every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )(test)()


# ---------------------------------------------------------------------------------------------


def fuzz_gguf(seed: Path, examples: int) -> None:
    from tinygptv_edge.runtime.language.decoder import Decoder
    from tinygptv_edge.runtime.language.gguf_file import GGUFFile
    from tinygptv_edge.runtime.sampling import GREEDY, Sampler

    data = seed.read_bytes()
    gf = GGUFFile.open(seed)
    header = gf.data_offset
    gf.close()
    path = WORK / "fuzz.gguf"

    @given(byte_ops(len(data), header))
    def test(ops):
        path.write_bytes(apply(data, ops))

        def body():
            with Decoder(path, n_ctx=32, n_threads=1) as dec:
                Sampler(GREEDY)(dec.eval_tokens([dec.tokenizer.bos_id, 1, 2]))

        outcome(body)

    run(test, examples)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def fuzz_onnx_meta(seed: Path, examples: int) -> None:
    import onnx

    from tinygptv_edge.runtime.vision.encoder import VisionEncoder

    model = onnx.load(str(seed))
    keys = [p.key for p in model.metadata_props]
    path = WORK / "fuzz.onnx"

    originals = sorted({p.value for p in model.metadata_props} | {"[0.5, 0.5, 0.5]", '"bilinear"', "1", "0"})
    value = st.one_of(
        st.sampled_from(originals),  # a valid value (of this key or another one)
        JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True)),
        st.text(max_size=30),
        st.sampled_from(
            ["1e400", "-1e400", "NaN", "[NaN, 0, 0]", "[1, 2]", "[]", "{}", '"bicubic"', "9" * 40]
        ),
    )

    @given(st.lists(st.tuples(st.sampled_from(keys), value), min_size=1, max_size=3))
    def test(changes):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for key, v in changes:
            next(p for p in m.metadata_props if p.key == key).value = v
        onnx.save(m, str(path))

        def body():
            with VisionEncoder(path, n_threads=1) as enc:
                S = enc.preprocess_cfg.image_size
                out = enc.embed(np.zeros((1, 3, S, S), np.float32))
                assert np.isfinite(out).all()

        outcome(body)

    run(test, examples)


def _paths(d, prefix=()):
    if isinstance(d, dict):
        yield prefix
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    else:
        yield prefix


def fuzz_config(seed: Path, examples: int) -> None:
    from tinygptv_edge.runtime.config import TinyGPTVConfig

    base = json.loads(seed.read_text())
    raw = seed.read_bytes()
    spots = [p for p in _paths(base) if p]
    path = WORK / "config.json"

    structured = st.tuples(st.just("set"), st.sampled_from(spots), JSON_VALUES)
    flips = st.tuples(st.just("bytes"), byte_ops(len(raw), len(raw)))

    @given(st.lists(st.one_of(structured, flips), min_size=1, max_size=3))
    def test(edits):
        doc = json.loads(json.dumps(base))
        text = None
        for edit in edits:
            if edit[0] == "set":
                node = doc
                for k in edit[1][:-1]:
                    node = node.get(k) if isinstance(node, dict) else None
                if isinstance(node, dict):
                    node[edit[1][-1]] = edit[2]
            else:
                text = apply(raw, edit[1])
        path.write_bytes(text if text is not None else json.dumps(doc, allow_nan=True).encode())

        def body():
            cfg = TinyGPTVConfig.load(path)
            cfg.prompt.first_turn("question?")
            assert cfg.preprocess.image_size > 0

        outcome(body)

    run(test, examples)


def _images() -> dict[str, bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out = {}
    for fmt, mode in (
        ("PNG", "RGBA"),
        ("JPEG", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "I;16"),
        ("WEBP", "RGB"),
    ):
        im = (
            Image.fromarray(px).convert(mode)
            if mode != "I;16"
            else Image.fromarray(px[..., 0].astype(np.uint16) * 257)
        )
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


def _png_with_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (with a valid CRC), pixels unchanged."""
    b = bytearray(data)
    struct.pack_into(">II", b, 16, w, h)
    struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def fuzz_image(seed: Path, examples: int) -> None:
    from tinygptv_edge.runtime.config import PreprocessConfig
    from tinygptv_edge.runtime.vision.images import load_image
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    images = _images()
    cfg = PreprocessConfig()
    dims = st.sampled_from([0, 1, 2, 100, 5000, 16384, 16385, 30_000_000, 2**31 - 1, 2**32 - 1])
    plain = st.tuples(st.sampled_from(sorted(images)), byte_ops(4096, 64))
    resized = st.tuples(st.just("PNG-size"), dims, dims)

    @given(st.one_of(plain, resized))
    def test(case):
        if case[0] == "PNG-size":
            data = _png_with_size(images["PNG"], case[1], case[2])
        else:
            data = apply(images[case[0]], case[1])

        def body():
            x = preprocess(load_image(data), cfg)
            assert x.shape == (3, cfg.image_size, cfg.image_size) and np.isfinite(x).all()

        outcome(body)

    run(test, examples)


TARGETS = {"gguf": fuzz_gguf, "onnx-meta": fuzz_onnx_meta, "config": fuzz_config, "image": fuzz_image}

if __name__ == "__main__":
    target, seed, examples = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    TARGETS[target](seed, examples)
    for kind, text in sorted(SAMPLES.items()):
        print(f"{kind}: {text}", file=sys.stderr)
    print(f"typed={COUNTS['typed']} accepted={COUNTS['accepted']}", flush=True)
    os._exit(0)  # skip interpreter teardown (ggml/onnxruntime threads)
