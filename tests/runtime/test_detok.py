"""Streaming detokenization: UTF-8 characters split over tokens, the separator split over tokens, strip."""

from __future__ import annotations

import pytest

from tinygptv_edge.runtime.text.detok import AnswerStream, TextStream, TokenBytes
from tinygptv_edge.runtime.text.tokenizer import Tokenizer

TEXTS = [
    "plain ascii text, with punctuation!",
    "naïve café — déjà vu",
    "中文字符 and emoji 🙂🚀 mixed",
    "tabs\tand    runs of spaces",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from tinygptv_edge.export.checkpoints.tokenizer_train import train_bpe

    hf = train_bpe(400)
    hf.add_tokens(["    "])  # a non-special added token, as Phi-2 has for runs of spaces
    return Tokenizer(hf)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_round_trip(tok, text):
    ids = tok.encode(text)
    assert TokenBytes(tok)(ids).decode("utf-8") == text == tok.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_text_stream_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    stream = TextStream(TokenBytes(tok))
    pieces = [stream.feed(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if "🙂" in text:  # the emoji is 4 bytes over several byte tokens: some feeds return nothing
        assert len([p for p in pieces if p == ""]) >= 2


def answer(tok, text: str, sep: str = "###") -> tuple[list[str], AnswerStream, int]:
    stream = AnswerStream(TokenBytes(tok), sep)
    pieces, used = [], 0
    for t in tok.encode(text):
        used += 1
        piece, stop = stream.push(t)
        pieces.append(piece)
        if stop:
            break
    else:
        pieces.append(stream.finish())
    return pieces, stream, used


def test_answer_stops_at_separator_split_over_tokens(tok):
    text = "  The cat is 中文 black.  ###Human: more"
    pieces, stream, used = answer(tok, text)
    assert "".join(pieces) == "The cat is 中文 black."
    assert stream.stopped and stream.text[stream.answer_chars :].startswith("###")
    ids = tok.encode(text)
    assert used < len(ids)  # stopped at the token completing "###", not at the end
    assert "###" in tok.decode(ids[:used]) and "###" not in tok.decode(ids[: used - 1])


def test_partial_separator_is_held_then_released(tok):
    pieces, stream, _ = answer(tok, "a ## b # c")
    assert "".join(pieces) == "a ## b # c" and stream.answer_chars == len(stream.text)


def test_answer_without_separator_is_stripped(tok):
    pieces, _, _ = answer(tok, "\n  hello  world \t ")
    assert "".join(pieces) == "hello  world"
    shown = [p for p in pieces if p]
    assert not shown[0][0].isspace() and not shown[-1][-1].isspace()  # never shown, not taken back


def test_other_separators(tok):
    pieces, _, _ = answer(tok, "x</s>y", sep="</s>")
    assert "".join(pieces) == "x"
    pieces, _, _ = answer(tok, "no sep at all", sep="")
    assert "".join(pieces) == "no sep at all"
