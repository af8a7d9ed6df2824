"""Incremental detokenization for streaming: token ids -> text pieces that never split a character.

Byte-level BPE tokens are byte strings: a Chinese character or an emoji is often spread over two or
three tokens, and decoding token by token would print U+FFFD halves. `TokenBytes` maps each id to its
bytes once (GPT-2's byte <-> unicode table inverted; added tokens are their own UTF-8 text, special
ones empty), and `TextStream` feeds them through an incremental UTF-8 decoder that holds a partial
character back until its last byte arrives.

`AnswerStream` adds what an answer needs on top: it stops at the turn separator ("###", which may come
split over tokens), and it strips the answer (leading and trailing whitespace never reach the caller),
so the streamed pieces join to exactly the non-streamed answer.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from .tokenizer import Tokenizer


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the rest shift to 256+."""
    ranges = [("!", "~"), ("¡", "¬"), ("®", "ÿ")]
    printable = [b for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenBytes:
    """id -> the bytes the token stands for."""

    def __init__(self, tokenizer: Tokenizer):
        hf = tokenizer.hf
        byte_of = _unicode_to_byte()
        added = hf.get_added_tokens_decoder()  # id -> AddedToken
        self.table: list[bytes] = []
        for i in range(tokenizer.vocab_size):
            tok = added.get(i)
            if tok is not None:
                self.table.append(b"" if tok.special else tok.content.encode("utf-8"))
                continue
            text = hf.id_to_token(i) or ""
            self.table.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in text))

    def __call__(self, ids: Sequence[int]) -> bytes:
        n = len(self.table)
        return b"".join(self.table[i] if 0 <= i < n else b"" for i in ids)


class TextStream:
    """Token ids in, complete characters out."""

    def __init__(self, token_bytes: TokenBytes):
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self.token_bytes([token]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class AnswerStream:
    """Detokenizes an answer, cuts it at `separator`, strips it, and says what is safe to show yet.

    `push(token)` returns the new visible text and whether the separator was reached. Text that could be
    the start of the separator, and trailing whitespace, are held until the next token decides.
    """

    def __init__(self, token_bytes: TokenBytes, separator: str):
        self.text_stream = TextStream(token_bytes)
        self.separator = separator
        self.text = ""  # everything decoded so far
        self.shown = 0  # characters of `text` already handed out
        self.started = False  # a non-space character has been seen (leading space is dropped)
        self.stopped = False
        self.answer_chars: int | None = None  # len(text) before the separator, once found

    def push(self, token: int) -> tuple[str, bool]:
        return self._advance(self.text_stream.feed(token), final=False)

    def finish(self) -> str:
        """The rest once generation ended without a separator (EOS, max tokens, full context)."""
        return self._advance(self.text_stream.flush(), final=True)[0]

    def _advance(self, new: str, final: bool) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += new
        if not self.started:
            lead = len(self.text) - len(self.text.lstrip())
            self.shown = max(self.shown, lead)
            self.started = lead < len(self.text)
        sep = self.separator
        cut = self.text.find(sep, max(0, self.shown - len(sep))) if sep else -1
        if cut >= 0:
            self.stopped, self.answer_chars = True, cut
            end = len(self.text[:cut].rstrip())
        elif final:
            self.stopped, self.answer_chars = True, len(self.text)
            end = len(self.text.rstrip())
        else:
            end = len(self.text) - _held(self.text, sep)
            end = min(end, len(self.text[:end].rstrip()))
        piece = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece, self.stopped


def _held(text: str, sep: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `sep`."""
    for n in range(min(len(sep) - 1, len(text)), 0, -1):
        if text.endswith(sep[:n]):
            return n
    return 0
