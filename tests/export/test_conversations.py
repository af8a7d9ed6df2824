"""Issue #31: conversations in the training data (laid out as the runtime's Chat does), paired exists
questions, the v2 camera chain, and the conversation evaluation split. Tiny sizes throughout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from tinygptv_edge.export.train import data as D  # noqa: E402
from tinygptv_edge.export.train import vqa  # noqa: E402
from tinygptv_edge.runtime.errors import ConfigError  # noqa: E402

VARIED = vqa.DATASETS["varied"]


def test_default_settings_draw_the_shipped_data():
    # digest of varied training samples 0-7 (pixels, questions, scenes) with the generator before issue #31
    h = hashlib.sha256()
    for i in range(8):
        s = vqa.sample("train", i, 0, VARIED)
        h.update(s.image.tobytes())
        h.update(repr(s.qas).encode())
        h.update(repr(s.scene).encode())
    assert h.hexdigest() == "c0c3786250719acdee01655b29899dc8947c7536872774751baf3f1b38767028"


def _qas(n: int, cfg: vqa.VQAConfig = VARIED) -> list[tuple[vqa.QA, ...]]:
    return [s.qas for s in vqa.iter_samples("train", n, 0, cfg)]


def test_conversations_are_questions_about_the_attached_image():
    qas = _qas(30)
    convs = vqa.conversations(
        qas, "train", 0, 1.0, vqa.ConversationConfig(greeting=0.3, thanks=0.3, second_image=0.4)
    )
    assert convs == vqa.conversations(
        qas, "train", 0, 1.0, vqa.ConversationConfig(greeting=0.3, thanks=0.3, second_image=0.4)
    )
    seen = {"greeting": 0, "thanks": 0, "second": 0}
    for i, conv in enumerate(convs):
        assert conv.image == i
        image_turns = [t for t in conv.turns if t.about is not None]
        assert 2 <= len(image_turns) <= 4
        current = None
        for t in conv.turns:
            if t.attach is not None:
                current = t.attach
            if t.about is None:
                assert t.qtype == vqa.CHAT and t.attach is None
                assert t.answer in (vqa.HELLO_ANSWER, vqa.THANKS_ANSWER)
                continue
            assert t.about == current  # questions are about the image attached last
            assert vqa.QA(t.question, t.answer, t.qtype) in qas[t.about]
        questions = [(t.about, t.question) for t in image_turns]
        assert len(set(questions)) == len(questions)
        seen["greeting"] += conv.turns[0].qtype == vqa.CHAT
        seen["thanks"] += any(t.answer == vqa.THANKS_ANSWER for t in conv.turns)
        seen["second"] += len({t.attach for t in conv.turns if t.attach is not None}) == 2
    assert min(seen.values()) >= 3, seen
    half = vqa.conversations(qas, "train", 0, 0.5, vqa.ConversationConfig())
    assert 5 <= len(half) <= 25
    with pytest.raises(ConfigError, match="min_questions"):
        vqa.ConversationConfig(min_questions=3, max_questions=2)


def test_exists_pairs_are_balanced_and_hard():
    cfg = vqa.VQAConfig(exists="pair")
    for s in vqa.iter_samples("test", 60, 0, cfg):
        ex = [qa for qa in s.qas if qa.qtype == "exists"]
        assert len(ex) == 2 and {qa.answer for qa in ex} == {"yes", "no"}
        present = {(sh.colour, sh.kind) for sh in s.scene.shapes}
        for qa in ex:
            c = next(c for c in vqa.COLOURS if f" {c} " in f" {qa.question} ")
            k = next(k for k in vqa.SHAPES if k in qa.question)
            assert ((c, k) in present) == (qa.answer == "yes")
            if qa.answer == "no" and qa is ex[1]:  # the paired one shares a colour or a kind with a shape
                assert any(c == sh.colour or k == sh.kind for sh in s.scene.shapes)
    # the other questions are those of "one": the extra one has its own stream
    one = vqa.sample("test", 3, 0, vqa.VQAConfig())
    pair = vqa.sample("test", 3, 0, cfg)
    assert pair.qas[: len(one.qas) - 1] == one.qas[:-1] and pair.qas[-1] == one.qas[-1]
    with pytest.raises(ConfigError, match="exists"):
        vqa.VQAConfig(exists="three")


def test_camera_v2_and_padded_frames():
    v2 = vqa.VQAConfig(camera=1.0, camera_style="v2")
    sizes, padded = [], 0
    for i in range(16):
        s = vqa.sample("train", i, 0, v2)
        sizes.append(s.image.size)
        padded += s.scene.frame != vqa.IDENTITY
    assert padded >= 5 and len(set(sizes)) >= 3
    _, cfg = vqa.eval_split("test-camera-padded")
    for i in range(6):
        s = vqa.sample("test", i, 0, cfg)
        w, h = s.image.size
        assert w * 3 == h * 4 and s.scene.frame.sx == pytest.approx(0.75)
        assert s.qas == vqa.sample("test", i).qas
    with pytest.raises(ConfigError, match="camera_style"):
        vqa.VQAConfig(camera_style="v3")


class _Tok:
    """A byte tokenizer (one id per byte, BOS 256): enough for layouts."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _cfg():
    from tinygptv_edge.runtime.config import small_config

    return small_config(258)


def _expand(data: D.Encoded, r: int, q: int) -> list:
    """Row r as the decoder sees it: tokens, and ("img", index) per image row."""
    out = list(data.prefix) + list(data.pre[r] if data.pre else [])
    out += [("img", int(data.image[r]))] * q
    for t in data.suffix[r]:
        out += [("img", -1 - t)] * q if t < 0 else [t]
    return out


def test_conversation_rows_are_laid_out_as_the_runtime_chat():
    from tinygptv_edge.runtime.pipeline import layout_chat

    cfg, tok = _cfg(), _Tok()
    q = cfg.qformer.num_query_tokens
    samples = list(vqa.iter_samples("train", 12, 0, VARIED))
    base = D.encode_samples(samples, cfg, tok)
    ccfg = vqa.ConversationConfig(greeting=0.5, thanks=0.5, second_image=0.5)
    convs = vqa.conversations([s.qas for s in samples], "train", 0, 1.0, ccfg)
    data = D.add_conversations(base, convs, cfg, tok)
    assert data.general and sum(data.conversation) == len(convs)
    assert data.image.tolist() == sorted(data.image.tolist())  # still grouped by image
    rows = [r for r, c in enumerate(data.conversation) if c]
    for conv, r in zip(convs, rows, strict=True):
        # the runtime: each turn through Chat, the answers as a client sends them back
        chat = layout_chat(tok, q, cfg.prompt)
        for t in conv.turns[:-1]:
            chat.add_turn(t.question, None if t.attach is None else str(t.attach), t.answer)
        last = conv.turns[-1]
        want = chat.next_positions(last.question, [] if last.attach is None else [str(last.attach)])
        want = [p if isinstance(p, int) else ("img", int(p[0])) for p in want]
        assert _expand(data, r, q) == want
        assert data.target[r] == tok.encode(last.answer + cfg.prompt.separator)
        assert data.answer[r] == last.answer and data.qtype[r] == last.qtype
        # the text: first turn, then separator + later-turn template; the image only where attached
        text = tok.decode([p for p in want if isinstance(p, int)])
        p = cfg.prompt
        assert text.startswith(p.system + p.separator + "Human: ")
        assert text.count("<Img>") == 1 + sum(t.attach is not None for t in conv.turns)  # the system's too
        assert (
            text.endswith(
                p.separator
                + "Human: "
                + ("<Img></Img> " if last.attach is not None else "")
                + last.question
                + p.separator
                + p.assistant_prefix
            )
            or len(conv.turns) == 1
        )
    # single-question rows keep their layout
    single = [r for r, c in enumerate(data.conversation) if not c]
    assert len(single) == len(base.suffix)
    for r0, r in enumerate(single):
        assert _expand(data, r, q) == _expand(base, r0, q)


def test_the_loss_covers_every_answer_and_one_question_rows_match_the_fast_path():
    from tinygptv_edge.export.model.tinygptv import TinyGPTV
    from tinygptv_edge.export.train.loop import init_weights

    torch.manual_seed(0)
    cfg, tok = _cfg(), _Tok()
    model = TinyGPTV(cfg)
    init_weights(model)
    model.eval()
    samples = list(vqa.iter_samples("train", 6, 0, vqa.VQAConfig(image_size=64)))
    base = D.encode_samples(samples, cfg, tok)
    convs = vqa.conversations([s.qas for s in samples], "train", 0, 1.0, vqa.ConversationConfig(greeting=0.5))
    data = D.add_conversations(base, convs, cfg, tok)
    with torch.no_grad():
        rows = torch.arange(len(base.suffix))
        fast, t_fast = D.forward_rows(model, base, rows, tok.eos_id)
        single = torch.tensor([r for r, c in enumerate(data.conversation) if not c])
        gen, t_gen = D.forward_rows(model, data, single, tok.eos_id)
        for j in range(len(rows)):  # the same answer logits, wherever the row's positions start
            a = fast[j][t_fast[j] != D.IGNORE]
            b = gen[j][t_gen[j] != D.IGNORE]
            assert torch.allclose(a, b, atol=1e-4)
            assert t_fast[j][t_fast[j] != D.IGNORE].tolist() == t_gen[j][t_gen[j] != D.IGNORE].tolist()
        conv_rows = torch.tensor([r for r, c in enumerate(data.conversation) if c])
        _, targets = D.forward_rows(model, data, conv_rows, tok.eos_id)
    for j, conv in enumerate(convs):
        got = tok.decode([t for t in targets[j].tolist() if t != D.IGNORE])
        want = "".join(t.answer for t in conv.turns) + cfg.prompt.separator
        assert got == want


def test_conversation_split_reports_turns_and_the_same_questions_alone(tmp_path: Path):
    from tinygptv_edge.export.checkpoints.single import load_single
    from tinygptv_edge.export.train.loop import evaluate_conversations, evaluate_greedy
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    assert "test-conversation" in vqa.EVAL_SPLITS and "test-conversation" in vqa.CONVERSATION_SPLITS
    folder = Path(__file__).resolve().parents[2] / "export" / "default_model"
    model = load_single(folder)[0]
    tok = Tokenizer.from_file(folder)
    table = evaluate_greedy(model, tok, "test-conversation", 2)
    assert table == evaluate_conversations(model, tok, "test-conversation", 2)
    assert {"all", "turn 1", "turn 2", "turn 3", "follow-ups", "alone: follow-ups", "alone: all"} <= set(
        table
    )
    assert table["follow-ups"]["total"] == table["alone: follow-ups"]["total"] >= 4
    assert table["turn 1"]["total"] == 2
    n_turns = sum(v["total"] for k, v in table.items() if k.startswith("turn "))
    assert n_turns == table["all"]["total"]
    for v in table.values():
        assert 0 <= v["accuracy"] <= 1 and v["correct"] <= v["total"]


def test_train_config_flags_are_checked():
    from tinygptv_edge.export.train.loop import TrainConfig

    assert TrainConfig().scene_data() == VARIED  # the defaults: the shipped recipe's data
    cfg = TrainConfig(exists="pair", camera_style="v2", camera=0.4, noisy_sigma=(16.0, 28.0))
    assert cfg.scene_data() == vqa.VQAConfig(
        phrasings="train",
        layout="mixed",
        camera=0.4,
        word_noise=0.3,
        exists="pair",
        camera_style="v2",
        noisy_sigma=(16.0, 28.0),
        **vqa.WIDE,
    )
    with pytest.raises(ConfigError, match="conversations"):
        TrainConfig(conversations=1.5)
    with pytest.raises(ConfigError, match="exists"):
        TrainConfig(exists="many")
    with pytest.raises(ConfigError, match="noisy_sigma"):
        TrainConfig(noisy_sigma=(30.0, 10.0))
    assert np.isfinite(cfg.noisy_sigma).all()
