"""VSR, Visual Spatial Reasoning (Liu et al. 2023) as released: a split's jsonl + COCO 2017 images.

    {split}.jsonl    {"image": "000000085637.jpg", "caption": "The cat is on the bed.", "label": 1,
                      "relation": "on", ...} per line
    images/          the image files, directly or under train2017/ and val2017/ (where the COCO
                     archives put them; TinyGPT-V's evaluation looks in both)

Scored by accuracy: the generated answer is read as true (starts with "true"/"yes") or false
("false"/"no"); anything else counts as wrong. Breakdown by relation.
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
    label01,
    nonempty,
    pick_images,
    read_jsonl,
)

SUBFOLDERS = ("", "train2017", "val2017")


def read(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    path = Path(path)
    rows = read_jsonl(path, "vsr annotations")
    folder = pick_images(path.parent, images, ("images", ""), "vsr")
    items = []
    for n, (where, obj) in enumerate(rows):
        name = field(obj, "image", str, where)
        cands = [image_path(folder / sub if sub else folder, name, where) for sub in SUBFOLDERS]
        rel = obj.get("relation")
        items.append(
            PaperItem(
                qid=str(n),
                image=next((c for c in cands if Path(c).is_file()), cands[0]),
                question=field(obj, "caption", str, where).strip(),
                label=label01(obj, "label", where),
                qtype=rel if isinstance(rel, str) and rel else "all",
            )
        )
    check_images(nonempty(items, path, "vsr"), "vsr")
    return PaperSet("vsr", path, folder, items, task)
