"""The synthetic VQA generator, the training loop, and the shipped default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from tinygptv_edge.export.train import vqa  # noqa: E402
from tinygptv_edge.runtime.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# ---- generator ------------------------------------------------------------------------------


def test_generator_is_deterministic_by_seed():
    a, b = vqa.sample("test", 7, seed=3), vqa.sample("test", 7, seed=3)
    assert a.scene == b.scene and a.qas == b.qas
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = vqa.sample("test", 7, seed=4)
    assert c.scene != a.scene


def test_splits_are_separate_streams():
    scenes = {
        split: [vqa.sample(split, i).scene for i in range(20)] for split in ("train", "validation", "test")
    }
    assert not set(scenes["train"]) & set(scenes["test"])
    assert not set(scenes["validation"]) & set(scenes["test"])


def test_questions_are_consistent_with_the_scene():
    seen = set()
    for i in range(60):
        s = vqa.sample("train", i)
        assert s.image.size == (128, 128) and s.image.mode == "RGB"
        assert 1 <= len(s.scene.shapes) <= 4
        assert len({sh.colour for sh in s.scene.shapes}) == len(s.scene.shapes)  # colours name objects
        for qa in s.qas:
            seen.add(qa.qtype)
            assert qa.qtype in vqa.QTYPES and qa.answer == qa.answer.strip().lower()
            if qa.qtype == "count":
                assert qa.answer == vqa.NUMBERS[len(s.scene.shapes)]
            if qa.qtype == "exists":
                named = {f"{sh.colour} {sh.kind}" for sh in s.scene.shapes}
                asked = next(
                    n for n in (f"{c} {k}" for c in vqa.COLOURS for k in vqa.SHAPES) if n in qa.question
                )
                assert qa.answer == ("yes" if asked in named else "no")
            if qa.qtype == "caption":
                assert qa.answer.endswith(f"on a {s.scene.background} background")
    assert seen == set(vqa.QTYPES)


def test_iter_vqa_yields_image_question_answer_type():
    rows = list(vqa.iter_vqa("validation", 3))
    assert len(rows) == sum(len(vqa.sample("validation", i).qas) for i in range(3))
    image, question, answer, qtype = rows[0]
    assert image.size == (128, 128) and question.strip() and answer and qtype in vqa.QTYPES


def test_write_calibration_images(tmp_path):
    paths = vqa.write_calibration_images(tmp_path / "cal", 3, seed=1)
    assert [p.name for p in paths] == ["calib_00000.png", "calib_00001.png", "calib_00002.png"]
    again = vqa.write_calibration_images(tmp_path / "cal2", 3, seed=1)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == [p.name for p in paths]  # no temp left
    with pytest.raises(ConfigError, match="expected n > 0"):
        vqa.write_calibration_images(tmp_path / "x", 0)


def test_grid_layout_puts_one_shape_per_cell():
    cfg = vqa.VQAConfig()
    for i in range(40):
        shapes = vqa.sample("train", i).scene.shapes
        cells = {(int(s.x * cfg.grid), int(s.y * cfg.grid)) for s in shapes}
        assert len(cells) == len(shapes)
        for s in shapes:
            cx, cy = ((int(v * cfg.grid) + 0.5) / cfg.grid for v in (s.x, s.y))
            assert abs(s.x - cx) <= cfg.jitter and abs(s.y - cy) <= cfg.jitter
    free = vqa.sample("train", 0, cfg=vqa.VQAConfig(layout="free"))
    assert free.scene != vqa.sample("train", 0).scene


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(ConfigError, match="unknown split"):
        vqa.sample("dev", 0)
    with pytest.raises(ConfigError, match="max_shapes"):
        vqa.VQAConfig(max_shapes=5)
    with pytest.raises(ConfigError, match="layout"):
        vqa.VQAConfig(layout="spiral")


# ---- training ---------------------------------------------------------------------------------


def test_training_is_deterministic_and_learns(tmp_path):
    from tinygptv_edge.export.train.loop import TrainConfig, train

    cfg = TrainConfig(
        train_images=8,
        val_images=2,
        pretrain_steps=3,
        pretrain_images_per_step=4,
        steps=4,
        images_per_step=4,
        eval_every=4,
        lr=2e-3,
        warmup=2,
        threads=1,
    )
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert a.losses == b.losses
    assert a.losses[-1] < a.losses[0]
    sd_a, sd_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert a.val[-1][0] == 4 and set(a.val[-1][1]) <= {*vqa.QTYPES, "all"}
    assert set(a.scene) == {"present", "kind", "xy_within_0.05", "count", "background"}


# ---- the shipped model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from tinygptv_edge.export.checkpoints.default import default_model_dir, load_default
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    model, summary = load_default()
    return model, Tokenizer.from_file(default_model_dir()), summary


def test_shipped_model_loads_through_the_official_loader(shipped):
    from safetensors import safe_open

    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.train.loop import TrainConfig, model_config

    model, tok, _ = shipped
    recipe = json.loads((default_model_dir() / "training.json").read_text())["train_config"]
    assert model.cfg == model_config(TrainConfig(**recipe), tok.vocab_size)  # what its recipe builds
    with safe_open(str(default_model_dir() / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "visual_encoder.blocks.0.attn.qkv.weight" in keys and "llama_proj2.weight" in keys
    assert "llama_model.model.layers.0.self_attn.query_key_value.weight" in keys
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lang = model.cfg.language
    assert lang.hidden % 256 == 0 and lang.intermediate % 256 == 0  # every GGUF type applies


def test_shipped_metrics_meet_the_target():
    from tinygptv_edge.export.checkpoints.default import default_model_dir

    metrics = json.loads((default_model_dir() / "training.json").read_text())
    table = metrics["test_greedy_exact_match"]
    assert set(table) == {*vqa.QTYPES, "all"}
    assert all(row["accuracy"] >= 0.95 for row in table.values()), table


def test_reference_accuracy_on_the_first_test_images(shipped):
    """Recomputed here, not read from training.json: greedy answers of the PyTorch reference."""
    from tinygptv_edge.export.train.loop import evaluate_greedy

    model, tok, _ = shipped
    table = evaluate_greedy(model, tok, "test", n_images=25)
    assert table["all"]["total"] >= 140
    assert table["all"]["accuracy"] >= 0.9, table


def test_reference_answers_fixed_test_questions(shipped):
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    model, tok, _ = shipped
    asked = 0
    for index in (0, 1, 2):  # every question of the first test images
        s = vqa.sample("test", index)
        pixels = torch.from_numpy(preprocess(s.image, model.cfg.preprocess))[None]
        for qa in s.qas:
            assert model.answer(qa.question, tok, pixels) == qa.answer, qa
            asked += 1
    assert asked >= 15


def test_batched_exact_match_equals_greedy_answers(shipped):
    """The training-time metric (teacher-forced argmax) agrees with real greedy decoding."""
    from tinygptv_edge.export.train.data import encode_samples, forward_rows, loss_and_exact
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    model, tok, _ = shipped
    samples = [vqa.sample("validation", i) for i in range(4)]
    data = encode_samples(samples, model.cfg, tok)
    with torch.no_grad():
        logits, targets = forward_rows(model, data, torch.arange(len(data.image)), tok.eos_id)
    exact = loss_and_exact(logits, targets)[1].tolist()
    greedy = []
    for s in samples:
        pixels = torch.from_numpy(preprocess(s.image, model.cfg.preprocess))[None]
        greedy += [model.answer(qa.question, tok, pixels) == qa.answer for qa in s.qas]
    assert exact == greedy


def test_example_image_is_the_generators():
    from PIL import Image

    with Image.open(ROOT / "export" / "data" / "example.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(vqa.sample("test", 0).image))


@pytest.mark.slow
def test_make_demo_answers_the_example(tmp_path):
    out = subprocess.run(
        # --no-print-directory: under `make test-slow` this make is a sub-make, which would end its
        # output with "make[1]: Leaving directory ..."
        ["make", "--no-print-directory", "demo", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr
    # the demo asks for the colour of the one circle in test image 0 and prints --json
    (circle,) = [sh for sh in vqa.sample("test", 0).scene.shapes if sh.kind == "circle"]
    assert json.loads(out.stdout.strip().splitlines()[-1])["answer"] == circle.colour


def test_train_config_rejects_bad_settings(tmp_path):
    from tinygptv_edge.export.train.loop import TrainConfig, train

    with pytest.raises(ConfigError, match="anchor_weight: expected >= 0"):
        TrainConfig(anchor_weight=-1.0)
    with pytest.raises(ConfigError, match="pretrain_images_per_step 32 > train_images 8"):
        TrainConfig(train_images=8, images_per_step=4)
    cfg = TrainConfig(
        train_images=8,
        val_images=2,
        pretrain_steps=1,
        pretrain_images_per_step=4,
        steps=1,
        images_per_step=4,
        anchor_layer=3,
        threads=1,
    )
    with pytest.raises(ConfigError, match="anchor_layer: expected < 3 decoder layers, got 3"):
        train(cfg, tmp_path)
