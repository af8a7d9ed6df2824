"""Constrained JSON answers always parse (issue #30): a free string closes where the model would end its
turn, the separator never enters an answer, a model's first word survives the structure the grammar puts
before it, unbounded strings and arrays get default bounds, and the budget closes what is still open.

The "model" here is a scripted logits function over the shipped model's tokenizer (torch-free): the
tests pin the steering rules, the grid in bench/json_validity.py measures them on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="the serve extra is not installed (pip install -e '.[serve]')")
jsonschema = pytest.importorskip("jsonschema")

from tinygptv_edge.export.checkpoints.default import default_model_dir  # noqa: E402
from tinygptv_edge.runtime.sampling import GREEDY, Sampler, SamplingConfig  # noqa: E402
from tinygptv_edge.runtime.serve.grammar import MAX_ITEMS, MAX_STRING, Grammars, bounded  # noqa: E402
from tinygptv_edge.runtime.serve.schema import ResponseFormat  # noqa: E402
from tinygptv_edge.runtime.text.detok import TokenBytes  # noqa: E402
from tinygptv_edge.runtime.text.tokenizer import Tokenizer  # noqa: E402

SEP = "###"
FREE = {
    "type": "object",
    "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["animal", "count"],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(default_model_dir() / "tokenizer.json")


@pytest.fixture(scope="module")
def grammars(tok) -> Grammars:
    return Grammars(tok, SEP)


def fmt(schema: dict | None) -> ResponseFormat:
    if schema is None:
        return ResponseFormat.model_validate({"type": "json_object"})
    return ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    )


def run(tok, constraint, prefer, max_new_tokens=300, sampling=GREEDY) -> tuple[str, str]:
    """Decode under `constraint` with a scripted model: `prefer(text_so_far, step)` names the texts the
    model likes, best first (their tokens get logits 10, 9, ...; every other token 0). Returns the answer
    and why it stopped (as Turn does: 'eos', 'constraint' or 'max_new_tokens')."""
    table = TokenBytes(tok).table
    ids_of: dict[bytes, int] = {}
    for i, b in enumerate(table):
        ids_of.setdefault(b, i)
    sampler, out = Sampler(sampling.replace(max_new_tokens=max_new_tokens)), []
    for step in range(max_new_tokens):
        logits = np.zeros(tok.vocab_size)
        text = b"".join(table[i] for i in out).decode("utf-8", "replace")
        for rank, piece in enumerate(prefer(text, step)):
            key = piece.encode() if piece != "<eos>" else None
            i = tok.eos_id if key is None else ids_of[key]
            logits[i] = 10.0 - rank
        token = sampler(logits, out, constraint.allowed(logits))
        if token == tok.eos_id:
            return text, "eos"
        constraint.accept(token)
        out.append(token)
        if constraint.done():
            return b"".join(table[i] for i in out).decode(), "constraint"
    return b"".join(table[i] for i in out).decode("utf-8", "replace"), "max_new_tokens"


def ends_turn_after(words: list[str]):
    """A model that says `words` one token each, then wants to end its turn with the separator."""

    def prefer(text: str, step: int) -> list[str]:
        said = [w for w in words if w in text]
        rest = [w for w in words if w not in said]
        return [rest[0], SEP] if rest else [SEP, "<eos>", "our"]

    return prefer


def test_a_free_string_closes_where_the_model_ends_its_turn(tok, grammars):
    """Before: the separator is valid string content, so the string never closed (`"ree shapes ...###our
    ###our...`, finish_reason length). Now the string closes, the object completes, nothing of `###`."""
    text, stop = run(tok, grammars.for_format(fmt(FREE), 300), ends_turn_after(["f", "our"]))
    assert stop == "constraint" and SEP not in text
    obj = json.loads(text)
    jsonschema.validate(obj, FREE)
    assert obj["animal"] == "four"


def test_the_first_word_survives_the_structure_the_grammar_puts_first(tok, grammars):
    """The model starts its answer ('f', 'our') at the first step, where the grammar needs `{"animal": "`:
    that token comes once the string opens, instead of the model's next guess ('ree' of 'three')."""

    def prefer(text: str, step: int) -> list[str]:
        if text.endswith('"animal": "'):
            return ["ree", "f"]  # the model, confused by JSON, would now continue a word it never began
        if text.endswith('"animal": '):
            return ["f", "our"]  # where the grammar needs the opening quote, the model begins its answer
        return ["our", SEP] if text.endswith('"f') else [SEP, "<eos>"]

    text, _ = run(tok, grammars.for_format(fmt(FREE), 300), prefer)
    assert json.loads(text)["animal"].startswith("f")


def test_the_separator_never_appears_inside_an_answer(tok, grammars):
    def prefer(text: str, step: int) -> list[str]:  # a model that keeps saying the separator
        return [SEP, "#", "##", "our"] if step % 2 else ["our", SEP]

    for schema in (
        FREE,
        None,
        {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}},
    ):
        text, stop = run(tok, grammars.for_format(fmt(schema), 120), prefer, max_new_tokens=120)
        assert "#" not in text and stop in ("constraint", "eos"), text
        json.loads(text)


def test_near_the_budget_only_closing_tokens_follow(tok, grammars):
    """A model that never wants to end: the answer still closes within max_tokens (no `length`)."""

    def prefer(text: str, step: int) -> list[str]:
        return ["our", " shapes", "f"]

    for schema in (FREE, None):
        text, stop = run(tok, grammars.for_format(fmt(schema), 80), prefer, max_new_tokens=80)
        assert stop in ("constraint", "eos"), (schema, text)
        json.loads(text)


def test_sampled_answers_parse_too(tok, grammars):
    def prefer(text: str, step: int) -> list[str]:
        return ["our", SEP, "f", " shapes", "<eos>"]

    for seed in range(5):
        s = SamplingConfig(do_sample=True, temperature=1.5, seed=seed)
        text, stop = run(tok, grammars.for_format(fmt(FREE), 300), prefer, sampling=s)
        assert stop in ("constraint", "eos") and SEP not in text
        jsonschema.validate(json.loads(text), FREE)


def test_unbounded_strings_and_arrays_get_default_bounds():
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "named": {"type": "string", "enum": ["a"]},
            "short": {"type": "string", "maxLength": 4},
            "list": {"type": "array", "items": {"type": ["string", "null"]}},
            "nested": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        },
    }
    got = bounded(schema)
    p = got["properties"]
    assert (
        p["free"]["maxLength"] == MAX_STRING
        and "maxLength" not in p["named"]
        and p["short"]["maxLength"] == 4
    )
    assert p["list"]["maxItems"] == MAX_ITEMS and p["list"]["items"]["maxLength"] == MAX_STRING
    assert p["nested"]["anyOf"][0]["maxLength"] == MAX_STRING and "maxLength" not in p["nested"]["anyOf"][1]
    assert "maxLength" not in schema["properties"]["free"]  # a copy: the request's schema is untouched
