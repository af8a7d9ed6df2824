"""The synthetic VQA generator's variety: phrasing sets, free layout and sizes, camera frames, eval splits."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

pytestmark = pytest.mark.torch

pytest.importorskip("torch")

from tinygptv_edge.export.train import phrasings as P  # noqa: E402
from tinygptv_edge.export.train import vqa  # noqa: E402
from tinygptv_edge.runtime.errors import ConfigError  # noqa: E402

SLOTS = {"c", "s", "c2", "s2"}
ANSWERS = {
    "colour": set(vqa.COLOURS),
    "shape": set(vqa.SHAPES),
    "count": set(vqa.NUMBERS[1:]),
    "position": {"left", "right", "top", "bottom"},
    "relation": {"left", "right", "above", "below", "higher", "lower", "over", "under"},
    "exists": {"yes", "no"},
}


def _norm(text: str) -> str:
    return text.lower().rstrip("?.")


def test_phrasing_sets_are_wide_and_the_held_out_ones_are_new():
    for key in P.KEYS:
        assert len(P.TRAIN[key]) >= 12, key
        assert len(P.HELDOUT[key]) >= 4, key
        assert P.TRAIN[key][: len(P.CLASSIC[key])] == P.CLASSIC[key]
        train = {_norm(t) for t, _ in P.TRAIN[key]}
        assert len(train) == len(P.TRAIN[key]), f"{key}: duplicate training phrasing"
        for text, _ in P.HELDOUT[key]:
            assert _norm(text) not in train, text
        for text, words in P.TRAIN[key] + P.HELDOUT[key]:
            assert set(re.findall(r"{(\w+)}", text)) <= SLOTS, text
            assert (words is not None) == (key == "relation_y"), text
            if words:  # the answer is always one of the question's own options
                assert all(re.search(rf"\b{w}\b", text) for w in words), text
    held = {t for ts in P.HELDOUT.values() for t, _ in ts}
    assert not held & set(vqa.vocabulary_text("train"))  # nor in the tokenizer's training text
    with pytest.raises(ConfigError, match="vocabulary_text"):
        vqa.vocabulary_text("spoken")


def test_spelling_imperatives_and_synonyms_are_covered():
    train = " ".join(t for ts in P.TRAIN.values() for t, _ in ts)
    words = ("colour", "color", "Summarise", "Summarize", "Please", "Could you", "thing", "object", "figure")
    for word in words:
        assert word in train, word
    assert any(t.startswith(("Count", "Name", "Tell", "Describe")) for ts in P.TRAIN.values() for t, _ in ts)
    assert ("Describe the image.", None) in P.TRAIN["caption"]


def test_test_split_keeps_its_questions():
    """The test split's questions and answers as the first default models saw them (a golden digest)."""
    h = hashlib.sha256()
    for i in range(30):
        for qa in vqa.sample("test", i).qas:
            h.update(f"{qa.question}|{qa.answer}|{qa.qtype}\n".encode())
    assert h.hexdigest()[:16] == "f459365869adbc12"  # computed with main at 15865eb


def test_rewording_keeps_the_image_and_what_is_asked():
    for i in range(20):
        a = vqa.sample("test", i)
        b = vqa.sample("test", i, cfg=vqa.VQAConfig(phrasings="heldout"))
        assert a.scene == b.scene and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert [q.qtype for q in a.qas] == [q.qtype for q in b.qas]
        for qa, qb in zip(a.qas, b.qas, strict=True):
            assert qb.question != qa.question
            if qa.qtype != "relation":  # relation_y answers in the phrasing's own words
                assert qb.answer == qa.answer


@pytest.mark.parametrize("name", ["varied", "heldout"])
def test_answers_are_always_of_the_questions_type(name):
    cfg = vqa.DATASETS["varied"] if name == "varied" else vqa.VQAConfig(phrasings="heldout")
    seen = set()
    for i in range(40):
        s = vqa.sample("train", i, cfg=cfg)
        for qa in s.qas:
            seen.add(qa.qtype)
            if qa.qtype == "caption":
                assert re.fullmatch(r"(one shape|(two|three|four) shapes) on a \w+ background", qa.answer)
            else:
                assert qa.answer in ANSWERS[qa.qtype], qa
            if qa.qtype == "relation" and " or " in qa.question:  # it offers options: the answer is one
                assert re.search(rf"\b{qa.answer}\b", qa.question.lower()), qa
    assert seen == set(vqa.QTYPES)


def test_training_never_asks_a_held_out_phrasing():
    held = {_norm(t) for ts in P.HELDOUT.values() for t, _ in ts}
    cfg = vqa.DATASETS["varied"]
    for i in range(60):
        for qa in vqa.sample("train", i, cfg=cfg).qas:
            for t in held:  # the template with its slots as wildcards
                pattern = re.escape(t).replace(r"\{c\}", r"\w+").replace(r"\{s\}", r"\w+")
                pattern = pattern.replace(r"\{c2\}", r"\w+").replace(r"\{s2\}", r"\w+")
                assert not re.fullmatch(pattern, _norm(qa.question)), qa.question


def test_free_layout_spreads_sizes_and_keeps_shapes_visible():
    _, cfg = vqa.eval_split("test-layout")
    radii, off_grid = [], 0
    for i in range(60):
        scene = vqa.sample("test", i, cfg=cfg).scene
        assert min(vqa.visible_shares(scene)) >= cfg.min_visible
        radii += [s.r for s in scene.shapes]
        off_grid += sum(abs((s.x * 4) % 1 - 0.5) > 0.2 for s in scene.shapes)
    assert min(radii) < 0.07 and max(radii) > 0.17
    assert off_grid > 10


def test_mixed_layout_draws_both():
    cfg = vqa.DATASETS["varied"]
    on_grid = 0
    for i in range(40):
        shapes = vqa.sample("train", i, cfg=cfg).scene.shapes
        cells = [((s.x * 4) % 1 - 0.5, (s.y * 4) % 1 - 0.5) for s in shapes]
        on_grid += all(abs(dx) <= cfg.jitter * 4 and abs(dy) <= cfg.jitter * 4 for dx, dy in cells)
    assert 8 < on_grid < 36


def test_camera_frames_are_non_square_and_their_frame_places_the_shapes():
    from tinygptv_edge.runtime.config import PreprocessConfig
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    _, cfg = vqa.eval_split("test-camera")
    sizes, padded = set(), 0
    for i in range(12):
        plain, cam = vqa.sample("test", i), vqa.sample("test", i, cfg=cfg)
        assert cam.qas == plain.qas and cam.scene.shapes == plain.scene.shapes
        sizes.add(cam.image.size)
        padded += cam.scene.frame != vqa.IDENTITY
        # the model's square input: each shape's colour at its placed centre (JPEG, blur, noise: roughly)
        px = cam.image.convert("RGB").resize((128, 128))
        top = vqa.shape_mask(cam.scene, 128)
        for k, s in enumerate(cam.scene.shapes):
            ys, xs = np.nonzero(top == k + 1)
            if len(ys) < 40:
                continue
            rgb = np.asarray(px)[ys, xs].astype(float).mean(0)
            assert np.abs(rgb - vqa.COLOURS[s.colour]).max() < 60, (i, s, rgb)
    assert len(sizes) >= 3 and any(w != h for w, h in sizes) and padded >= 2
    x = preprocess(cam.image, PreprocessConfig(image_size=64))
    assert x.shape == (3, 64, 64)


def test_evaluation_splits_have_enough_questions():
    assert list(vqa.EVAL_SPLITS) == [
        "test", "test-phrasing", "test-layout", "test-camera", "test-camera-padded", "test-conversation"
    ]  # fmt: skip
    split, cfg = vqa.eval_split("test-layout")
    assert split == "test" and sum(len(s.qas) for s in vqa.iter_samples(split, 80, 0, cfg)) >= 500
    with pytest.raises(ConfigError, match="unknown evaluation split"):
        vqa.eval_split("val")


def test_new_settings_are_checked():
    with pytest.raises(ConfigError, match="phrasings"):
        vqa.VQAConfig(phrasings="slang")
    with pytest.raises(ConfigError, match="camera"):
        vqa.VQAConfig(camera=1.5)
    with pytest.raises(ConfigError, match="min_visible"):
        vqa.VQAConfig(min_visible=-0.1)
    with pytest.raises(ConfigError, match="word_noise"):
        vqa.VQAConfig(word_noise=2.0)


def test_word_noise_edits_one_word_and_never_a_slot_or_an_option():
    rng = np.random.default_rng(0)
    templates = [t for ts in P.TRAIN.values() for t, _ in ts]
    edits = {"replace": 0, "drop": 0, "add": 0}
    for k in range(600):
        t = templates[k % len(templates)]
        got = P.noise(t, rng, 1.0)
        assert got != t
        a, b = t.split(" "), got.split(" ")
        # slots and options survive, in order
        keep = [w.strip(P.PUNCT) for w in a if "{" in w or w.strip(P.PUNCT + "'s").lower() in P.OPTIONS]
        assert [w.strip(P.PUNCT) for w in b if w.strip(P.PUNCT) in keep] == keep, (t, got)
        edits["add" if len(b) > len(a) else "drop" if len(b) < len(a) else "replace"] += 1
    assert min(edits.values()) > 100, edits
    assert P.noise("Count the shapes.", rng, 0.0) == "Count the shapes."


def test_word_noise_is_training_data_only():
    assert vqa.DATASETS["varied"].word_noise > 0
    assert all(cfg.word_noise == 0 for _, cfg in vqa.EVAL_SPLITS.values())
    vocab = {w.strip(P.PUNCT).lower() for ts in P.TRAIN.values() for t, _ in ts for w in t.split()}
    vocab |= {*vqa.COLOURS, *vqa.SHAPES}
    noisy = [qa.question for i in range(40) for qa in vqa.sample("train", i, cfg=vqa.DATASETS["varied"]).qas]
    unseen = [q for q in noisy if any(w.strip(P.PUNCT).lower() not in vocab for w in q.split())]
    assert 0.15 < len(unseen) / len(noisy) < 0.45, len(unseen) / len(noisy)


def test_train_config_names_its_data_and_input():
    from tinygptv_edge.export.train.loop import TrainConfig, model_config
    from tinygptv_edge.runtime.config import small_config

    assert TrainConfig().data == "varied" and model_config(TrainConfig(), 512) == small_config(512)
    cfg = model_config(TrainConfig(image_size=64, patch_size=8), 512)
    assert cfg.vision.grid == 8 and cfg.preprocess.image_size == 64
    assert cfg.language == small_config(512).language  # every GGUF type still applies
    with pytest.raises(ConfigError, match="TrainConfig.data"):
        TrainConfig(data="web")
    with pytest.raises(ConfigError, match="patch_size"):
        TrainConfig(image_size=64, patch_size=12)
    wide = model_config(TrainConfig(image_size=128, vision_width=192, vision_depth=4), 512)
    v = wide.vision
    assert (v.width, v.depth, v.stored_depth, v.heads, v.mlp_hidden) == (192, 4, 4, 6, 768)
    assert wide.qformer.vision_width == 192 and wide.vision.grid == 8 and wide.preprocess.image_size == 128
    assert wide.language == small_config(512).language
    with pytest.raises(ConfigError, match="vision_width"):
        TrainConfig(vision_width=100)


def test_eval_only_prints_every_split(capsys):
    from tinygptv_edge.cli import main

    assert main(["train", "--eval-only", "--test-images", "1", "--eval-images", "1"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("type"))
    assert header.split()[1:] == list(vqa.EVAL_SPLITS)
    assert re.search(r"^\s+all(\s+\d+\.\d%){" + str(len(vqa.EVAL_SPLITS)) + "}$", out, re.M)


def test_answer_of_type_accepts_any_answer_of_the_kind_asked():
    assert vqa.answer_of_type("colour", "What color is the circle?", "purple")
    assert not vqa.answer_of_type("colour", "What color is the circle?", "four")
    assert vqa.answer_of_type("count", "Count the shapes.", "two")
    assert not vqa.answer_of_type("count", "Count the shapes.", "no")
    q = "Is the red circle higher or lower than the blue square?"
    assert vqa.answer_of_type("relation", q, "lower") and not vqa.answer_of_type("relation", q, "below")
    assert vqa.answer_of_type("caption", "Describe the image.", "two shapes on a noisy background")
    assert not vqa.answer_of_type("caption", "Describe the image.", "four")
    for s in (vqa.sample("test", i, cfg=vqa.VQAConfig(phrasings="heldout")) for i in range(10)):
        assert all(vqa.answer_of_type(qa.qtype, qa.question, qa.answer) for qa in s.qas)
    with pytest.raises(ConfigError, match="unknown question type"):
        vqa.answer_of_type("mood", "q", "a")
