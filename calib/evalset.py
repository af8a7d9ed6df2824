"""Evaluation sets for the report: images with questions and reference answers.

A folder in this format (any source; the default is written from the synthetic VQA test split):

    folder/
      questions.jsonl     one JSON object per line:
                          {"image": "img_00000.png", "question": "What colour is the circle?",
                           "answer": "red", "type": "colour",       # "type" optional ("all")
                           "split": "test-phrasing"}                # "split" optional ("all")
      img_00000.png ...   paths in "image" are relative to the folder (no "..", no absolute paths)

Several questions may share an image; each image is decoded once. "split" names a part of the set
(the VQA generator's evaluation splits: test, test-phrasing, test-layout, test-camera); the report
gives exact match per split and says on which one a level starts to drop. The set's hash (sha256 over
questions.jsonl and every image it names, in order) goes into the report's provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from tinygptv_edge.runtime.errors import EvalSetError

QUESTIONS = "questions.jsonl"
DEFAULT_TYPE = "all"
DEFAULT_SPLIT = "all"


@dataclass(frozen=True)
class EvalItem:
    image: str  # relative path inside the folder; also the image's key
    question: str
    answer: str
    qtype: str = DEFAULT_TYPE
    split: str = DEFAULT_SPLIT


@dataclass
class EvalSet:
    folder: Path
    items: list[EvalItem]
    sha256: str

    @property
    def images(self) -> list[str]:
        """Distinct image keys in first-use order."""
        return list(dict.fromkeys(it.image for it in self.items))

    @property
    def types(self) -> list[str]:
        return sorted({it.qtype for it in self.items})

    @property
    def splits(self) -> list[str]:
        """Distinct split names in first-use order (["all"] for a set without splits)."""
        return list(dict.fromkeys(it.split for it in self.items))

    def load_image(self, key: str) -> Image.Image:
        from tinygptv_edge.runtime.vision.images import load_image

        return load_image(self.folder / key)


def _check_rel(rel: object, where: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise EvalSetError(f'{where}: expected "image" to be a relative path, got {rel!r}')
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise EvalSetError(f"{where}: expected an image path inside the folder, got {rel!r}")
    return rel


def parse_line(line: str, where: str) -> EvalItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalSetError(f"{where}: expected a JSON object, got invalid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise EvalSetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("image", "question", "answer") if k not in obj]
    if missing:
        raise EvalSetError(f"{where}: expected keys image, question, answer; missing {', '.join(missing)}")
    for k in ("question", "answer"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise EvalSetError(f"{where}: expected a non-empty string for {k!r}, got {obj[k]!r}")
    qtype = obj.get("type", DEFAULT_TYPE)
    if not isinstance(qtype, str) or not qtype:
        raise EvalSetError(f"{where}: expected a non-empty string for 'type', got {qtype!r}")
    split = obj.get("split", DEFAULT_SPLIT)
    if not isinstance(split, str) or not split.strip():
        raise EvalSetError(f"{where}: expected a non-empty string for 'split', got {split!r}")
    return EvalItem(
        _check_rel(obj["image"], where), obj["question"].strip(), obj["answer"].strip(), qtype, split.strip()
    )


def load_evalset(folder: str | Path, limit: int | None = None) -> EvalSet:
    """Read and check a folder (every named image must exist); `limit` keeps the first questions."""
    folder = Path(folder)
    qfile = folder / QUESTIONS
    if not qfile.is_file():
        raise EvalSetError(f"evaluation set: expected {QUESTIONS} in {folder}, found none")
    if limit is not None and limit < 1:
        raise EvalSetError(f"evaluation set: expected a question limit >= 1, got {limit}")
    items = []
    for n, line in enumerate(qfile.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            items.append(parse_line(line, f"{qfile}:{n}"))
    if not items:
        raise EvalSetError(f"evaluation set: expected at least one question in {qfile}, found none")
    items = items[:limit] if limit else items
    h = hashlib.sha256()
    for it in items:
        row = [it.image, it.question, it.answer, it.qtype]  # the split only where given: old hashes stay
        h.update(json.dumps(row + ([it.split] if it.split != DEFAULT_SPLIT else [])).encode())
    for key in dict.fromkeys(it.image for it in items):
        path = folder / key
        if not path.is_file():
            raise EvalSetError(f"evaluation set: {qfile} names image {key!r}, not found in {folder}")
        h.update(path.read_bytes())
    return EvalSet(folder, items, h.hexdigest())


def write_evalset(folder: str | Path, rows) -> Path:
    """Write (PIL image, question, answer, type[, split]) rows as a folder; an image object shared by
    consecutive rows is written once. Published atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        lines, last, name = [], None, ""
        for image, question, answer, qtype, *split in rows:
            if image is not last:
                name = f"img_{len({ln['image'] for ln in lines}):05d}.png"
                image.save(tmp / name, format="PNG")
                last = image
            line = {"image": name, "question": question, "answer": answer, "type": qtype}
            lines.append(line | ({"split": split[0]} if split else {}))
        if not lines:
            raise EvalSetError("write_evalset: expected at least one row, got none")
        (tmp / QUESTIONS).write_text("".join(json.dumps(ln) + "\n" for ln in lines), encoding="utf-8")
        load_evalset(tmp)  # verify before publishing
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def write_vqa_evalset(folder: str | Path, n_images: int, split: str = "test", seed: int = 0) -> Path:
    """The synthetic VQA split (export/train/vqa.py) as an evaluation folder: every question of `n_images`."""
    try:
        from tinygptv_edge.export.train import vqa
    except ImportError as e:
        raise EvalSetError(
            "the synthetic VQA generator (export/train/vqa.py) is not available: give an evaluation folder"
        ) from e
    return write_evalset(folder, vqa.iter_vqa(split, n_images, seed))


def write_vqa_splits(folder: str | Path, n_images: int, splits: list[str], seed: int = 0) -> Path:
    """Several of the generator's evaluation splits (`vqa.EVAL_SPLITS`: test, test-phrasing,
    test-layout, test-camera) as one folder, every question of `n_images` images each, rows tagged
    with their split."""
    try:
        from tinygptv_edge.export.train import vqa
    except ImportError as e:
        raise EvalSetError(
            "the synthetic VQA generator (export/train/vqa.py) is not available: give an evaluation folder"
        ) from e
    if not splits:
        raise EvalSetError("write_vqa_splits: expected at least one split, got none")
    for name in splits:
        if name not in vqa.EVAL_SPLITS:
            raise EvalSetError(f"VQA split: expected one of {', '.join(vqa.EVAL_SPLITS)}, got {name!r}")

    def rows():
        for name in splits:
            stream, cfg = vqa.EVAL_SPLITS[name]
            for s in vqa.iter_samples(stream, n_images, seed, cfg):
                for qa in s.qas:
                    yield s.image, qa.question, qa.answer, qa.qtype, name

    return write_evalset(folder, rows())
