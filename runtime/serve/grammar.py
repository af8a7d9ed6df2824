"""Constrained decoding for `response_format` json_object / json_schema, on llguidance.

    tokenizer (the GGUF's BPE, as tokenizers JSON) --LLTokenizer (once)--+
    JSON schema --bounded (default lengths)--> grammar --LLMatcher (per answer)--> bitmask per step
    bitmask + the model's logits --steer--> the tokens the sampler may choose from

llguidance (the library llama.cpp and onnxruntime-genai use) computes, for each step, which tokens can
continue a string the grammar accepts; `Sampler` drops the rest, so every finished answer parses and
validates. Whitespace between JSON tokens is fixed (", " and ": "): a small model given the freedom
fills it with newlines.

A grammar alone lets a free string run on: the model ends its turn with the separator (`###`) or EOS,
both valid string content, and the answer grows until `max_tokens` cuts it (`finish_reason: length`,
invalid JSON). So the mask is steered by the model's own logits (`GrammarConstraint.allowed`):

    separator pieces and EOS   never inside the answer (EOS only once the grammar accepts)
    the model would end        (its most likely token ends the turn) -> only closing tokens among
                               those the grammar allows: `"` inside a string, `}` or `]` outside,
                               so the JSON closes instead
    structure first            the model's most likely token is not allowed (it begins its answer
                               where the grammar needs `{"a": "`): that token, if the grammar allows
                               it at the next step, is taken there, so the answer keeps its first word
    budget                     within RESERVE tokens of `max_tokens`, closing tokens only

and strings and arrays a schema leaves unbounded get default bounds (`bounded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance as llg
import numpy as np

from ..text.detok import TokenBytes
from ..text.tokenizer import Tokenizer
from .errors import BadRequest, ServerError
from .schema import ResponseFormat

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


MAX_STRING = 128  # characters of a string whose schema sets no maxLength, enum, const or pattern
MAX_ITEMS = 16  # items of an array whose schema sets no maxItems
RESERVE = 32  # tokens before max_tokens from which only closing tokens may follow


def bounded(schema: Any) -> Any:
    """A copy of a JSON schema in which every unbounded string and array gets a default bound."""
    if isinstance(schema, list):
        return [bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) for k, v in schema.items()}
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and not {"maxLength", "enum", "const", "pattern", "format"} & out.keys():
        out["maxLength"] = MAX_STRING
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = MAX_ITEMS
    return out


@dataclass(frozen=True)
class Vocabulary:
    """Which token ids end a turn and which close JSON structure, for one tokenizer and separator."""

    table: list[bytes]  # id -> bytes
    ends: np.ndarray  # (V,) bool: EOS, and tokens holding the separator or a piece of it
    close_string: np.ndarray  # (V,) bool: tokens that begin with `"` (inside a string: its end)
    close_value: np.ndarray  # (V,) bool: tokens that begin with `}` or `]` (outside strings)
    eos: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, separator: str) -> Vocabulary:
        table = TokenBytes(tokenizer).table
        sep = separator.encode("utf-8")
        pieces = {sep[i:j] for i in range(len(sep)) for j in range(i + 1, len(sep) + 1)}
        ends = np.array([bool(b) and (sep in b or b in pieces) for b in table])
        close_string = np.array([b[:1] == b'"' for b in table])
        close_value = np.array([b[:1] in (b"}", b"]") for b in table])
        ends[tokenizer.eos_id] = True
        return cls(table, ends, close_string, close_value, tokenizer.eos_id)


class GrammarConstraint:
    """A `runtime.sampling.TokenConstraint` over one llguidance matcher, steered by the model's logits
    (the module docstring says how)."""

    def __init__(
        self,
        tokenizer: llg.LLTokenizer,
        grammar: str,
        vocab: Vocabulary | None = None,  # None: the grammar's mask alone (GBNF: no JSON to close)
        budget: int | None = None,
    ):
        self.matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise BadRequest(
                f"response_format: {self.matcher.get_error()}", "response_format", "invalid_schema"
            )
        self.n_vocab = tokenizer.vocab_size
        self.vocab, self.budget, self.used = vocab, budget, 0
        self.postponed: int | None = None  # the model's choice at the last step structure was forced
        self.in_string = self.escaped = False  # where the answer so far stands (JSON: `"` toggles)

    def grammar_mask(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def allowed(self, logits: np.ndarray) -> np.ndarray:
        grammar = self.grammar_mask()
        v = self.vocab
        if v is None:
            return grammar
        n = min(grammar.size, v.ends.size)
        mask = grammar.copy()
        mask[:n] &= ~v.ends[:n]
        eos_ok = v.eos < grammar.size and bool(grammar[v.eos]) and self.matcher.is_accepting()
        if eos_ok:
            mask[v.eos] = True  # a complete answer may end
        if not mask.any():
            return grammar  # only an end token continues the grammar: let it
        top = int(np.argmax(np.asarray(logits).reshape(-1)[: mask.size]))
        wants_to_end = top < v.ends.size and bool(v.ends[top])
        wanted, self.postponed = self.postponed, None
        near_budget = self.budget is not None and self.used >= self.budget - RESERVE
        if wants_to_end or near_budget:
            closing = mask.copy()
            closing[:n] &= (v.close_string if self.in_string else v.close_value)[:n]
            if eos_ok:
                closing[v.eos] = True
            if closing.any():
                return closing
        if not mask[top] and not wants_to_end:  # structure comes first: keep what the model wanted
            self.postponed = top
            return mask
        if wanted is not None and mask[wanted] and not v.ends[wanted]:
            only = np.zeros_like(mask)
            only[wanted] = True
            return only
        return mask

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ServerError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.used += 1
        table = self.vocab.table if self.vocab is not None else []
        for c in table[token] if token < len(table) else b"":
            if self.escaped:
                self.escaped = False
            elif c == 0x5C and self.in_string:  # backslash
                self.escaped = True
            elif c == 0x22:  # quote
                self.in_string = not self.in_string

    def done(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    """Builds constraints for one tokenizer (the LLTokenizer is made once)."""

    def __init__(self, tokenizer: Tokenizer, separator: str):
        self.tokenizer = llg.LLTokenizer(
            tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id
        )
        self.vocab = Vocabulary.of(tokenizer, separator)

    def schema_grammar(self, schema: dict[str, Any]) -> str:
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(bounded(schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise BadRequest(f"response_format: {e}", "response_format", "invalid_schema") from None
        problem = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise BadRequest(f"response_format: {problem}", "response_format", "invalid_schema")
        return grammar

    def for_format(self, fmt: ResponseFormat | None, budget: int | None = None) -> GrammarConstraint | None:
        """The constraint a response_format asks for (None: free text); `budget`: the answer's max_tokens."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        elif fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
            schema = fmt.json_schema.schema_
        else:  # plan_chat (schema.py) refuses it first
            raise BadRequest(
                "response_format.json_schema.schema: required for type json_schema",
                "response_format.json_schema",
                "invalid_value",
            )
        return GrammarConstraint(self.tokenizer, self.schema_grammar(schema), self.vocab, budget)
