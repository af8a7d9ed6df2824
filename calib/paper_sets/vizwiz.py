"""VizWiz-VQA (Gurari et al. 2018) as released: `Annotations/{split}.json` + `{split}/` images.

    {split}.json     [{"image": "VizWiz_val_00000000.jpg", "question": "...", "answers":
                       [{"answer": "unanswerable", "answer_confidence": "yes"}, ... 10],
                       "answer_type": "unanswerable", "answerable": 0}, ...]
    images           {split}/ (the archive's folder) beside the JSON or one level up, or images/

Scored by VQA accuracy (vqa_eval.py); "unanswerable" is an answer like any other, and the prompt asks
for it. Breakdown by answer type (other, yes/no, number, unanswerable).
"""

from __future__ import annotations

from pathlib import Path

from tinygptv_edge.runtime.errors import EvalSetError

from .base import (
    PaperItem,
    PaperSet,
    Task,
    check_images,
    field,
    image_path,
    nonempty,
    pick_images,
    read_json,
)


def answers_of(obj: dict, where: str) -> tuple[str, ...]:
    raw = field(obj, "answers", list, where)
    out = []
    for i, a in enumerate(raw):
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise EvalSetError(f"{where}: answers[{i}]: expected an answer string, found {a!r}")
        out.append(text)
    if len(out) < 2:
        raise EvalSetError(f"{where}: field 'answers': expected the human answers (10), found {len(out)}")
    return tuple(out)


def read(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    path = Path(path)
    doc = read_json(path, "vizwiz annotations")
    if not isinstance(doc, list):
        raise EvalSetError(
            f"{path}: expected a JSON list of questions (VizWiz release), found {type(doc).__name__}"
        )
    stem = path.stem
    folder = pick_images(path.parent, images, (stem, f"../{stem}", "images", ""), "vizwiz")
    items = []
    for n, obj in enumerate(doc):
        where = f"{path}: item {n}"
        atype = obj.get("answer_type") if isinstance(obj, dict) else None
        name = field(obj, "image", str, where)
        items.append(
            PaperItem(
                qid=Path(name).stem,
                image=image_path(folder, name, where),
                question=field(obj, "question", str, where).strip(),
                answers=answers_of(obj, where),
                qtype=atype if isinstance(atype, str) and atype else "all",
            )
        )
    check_images(nonempty(items, path, "vizwiz"), "vizwiz")
    return PaperSet("vizwiz", path, folder, items, task)
