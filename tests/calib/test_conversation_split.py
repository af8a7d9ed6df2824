"""The conversation split in the report's evaluation set (issue #31): conversation lines in the evalset
format, and `matrix.prepare` laying each turn out after the earlier ones as the runtime's Chat does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinygptv_edge.calib import evalset as E
from tinygptv_edge.runtime.config import PromptConfig
from tinygptv_edge.runtime.errors import EvalSetError


class _Tok:
    """One id per byte, BOS 256."""

    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _write(tmp_path, lines):
    folder = tmp_path / "set"
    folder.mkdir(exist_ok=True)
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8, 3), 40 if name == "a.png" else 200, np.uint8)).save(folder / name)
    (folder / E.QUESTIONS).write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return folder


CONV = [
    {"image": "a.png", "question": "What colour is the circle?", "answer": "red", "type": "colour"},
    {"image": "a.png", "question": "Hello!", "answer": "hello", "type": "chat", "conversation": 0, "turn": 1,
     "attach": False},
    {"image": "a.png", "question": "Count the shapes.", "answer": "two", "type": "count", "conversation": 0,
     "turn": 2},
    {"image": "a.png", "question": "Is there a red circle?", "answer": "yes", "type": "exists",
     "conversation": 0, "turn": 3, "attach": False},
    {"image": "b.png", "question": "What shape is the blue object?", "answer": "cross", "type": "shape",
     "conversation": 0, "turn": 4},
]  # fmt: skip


def test_conversation_lines_are_read_and_checked(tmp_path):
    s = E.load_evalset(_write(tmp_path, CONV))
    assert [(it.conversation, it.turn, it.attach) for it in s.items] == [
        (None, 1, True), (0, 1, False), (0, 2, True), (0, 3, False), (0, 4, True)
    ]  # fmt: skip
    plain = E.load_evalset(_write(tmp_path, CONV[:1]))
    assert plain.items[0].conversation is None
    for bad, match in (
        ({**CONV[2], "turn": 3}, "consecutive"),
        ({**CONV[0], "turn": 2}, "belong to a 'conversation'"),
        ({**CONV[2], "attach": "no"}, "'attach'"),
        ({**CONV[2], "conversation": "x"}, "'conversation'"),
    ):
        with pytest.raises(EvalSetError, match=match):
            E.load_evalset(_write(tmp_path, [CONV[0], CONV[1], bad]))


def test_prepare_lays_turns_out_as_the_runtime_chat(tmp_path):
    from tinygptv_edge.calib.matrix import prepare
    from tinygptv_edge.runtime.config import PreprocessConfig
    from tinygptv_edge.runtime.pipeline import layout_chat

    s = E.load_evalset(_write(tmp_path, CONV))
    tok, prompt = _Tok(), PromptConfig()
    prep = prepare(s, tok, prompt, PreprocessConfig(image_size=32))
    rows = {k: i for i, k in enumerate(s.images)}
    chat = layout_chat(tok, 1, prompt)
    for q, it in enumerate(s.items):
        got = list(prep.prefix)
        for toks, img in prep.pieces_of(q):
            got += toks + ([("img", img)] if img is not None else [])
        got += prep.suffix[q]
        if it.conversation is None:
            want = prompt.first_turn(it.question)
            head, tail = want.split("<ImageHere>")
            expect = [tok.bos_id, *tok.encode(head), ("img", rows[it.image]), *tok.encode(tail)]
        else:
            key = it.image if it.attach else None
            pos = chat.next_positions(it.question, [] if key is None else [key])
            expect = [p if isinstance(p, int) else ("img", rows[p[0]]) for p in pos]
            chat.add_turn(it.question, key, it.answer)
        assert got == expect, q
        assert prep.target[q] == tok.encode(it.answer + prompt.separator)
    # a set without conversations keeps the one-image layout
    plain = prepare(E.load_evalset(_write(tmp_path, CONV[:1])), tok, prompt, PreprocessConfig(image_size=32))
    assert plain.pieces is None and plain.pieces_of(0) == [([], 0)]


def test_the_conversation_split_is_written_with_follow_ups_and_the_same_questions_alone(tmp_path):
    pytest.importorskip("tinygptv_edge.export.train.vqa")
    folder = E.write_vqa_splits(tmp_path / "conv", 4, ["test", "test-conversation"])
    s = E.load_evalset(folder)
    assert s.splits == ["test", "test-conversation", "test-conversation-followups", "test-conversation-alone"]
    follow = [it for it in s.items if it.split == "test-conversation-followups" and it.qtype != "chat"]
    alone = [it for it in s.items if it.split == "test-conversation-alone"]
    assert [(it.question, it.answer) for it in follow] == [(it.question, it.answer) for it in alone]
    assert all(it.conversation is None for it in alone)
    firsts = [it for it in s.items if it.split == "test-conversation"]
    assert len(firsts) == 4 and all(it.turn == 1 for it in firsts)
    assert len(s.images) == 4 + 4  # test's images and the conversation's (the same scenes, written once each)
