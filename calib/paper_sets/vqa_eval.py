"""VQA accuracy as the official VQA evaluation computes it (VizWiz, VQAv2, TextVQA).

Reference: GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (Agrawal et al.), the
script the VQAv2 and VizWiz servers run. Rewritten here from its description; behaviour kept, quirks too:

    prediction   newlines/tabs -> spaces, strip
                 punctuation: each of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  is deleted when the
                   text has it next to a space (or has a digit,digit group anywhere), else replaced by
                   a space; then a period not followed by a digit is deleted (at most 32 of them)
                 lower case, words: number words zero..ten and "none" -> digits, articles a/an/the
                   dropped, apostrophe-less contractions restored ("dont" -> "don't")
    references   stripped; the punctuation step only, and only when the annotators disagree
    accuracy     for each of the n references left out in turn: min(1, matches among the other n-1 / 3);
                 the mean over the n (the "10 choose 9" average): k matching references of 10 give
                 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, >= 4
"""

from __future__ import annotations

import re

from tinygptv_edge.runtime.errors import ConfigError

_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # the official script passes re.UNICODE (= 32) as re.sub's count
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions the official table restores, written with their apostrophes: each key of the table is
# the form with exactly one apostrophe left out ("couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTED_TEXT = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
    "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've"
)
_CONTRACTED = _CONTRACTED_TEXT.split()
# The official table's irregular entries that a lower-cased word can reach: "somebody'd" is mapped
# the wrong way round (to "somebodyd"); its "I'm"-style keys are capitalized and never match.
_IRREGULAR = {"somebody'd": "somebodyd"}


def _contractions() -> dict[str, str]:
    table = {}
    for full in _CONTRACTED:
        for i, ch in enumerate(full):
            if ch == "'":
                table[full[:i] + full[i + 1 :]] = full
    table.update(_IRREGULAR)
    return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring)."""
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower case; number words -> digits; articles dropped; contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_prediction(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, references) -> float:
    """Official VQA accuracy of one prediction against the human answers (usually 10)."""
    refs = [r.replace("\n", " ").replace("\t", " ").strip() for r in references]
    if len(refs) < 2:
        raise ConfigError(f"vqa_accuracy: expected at least 2 human answers, got {len(refs)}")
    if len(set(refs)) > 1:
        refs = [process_punctuation(r) for r in refs]
    pred = normalize_prediction(prediction)
    matches = sum(r == pred for r in refs)
    # leaving out a matching reference leaves matches - 1, any other leaves matches
    total = sum(min(1.0, (matches - (r == pred)) / 3.0) for r in refs)
    return total / len(refs)
