"""Issue #19 on the runtime side: each class of bad input ends in a typed error naming the problem.

Classes: crashes and hangs of the API (threads, thread counts, FIFOs, use after close), sizes
trusted before they are checked, generic exceptions from deep inside, garbage accepted, confusing
messages. Inputs that could run away with memory run in a subprocess capped with RLIMIT_AS.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import struct
import threading
import time

import numpy as np
import pytest
from helpers.hostile import GiB, patch_bytes, patch_scalar, run_limited, tensor_type_pos
from PIL import Image

from tinygptv_edge.cli import main
from tinygptv_edge.runtime import contract as C
from tinygptv_edge.runtime.checks import max_threads
from tinygptv_edge.runtime.config import PreprocessConfig, PromptConfig
from tinygptv_edge.runtime.errors import (
    BackendError,
    ClosedError,
    ConfigError,
    ContextOverflowError,
    GGUFFormatError,
    GGUFModelError,
    ImageError,
    ImageTooLargeError,
    ModelFileError,
    NonFiniteTensorError,
    NumericsError,
    TinyGPTVError,
)
from tinygptv_edge.runtime.language.gguf_file import GGUFFile
from tinygptv_edge.runtime.sampling import Sampler, SamplingConfig
from tinygptv_edge.runtime.text.tokenizer import Tokenizer
from tinygptv_edge.runtime.vision.images import load_image

pytest.importorskip("tinygptv_edge.runtime.language.decoder")
from tinygptv_edge.runtime.language.decoder import Decoder  # noqa: E402
from tinygptv_edge.runtime.pipeline import Pipeline  # noqa: E402
from tinygptv_edge.runtime.vision.encoder import VisionEncoder  # noqa: E402

ARCH = C.GGUF_ARCH


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """FP32 vision graph, Q8_0 language model (the committed exports of the shipped model, so these
    run in the torch-free tier) and a photo."""
    from helpers.shipped_data import DATA, language_file

    out = tmp_path_factory.mktemp("hostile")
    shutil.copyfile(DATA / C.VISION_FILE_FP32, out / C.VISION_FILE_FP32)
    shutil.copyfile(language_file("Q8_0"), out / "language.q8_0.gguf")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(out / "photo.png")
    return out


def gguf(dist):
    return dist / "language.q8_0.gguf"


def onnx_path(dist):
    return dist / C.VISION_FILE_FP32


def variant(tmp_path, name: str, data: bytes):
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(data)
    return p


def tensor_data_pos(path, name: str) -> tuple[int, int]:
    gf = GGUFFile.open(path)
    t = gf.tensors[name]
    gf.close()
    return t.offset, t.nbytes


# ---------------------------------------------------------------------------------------------
# crashes and hangs of the API
# ---------------------------------------------------------------------------------------------


def test_decoder_shared_by_threads_gives_sequential_results(dist):
    """Eight threads on one Decoder: calls are serialised (ggml would abort on two at once)."""
    code = f"""
import threading, numpy as np
from tinygptv_edge.runtime.language.decoder import Decoder
dec = Decoder({str(gguf(dist))!r}, n_ctx=64, n_threads=1)
ids = [dec.tokenizer.bos_id, 5, 6, 7, 8]
want = dec.eval_tokens(ids)
out, errors = [], []
def worker():
    try:
        for _ in range(6):
            dec.truncate(0)  # may interleave with another thread's eval: only no crash is required
            dec.eval_tokens(ids[:2])
            dec.embed_tokens(ids)
    except Exception as e:
        errors.append(e)
ts = [threading.Thread(target=worker) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
bad = [e for e in errors if type(e).__name__ != "ContextOverflowError"]
assert not bad, bad
dec.truncate(0)
np.testing.assert_array_equal(dec.eval_tokens(ids), want)
print("ok")
"""
    res = run_limited(code, mem=2 * GiB, timeout=180)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("n", [0, -1, 100000, 2000, 5000, True, 2.5, "4"])
def test_thread_counts_are_bounded(dist, n):
    hi = max_threads()
    with pytest.raises(ConfigError, match=rf"n_threads: expected an integer in 1\.\.{hi}"):
        Decoder(gguf(dist), n_ctx=16, n_threads=n)
    with pytest.raises(ConfigError, match="n_threads"):
        VisionEncoder(onnx_path(dist), n_threads=n)
    with pytest.raises(ConfigError, match="n_threads"):
        Pipeline(onnx_path(dist), gguf(dist), n_threads=n)


def test_run_threads_5000_is_refused_before_loading(dist, capsys):
    t0 = time.perf_counter()
    code = main(["run", "--dist", str(dist), "--prompt", "hi", "--threads", "5000"])
    err = capsys.readouterr().err
    assert code == 2 and "n_threads: expected an integer in 1.." in err and "5000" in err
    assert time.perf_counter() - t0 < 30


def _with_alarm(fn, seconds: int = 10):
    """Run fn; a hang (open() on a FIFO) becomes a test failure instead of a stuck run."""

    def hang(*_):
        raise TimeoutError("blocked")

    old = __import__("signal").signal(14, hang)
    __import__("signal").alarm(seconds)
    try:
        return fn()
    finally:
        __import__("signal").alarm(0)
        __import__("signal").signal(14, old)


def test_fifo_and_folders_are_refused_before_open(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    cases = [
        (lambda: Decoder(fifo, n_ctx=16), GGUFFormatError),
        (lambda: GGUFFile.open(fifo), GGUFFormatError),
        (lambda: VisionEncoder(fifo), ModelFileError),
        (lambda: load_image(fifo), ImageError),
        (lambda: Tokenizer.from_file(fifo), ConfigError),
        (lambda: Decoder(tmp_path, n_ctx=16), GGUFFormatError),
        (lambda: VisionEncoder(tmp_path), ModelFileError),
    ]
    for fn, err in cases:
        with pytest.raises(err, match="FIFO|folder"):
            _with_alarm(fn)


def test_use_after_close(dist):
    dec = Decoder(gguf(dist), n_ctx=32, n_threads=1)
    dec.close()
    dec.close()  # twice is fine
    for call in (
        lambda: dec.eval_tokens([1]),
        lambda: dec.embed_tokens([1]),
        lambda: dec.eval_embeddings(np.zeros((1, dec.n_embd), np.float32)),
        lambda: dec.truncate(0),
    ):
        with pytest.raises(ClosedError, match="closed"):
            call()
    pipe = Pipeline(onnx_path(dist), gguf(dist), n_threads=1)
    pipe.close()
    for call in (
        lambda: pipe.ask("hi"),
        lambda: pipe.ask("what?", dist / "photo.png"),
        lambda: pipe.embed_image(dist / "photo.png"),
        lambda: list(pipe.stream("hi")),
    ):
        with pytest.raises(ClosedError, match="pipeline is closed"):
            call()


def test_closed_stdout_ends_quietly(dist):
    code = f"""
import os, sys
r, w = os.pipe()
os.close(r)
os.dup2(w, 1)
from tinygptv_edge.cli import main
sys.exit(main(["run", "--dist", {str(dist)!r}, "--prompt", "hi", "--stream", "--threads", "1",
               "--max-new-tokens", "4"]))
"""
    res = run_limited(code, mem=2 * GiB)
    assert res.returncode == 141, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr


# ---------------------------------------------------------------------------------------------
# sizes trusted before they are checked
# ---------------------------------------------------------------------------------------------


def test_header_sizes_are_refused_against_the_file(dist, tmp_path):
    data = gguf(dist).read_bytes()
    cases = {
        "block_count_2^31": (patch_scalar(data, f"{ARCH}.block_count", "I", 1 << 31), "block_count"),
        "block_count_10^8": (patch_scalar(data, f"{ARCH}.block_count", "I", 10**8), "block_count"),
        "context_length_2^32-1": (
            patch_scalar(data, f"{ARCH}.context_length", "I", (1 << 32) - 1),
            "context_length",
        ),
    }
    for name, (bad, words) in cases.items():
        path = variant(tmp_path, name, bad)
        code = f"""
import time
from tinygptv_edge.runtime.pipeline import Pipeline
from tinygptv_edge.runtime.errors import GGUFModelError
t0 = time.perf_counter()
try:
    Pipeline(None, {str(path)!r}, n_threads=1)
except GGUFModelError as e:
    print("typed:", e)
print("seconds", time.perf_counter() - t0)
"""
        res = run_limited(code, mem=GiB, timeout=60)
        assert res.returncode == 0 and "typed:" in res.stdout and words in res.stdout, (name, res.stderr)


def test_large_context_length_is_clamped_by_default(dist, tmp_path, monkeypatch):
    """A valid but large context_length is not allocated by default (n_ctx at most 4096), and a KV
    cache larger than the machine's memory is refused before it is allocated."""
    data = gguf(dist).read_bytes()
    path = variant(tmp_path, "ctx", patch_scalar(data, f"{ARCH}.context_length", "I", 1 << 20))
    with Pipeline(None, path, n_threads=1) as pipe:
        assert pipe.n_ctx == 4096
    monkeypatch.setattr("tinygptv_edge.runtime.checks.physical_memory", lambda: 1 << 20)
    with pytest.raises(ConfigError, match=r"KV cache of n_ctx=4096 positions: needs .* GiB, more than"):
        Decoder(path, n_ctx=4096)
    bigger = variant(tmp_path, "ctx2", patch_scalar(data, f"{ARCH}.context_length", "I", (1 << 20) + 1))
    with pytest.raises(GGUFModelError, match="context_length"):
        Decoder(bigger)


def test_long_prompt_templates_are_refused(tiny, tmp_path):
    from helpers.decoder_gguf import write_gguf

    long = PromptConfig.__new__(PromptConfig)  # bypass validation to write a hostile file
    object.__setattr__(long, "system", "x" * 200_000)
    for f in ("separator", "user_template", "text_user_template", "assistant_prefix"):
        object.__setattr__(long, f, getattr(PromptConfig(), f))
    path = write_gguf(
        tmp_path / "long.gguf", tiny.model.language, tiny.synth.phi2 / "tokenizer.json", prompt=long
    )
    with pytest.raises(GGUFModelError, match="system: expected at most 65536 characters, got 200000"):
        Decoder(path, n_ctx=16)


def test_huge_question_is_refused_before_tokenizing(dist, monkeypatch):
    import tracemalloc

    with Pipeline(None, gguf(dist), n_threads=1) as pipe:
        monkeypatch.setattr(pipe.tokenizer, "encode", lambda text: pytest.fail("tokenized"))
        question = "word " * 2_000_000  # 10 MB
        tracemalloc.start()
        with pytest.raises(ContextOverflowError, match="but the context holds"):
            pipe.ask(question)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 100 * 2**20, peak


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR says w x h (valid CRC) with a tiny IDAT: enough for the header checks."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "size, words",
    [
        ((30_000_000, 1), "a side of 30000000"),
        ((1, 30_000_000), "a side of 30000000"),
        ((16000, 1), "aspect ratio"),
        ((20000, 1000), "a side of 20000"),
        ((6000, 6000), "pixels, over the cap"),
        ((0, 10), "no pixels|corrupt|cannot"),
    ],
)
def test_image_sizes_are_checked_from_the_header(size, words, tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(_png_header_only(*size))
    code = f"""
from tinygptv_edge.runtime.vision.images import load_image
from tinygptv_edge.runtime.errors import ImageError
try:
    load_image({str(path)!r})
except ImageError as e:
    print("typed:", e)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print("peak_kb", hwm.split()[1])  # ru_maxrss would carry the parent's peak across fork
"""
    res = run_limited(code, mem=GiB, timeout=60)
    assert res.returncode == 0 and "typed:" in res.stdout, res.stderr
    import re

    assert re.search(words, res.stdout), res.stdout
    peak_kb = int(res.stdout.split("peak_kb")[1])
    assert peak_kb < 300 * 1024  # the interpreter and Pillow; no pixels decoded


def test_a_real_long_strip_is_refused_without_resizing(tmp_path):
    """A decodable 16000 x 150 image (2.4 MP, under the pixel cap) stops at the aspect cap."""
    buf = io.BytesIO()
    Image.new("L", (16000, 150)).save(buf, "PNG")
    with pytest.raises(ImageTooLargeError, match="aspect ratio 107:1"):
        load_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (4000, 41)).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (4000, 41)  # 98:1 is accepted


# ---------------------------------------------------------------------------------------------
# generic exceptions from deep inside -> typed
# ---------------------------------------------------------------------------------------------

BAD_TEMPLATES = [
    dict(user_template="Human: <ImageHere> {q}###"),
    dict(user_template="Human: <ImageHere> {question} {answer}###"),
    dict(user_template="Human: <ImageHere> {}###"),
    dict(user_template="Human: <ImageHere> {0}###"),
    dict(user_template="Human: <ImageHere> {question###"),
    dict(user_template="Human: <ImageHere> question}###"),
    dict(user_template="Human: <ImageHere> {question.__class__}###"),
    dict(user_template="Human: <ImageHere> {question[0]}###"),
    dict(user_template="Human: {question}###"),
    dict(user_template="<ImageHere><ImageHere>{question}"),
    dict(text_user_template="Human: <ImageHere>{question}###"),
    dict(text_user_template="Human: ###"),
    dict(system="x <ImageHere>"),
    dict(separator=None),
    dict(user_template=["<ImageHere>{question}"]),
]


@pytest.mark.parametrize("bad", BAD_TEMPLATES)
def test_prompt_templates_are_validated(bad):
    with pytest.raises(ConfigError, match="PromptConfig"):
        PromptConfig(**bad)


def test_prompt_template_in_a_gguf_is_validated(tiny, tmp_path):
    from helpers.decoder_gguf import write_gguf

    bad = PromptConfig.__new__(PromptConfig)
    for f in ("system", "separator", "text_user_template", "assistant_prefix"):
        object.__setattr__(bad, f, getattr(PromptConfig(), f))
    object.__setattr__(bad, "user_template", "Human: <ImageHere> {q}###")
    path = write_gguf(
        tmp_path / "tpl.gguf", tiny.model.language, tiny.synth.phi2 / "tokenizer.json", prompt=bad
    )
    with pytest.raises(GGUFModelError, match=r"tpl\.gguf: prompt keys: PromptConfig.user_template"):
        Decoder(path, n_ctx=16)


def test_non_utf8_text_is_named(dist, capsys):
    with Pipeline(None, gguf(dist), n_threads=1) as pipe:
        for text in ("caf\udce9", "\udcff\udcfe", "a\ud800b"):
            with pytest.raises(ConfigError, match="question: expected UTF-8 text, found the undecodable"):
                pipe.ask(text)
        with pytest.raises(ConfigError, match="expected a string"):
            pipe.ask(b"bytes")
        assert pipe.ask("hi", sampling=SamplingConfig(max_new_tokens=2)).stop  # still usable
    code = main(["run", "--dist", str(dist), "--prompt", "caf\udce9", "--threads", "1"])
    assert code == 2 and "b'\\xe9'" in capsys.readouterr().err


def test_non_utf8_stdin_does_not_end_the_chat(dist, capsys, monkeypatch):
    raw = b"caf\xe9 au lait?\nwhat now?\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    code = main(["run", "--dist", str(dist), "--chat", "--json", "--threads", "1", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "expected UTF-8 text" in err and "b'\\xe9'" in err
    assert len([ln for ln in out.splitlines() if ln.startswith("{")]) == 1  # the second question answered


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300, 1e-40, 1e-8])
def test_tiny_temperatures_pick_the_best_token(temperature):
    logits = np.array([0.5, 3.0, -2.0, 2.999, -np.float32(3e38)], np.float32)
    for top_p, top_k in ((1.0, 0), (0.9, 0), (0.5, 2)):
        cfg = SamplingConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, seed=1)
        s = Sampler(cfg)
        assert {s(logits) for _ in range(20)} == {1}


def test_non_finite_logits_are_typed():
    for bad in (np.full(4, np.nan), np.array([1.0, np.inf, 0.0]), np.array([0.0, np.nan])):
        with pytest.raises(NumericsError, match="logits are NaN or infinity"):
            Sampler(SamplingConfig())(bad)


def test_onnxruntime_run_errors_are_wrapped(dist, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    enc = VisionEncoder(onnx_path(dist), n_threads=1)

    class Broken:
        def run(self, *a, **k):
            raise Fail(
                "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node"
            )

    monkeypatch.setattr(enc, "_session", Broken())
    S = enc.preprocess_cfg.image_size
    with pytest.raises(BackendError, match=r"running the vision graph: onnxruntime failed: Fail"):
        enc.embed(np.zeros((1, 3, S, S), np.float32))
    assert str(onnx_path(dist)) in str(pytest.raises(BackendError, enc.embed, np.zeros((1, 3, S, S))).value)


def _with_metadata(src, dst, **changes):
    onnx = pytest.importorskip("onnx", reason="rewriting ONNX metadata needs the export extra")

    m = onnx.load(str(src), load_external_data=False)
    for p in m.metadata_props:
        for key, value in changes.items():
            if p.key == C.ONNX_META[key]:
                p.value = value
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize(
    "change",
    [
        dict(image_size="1e400"),
        dict(image_size="-56"),
        dict(image_size="100000"),
        dict(image_size='"big"'),
        dict(mean="[0.5, 0.5]"),
        dict(mean="[NaN, 0.5, 0.5]"),
        dict(mean="[Infinity, 0.5, 0.5]"),
        dict(mean="0.5"),
        dict(mean='{"a": 1}'),
        dict(std="[0, 0.5, 0.5]"),
        dict(std="[-1, 0.5, 0.5]"),
        dict(std="[1e-300, 1, 1]"),
        dict(resample="lanczos"),
        dict(num_query_tokens="0"),
        dict(num_query_tokens="1e400"),
        dict(embed_dim="-1"),
        dict(stage="99"),
    ],
)
def test_preprocessing_metadata_out_of_range(dist, tmp_path, change):
    path = _with_metadata(onnx_path(dist), tmp_path / "v.onnx", **change)
    with pytest.raises(ModelFileError, match=r"v\.onnx: bad tinygptv\.\* metadata"):
        VisionEncoder(path)


@pytest.mark.parametrize("kwargs", [dict(mean=(0.5, 0.5)), dict(std=(1.0, 0.0, 1.0)), dict(resample="box")])
def test_preprocess_config_is_validated(kwargs):
    with pytest.raises(ConfigError, match="PreprocessConfig"):
        PreprocessConfig(**kwargs)


@pytest.mark.parametrize("body", ["{", "[]", "null", '{"model": 5}', "\xff\xfe", ""])
def test_corrupt_tokenizer_json(tmp_path, body):
    (tmp_path / "tokenizer.json").write_text(body, encoding="latin-1")
    with pytest.raises(ConfigError, match="tokenizer"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1,", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()


def test_duplicate_ids_in_tokenizer_json(tiny, tmp_path):
    import json

    data = json.loads((tiny.synth.phi2 / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[b] = vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"expected one token per id, found .* at id {vocab[a]}"):
        Tokenizer.from_file(tmp_path)


def test_text_mode_file_objects_are_refused(dist):
    for encoding in ("latin-1", "utf-8"):  # utf-8: reading would raise UnicodeDecodeError
        with open(dist / "photo.png", encoding=encoding) as f, pytest.raises(ImageError, match="binary file"):
            load_image(f)
    with pytest.raises(ImageError, match="binary file"):
        load_image(io.StringIO("not bytes"))
    f = open(dist / "photo.png", "rb")  # noqa: SIM115
    f.close()
    with pytest.raises(ImageError, match="cannot read the image file object"):
        load_image(f)


# ---------------------------------------------------------------------------------------------
# garbage accepted -> refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor, offset, value",
    [
        ("output.bias", 0, np.float32(np.nan)),
        ("blk.1.attn_norm.weight", 8, np.float32(np.inf)),
        ("blk.0.ffn_down.bias", 4, np.float32(-np.inf)),
        ("output_norm.bias", 0, np.float32(np.nan)),
        ("blk.0.attn_qkv.weight", 0, np.float16(np.inf)),  # a Q8_0 block scale
        ("blk.1.ffn_up.weight", 34 * 3, np.float16(np.nan)),
        ("token_embd.weight", 34 * 5, np.float16(-np.inf)),
        ("output.weight", 0, np.float16(np.nan)),
    ],
)
def test_non_finite_weights_are_refused_at_open(dist, tmp_path, tensor, offset, value):
    start, _ = tensor_data_pos(gguf(dist), tensor)
    path = variant(tmp_path, "nan", patch_bytes(gguf(dist).read_bytes(), start + offset, value.tobytes()))
    with pytest.raises(NonFiniteTensorError, match=rf"{tensor} in .*nan\.gguf: 1 non-finite value"):
        Decoder(path, n_ctx=16, n_threads=1)


def test_non_finite_weights_are_refused_before_any_weight_is_allocated(dist, tmp_path, monkeypatch):
    """A NaN in the last weight stored must not cost the memory of loading the ones before it."""
    from tinygptv_edge.runtime.language import decoder as D

    gf = GGUFFile.open(gguf(dist))
    last = max(gf.tensors.values(), key=lambda t: t.offset)
    gf.close()
    start, _ = tensor_data_pos(gguf(dist), last.name)
    nan = np.float32(np.nan) if last.type.name == "F32" else np.float16(np.nan)
    path = variant(tmp_path, "nanlast", patch_bytes(gguf(dist).read_bytes(), start, nan.tobytes()))

    def allocate(*args, **kwargs):
        raise AssertionError("weights were allocated before the values were checked")

    monkeypatch.setattr(D, "place_weights", allocate)
    monkeypatch.setattr(D, "_CHECKED", set())
    with pytest.raises(NonFiniteTensorError, match=last.name.replace(".", r"\.")):
        Decoder(path, n_ctx=16, n_threads=1)


def test_q4_0_bytes_relabelled_as_q4_k_are_refused(tiny, tmp_path):
    """Same byte count for rows of 256; the K-quant super-block scales give the relabelling away."""
    from helpers.wide import wide_source

    from tinygptv_edge.export.gguf.export import export_source

    _, src = wide_source(tiny, seed=1)
    path = export_source(src, tmp_path / "q40.gguf", "Q4_0", pure=True).path
    data = path.read_bytes()
    gf = GGUFFile.open(path)
    names = [n for n, t in gf.tensors.items() if t.type.name == "Q4_0"]
    gf.close()
    assert len(names) >= 8
    for i, name in enumerate(names):
        bad = variant(
            tmp_path, f"relabel{i}", patch_bytes(data, tensor_type_pos(data, name), struct.pack("<I", 12))
        )
        assert GGUFFile.open(bad).tensors[name].nbytes == GGUFFile.open(path).tensors[name].nbytes
        with pytest.raises((GGUFModelError, NonFiniteTensorError), match=name.replace(".", r"\.")):
            Decoder(bad, n_ctx=16, n_threads=1)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("rope.freq_base", math.inf, "freq_base: expected a finite number"),
        ("rope.freq_base", math.nan, "freq_base"),
        ("rope.freq_base", -1.0, "freq_base"),
        ("attention.layer_norm_epsilon", math.nan, "eps_norm"),
        ("attention.layer_norm_epsilon", math.inf, "eps_norm"),
    ],
)
def test_bad_float_hyperparameters(dist, tmp_path, key, value, words):
    path = variant(tmp_path, "hp", patch_scalar(gguf(dist).read_bytes(), f"{ARCH}.{key}", "f", value))
    with pytest.raises(GGUFModelError, match=words):
        Decoder(path, n_ctx=16)


def test_nan_mean_and_zero_std_metadata(dist, tmp_path):
    for change in (dict(mean="[NaN, NaN, NaN]"), dict(std="[0.0, 0.0, 0.0]")):
        with pytest.raises(ModelFileError, match="PreprocessConfig"):
            VisionEncoder(_with_metadata(onnx_path(dist), tmp_path / "m.onnx", **change))


def test_duplicate_vocabulary_entries(dist, tmp_path):
    data = gguf(dist).read_bytes()
    gf = GGUFFile.open(gguf(dist))
    tokens = gf.fields["tokenizer.ggml.tokens"].value
    gf.close()
    a, b = next((t, u) for t, u in zip(tokens, tokens[1:], strict=False) if len(t) == len(u) and t != u)
    pos = data.index(
        struct.pack("<Q", len(b)) + b.encode(), data.index(struct.pack("<Q", len(a)) + a.encode())
    )
    bad = patch_bytes(data, pos + 8, a.encode())
    with pytest.raises(GGUFModelError, match=rf"expected unique tokens, found {a!r}"):
        Decoder(variant(tmp_path, "dup", bad), n_ctx=16)


# ---------------------------------------------------------------------------------------------
# confusing messages
# ---------------------------------------------------------------------------------------------


def test_n_ctx_zero_is_named(dist, capsys):
    for n in (0, -5):
        code = main(["run", "--dist", str(dist), "--prompt", "hi", "--n-ctx", str(n), "--threads", "1"])
        assert code == 2 and f"n_ctx: expected an integer >= 1, got {n}" in capsys.readouterr().err
    from tinygptv_edge.runtime.pipeline import trained_context

    trained = trained_context(gguf(dist))
    with pytest.raises(
        ConfigError,
        match=rf"n_ctx: expected at most the model's trained context of {trained} \(.*\), got {trained + 44}",
    ):
        Decoder(gguf(dist), n_ctx=trained + 44)


def test_head_count_zero_is_named(dist, tmp_path):
    path = variant(
        tmp_path, "h0", patch_scalar(gguf(dist).read_bytes(), f"{ARCH}.attention.head_count", "I", 0)
    )
    with pytest.raises(GGUFModelError, match=r"HParams\.n_head: expected a positive integer, got 0") as e:
        Decoder(path, n_ctx=16)
    assert "head_count_kv" not in str(e.value)


def test_nan_image_embeddings_name_the_vision_file(dist, tmp_path):
    onnx = pytest.importorskip("onnx", reason="rewriting ONNX graphs needs the export extra")
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path(dist)))
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))  # a large weight
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    path = tmp_path / "nan.onnx"
    onnx.save(m, str(path))
    with Pipeline(path, gguf(dist), n_threads=1) as pipe:
        with pytest.raises(NumericsError, match=r"nan\.onnx: the vision graph produced \d+ NaN/inf"):
            pipe.ask("what?", dist / "photo.png")
        assert pipe.ask("hi", sampling=SamplingConfig(max_new_tokens=2)).stop  # text-only still works


def test_chat_image_failures_do_not_stick(dist, capsys, monkeypatch, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = "\n".join(
        [
            f"/image {tmp_path / 'bad.png'}",  # refused at once, nothing attached
            "first?",
            f"/image {dist / 'photo.png'}",
            "/reset",  # clears the attached image too
            "second?",
            f"/image {tmp_path / 'missing.png'}",
            "third?",
        ]
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(lines + "\n"))
    code = main(["run", "--dist", str(dist), "--chat", "--json", "--threads", "1", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    answers = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(answers) == 3, err
    assert err.count("(no image attached)") == 2 and "bad.png" in err and "missing.png" in err
    assert '"image_ms": 0.0' in answers[1]  # /reset dropped the image


def test_literal_image_placeholder_in_a_question(dist):
    with Pipeline(onnx_path(dist), gguf(dist), n_threads=1) as pipe:
        for image in (None, dist / "photo.png"):
            with pytest.raises(ConfigError, match="question: expected no <ImageHere>"):
                pipe.ask("what is <ImageHere> here?", image)


def test_every_typed_error_is_a_tinygptv_error():
    from tinygptv_edge.runtime import errors

    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(k, TinyGPTVError) for k in kinds)
    assert threading  # the module imports stay used


def test_config_and_tokenizer_files_are_size_checked_before_reading(tmp_path):
    from tinygptv_edge.runtime.checks import MAX_JSON_BYTES
    from tinygptv_edge.runtime.config import TinyGPTVConfig

    big = tmp_path / "config.json"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(ConfigError, match=f"expected at most {MAX_JSON_BYTES} bytes"):
        TinyGPTVConfig.load(big)
    big.rename(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=f"expected at most {MAX_JSON_BYTES} bytes"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "bad.json").write_bytes(b"\x80{}")
    with pytest.raises(ConfigError, match="cannot read config"):
        TinyGPTVConfig.load(tmp_path / "bad.json")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ConfigError, match="FIFO"):
        _with_alarm(lambda: TinyGPTVConfig.load(tmp_path / "fifo.json"))


def test_weights_are_checked_again_after_the_file_changes(dist, tmp_path):
    """The value check runs once per file identity: a rewritten file is checked again."""
    path = tmp_path / "m.gguf"
    shutil.copyfile(gguf(dist), path)
    Decoder(path, n_ctx=16, n_threads=1).close()
    start, _ = tensor_data_pos(path, "output.bias")
    data = patch_bytes(path.read_bytes(), start, np.float32(np.nan).tobytes())
    path.unlink()
    path.write_bytes(data)
    with pytest.raises(NonFiniteTensorError, match="output.bias"):
        Decoder(path, n_ctx=16, n_threads=1)


# ---------------------------------------------------------------------------------------------
# issue #32: wrong argument types get a ConfigError naming the argument, not a TypeError from inside
# ---------------------------------------------------------------------------------------------

NOT_PATHS = [(None, "got None"), (3, "got int 3"), (b"m.gguf", "got bytes b'm.gguf'"), (["a"], "got list"),
             ("", "got str ''")]  # fmt: skip


@pytest.mark.parametrize("value, words", NOT_PATHS)
def test_model_constructors_want_a_path(value, words):
    for make, what in (
        (Decoder, "GGUF file path"),
        (GGUFFile.open, "GGUF file path"),
        (VisionEncoder, "vision model path"),
        (Tokenizer.from_file, "tokenizer path"),
    ):
        with pytest.raises(ConfigError, match=f"^{what}: expected a path \\(str or os.PathLike\\), {words}$"):
            make(value)


def test_pipeline_model_arguments_of_the_wrong_kind(dist):
    with pytest.raises(
        ConfigError, match="^vision: expected a path to the ONNX file, a VisionEncoder or None"
    ):
        Pipeline(3, gguf(dist))
    with pytest.raises(
        ConfigError, match="^language: expected a path to the GGUF file, a Decoder or a callable"
    ):
        Pipeline(None, None)
    with pytest.raises(ConfigError, match="^language: .* got int 4"):
        Pipeline(None, 4)
    with pytest.raises(ConfigError, match="vision model path: expected a path .* got bytes"):
        VisionEncoder(b"vision.onnx")


@pytest.mark.parametrize("sampling", [{"seed": 0}, {}, "greedy", 0.7])
def test_sampling_that_is_not_a_sampling_config(dist, sampling):
    """docs/pipeline.md promises SamplingConfig objects (SamplingConfig(...), TINYGPTV.replace(...)), no
    dicts: a dict is refused with the argument's name; an empty one is not taken for 'the default'."""
    words = r"^sampling: expected a SamplingConfig \(e.g. SamplingConfig\(\*\*fields\)"
    with Pipeline(None, gguf(dist), n_threads=1) as pipe:
        with pytest.raises(ConfigError, match=words):
            pipe.ask("what is it?", sampling=sampling)
        with pytest.raises(ConfigError, match=words):
            pipe.stream("what is it?", sampling=sampling)  # at the call, not at the first piece
        with pytest.raises(ConfigError, match=words):
            pipe.chat(sampling)
        with pytest.raises(ConfigError, match=words):
            pipe.chat().ask("what is it?", sampling=sampling)
    with pytest.raises(ConfigError, match="^Sampler cfg: expected a SamplingConfig"):
        Sampler(sampling)
