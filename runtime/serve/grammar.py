"""Constrained decoding for `response_format` json_object / json_schema, on llguidance.

    tokenizer (the GGUF's BPE, as tokenizers JSON) --LLTokenizer (once)--+
    JSON schema --grammar_from_json_schema--> grammar --LLMatcher (per answer)--> bitmask per step

llguidance (the library llama.cpp and onnxruntime-genai use) computes, for each step, which tokens can
continue a string the grammar accepts; `Sampler` drops the rest, so every finished answer parses and
validates. Whitespace between JSON tokens is fixed (", " and ": "): a small model given the freedom
fills it with newlines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import llguidance as llg
import numpy as np

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


class GrammarConstraint:
    """A `runtime.sampling.TokenConstraint` over one llguidance matcher."""

    def __init__(self, tokenizer: llg.LLTokenizer, grammar: str):
        self.matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise BadRequest(
                f"response_format: {self.matcher.get_error()}", "response_format", "invalid_schema"
            )
        self.n_vocab = tokenizer.vocab_size

    def allowed(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ServerError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    def done(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    """Builds constraints for one tokenizer (the LLTokenizer is made once)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = llg.LLTokenizer(
            tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id
        )

    def schema_grammar(self, schema: dict[str, Any]) -> str:
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise BadRequest(f"response_format: {e}", "response_format", "invalid_schema") from None
        problem = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise BadRequest(f"response_format: {problem}", "response_format", "invalid_schema")
        return grammar

    def for_format(self, fmt: ResponseFormat | None) -> GrammarConstraint | None:
        """The constraint a response_format asks for (None: free text)."""
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
        return GrammarConstraint(self.tokenizer, self.schema_grammar(schema))
