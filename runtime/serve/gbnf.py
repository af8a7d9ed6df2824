"""llama-server's `grammar` field: a GBNF grammar as a `GrammarConstraint`, through llguidance.

    GBNF text --llguidance.grammar_from("gbnf", ...) (GBNF -> Lark)--> grammar --GrammarConstraint-->

Kept beside grammar.py (the JSON constraints), which it reuses and does not change.
"""

from __future__ import annotations

import llguidance as llg

from .errors import BadRequest
from .grammar import GrammarConstraint, Grammars


def gbnf_constraint(grammars: Grammars, gbnf: str) -> GrammarConstraint:
    """A constraint for a GBNF grammar (llama.cpp's grammars/README.md syntax; Lark is accepted too)."""
    try:
        grammar = llg.grammar_from("gbnf", gbnf)
    except ValueError as e:
        raise BadRequest(f"grammar: {e}", "grammar", "invalid_grammar") from None
    problem = llg.LLMatcher.validate_grammar(grammar, grammars.tokenizer)
    if problem:
        raise BadRequest(f"grammar: {problem}", "grammar", "invalid_grammar")
    try:
        return GrammarConstraint(grammars.tokenizer, grammar)
    except BadRequest as e:
        raise BadRequest(
            e.message.replace("response_format", "grammar", 1), "grammar", "invalid_grammar"
        ) from None
