"""The end-to-end runtime on the tiny model: ONNX vision + a decoder, against the PyTorch reference.

Decoders: `ref` (the reference language model behind the Decoder interface, tests/helpers/pipeline_doubles.py)
checks the pipeline's own logic; `ggml` (runtime/language/decoder.py on the exported F32 GGUF) is the real
end-to-end parity and is skipped only while that module does not exist.
"""

from __future__ import annotations

import dataclasses
import io
import threading

import numpy as np
import pytest
from PIL import Image

from tinygptv_edge.runtime.errors import (
    ConfigError,
    ContextOverflowError,
    ImageError,
    ModelFileError,
    ModelMismatchError,
    PipelineBusyError,
)
from tinygptv_edge.runtime.interfaces import LanguageDecoder, VisionModel
from tinygptv_edge.runtime.pipeline import Pipeline, Timings
from tinygptv_edge.runtime.sampling import SamplingConfig
from tinygptv_edge.runtime.vision.encoder import VisionEncoder
from tinygptv_edge.runtime.vision.preprocess import preprocess

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
from helpers.pipeline_doubles import RefDecoder, ScriptedDecoder  # noqa: E402

N = 8  # new tokens per answer
GREEDY = SamplingConfig(max_new_tokens=N)


def photo(seed: int, size=(80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny model exported: FP32 ONNX vision graph and (when the exporter exists) an F32 GGUF."""
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.export.onnx.export import export_vision

    out = tmp_path_factory.mktemp("dist")
    onnx_path = export_vision(tiny.model, out).path
    gguf_path = out / "language.f32.gguf"
    export_gguf(tiny.model, tiny.tokenizer, gguf_path, "F32")
    return onnx_path, gguf_path


def _has_ggml_decoder() -> bool:
    import importlib.util

    return importlib.util.find_spec("tinygptv_edge.runtime.language.decoder") is not None


def _pipes(kind, tiny, files):
    onnx_path, gguf_path = files
    if kind == "ggml":
        pytest.importorskip("tinygptv_edge.runtime.language.decoder")
        language = gguf_path
    else:
        language = lambda: RefDecoder(tiny.model, tiny.tokenizer)  # noqa: E731
    made = []

    def make(**kw):
        kw.setdefault("n_threads", 1)  # ggml's spinning workers crawl on a shared 2-core machine
        pipe = Pipeline(vision=kw.pop("vision", onnx_path), language=kw.pop("language", language), **kw)
        made.append(pipe)
        return pipe

    return make, made


@pytest.fixture(params=["ref", "ggml"])
def make_pipe(request, tiny, files):
    """Parity tests run on both decoders."""
    make, made = _pipes(request.param, tiny, files)
    yield make
    for p in made:
        p.close()


@pytest.fixture
def make_any(tiny, files):
    """Logic tests run once: on the ggml decoder when it exists, else on the reference stand-in."""
    make, made = _pipes("ggml" if _has_ggml_decoder() else "ref", tiny, files)
    yield make
    for p in made:
        p.close()


def reference_tokens(tiny, prompt_embeds: torch.Tensor) -> list[int]:
    tok = tiny.tokenizer
    return tiny.model.generate(prompt_embeds, N, (tok.eos_id,), tok, tiny.cfg.prompt.separator)


def pixels(tiny, data: bytes) -> torch.Tensor:
    from tinygptv_edge.runtime.vision.images import load_image

    return torch.from_numpy(preprocess(load_image(data), tiny.cfg.preprocess))[None]


# -- vision --------------------------------------------------------------------------------------


def test_vision_encoder_matches_reference(tiny, files):
    enc = VisionEncoder(files[0])
    assert enc.preprocess_cfg == tiny.cfg.preprocess
    assert (enc.num_query_tokens, enc.embed_dim) == (tiny.cfg.num_image_tokens, tiny.cfg.language.hidden)
    px = torch.cat([pixels(tiny, photo(1)), pixels(tiny, photo(2))])
    got = enc.embed(px.numpy())
    assert got.shape == (2, enc.num_query_tokens, enc.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, tiny.model.embed_image(px).numpy(), atol=1e-4, rtol=1e-4)
    enc.release()
    assert not enc.loaded
    np.testing.assert_array_equal(enc.embed(px.numpy()), got)  # reloaded on demand
    with pytest.raises(ConfigError, match="pixel_values"):
        enc.embed(np.zeros((1, 3, 8, 8), np.float32))


def test_vision_file_errors(tmp_path, files):
    with pytest.raises(ModelFileError, match="not found"):
        VisionEncoder(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelFileError, match="cannot load"):
        VisionEncoder(junk)
    import onnx

    proto = onnx.load(str(files[0]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelFileError, match="metadata lacks"):
        VisionEncoder(bare)


def test_vision_format_version(tmp_path, files):
    """A newer graph is refused with a typed error that says what to do; an unversioned one reads as 1."""
    import onnx

    from tinygptv_edge.runtime.contract import ONNX_FORMAT_VERSION, ONNX_META
    from tinygptv_edge.runtime.errors import FormatVersionError

    key = ONNX_META["format_version"]
    assert VisionEncoder(files[0]).format_version == ONNX_FORMAT_VERSION

    def variant(name: str, value: str | None):
        proto = onnx.load(str(files[0]))
        kept = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
        del proto.metadata_props[:]
        for k, v in kept + ([(key, value)] if value is not None else []):
            proto.metadata_props.add(key=k, value=v)
        path = tmp_path / f"{name}.onnx"
        onnx.save(proto, str(path))
        return path

    newer = variant("newer", str(ONNX_FORMAT_VERSION + 1))
    with pytest.raises(FormatVersionError) as e:
        VisionEncoder(newer)
    assert str(e.value) == (
        f"{newer}: written by format version {ONNX_FORMAT_VERSION + 1}, this runtime reads up to "
        f"{ONNX_FORMAT_VERSION}: upgrade tinygptv-edge"
    )
    assert isinstance(e.value, ModelFileError)
    for bad in ("0", "two"):
        with pytest.raises(
            ModelFileError, match=f"format_version: expected a format version >= 1, got '{bad}'"
        ):
            VisionEncoder(variant(f"bad-{bad}", bad))
    assert VisionEncoder(variant("unversioned", None)).format_version == 1  # written before versions


def test_vision_width_must_match_decoder(make_any, files, tmp_path):
    import onnx

    from tinygptv_edge.runtime.contract import ONNX_META

    proto = onnx.load(str(files[0]))
    for p in proto.metadata_props:
        if p.key == ONNX_META["embed_dim"]:
            p.value = "80"
    wrong = tmp_path / "wrong.onnx"
    onnx.save(proto, str(wrong))
    with pytest.raises(ModelMismatchError, match="vision output width 80 != decoder embedding width 64"):
        make_any(vision=wrong)


def test_missing_model_files(tmp_path, files):
    with pytest.raises(ModelFileError, match="language model not found"):
        Pipeline(vision=files[0], language=tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="vision model not found"):
        Pipeline(vision=tmp_path / "missing.onnx", language=files[1])
    with pytest.raises(ConfigError, match="low_memory"):
        Pipeline(vision=files[0], language=object(), low_memory=True)


# -- answers ------------------------------------------------------------------------------------


def test_greedy_answer_equals_reference(make_pipe, tiny):
    pipe = make_pipe()
    data = photo(3)
    ans = pipe.ask("what is in the picture?", data, GREEDY)
    prompt = tiny.cfg.prompt.first_turn("what is in the picture?")
    want = reference_tokens(tiny, tiny.model.prompt_embeds(prompt, tiny.tokenizer, pixels(tiny, data)))
    assert list(ans.token_ids) == want
    assert ans.stop in ("max_new_tokens", "separator", "eos")
    assert ans.text == tiny.tokenizer.decode(want).split("###")[0].strip()
    t = ans.timings
    assert t.images == 1 and t.prefill_tokens > tiny.cfg.num_image_tokens and t.first_token_ms > 0


def test_text_only_answer_equals_reference(make_pipe, tiny):
    pipe = make_pipe()
    ans = pipe.ask("say something", None, GREEDY)
    prompt = tiny.cfg.prompt.first_turn("say something", with_image=False)
    want = reference_tokens(tiny, tiny.model.prompt_embeds(prompt, tiny.tokenizer))
    assert list(ans.token_ids) == want and ans.timings.images == 0


def test_streaming_equals_non_streaming(make_pipe):
    pipe = make_pipe()
    data = photo(4)
    turn = pipe.stream("describe it", data, GREEDY)
    pieces = list(turn)
    whole = pipe.ask("describe it", data, GREEDY)
    assert "".join(pieces) == whole.text == turn.answer.text
    assert turn.answer.token_ids == whole.token_ids


def conversation_embeds(tiny, chat_turns) -> torch.Tensor:
    """Reference embeddings of a whole conversation built from scratch: each turn's text (first turn
    with BOS, later ones after the separator) with its image, and the tokens each answer produced."""
    tok, cfg, model = tiny.tokenizer, tiny.cfg, tiny.model
    parts = []
    for i, (question, data, answer_ids) in enumerate(chat_turns):
        if i == 0:
            text = cfg.prompt.first_turn(question, data is not None)
        else:
            text = "###" + cfg.prompt.turn(question, data is not None)
        before, _, after = text.partition("<ImageHere>")
        ids = ([tok.bos_id] if i == 0 else []) + tok.encode(before)
        parts.append(model.language.embed(torch.tensor(ids)))
        if data is not None:
            parts.append(model.embed_image(pixels(tiny, data))[0])
            parts.append(model.language.embed(torch.tensor(tok.encode(after))))
        if answer_ids is not None:
            parts.append(model.language.embed(torch.tensor(list(answer_ids), dtype=torch.long)))
    return torch.cat(parts)[None]


def test_multi_turn_equals_fresh_run_on_concatenated_conversation(make_pipe, tiny):
    pipe = make_pipe()
    chat = pipe.chat(GREEDY)
    questions = [
        ("first question", photo(5)),
        ("a text-only follow-up", None),
        ("a second picture", photo(6)),
    ]
    answers = [chat.ask(q, img) for q, img in questions]
    for k in (1, 2):  # turn k, fresh: all earlier turns with their answers, then turn k's question
        history = [(q, img, a.token_ids) for (q, img), a in zip(questions[:k], answers[:k], strict=True)]
        embeds = conversation_embeds(tiny, [*history, (*questions[k], None)])
        assert list(answers[k].token_ids) == reference_tokens(tiny, embeds)
    # the KV cache was reused: a later turn evaluates its own text (and the last answer token) only
    turn2 = len(tiny.tokenizer.encode("###" + tiny.cfg.prompt.turn(questions[1][0], False)))
    assert answers[1].timings.prefill_tokens <= turn2 + 1
    assert answers[2].timings.prefill_tokens <= 40 + tiny.cfg.num_image_tokens


def test_two_chats_interleaved_match_each_alone(make_any):
    pipe = make_any()
    a, b = pipe.chat(GREEDY), pipe.chat(GREEDY)
    a1, b1 = a.ask("alpha", photo(7)), b.ask("beta", photo(8))
    a2 = a.ask("alpha again")
    solo = pipe.chat(GREEDY)
    assert solo.ask("alpha", photo(7)).token_ids == a1.token_ids
    assert solo.ask("alpha again").token_ids == a2.token_ids
    assert b1.token_ids == pipe.ask("beta", photo(8), GREEDY).token_ids


def test_image_cache(make_any):
    pipe = make_any()
    first = pipe.ask("q", photo(9), GREEDY)
    again = pipe.ask("q", photo(9), GREEDY)
    assert again.timings.images_cached == 1 and first.timings.images_cached == 0
    assert again.token_ids == first.token_ids
    off = make_any(image_cache_size=0)
    assert off.ask("q", photo(9), GREEDY).timings.images_cached == 0


def test_image_cache_on_disk_across_pipelines(make_any, tmp_path):
    first = make_any(image_cache_dir=tmp_path).ask("q", photo(9), GREEDY)
    assert first.timings.images_cached == 0 and len(list(tmp_path.glob("*.e1"))) == 1
    restarted = make_any(image_cache_dir=tmp_path, image_cache_size=0)  # disk tier only
    again = restarted.ask("q", photo(9), GREEDY)
    assert again.timings.images_cached == 1 and again.token_ids == first.token_ids
    with pytest.raises(PipelineBusyError, match="hold pipeline.gate"):
        restarted.encode_image(photo(9), Timings())  # only inside a turn (or through embed_image)
    np.testing.assert_array_equal(restarted.embed_image(photo(9)), make_any().embed_image(photo(9)))


def test_gate_is_a_context_manager(make_any):
    pipe = make_any()
    with pipe.gate:
        _, embeds = pipe.encode_image(photo(9), Timings())  # allowed while held
        with pytest.raises(PipelineBusyError, match="already runs a turn"), pipe.gate:
            pass  # re-entry from the holder thread is refused
        assert pipe.gate.held()
    assert not pipe.gate.held()
    np.testing.assert_array_equal(pipe.embed_image(photo(9)), embeds)


def test_timings_add_up():
    from tinygptv_edge.runtime.prefix_cache import Prefill

    t = Timings(images=1, image_ms=2.0)
    t.add_prefill(Prefill(np.zeros(1), evaluated=3, ms=4.0, restored=5))
    t.add_prefill(Prefill(np.zeros(1), evaluated=1, ms=1.0))
    t.add_images(Timings(images=2, images_cached=1, image_ms=0.5))
    assert (t.prefill_tokens, t.prefill_restored, t.prefill_ms) == (4, 5, 5.0)
    assert (t.images, t.images_cached, t.image_ms) == (3, 1, 2.5)


def test_sampling_with_seed_is_reproducible(make_any):
    pipe = make_any()
    cfg = SamplingConfig(max_new_tokens=N, do_sample=True, top_p=0.9, repetition_penalty=1.05, seed=11)
    assert pipe.ask("x", photo(1), cfg).token_ids == pipe.ask("x", photo(1), cfg).token_ids


def test_replayed_history_reuses_the_cache_and_equals_the_live_chat(make_any):
    pipe = make_any()
    live = pipe.chat(GREEDY)
    a1 = live.ask("first", photo(5))
    a2 = live.ask("second")
    replay = pipe.chat(GREEDY)
    replay.add_turn("first", photo(5), list(a1.token_ids))
    b2 = replay.ask("second")
    assert b2.token_ids == a2.token_ids and b2.prompt_tokens == a2.prompt_tokens
    assert b2.timings.prefill_tokens == 0  # the live chat's second prompt: cached, its logits kept
    assert b2.timings.images_cached == 0 and replay.turns == 2
    as_text = pipe.chat(GREEDY)  # an answer given as text is tokenized
    as_text.add_turn("first", photo(5), a1.text)
    assert as_text.positions[: len(a1.token_ids)] == replay.positions[: len(a1.token_ids)]


def test_warm_caches_the_common_start(make_any):
    pipe = make_any()
    n = pipe.warm()
    assert n > 1 and len(pipe.prefix) == n
    ans = pipe.ask("q", photo(1), GREEDY)
    assert ans.timings.prefill_tokens == ans.prompt_tokens - n
    assert ans.token_ids == make_any().ask("q", photo(1), GREEDY).token_ids


class FixedSequence:
    """A TokenConstraint that allows exactly one token sequence."""

    def __init__(self, ids):
        self.ids, self.at = list(ids), 0

    def allowed(self, logits):
        mask = np.zeros(1000, bool)
        mask[self.ids[self.at]] = True
        return mask

    def accept(self, token):
        assert token == self.ids[self.at]
        self.at += 1

    def done(self):
        return self.at == len(self.ids)


def test_constraint_and_cancel(make_any, tiny):
    pipe = make_any()
    want = tiny.tokenizer.encode("a b ### c")  # the separator does not end a constrained answer
    ans = pipe.chat(GREEDY).stream("q", None, constraint=FixedSequence(want))
    text = "".join(ans)
    assert list(ans.answer.token_ids) == want and ans.answer.stop == "constraint" and text == "a b ### c"
    stop = threading.Event()
    turn = pipe.chat(SamplingConfig(max_new_tokens=50)).stream("q", None, cancel=stop)
    stop.set()
    assert list(turn) == [] and turn.answer.stop == "cancelled" and turn.answer.token_ids == ()
    other = pipe.chat(GREEDY, dataclasses.replace(tiny.cfg.prompt, system="Another system prompt."))
    assert other.prompt_text("q", False).startswith("Another system prompt.###")


def test_doubles_and_models_satisfy_the_protocols(tiny, files):
    """runtime/interfaces.py: the reference stand-ins are LanguageDecoders, VisionEncoder a VisionModel."""
    assert isinstance(RefDecoder(tiny.model, tiny.tokenizer), LanguageDecoder)
    assert isinstance(ScriptedDecoder(tiny.model, tiny.tokenizer, [0]), LanguageDecoder)
    with VisionEncoder(files[0]) as vision:
        assert isinstance(vision, VisionModel)
    assert not isinstance(object(), LanguageDecoder) and not isinstance(object(), VisionModel)


# -- stops and history --------------------------------------------------------------------------


def test_stop_at_separator_and_history(tiny, files):
    tok = tiny.tokenizer
    answer, rest = tok.encode("a cat"), tok.encode("###Human: junk")
    dec = ScriptedDecoder(tiny.model, tok, answer + rest)
    pipe = Pipeline(vision=files[0], language=dec)
    chat = pipe.chat(SamplingConfig(max_new_tokens=50))
    a1 = chat.ask("what?", photo(1))
    assert a1.stop == "separator" and a1.text == "a cat"
    assert list(a1.token_ids[: len(answer)]) == answer and len(a1.token_ids) < len(answer + rest)
    before = list(chat.positions)
    assert before[-len(answer) :] == answer  # separator tokens are not part of the history
    dec.script, dec.produced = [tok.eos_id], 0
    a2 = chat.ask("more?")
    assert a2.stop == "eos" and a2.token_ids == () and a2.text == ""
    assert chat.positions == before + tok.encode("###" + tiny.cfg.prompt.turn("more?", False))


def test_max_new_tokens_and_context_stop(tiny, files):
    tok = tiny.tokenizer
    dec = ScriptedDecoder(tiny.model, tok, tok.encode(" word") * 400, n_ctx=80)
    pipe = Pipeline(vision=files[0], language=dec)
    assert pipe.ask("q", None, SamplingConfig(max_new_tokens=3)).stop == "max_new_tokens"
    dec.produced = 0
    ans = pipe.ask("q", None, SamplingConfig(max_new_tokens=300))
    assert ans.stop == "context" and dec.n_past == 80


# -- errors, threads, memory --------------------------------------------------------------------


def test_prompt_overflow_is_typed_and_pipeline_stays_usable(make_any, tiny):
    pipe = make_any()
    chat = pipe.chat(GREEDY)
    first = chat.ask("short", photo(2))
    with pytest.raises(ContextOverflowError, match=r"context holds 256") as e:
        chat.ask("word " * 300)
    assert e.value.n_ctx == 256 and e.value.n_past == len(chat.positions)
    assert e.value.n_past + e.value.n_new > 256 and e.value.n_new > 300
    assert chat.turns == 1  # the failed turn was not added
    with pytest.raises(ImageError):
        chat.ask("bad image", b"not an image")
    again = pipe.ask("short", photo(2), GREEDY)
    assert again.token_ids == first.token_ids


def test_same_thread_reentry_is_refused_and_recovers(make_any):
    pipe = make_any()
    stream = pipe.stream("q", photo(3), SamplingConfig(max_new_tokens=N))
    next(iter(stream), None)
    with pytest.raises(PipelineBusyError, match="already runs a turn"):
        pipe.ask("other", None, GREEDY)
    stream.close()
    assert stream.answer is not None and stream.answer.stop == "closed"
    pipe.ask("other", None, GREEDY)


def test_concurrent_calls_are_serialized(make_any):
    pipe = make_any()
    want = {i: pipe.ask(f"question {i}", photo(i), GREEDY).token_ids for i in range(3)}
    got, errors = {}, []

    def run(i):
        try:
            streamed = pipe.stream(f"question {i}", photo(i), GREEDY)
            text = "".join(streamed)
            got[i] = (text, streamed.answer.token_ids)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and {i: g[1] for i, g in got.items()} == want
    assert all(got[i][0] == pipe.ask(f"question {i}", photo(i), GREEDY).text for i in got)


def test_busy_timeout_rejects_clearly(make_any):
    pipe = make_any(busy_timeout=0.05)
    stream = pipe.stream("q", None, GREEDY)
    next(iter(stream), None)
    err = []
    t = threading.Thread(target=lambda: err.append(pytest.raises(PipelineBusyError, pipe.ask, "x")))
    t.start()
    t.join()
    stream.close()
    assert err and "busy" in str(err[0].value)


def test_low_memory_mode_same_answers(make_any):
    resident = make_any()
    low = make_any(low_memory=True)
    assert not low.vision.loaded
    chat_r, chat_l = resident.chat(GREEDY), low.chat(GREEDY)
    for q, img in (("one", photo(1)), ("two", None), ("three", photo(2))):
        assert chat_l.ask(q, img).token_ids == chat_r.ask(q, img).token_ids
        assert not low.vision.loaded  # released before decoding


@pytest.mark.slow
def test_shipped_model_greedy_parity(tmp_path):
    """The shipped default model: FP32 ONNX + F32 GGUF answers equal the PyTorch reference's tokens."""
    pytest.importorskip("tinygptv_edge.runtime.language.decoder")
    from tinygptv_edge.export.checkpoints.default import default_model_dir, load_default
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.export.onnx.export import export_vision
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer
    from tinygptv_edge.runtime.vision.images import load_image

    if not (default_model_dir() / "model.safetensors").is_file():
        pytest.skip("the shipped model is not built (make train-default)")
    model, _ = load_default()
    tok = Tokenizer.from_file(default_model_dir())
    onnx_path = export_vision(model, tmp_path).path
    gguf_path = tmp_path / "language.f32.gguf"
    export_gguf(model, tok, gguf_path, "F32")
    with Pipeline(onnx_path, gguf_path) as pipe:
        for seed, question in enumerate(["What is in the image?", "What colour is the shape?"]):
            data = photo(seed, size=(224, 224))
            got = pipe.ask(question, data, SamplingConfig(max_new_tokens=32))
            px = torch.from_numpy(preprocess(load_image(data), model.cfg.preprocess))[None]
            embeds = model.prompt_embeds(model.cfg.prompt.first_turn(question), tok, px)
            want = model.generate(embeds, 32, (tok.eos_id,), tok, model.cfg.prompt.separator)
            assert list(got.token_ids) == want
