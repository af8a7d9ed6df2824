"""Readers for the data sets TinyGPT-V reports scores on (GQA, VSR, IconQA, VizWiz, Hateful Memes) and the
VQAv2/TextVQA layout, each with its official metric and its evaluation prompt (one table below).

    load_paper_set("gqa", "testdev_balanced_questions.json") -> PaperSet (items + Task)

Prompts: the question text TinyGPT-V's evaluation feeds the model (`minigpt4/datasets/datasets/
vqa_datasets.py`, the *EvalData classes used by `eval_scripts/eval_vqa.py`); the model's own
template (from the GGUF) wraps it, as `prepare_texts` wraps it with the conversation template there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinygptv_edge.runtime.errors import EvalSetError

from . import gqa, hateful_memes, iconqa, vizwiz, vqa, vsr
from .base import PaperItem, PaperSet, Task

_SRC = "TinyGPT-V minigpt4/datasets/datasets/vqa_datasets.py"
SHORT = "[vqa] Based on the image, respond to this question with a short answer: {question}"


@dataclass(frozen=True)
class Spec:
    reader: Callable[..., PaperSet]
    task: Task
    label: str  # the column title in the table


PAPER_SETS: dict[str, Spec] = {
    "gqa": Spec(gqa.read, Task("generate", "exact_match", SHORT, f"{_SRC} GQAEvalData"), "GQA"),
    "vsr": Spec(
        vsr.read,
        Task(
            "generate",
            "accuracy",
            "[vqa] Based on the image, is this statement true or false? {question}",
            f"{_SRC} VSREvalData",
        ),
        "VSR",
    ),  # fmt: skip
    "iconqa": Spec(iconqa.read, Task("choice", "accuracy", SHORT, f"{_SRC} IconQAEvalData"), "IconQA"),
    "vizwiz": Spec(
        vizwiz.read,
        Task(
            "generate",
            "vqa_accuracy",
            "[vqa] The question is '{question}' Based on the image, answer the question with a "
            "single word or phrase. and reply 'unanswerable' when the provided information is "
            "insufficient",
            f"{_SRC} VizWizEvalData",
        ),
        "VizWiz",
    ),  # fmt: skip
    "hateful_memes": Spec(
        hateful_memes.read,
        Task(
            "yes_no",
            "auroc",
            "This is an image writting '{question}'. Is this image hateful? Answer yes or no. Answer:",
            f"{_SRC} HMEvalData (wording as written there)",
        ),
        "HM",
    ),  # fmt: skip
    "vqav2": Spec(
        vqa.read_vqav2,
        Task("generate", "vqa_accuracy", SHORT, f"{_SRC} OKVQAEvalData (the VQA-style prompt)"),
        "VQAv2",
    ),  # fmt: skip
    "textvqa": Spec(
        vqa.read_textvqa,
        Task("generate", "vqa_accuracy", SHORT, f"{_SRC} OKVQAEvalData (the VQA-style prompt)"),
        "TextVQA",
    ),  # fmt: skip
}


def load_paper_set(name: str, path: str | Path, images: str | Path | None = None) -> PaperSet:
    """Read paper set `name` from `path` (its annotation file or folder; see each module)."""
    spec = PAPER_SETS.get(name)
    if spec is None:
        raise EvalSetError(f"paper set: expected one of {', '.join(PAPER_SETS)}, got {name!r}")
    return spec.reader(path, spec.task, images)


def parse_paper_args(values: list[str] | None, strip: bool = True) -> dict[str, str]:
    """["gqa=PATH", ...] -> {"gqa": "PATH"}; each name once (`strip`: trim the value's spaces)."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep or not path.strip():
            raise EvalSetError(
                f"--paper-set: expected NAME=PATH (NAME one of {', '.join(PAPER_SETS)}), got {v!r}"
            )
        if name not in PAPER_SETS:
            raise EvalSetError(f"--paper-set: expected NAME one of {', '.join(PAPER_SETS)}, got {name!r}")
        if name in out:
            raise EvalSetError(f"--paper-set: expected each paper set once, got {name} twice")
        out[name] = path.strip() if strip else path
    return out


__all__ = ["PAPER_SETS", "PaperSet", "PaperItem", "Spec", "Task", "load_paper_set", "parse_paper_args"]
