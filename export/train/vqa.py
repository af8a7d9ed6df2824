"""Synthetic visual question answering: shapes on backgrounds, drawn with PIL, deterministic by seed.

    seed, split, index --rng--> Scene (1-4 shapes, distinct colours, a background kind)
                          --render--> PIL image (size x size, drawn at 2x and downsampled)
                          --ask-----> one question per type that the scene can answer

Every image comes from its own random stream `(seed, split, index)`, so the splits never share an
image and any item can be regenerated alone. Question types (`QTYPES`): colour, shape, count,
position (left/right, top/bottom of the image), relation (left/right of, above/below another shape),
exists (yes/no) and caption ("two shapes on a noisy background"); each has several phrasings.
Answers are one to a few words, lower case.

The same generator writes calibration images (`write_calibration_images`) for INT8 and imatrix runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tinygptv_edge.runtime.errors import ConfigError

COLOURS = {  # name -> RGB; saturated, far apart in hue, all far from the greyish backgrounds
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 220, 30),
    "purple": (160, 50, 210),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("plain", "gradient", "noisy", "striped")
NUMBERS = ("zero", "one", "two", "three", "four")
SPLITS = {"train": 0, "validation": 1, "test": 2, "calibration": 3}
LAYOUTS = ("grid", "free")
QTYPES = ("colour", "shape", "count", "position", "relation", "exists", "caption")

PHRASINGS = {
    "colour": (
        "What colour is the {s}?",
        "What is the colour of the {s}?",
        "Which colour does the {s} have?",
    ),
    "shape": ("What shape is the {c} object?", "What is the {c} shape?", "Name the shape of the {c} object."),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "position_x": (
        "Is the {c} {s} on the left or the right?",
        "Which side of the image is the {c} {s} on?",
        "Is the {c} {s} in the left or right half?",
    ),
    "position_y": (
        "Is the {c} {s} at the top or the bottom?",
        "Is the {c} {s} in the top or bottom half?",
        "Where is the {c} {s}, top or bottom?",
    ),
    "relation_x": (
        "Is the {c} {s} left or right of the {c2} {s2}?",
        "Is the {c} {s} to the left or to the right of the {c2} {s2}?",
        "Which side of the {c2} {s2} is the {c} {s} on?",
    ),
    "relation_y": (
        "Is the {c} {s} above or below the {c2} {s2}?",
        "Is the {c} {s} higher or lower than the {c2} {s2}?",
        "Is the {c} {s} over or under the {c2} {s2}?",
    ),
    "exists": ("Is there a {c} {s}?", "Does the image contain a {c} {s}?", "Can you see a {c} {s}?"),
    "caption": ("Describe the image briefly.", "Give a short caption.", "What does the image show?"),
}
# relation_y phrasings answer in their own words
_Y_WORDS = {0: ("above", "below"), 1: ("higher", "lower"), 2: ("over", "under")}


@dataclass(frozen=True)
class VQAConfig:
    """Scene and drawing settings; positions and radii are fractions of the image side."""

    image_size: int = 128
    min_shapes: int = 1
    max_shapes: int = 4
    layout: str = "grid"  # "grid": one shape per cell of a grid x grid layout, jittered; "free": anywhere
    grid: int = 4
    jitter: float = 0.03  # grid layout: centre offset from the cell centre, up to this
    min_radius: float = 0.08
    max_radius: float = 0.13
    min_center_gap: float = 0.8  # centres at least this times (r1 + r2) apart: overlaps stay partial
    position_margin: float = 0.1  # |x - 0.5| (or y) at least this for a position question
    relation_margin: float = 0.12  # |x1 - x2| (or y) at least this for a relation question

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 4096:
            raise ConfigError(f"VQAConfig.image_size: expected 16..4096, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes <= 4:
            raise ConfigError(
                "VQAConfig: expected 1 <= min_shapes <= max_shapes <= 4, "
                f"got {self.min_shapes}, {self.max_shapes}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"VQAConfig.layout: expected one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "grid" and not self.max_shapes <= self.grid * self.grid:
            raise ConfigError(
                f"VQAConfig: a {self.grid}x{self.grid} grid holds fewer than {self.max_shapes} shapes"
            )
        if not 0 < self.min_radius <= self.max_radius < 0.25:
            raise ConfigError(
                "VQAConfig: expected 0 < min_radius <= max_radius < 0.25, "
                f"got {self.min_radius}, {self.max_radius}"
            )


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, fraction of the width (0 = left)
    y: float  # centre, fraction of the height (0 = top)
    r: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in drawing order: later ones cover earlier ones
    background: str


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    scene: Scene
    qas: tuple[QA, ...]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def make_scene(rng: np.random.Generator, cfg: VQAConfig) -> Scene:
    """Draw 1-4 shapes with distinct colours; centres far enough apart that overlaps stay partial.

    The grid layout puts each shape in its own cell (jittered, so neighbours can still touch or
    overlap a little); the free layout places centres anywhere.
    """
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    if cfg.layout == "grid":
        cells = rng.choice(cfg.grid * cfg.grid, size=n, replace=False)
        grid_shapes = []
        for colour, cell in zip(colours, cells, strict=True):
            r = float(rng.uniform(cfg.min_radius, cfg.max_radius))
            row, col = divmod(int(cell), cfg.grid)
            x, y = ((v + 0.5) / cfg.grid + float(rng.uniform(-cfg.jitter, cfg.jitter)) for v in (col, row))
            grid_shapes.append(Shape(str(rng.choice(SHAPES)), str(colour), x, y, r))
        return Scene(tuple(grid_shapes), str(rng.choice(BACKGROUNDS)))
    shapes: list[Shape] = []
    while len(shapes) < n:
        for _ in range(200):
            r = float(rng.uniform(cfg.min_radius, cfg.max_radius))
            x, y = (float(v) for v in rng.uniform(r, 1 - r, size=2))
            if all(np.hypot(x - s.x, y - s.y) >= cfg.min_center_gap * (r + s.r) for s in shapes):
                kind = str(rng.choice(SHAPES))
                shapes.append(Shape(kind, str(colours[len(shapes)]), x, y, r))
                break
        else:  # crowded: start over with the same count
            shapes = []
    return Scene(tuple(shapes), str(rng.choice(BACKGROUNDS)))


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 greyish background: low saturation, value 25..165."""
    base = rng.uniform(25, 165) + rng.uniform(-15, 15, size=3)  # (3,) slight tint
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        other = rng.uniform(25, 165) + rng.uniform(-15, 15, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        img = base * (1 - t) + other * t
    elif kind == "noisy":
        img = img + rng.normal(0, rng.uniform(10, 25), size=(size, size, 1))
    elif kind == "striped":
        period = rng.uniform(0.06, 0.15) * size
        yy, xx = np.mgrid[0:size, 0:size]
        coord = xx if rng.random() < 0.5 else yy
        if rng.random() < 0.3:
            coord = xx + yy
        img = img + np.where((coord // period) % 2 == 0, 1.0, -1.0)[..., None] * rng.uniform(12, 25)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, s: Shape, size: int, fill: tuple[int, ...] | int | None = None) -> None:
    cx, cy, r = s.x * size, s.y * size, s.r * size
    fill = COLOURS[s.colour] if fill is None else fill
    if s.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.kind == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif s.kind == "triangle":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill
        )
    elif s.kind == "cross":
        w = r * 0.32
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ConfigError(f"unknown shape kind {s.kind!r}: expected one of {', '.join(SHAPES)}")


def render(scene: Scene, cfg: VQAConfig, rng: np.random.Generator) -> Image.Image:
    """Draw at twice the size, then downsample (LANCZOS) for smooth edges."""
    big = 2 * cfg.image_size
    img = Image.fromarray(_background(scene.background, big, rng), "RGB")
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw(draw, s, big)
    return img.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)


def shape_mask(scene: Scene, size: int) -> np.ndarray:
    """(size, size) uint8: 1 + the index of the shape on top at each pixel, 0 for background."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(scene.shapes):
        _draw(draw, s, size, fill=i + 1)
    return np.asarray(img)


def ask(scene: Scene, rng: np.random.Generator, cfg: VQAConfig) -> tuple[QA, ...]:
    """One question per type the scene can answer unambiguously, phrasing drawn from `rng`."""
    shapes = scene.shapes

    def phrase(key: str) -> tuple[int, str]:
        i = int(rng.integers(len(PHRASINGS[key])))
        return i, PHRASINGS[key][i]

    def pick(items):
        return items[int(rng.integers(len(items)))]

    qas: list[QA] = []
    kinds = [s.kind for s in shapes]
    unique_kind = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique_kind:
        s = pick(unique_kind)
        qas.append(QA(phrase("colour")[1].format(s=s.kind), s.colour, "colour"))
    s = pick(shapes)
    qas.append(QA(phrase("shape")[1].format(c=s.colour), s.kind, "shape"))
    qas.append(QA(phrase("count")[1], NUMBERS[len(shapes)], "count"))

    options = [(s, "x") for s in shapes if abs(s.x - 0.5) >= cfg.position_margin]
    options += [(s, "y") for s in shapes if abs(s.y - 0.5) >= cfg.position_margin]
    if options:
        s, axis = pick(options)
        if axis == "x":
            q, a = phrase("position_x")[1], "left" if s.x < 0.5 else "right"
        else:
            q, a = phrase("position_y")[1], "top" if s.y < 0.5 else "bottom"
        qas.append(QA(q.format(c=s.colour, s=s.kind), a, "position"))

    pairs = []
    for a in shapes:
        for b in shapes:
            if a is not b:
                if abs(a.x - b.x) >= cfg.relation_margin:
                    pairs.append((a, b, "x"))
                if abs(a.y - b.y) >= cfg.relation_margin:
                    pairs.append((a, b, "y"))
    if pairs:
        a, b, axis = pick(pairs)
        if axis == "x":
            _, q = phrase("relation_x")
            ans = "left" if a.x < b.x else "right"
        else:
            i, q = phrase("relation_y")
            ans = _Y_WORDS[i][0] if a.y < b.y else _Y_WORDS[i][1]
        qas.append(QA(q.format(c=a.colour, s=a.kind, c2=b.colour, s2=b.kind), ans, "relation"))

    present = {(s.colour, s.kind) for s in shapes}
    if rng.random() < 0.5:
        c, k = pick(sorted(present))
    else:  # a hard negative half the time: a colour or a kind that is in the image
        s = pick(shapes)
        absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
        near = [(c, k) for c, k in absent if c == s.colour or k == s.kind]
        c, k = pick(near if near and rng.random() < 0.7 else absent)
    qas.append(QA(phrase("exists")[1].format(c=c, s=k), "yes" if (c, k) in present else "no", "exists"))

    n = len(shapes)
    caption = f"{NUMBERS[n]} shape{'s' if n > 1 else ''} on a {scene.background} background"
    qas.append(QA(phrase("caption")[1], caption, "caption"))
    return tuple(qas)


def sample(split: str, index: int, seed: int = 0, cfg: VQAConfig | None = None) -> Sample:
    """Image `index` of `split`, its scene and its questions; the same arguments give the same sample."""
    cfg = cfg or VQAConfig()
    rng = _rng(seed, split, index)
    scene = make_scene(rng, cfg)
    image = render(scene, cfg, rng)
    return Sample(image, scene, ask(scene, rng, cfg))


def iter_samples(split: str, n_images: int, seed: int = 0, cfg: VQAConfig | None = None) -> Iterator[Sample]:
    for i in range(n_images):
        yield sample(split, i, seed, cfg)


def iter_vqa(
    split: str, n_images: int, seed: int = 0, cfg: VQAConfig | None = None
) -> Iterator[tuple[Image.Image, str, str, str]]:
    """(image, question, answer, qtype) for every question of the first `n_images` images of `split`."""
    for s in iter_samples(split, n_images, seed, cfg):
        for qa in s.qas:
            yield s.image, qa.question, qa.answer, qa.qtype


def vocabulary_text() -> list[str]:
    """Every word the questions and answers can use, one phrase per line (for tokenizer training)."""
    lines = [p for ps in PHRASINGS.values() for p in ps]
    names = [*COLOURS, *SHAPES, *BACKGROUNDS, *NUMBERS, "yes", "no", "left", "right", "top", "bottom"]
    lines += [f"{a} {b}" for a in names for b in names[:10]]
    return lines


def write_calibration_images(
    folder: str | Path, n: int, seed: int = 0, cfg: VQAConfig | None = None
) -> list[Path]:
    """Write `n` PNGs of the calibration split into `folder` (each written to a temp name, then renamed)."""
    if n <= 0:
        raise ConfigError(f"write_calibration_images: expected n > 0, got {n}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"calib_{i:05d}.png"
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder, prefix=".tmp_")
        os.close(fd)
        try:
            sample("calibration", i, seed, cfg).image.save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
    return paths
