"""The VQAv2 layout (questions JSON + annotations JSON + COCO images), and TextVQA.

VQAv2 (Goyal et al. 2017), a folder holding one file of each:
    v2_OpenEnded_mscoco_{sub}_questions.json  {"data_subtype": "val2014", "questions":
                                               [{"question_id": 1, "image_id": 42, "question": "..."}]}
    v2_mscoco_{sub}_annotations.json          {"annotations": [{"question_id": 1, "image_id": 42,
                                               "answers": [{"answer": "2", ...} x10],
                                               "answer_type": "number"}]}
    images                                    {sub}/COCO_{sub}_{image_id:012d}.jpg (or images/...)
TextVQA (Singh et al. 2019): the same folder layout, or its own single file
    TextVQA_0.5.1_{split}.json                {"data": [{"question_id": 1, "image_id": "abc",
                                               "question": "...",
                                               "answers": ["...", x10]}]}, images train_images/{image_id}.jpg

Scored by VQA accuracy (vqa_eval.py); breakdown by answer type where the annotations give one.
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
from .vizwiz import answers_of


def _one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise EvalSetError(f"{what}: expected one file matching {pattern} in {folder}, found {names}")
    return found[0]


def read_vqa_layout(folder: Path, name: str, task: Task, images: str | Path | None) -> PaperSet:
    if not folder.is_dir():
        raise EvalSetError(
            f"{name}: expected a folder with a questions and an annotations JSON at {folder}, found none"
        )
    qfile = _one(folder, "*questions*.json", name)
    afile = _one(folder, "*annotations*.json", name)
    qdoc, adoc = read_json(qfile, f"{name} questions"), read_json(afile, f"{name} annotations")
    questions = field(qdoc, "questions", list, str(qfile))
    anns = {}
    for n, a in enumerate(field(adoc, "annotations", list, str(afile))):
        anns[field(a, "question_id", (int, str), f"{afile}: annotation {n}")] = (n, a)
    sub = qdoc.get("data_subtype", "")
    if not isinstance(sub, str):
        raise EvalSetError(
            f"{qfile}: field 'data_subtype': expected a string such as 'val2014', found {sub!r}"
        )
    pics = pick_images(folder, images, tuple(c for c in (sub, "images", "") if c or c == ""), name)
    items = []
    for n, q in enumerate(questions):
        where = f"{qfile}: question {n}"
        qid = field(q, "question_id", (int, str), where)
        if qid not in anns:
            raise EvalSetError(f"{where}: question_id {qid}: expected an annotation in {afile}, found none")
        k, a = anns[qid]
        img = field(q, "image_id", (int, str), where)
        file = f"COCO_{sub}_{int(img):012d}.jpg" if sub and isinstance(img, int) else f"{img}.jpg"
        atype = a.get("answer_type")
        items.append(
            PaperItem(
                qid=str(qid),
                image=image_path(pics, file, where, "image_id"),
                question=field(q, "question", str, where).strip(),
                answers=answers_of(a, f"{afile}: annotation {k}"),
                qtype=atype if isinstance(atype, str) and atype else "all",
            )
        )
    check_images(nonempty(items, qfile, name), name)
    return PaperSet(name, folder, pics, items, task)


def read_vqav2(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    return read_vqa_layout(Path(path), "vqav2", task, images)


def read_textvqa(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    path = Path(path)
    if path.is_dir():
        return read_vqa_layout(path, "textvqa", task, images)
    doc = read_json(path, "textvqa annotations")
    data = field(doc, "data", list, str(path))
    pics = pick_images(path.parent, images, ("train_images", "images", ""), "textvqa")
    items = []
    for n, obj in enumerate(data):
        where = f"{path}: data[{n}]"
        items.append(
            PaperItem(
                qid=str(field(obj, "question_id", (int, str), where)),
                image=image_path(pics, f"{field(obj, 'image_id', str, where)}.jpg", where, "image_id"),
                question=field(obj, "question", str, where).strip(),
                answers=answers_of(obj, where),
            )
        )
    check_images(nonempty(items, path, "textvqa"), "textvqa")
    return PaperSet("textvqa", path, pics, items, task)
