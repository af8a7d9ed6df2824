"""IconQA (Lu et al. 2021), multiple-choice text sub-task as released: one folder per problem.

    iconqa_data/iconqa/{split}/choose_txt/<problem id>/data.json   {"question": "...",
                                         "choices": ["3", "5"], "answer": 1, "ques_type": "choose_txt", ...}
                                       /<problem id>/image.png
Point the report at `{split}/choose_txt` (or at `{split}`; its choose_txt folder is used).

Answered as TinyGPT-V's `multi_select` does: each choice is scored by the mean negative log-likelihood
of its tokens (and the turn separator) after the prompt; the lowest wins. Scored by accuracy.
"""

from __future__ import annotations

from pathlib import Path

from tinygptv_edge.runtime.errors import EvalSetError

from .base import PaperItem, PaperSet, Task, check_images, field, nonempty, read_json

SUBTASK = "choose_txt"


def _order(p: Path):
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def read(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    path = Path(path)
    if (path / SUBTASK).is_dir():
        path = path / SUBTASK
    if not path.is_dir():
        raise EvalSetError(f"iconqa: expected a folder of problem folders at {path}, found none")
    if images is not None:
        raise EvalSetError(
            "iconqa: expected no separate image folder (each problem folder holds its image.png)"
        )
    items = []
    for prob in sorted((p for p in path.iterdir() if p.is_dir()), key=_order):
        data = prob / "data.json"
        obj = read_json(data, "iconqa problem")
        where = str(data)
        kind = obj.get("ques_type", SUBTASK) if isinstance(obj, dict) else SUBTASK
        if kind != SUBTASK:
            raise EvalSetError(f"{where}: field 'ques_type': expected {SUBTASK!r}, found {kind!r}")
        choices = field(obj, "choices", list, where)
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise EvalSetError(
                f"{where}: field 'choices': expected >= 2 non-empty strings, found {choices!r}"
            )
        answer = field(obj, "answer", int, where)
        if not 0 <= answer < len(choices):
            raise EvalSetError(
                f"{where}: field 'answer': expected a choice index 0..{len(choices) - 1}, found {answer}"
            )
        items.append(
            PaperItem(
                qid=prob.name,
                image=str(prob / "image.png"),
                question=field(obj, "question", str, where).strip(),
                choices=tuple(c.strip() for c in choices),
                label=answer,
                answers=(choices[answer].strip(),),
            )
        )
    check_images(nonempty(items, path, "iconqa"), "iconqa")
    return PaperSet("iconqa", path, path, items, task)
