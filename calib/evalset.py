"""Evaluation sets for the report: images with questions and reference answers.

A folder in this format (any source; the default is written from the synthetic VQA test split):

    folder/
      questions.jsonl     one JSON object per line:
                          {"image": "img_00000.png", "question": "What colour is the circle?",
                           "answer": "red", "type": "colour",       # "type" optional ("all")
                           "split": "test-phrasing"}                # "split" optional ("all")
      img_00000.png ...   paths in "image" are relative to the folder (no "..", no absolute paths)

A conversation is consecutive lines with the same "conversation" id (an int) and "turn" 1, 2, ...;
"attach" (default true) says whether the image goes with that turn or the turn is text only (its
"image" is then the conversation's image so far; a greeting before any image names the first one).
Each turn is asked after the earlier turns of its conversation with their reference answers, laid
out as the runtime's `Chat` holds a conversation sent back whole (`Chat.add_turn`).

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
    conversation: int | None = None  # an id shared by the turns of one conversation, in order
    turn: int = 1
    attach: bool = True  # the image goes with this turn (False: a text-only turn)


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
    conv, turn, attach = obj.get("conversation"), obj.get("turn", 1), obj.get("attach", True)
    if conv is not None and (not isinstance(conv, int) or isinstance(conv, bool)):
        raise EvalSetError(f"{where}: expected an integer 'conversation' id, got {conv!r}")
    if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
        raise EvalSetError(f"{where}: expected 'turn' to be an integer >= 1, got {turn!r}")
    if not isinstance(attach, bool):
        raise EvalSetError(f"{where}: expected 'attach' to be true or false, got {attach!r}")
    if conv is None and (turn != 1 or not attach):
        raise EvalSetError(f"{where}: 'turn' and 'attach' belong to a 'conversation'")
    return EvalItem(
        _check_rel(obj["image"], where),
        obj["question"].strip(),
        obj["answer"].strip(),
        qtype,
        split.strip(),
        conv,
        turn,
        attach,
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
    _check_conversations(items, qfile)
    h = hashlib.sha256()
    for it in items:
        row = [it.image, it.question, it.answer, it.qtype]  # the split only where given: old hashes stay
        row += [it.split] if it.split != DEFAULT_SPLIT else []
        row += [it.conversation, it.turn, it.attach] if it.conversation is not None else []
        h.update(json.dumps(row).encode())
    for key in dict.fromkeys(it.image for it in items):
        path = folder / key
        if not path.is_file():
            raise EvalSetError(f"evaluation set: {qfile} names image {key!r}, not found in {folder}")
        h.update(path.read_bytes())
    return EvalSet(folder, items, h.hexdigest())


def _check_conversations(items: list[EvalItem], qfile: Path) -> None:
    """A conversation's turns are consecutive lines numbered 1, 2, ...; an id is used once."""
    done: set[int] = set()
    last: EvalItem | None = None
    for n, it in enumerate(items, 1):
        if it.conversation is not None:
            cont = last is not None and last.conversation == it.conversation
            if it.turn != (last.turn + 1 if cont and last is not None else 1) or (
                not cont and it.conversation in done
            ):
                raise EvalSetError(
                    f"{qfile}: question {n}: expected conversation {it.conversation}'s turns as consecutive "
                    f"lines numbered from 1, got turn {it.turn}"
                )
            done.add(it.conversation)
        last = it


def write_evalset(folder: str | Path, rows) -> Path:
    """Write (PIL image, question, answer, type[, split[, extra]]) rows as a folder; an image object
    named by several rows is written once (`extra`: more keys of the line, e.g. a conversation's).
    Published atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        lines: list[dict] = []
        names: dict[int, tuple[object, str]] = {}  # id -> (the image, kept alive so ids stay unique; name)
        for image, question, answer, qtype, *more in rows:
            if id(image) not in names:
                name = f"img_{len(names):05d}.png"
                image.save(tmp / name, format="PNG")
                names[id(image)] = (image, name)
            line = {"image": names[id(image)][1], "question": question, "answer": answer, "type": qtype}
            lines.append(line | ({"split": more[0]} if more else {}) | (more[1] if len(more) > 1 else {}))
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
            if name in vqa.CONVERSATION_SPLITS:
                yield from conversation_rows(name, n_images, seed)
                continue
            for s in vqa.iter_samples(stream, n_images, seed, cfg):
                for qa in s.qas:
                    yield s.image, qa.question, qa.answer, qa.qtype, name

    return write_evalset(folder, rows())


def conversation_rows(name: str, n_images: int, seed: int = 0):
    """A conversation split (`vqa.CONVERSATION_SPLITS`) as evaluation rows: every turn of every
    conversation, the first turns tagged `name`, the later ones `name-followups`; then the follow-up
    image questions again, each alone (a first turn with its image), tagged `name-alone`. The report's
    exact match per split then compares follow-ups in a conversation with the same questions alone."""
    from tinygptv_edge.export.train import vqa

    stream, cfg = vqa.EVAL_SPLITS[name]
    samples = list(vqa.iter_samples(stream, n_images, seed, cfg))
    convs = vqa.conversations([s.qas for s in samples], stream, seed, 1.0, vqa.CONVERSATION_SPLITS[name])
    alone = []
    for c, conv in enumerate(convs):
        current = conv.image  # a text-only turn names the conversation's image so far
        for k, t in enumerate(conv.turns):
            if t.attach is not None:
                current = t.attach
            split = name if k == 0 else f"{name}-followups"
            extra = {"conversation": c, "turn": k + 1, "attach": t.attach is not None}
            yield samples[current].image, t.question, t.answer, t.qtype, split, extra
            if k > 0 and t.about is not None:
                alone.append((samples[t.about].image, t.question, t.answer, t.qtype, f"{name}-alone"))
    yield from alone
