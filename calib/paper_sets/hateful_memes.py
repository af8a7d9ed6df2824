"""Hateful Memes (Kiela et al. 2020) as released: `{split}.jsonl` beside the `img/` folder.

    dev_seen.jsonl   {"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."} per line
                     ("img" is relative to the jsonl's folder)

Answered from the logits, not by sampling: at the first answer position,
P(yes) / (P(yes) + P(no)) with each side summed over the first tokens of "yes"/"Yes" and "no"/"No".
Scored by AUROC of that probability against the label (the challenge's metric), with the accuracy
of P(yes) > 0.5 beside it.
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


def read(path: str | Path, task: Task, images: str | Path | None = None) -> PaperSet:
    path = Path(path)
    rows = read_jsonl(path, "hateful memes annotations")
    folder = pick_images(path.parent, images, ("",), "hateful_memes")
    items = []
    for where, obj in rows:
        mid = field(obj, "id", (int, str), where)
        items.append(
            PaperItem(
                qid=str(mid),
                image=image_path(folder, field(obj, "img", str, where), where, "img"),
                question=field(obj, "text", str, where).strip(),
                label=label01(obj, "label", where),
            )
        )
    check_images(nonempty(items, path, "hateful_memes"), "hateful_memes")
    return PaperSet("hateful_memes", path, folder, items, task)
