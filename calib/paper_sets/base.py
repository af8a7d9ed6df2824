"""What every paper-set reader returns, and the checks the readers share.

    annotation file(s) as the official release ships them --reader--> PaperSet
        items: PaperItem(qid, image path, question, answers, choices, label, qtype), in file order
        task:  how a model answers (generate | choice | yes_no) and how it is scored (scoring.py)

Readers check every field they use and raise EvalSetError naming the file, the record, the field,
what was expected and what was found. Nothing is downloaded: a missing file is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from tinygptv_edge.runtime.errors import EvalSetError

ANSWER_KINDS = ("generate", "choice", "yes_no")
METRICS = ("exact_match", "accuracy", "vqa_accuracy", "auroc")


@dataclass(frozen=True)
class Task:
    """How one paper set is answered and scored; `prompt` gets the item's fields by name."""

    kind: str  # generate: greedy text | choice: lowest mean NLL of each choice | yes_no: P(yes) vs P(no)
    metric: str  # headline metric (scoring.py); yes_no also reports accuracy
    prompt: str  # e.g. "[vqa] Based on the image, respond to this question with a short answer: {question}"
    source: str  # where the prompt wording comes from

    def __post_init__(self) -> None:
        if self.kind not in ANSWER_KINDS:
            raise EvalSetError(f"task kind: expected one of {', '.join(ANSWER_KINDS)}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise EvalSetError(f"task metric: expected one of {', '.join(METRICS)}, got {self.metric!r}")
        if "{question}" not in self.prompt:
            raise EvalSetError(f"task prompt: expected a {{question}} field, got {self.prompt!r}")


@dataclass(frozen=True)
class PaperItem:
    qid: str  # the release's question / problem / meme id
    image: str  # absolute path of the image file
    question: str  # question, caption (VSR) or meme text (Hateful Memes)
    answers: tuple[str, ...] = ()  # reference answers: 1 (GQA), 10 human answers (VQA-style)
    choices: tuple[str, ...] = ()  # multiple choice (IconQA)
    label: int = -1  # binary label (VSR, Hateful Memes) or index of the right choice (IconQA)
    qtype: str = "all"  # breakdown key (answer type, question type, relation)


@dataclass
class PaperSet:
    name: str
    source: Path  # the annotation file or folder the user pointed at
    images: Path  # the image folder used
    items: list[PaperItem]
    task: Task

    @property
    def sha256(self) -> str:
        """Hash of the items as read (ids, texts, answers, labels, image paths relative to `images`)."""
        h = hashlib.sha256()
        for it in self.items:
            rel = os.path.relpath(it.image, self.images)
            h.update(
                json.dumps([it.qid, rel, it.question, it.answers, it.choices, it.label, it.qtype]).encode()
            )
        return h.hexdigest()

    def select(self, limit: int | None = None, sample: int | None = None, seed: int = 0) -> PaperSet:
        """The first `limit` items, or `sample` items drawn without replacement (seeded, file order kept)."""
        if limit is not None and sample is not None:
            raise EvalSetError("select: expected --limit or --sample, got both")
        items = self.items
        if limit is not None:
            if limit < 1:
                raise EvalSetError(f"{self.name}: expected a limit >= 1, got {limit}")
            items = items[:limit]
        elif sample is not None:
            if sample < 1:
                raise EvalSetError(f"{self.name}: expected a sample size >= 1, got {sample}")
            if sample < len(items):
                keep = np.sort(np.random.default_rng(seed).choice(len(items), sample, replace=False))
                items = [items[i] for i in keep]
        return PaperSet(self.name, self.source, self.images, list(items), self.task)


# -- shared checks -------------------------------------------------------------------------------------
def read_json(path: Path, what: str):
    if not path.is_file():
        raise EvalSetError(f"{what}: expected the file {path}, found none")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalSetError(f"{path}: expected JSON, found invalid JSON ({e})") from e


def read_jsonl(path: Path, what: str) -> list[tuple[str, dict]]:
    """(where, object) per non-empty line; `where` is "file:line" for error messages."""
    if not path.is_file():
        raise EvalSetError(f"{what}: expected the file {path}, found none")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalSetError(f"{where}: expected a JSON object, found invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise EvalSetError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        out.append((where, obj))
    return out


def field(obj: dict, key: str, kind: type | tuple[type, ...], where: str):
    """obj[key], checked to be of `kind` (a str must be non-empty); bool is not an int here."""
    if not isinstance(obj, dict):
        raise EvalSetError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise EvalSetError(
            f"{where}: expected field {key!r}, found none (fields: {', '.join(map(str, obj))})"
        )
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok or (isinstance(v, str) and not v.strip()):
        names = " or ".join("non-empty string" if k is str else k.__name__ for k in kinds)
        raise EvalSetError(f"{where}: field {key!r}: expected {names}, found {v!r}")
    return v


def label01(obj: dict, key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, str) and v.strip() in ("0", "1"):
        v = int(v)
    if isinstance(v, bool) or v not in (0, 1):
        raise EvalSetError(f"{where}: field {key!r}: expected 0 or 1, found {v!r}")
    return int(v)


def image_path(folder: Path, rel: object, where: str, key: str = "image") -> str:
    """folder / rel, refusing absolute paths and '..' (the release names files inside its folder)."""
    if not isinstance(rel, str) or not rel.strip():
        raise EvalSetError(f"{where}: field {key!r}: expected an image file name, found {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise EvalSetError(f"{where}: field {key!r}: expected a path inside {folder}, found {rel!r}")
    return str(folder / p)


def pick_images(source: Path, images: str | Path | None, candidates: tuple[str, ...], what: str) -> Path:
    """The image folder: the one given, else the first candidate (relative to `source`) that exists."""
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise EvalSetError(f"{what}: expected an image folder at {folder}, found none")
        return folder
    tried = [source / c if c else source for c in candidates]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise EvalSetError(f"{what}: expected an image folder at {' or '.join(map(str, tried))}, found none")


def check_images(items: list[PaperItem], what: str) -> None:
    """Every named image exists (checked up front: a run of hours should not stop at item 9000)."""
    missing = [it for it in items if not Path(it.image).is_file()]
    if missing:
        it = missing[0]
        raise EvalSetError(
            f"{what}: item {it.qid} names image {it.image}, found no such file "
            f"({len(missing)} missing in all)"
        )


def nonempty(items: list[PaperItem], path: Path, what: str) -> list[PaperItem]:
    if not items:
        raise EvalSetError(f"{what}: expected at least one item in {path}, found none")
    return items
