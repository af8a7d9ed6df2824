"""GQA (Hudson & Manning 2019) as released: `{split}_questions.json` + `images/`.

    questions JSON   {"<question id>": {"imageId": "n161313", "question": "...", "answer": "no",
                                        "types": {"structural": "verify", ...}, ...}, ...}
    images/          <imageId>.jpg (the release's images.zip)

Scored by exact match of the normalized answer (lower case, spaces and end punctuation trimmed);
breakdown by the structural type (verify, query, choose, logical, compare).
"""

from __future__ import annotations

from pathlib import Path

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


def read(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    path = Path(path)
    doc = read_json(path, "gqa questions")
    if not isinstance(doc, dict):
        raise_type(path, doc)
    folder = pick_images(path.parent, images, ("images",), "gqa")
    items = []
    for qid, q in doc.items():
        where = f"{path}: question {qid}"
        types = q.get("types") if isinstance(q, dict) else None
        qtype = types.get("structural") if isinstance(types, dict) else None
        items.append(
            PaperItem(
                qid=str(qid),
                image=image_path(folder, f"{field(q, 'imageId', str, where)}.jpg", where, "imageId"),
                question=field(q, "question", str, where).strip(),
                answers=(field(q, "answer", str, where).strip(),),
                qtype=qtype if isinstance(qtype, str) and qtype else "all",
            )
        )
    check_images(nonempty(items, path, "gqa"), "gqa")
    return PaperSet("gqa", path, folder, items, task)


def raise_type(path: Path, doc) -> None:
    from tinygptv_edge.runtime.errors import EvalSetError

    raise EvalSetError(
        f"{path}: expected a JSON object of questions by id (GQA release), found {type(doc).__name__}"
    )
