"""Synthetic visual question answering: shapes on backgrounds, drawn with PIL, deterministic by seed.

    seed, split, index --rng--> Scene (1-4 shapes, distinct colours, a background kind; grid or free)
                          --render--> PIL image (size x size, drawn at 2x and downsampled)
                          --ask-----> one question per type that the scene can answer
                       --wording rng--> its phrasing (phrasings.py: classic, train or held-out)
                       --camera rng---> optionally a camera frame (non-square, blur, noise, JPEG)

Every image comes from its own random stream `(seed, split, index)`, so the splits never share an
image and any item can be regenerated alone. Question types (`QTYPES`): colour, shape, count,
position (left/right, top/bottom of the image), relation (left/right of, above/below another shape),
exists (yes/no) and caption ("two shapes on a noisy background"). Answers are one to a few words,
lower case, always of the question's type. `DATASETS` names the scene settings training draws from
(classic, varied); `EVAL_SPLITS` the evaluation splits (test, test-phrasing, test-layout, test-camera).

The same generator writes calibration images (`write_calibration_images`) for INT8 and imatrix runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tinygptv_edge.export.train.phrasings import CLASSIC, SETS, noise, surface
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
LAYOUTS = ("grid", "free", "mixed")
QTYPES = ("colour", "shape", "count", "position", "relation", "exists", "caption")

PHRASINGS = {k: tuple(t for t, _ in v) for k, v in CLASSIC.items()}  # the test split's wording
PHRASING_SETS = tuple(SETS)
CAMERA_FRAMES = ((640, 480), (480, 640), (800, 600), (1280, 720), (720, 1280), (480, 480))
EXISTS_MODES = ("one", "pair")
CAMERA_STYLES = ("v1", "v2", "pad43")


@dataclass(frozen=True)
class VQAConfig:
    """Scene and drawing settings; positions and radii are fractions of the image side."""

    image_size: int = 128
    min_shapes: int = 1
    max_shapes: int = 4
    layout: str = "grid"  # "grid": one shape per cell of a grid x grid layout, jittered; "free": anywhere;
    # "mixed": grid or free, half the images each (grid radii capped at 0.52 / grid)
    grid: int = 4
    jitter: float = 0.03  # grid layout: centre offset from the cell centre, up to this
    min_radius: float = 0.08
    max_radius: float = 0.13
    min_center_gap: float = 0.8  # centres at least this times (r1 + r2) apart: overlaps stay partial
    position_margin: float = 0.1  # |x - 0.5| (or y) at least this for a position question
    relation_margin: float = 0.12  # |x1 - x2| (or y) at least this for a relation question
    min_visible: float = 0.6  # free layout: every shape keeps at least this share of its area visible
    phrasings: str = "classic"  # wording: "classic" (the test split's), "train" or "heldout" (phrasings.py)
    camera: float = 0.0  # share of images shown as camera frames (non-square, JPEG, blur, noise)
    word_noise: float = 0.0  # share of non-classic questions with one word made up, dropped or added
    exists: str = "one"  # "one": one exists question (half yes, half a hard or any absent object);
    # "pair": also the opposite answer, the absent object sharing a colour or a kind with a present one
    camera_style: str = "v1"  # "v1": the first camera chain; "v2": more 4:3 padding, stronger blur and
    # noise, exposure and white balance (`camera_frame`)
    noisy_sigma: tuple[float, float] = (10.0, 25.0)  # a "noisy" background's pixel noise, drawn in this range

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
        if self.phrasings not in PHRASING_SETS:
            raise ConfigError(
                f"VQAConfig.phrasings: expected one of {', '.join(PHRASING_SETS)}, got {self.phrasings!r}"
            )
        if self.exists not in EXISTS_MODES:
            raise ConfigError(
                f"VQAConfig.exists: expected one of {', '.join(EXISTS_MODES)}, got {self.exists!r}"
            )
        if self.camera_style not in CAMERA_STYLES:
            raise ConfigError(
                f"VQAConfig.camera_style: expected one of {', '.join(CAMERA_STYLES)}, "
                f"got {self.camera_style!r}"
            )
        if not 0 <= self.noisy_sigma[0] <= self.noisy_sigma[1] <= 64:
            raise ConfigError(
                f"VQAConfig.noisy_sigma: expected 0 <= low <= high <= 64, got {self.noisy_sigma}"
            )
        for name in ("min_visible", "camera", "word_noise"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"VQAConfig.{name}: expected 0..1, got {getattr(self, name)}")
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
class Frame:
    """Where the scene lands in the model's square input: x' = ox + sx * x, y' = oy + sy * y.

    The identity for the generator's own square images; a camera frame padded to another aspect
    squeezes the scene along one axis once the runtime resizes the frame to its square input.
    """

    ox: float = 0.0
    oy: float = 0.0
    sx: float = 1.0
    sy: float = 1.0

    def place(self, x: float, y: float) -> tuple[float, float]:
        return self.ox + self.sx * x, self.oy + self.sy * y


IDENTITY = Frame()


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in drawing order: later ones cover earlier ones
    background: str
    frame: Frame = IDENTITY  # where the shapes are in the model's input (scene_targets, shape_mask)


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


# Scene settings by name. "varied" is what training draws from: the training phrasings, grid and free
# layouts, radii 0.05-0.2 (overlaps up to 40% of a shape), 30% of the images as camera frames, 30% of
# the questions with a word made up, dropped or added.
WIDE = {"min_radius": 0.05, "max_radius": 0.2, "min_center_gap": 0.6}
DATASETS = {
    "classic": VQAConfig(),
    "varied": VQAConfig(phrasings="train", layout="mixed", camera=0.3, word_noise=0.3, **WIDE),
}
# Evaluation splits: (generator split, scene settings). Each changes one thing from `test`, whose
# images and questions stay those of the first default models.
EVAL_SPLITS = {
    "test": ("test", VQAConfig()),
    "test-phrasing": ("test", VQAConfig(phrasings="heldout")),  # test's images and questions, reworded
    "test-layout": ("test", VQAConfig(layout="free", **WIDE)),  # shapes anywhere, radii 0.05-0.2
    "test-camera": ("test", VQAConfig(camera=1.0)),  # test's scenes as camera frames
    "test-camera-padded": ("test", VQAConfig(camera=1.0, camera_style="pad43")),  # ... padded into 4:3 frames
    "test-conversation": ("test", VQAConfig()),  # test's questions, 3-4 to a conversation (below)
}


def eval_split(name: str) -> tuple[str, VQAConfig]:
    """(generator split, scene settings) of an evaluation split name (`EVAL_SPLITS`)."""
    if name not in EVAL_SPLITS:
        raise ConfigError(f"unknown evaluation split {name!r}: expected one of {', '.join(EVAL_SPLITS)}")
    return EVAL_SPLITS[name]


_ANSWERS = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "count": set(NUMBERS[1:]),
    "position": {"left", "right", "top", "bottom"},
    "relation": {"left", "right", "above", "below", "higher", "lower", "over", "under"},
    "exists": {"yes", "no"},
    "chat": set(),  # filled below: the small-talk answers
}
_CAPTION = re.compile(rf"(one shape|(two|three|four) shapes) on an? ({'|'.join(BACKGROUNDS)}) background")


def answer_of_type(qtype: str, question: str, answer: str) -> bool:
    """Whether `answer` is an answer of the question's type (right or wrong): a colour for a colour
    question, a number word for a count, one of the options the question names for a relation..."""
    if qtype == "caption":
        return bool(_CAPTION.fullmatch(answer))
    if qtype not in _ANSWERS:
        raise ConfigError(f"unknown question type {qtype!r}: expected one of {', '.join(QTYPES)}")
    if qtype == "relation" and answer not in re.findall(r"\w+", question.lower()):
        return False
    return answer in _ANSWERS[qtype]


# -- conversations ---------------------------------------------------------------------------------
# A conversation is 2-4 questions about one image in one chat (the image attached on the first of
# them; follow-ups text only), sometimes with a text-only greeting first or a "thanks" turn between,
# sometimes with a second image attached mid-conversation and the questions after it about that image.
# The training data (`data.encode_conversations`) and the conversation split lay them out exactly as the
# runtime's `Chat` does. Small talk has its own question type and answers:
CHAT = "chat"
GREETINGS = ("Hello!", "Hi", "hello there", "Hi there!", "Good morning.", "hey", "Hello, can you help me?")
THANKS = ("Thanks!", "thank you", "Thank you.", "thanks a lot", "Great, thanks!", "OK, thank you!")
HELLO_ANSWER = "hello"
THANKS_ANSWER = "you are welcome"
_ANSWERS[CHAT] = {HELLO_ANSWER, THANKS_ANSWER}


@dataclass(frozen=True)
class ConversationConfig:
    """How conversations are drawn (shares are of conversations)."""

    min_questions: int = 2  # questions about images, per conversation
    max_questions: int = 4
    greeting: float = 0.2  # open with a text-only greeting; the image comes with the first question
    thanks: float = 0.2  # a "thanks" turn after one of the answers (also as the last turn)
    second_image: float = 0.25  # a second image attached on a later question; the questions from it on
    # are about the new image

    def __post_init__(self) -> None:
        if not 1 <= self.min_questions <= self.max_questions <= 6:
            raise ConfigError(
                "ConversationConfig: expected 1 <= min_questions <= max_questions <= 6, "
                f"got {self.min_questions}, {self.max_questions}"
            )
        for name in ("greeting", "thanks", "second_image"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"ConversationConfig.{name}: expected 0..1, got {getattr(self, name)}")


# Evaluation splits asked as conversations (every image opens one; `EVAL_SPLITS` names their images):
# accuracy per turn in the conversation and of the same questions asked alone (a first turn with the image).
CONVERSATION_SPLITS = {
    "test-conversation": ConversationConfig(
        min_questions=3, max_questions=4, greeting=0.15, thanks=0.15, second_image=0.3
    )
}


@dataclass(frozen=True)
class ConvTurn:
    question: str
    answer: str
    qtype: str
    attach: int | None  # the image attached on this turn (an index into the samples), or None
    about: int | None  # the image the question is about (None: small talk)


@dataclass(frozen=True)
class Conversation:
    turns: tuple[ConvTurn, ...]

    @property
    def image(self) -> int:
        """The first image attached (every conversation has one)."""
        return next(t.attach for t in self.turns if t.attach is not None)


def conversation(
    qas: Sequence[Sequence[QA]], index: int, rng: np.random.Generator, ccfg: ConversationConfig
) -> Conversation:
    """A conversation about image `index` (and, with a second image, another one), its questions drawn
    without repeats from each image's own questions (`qas[i]`: image i's), in a random order."""
    n_q = int(rng.integers(ccfg.min_questions, ccfg.max_questions + 1))
    second = len(qas) > 1 and n_q >= 2 and rng.random() < ccfg.second_image
    first_qas = list(qas[index])
    order = rng.permutation(len(first_qas))
    if second:
        other = int(rng.integers(len(qas) - 1))
        other += other >= index  # any image but this one
        switch = int(rng.integers(1, n_q))  # the question that comes with the new image
        second_qas = list(qas[other])
        order2 = rng.permutation(len(second_qas))
        picks = [(index, first_qas[i]) for i in order[:switch]]
        picks += [(other, second_qas[i]) for i in order2[: n_q - switch]]
    else:
        picks = [(index, first_qas[i]) for i in order[:n_q]]
    turns: list[ConvTurn] = []
    if rng.random() < ccfg.greeting:
        turns.append(ConvTurn(GREETINGS[int(rng.integers(len(GREETINGS)))], HELLO_ANSWER, CHAT, None, None))
    thanks_after = int(rng.integers(len(picks))) if rng.random() < ccfg.thanks else -1
    attached: set[int] = set()
    for k, (img, qa) in enumerate(picks):
        attach = img if img not in attached else None
        attached.add(img)
        turns.append(ConvTurn(qa.question, qa.answer, qa.qtype, attach, img))
        if k == thanks_after:
            turns.append(ConvTurn(THANKS[int(rng.integers(len(THANKS)))], THANKS_ANSWER, CHAT, None, None))
    return Conversation(tuple(turns))


def conversations(
    qas: Sequence[Sequence[QA]], split: str, seed: int, share: float, ccfg: ConversationConfig
) -> list[Conversation]:
    """A conversation about each image (`qas[i]`: the questions of image i of `split`) with probability
    `share`, each drawn from its own stream (4), so the images and their questions stay the same."""
    out = []
    for i in range(len(qas)):
        rng = _rng(seed, split, i, 4)
        if share >= 1 or rng.random() < share:
            out.append(conversation(qas, i, rng, ccfg))
    return out


def _rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """Stream 0 draws the scene, its pixels and its questions; 1 the wording of non-classic phrasings;
    2 the camera frame; 3 the second exists question (`VQAConfig.exists`); 4 conversations. So a
    split's images and questions stay the same whatever the wording, frame or conversation."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index] + ([stream] if stream else []))


def make_scene(rng: np.random.Generator, cfg: VQAConfig) -> Scene:
    """Draw 1-4 shapes with distinct colours; centres far enough apart that overlaps stay partial.

    The grid layout puts each shape in its own cell (jittered, so neighbours can still touch or
    overlap a little); the free layout places centres anywhere.
    """
    layout = cfg.layout
    if layout == "mixed":
        layout = "grid" if rng.random() < 0.5 else "free"
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    if layout == "grid":
        cells = rng.choice(cfg.grid * cfg.grid, size=n, replace=False)
        grid_shapes = []
        for colour, cell in zip(colours, cells, strict=True):
            r = float(rng.uniform(cfg.min_radius, cfg.max_radius))
            if cfg.layout == "mixed":  # wide radius ranges are for the free half: keep cells apart
                r = min(r, 0.52 / cfg.grid)
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
        if len(shapes) == n and min(visible_shares(Scene(tuple(shapes), "plain"))) < cfg.min_visible:
            shapes = []  # a shape mostly hidden under later ones: its questions would be guesses
    return Scene(tuple(shapes), str(rng.choice(BACKGROUNDS)))


def visible_shares(scene: Scene, size: int = 96) -> list[float]:
    """Per shape, the share of its area that no later shape covers (rasterised at `size`)."""
    mask = shape_mask(scene, size)
    shares = []
    for i, s in enumerate(scene.shapes):
        alone = shape_mask(Scene((s,), "plain"), size)
        shares.append(float((mask == i + 1).sum()) / max(1.0, float(alone.sum())))
    return shares


def _background(
    kind: str, size: int, rng: np.random.Generator, noisy_sigma: tuple[float, float] = (10.0, 25.0)
) -> np.ndarray:
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
        img = img + rng.normal(0, rng.uniform(*noisy_sigma), size=(size, size, 1))
    elif kind == "striped":
        period = rng.uniform(0.06, 0.15) * size
        yy, xx = np.mgrid[0:size, 0:size]
        coord = xx if rng.random() < 0.5 else yy
        if rng.random() < 0.3:
            coord = xx + yy
        img = img + np.where((coord // period) % 2 == 0, 1.0, -1.0)[..., None] * rng.uniform(12, 25)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(
    draw: ImageDraw.ImageDraw,
    s: Shape,
    size: int,
    fill: tuple[int, ...] | int | None = None,
    frame: Frame = IDENTITY,
) -> None:
    x, y = frame.place(s.x, s.y)
    cx, cy, rx, ry = x * size, y * size, frame.sx * s.r * size, frame.sy * s.r * size
    fill = COLOURS[s.colour] if fill is None else fill
    if s.kind == "circle":
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    elif s.kind == "square":
        hx, hy = rx * 0.85, ry * 0.85
        draw.rectangle([cx - hx, cy - hy, cx + hx, cy + hy], fill=fill)
    elif s.kind == "triangle":
        draw.polygon(
            [(cx, cy - ry), (cx + rx * 0.95, cy + ry * 0.75), (cx - rx * 0.95, cy + ry * 0.75)], fill=fill
        )
    elif s.kind == "cross":
        wx, wy = rx * 0.32, ry * 0.32
        draw.rectangle([cx - rx, cy - wy, cx + rx, cy + wy], fill=fill)
        draw.rectangle([cx - wx, cy - ry, cx + wx, cy + ry], fill=fill)
    else:
        raise ConfigError(f"unknown shape kind {s.kind!r}: expected one of {', '.join(SHAPES)}")


def render(scene: Scene, cfg: VQAConfig, rng: np.random.Generator) -> Image.Image:
    """Draw at twice the size, then downsample (LANCZOS) for smooth edges."""
    big = 2 * cfg.image_size
    img = Image.fromarray(_background(scene.background, big, rng, cfg.noisy_sigma), "RGB")
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw(draw, s, big)
    return img.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)


def shape_mask(scene: Scene, size: int) -> np.ndarray:
    """(size, size) uint8: 1 + the index of the shape on top at each pixel of the model's square input
    (the scene placed by its frame), 0 for background."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(scene.shapes):
        _draw(draw, s, size, fill=i + 1, frame=scene.frame)
    return np.asarray(img)


def camera_frame(
    image: Image.Image, rng: np.random.Generator, style: str = "v1"
) -> tuple[Image.Image, Frame]:
    """The square scene as a camera would pass it on: a non-square frame (`CAMERA_FRAMES`), the scene
    either padded (centred, bars of one dark colour) or stretched to it, mild blur and sensor noise,
    then JPEG. Returns the frame and where the scene lands once the frame is resized to a square.

    `style` "v2" (training for camera robustness): the scene padded 60% of the time, 4:3 frames
    (640x480, 800x600) drawn twice as often, blur up to 1.6 px at 480 px, an exposure gain of
    0.7-1.35 and a white balance of 0.85-1.15 per channel, noise up to sigma 8, JPEG quality 40-90.
    "v1" draws exactly what it always drew (the shipped model's data); "pad43" is v1 with every scene
    padded into a 4:3 frame (640x480 or 800x600), the camera split's hardest case."""
    import io

    from PIL import ImageFilter

    if style not in CAMERA_STYLES:
        raise ConfigError(f"camera_frame: expected style one of {', '.join(CAMERA_STYLES)}, got {style!r}")
    v2 = style == "v2"
    if style == "pad43":
        w, h = ((640, 480), (800, 600))[int(rng.integers(2))]
    elif v2:
        weights = np.array([2.0 if w * 3 == h * 4 else 1.0 for w, h in CAMERA_FRAMES])
        w, h = CAMERA_FRAMES[int(rng.choice(len(CAMERA_FRAMES), p=weights / weights.sum()))]
    else:
        w, h = CAMERA_FRAMES[int(rng.integers(len(CAMERA_FRAMES)))]
    if rng.random() < (0.6 if v2 else 0.5) or style == "pad43":
        side = min(w, h)
        ox, oy = (w - side) // 2, (h - side) // 2
        bar = tuple(int(v) for v in rng.integers(0, 70) + rng.integers(0, 12, size=3))
        out = Image.new("RGB", (w, h), bar)
        out.paste(image.resize((side, side), Image.Resampling.BICUBIC), (ox, oy))
        frame = Frame(ox / w, oy / h, side / w, side / h)
    else:
        out, frame = image.resize((w, h), Image.Resampling.BICUBIC), IDENTITY
    out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.6 if v2 else 1.2)) * min(w, h) / 480))
    sigma = float(rng.uniform(0.0, 8.0 if v2 else 6.0))
    pixels = np.asarray(out, dtype=np.float32)
    if v2:  # exposure and white balance, as an auto-exposed, auto-balanced camera gets them slightly wrong
        gain = float(rng.uniform(0.7, 1.35)) * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
        pixels = pixels * gain
    pixels = pixels + sigma * rng.standard_normal((h, w, 1), dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(
        buf, format="JPEG", quality=int(rng.integers(40 if v2 else 50, 91))
    )
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB"), frame


def ask(
    scene: Scene,
    rng: np.random.Generator,
    cfg: VQAConfig,
    wording: np.random.Generator | None = None,
    extra: np.random.Generator | None = None,
) -> tuple[QA, ...]:
    """One question per type the scene can answer unambiguously; what is asked is drawn from `rng`,
    the phrasing (`cfg.phrasings`, other than classic) from `wording` (default: `rng`).

    `cfg.exists == "pair"`: a second exists question with the other answer, drawn from `extra` (its own
    stream, so the other questions stay those of "one"): for a "yes", an absent object that shares a
    colour or a kind with a present one; for a "no", a present object."""
    shapes = scene.shapes
    words = wording or rng  # the wording's own stream (non-classic phrasings)

    def phrase(key: str) -> tuple[str, tuple[str, str] | None]:
        i = int(rng.integers(len(CLASSIC[key])))  # drawn for every wording: the scene stream stays the same
        if cfg.phrasings == "classic":
            return CLASSIC[key][i]
        table = SETS[cfg.phrasings][key]
        text, answer_words = table[int(words.integers(len(table)))]
        return surface(noise(text, words, cfg.word_noise), words), answer_words

    def pick(items):
        return items[int(rng.integers(len(items)))]

    qas: list[QA] = []
    kinds = [s.kind for s in shapes]
    unique_kind = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique_kind:
        s = pick(unique_kind)
        qas.append(QA(phrase("colour")[0].format(s=s.kind), s.colour, "colour"))
    s = pick(shapes)
    qas.append(QA(phrase("shape")[0].format(c=s.colour), s.kind, "shape"))
    qas.append(QA(phrase("count")[0], NUMBERS[len(shapes)], "count"))

    options = [(s, "x") for s in shapes if abs(s.x - 0.5) >= cfg.position_margin]
    options += [(s, "y") for s in shapes if abs(s.y - 0.5) >= cfg.position_margin]
    if options:
        s, axis = pick(options)
        if axis == "x":
            q, a = phrase("position_x")[0], "left" if s.x < 0.5 else "right"
        else:
            q, a = phrase("position_y")[0], "top" if s.y < 0.5 else "bottom"
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
            q = phrase("relation_x")[0]
            ans = "left" if a.x < b.x else "right"
        else:
            q, above_below = phrase("relation_y")
            ans = above_below[0] if a.y < b.y else above_below[1]
        qas.append(QA(q.format(c=a.colour, s=a.kind, c2=b.colour, s2=b.kind), ans, "relation"))

    present = {(s.colour, s.kind) for s in shapes}
    if rng.random() < 0.5:
        c, k = pick(sorted(present))
    else:  # a hard negative half the time: a colour or a kind that is in the image
        s = pick(shapes)
        absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
        near = [(c, k) for c, k in absent if c == s.colour or k == s.kind]
        c, k = pick(near if near and rng.random() < 0.7 else absent)
    qas.append(QA(phrase("exists")[0].format(c=c, s=k), "yes" if (c, k) in present else "no", "exists"))
    if cfg.exists == "pair":
        ex = extra if extra is not None else rng
        if (c, k) in present:
            near = [
                (c2, k2)
                for c2 in COLOURS
                for k2 in SHAPES
                if (c2, k2) not in present and any(c2 == s.colour or k2 == s.kind for s in shapes)
            ]
            c, k = near[int(ex.integers(len(near)))]
        else:
            ordered = sorted(present)
            c, k = ordered[int(ex.integers(len(ordered)))]
        table = SETS["classic" if cfg.phrasings == "classic" else cfg.phrasings]["exists"]
        text = table[int(ex.integers(len(table)))][0]
        if cfg.phrasings != "classic":
            text = surface(noise(text, ex, cfg.word_noise), ex)
        qas.append(QA(text.format(c=c, s=k), "yes" if (c, k) in present else "no", "exists"))

    n = len(shapes)
    caption = f"{NUMBERS[n]} shape{'s' if n > 1 else ''} on a {scene.background} background"
    qas.append(QA(phrase("caption")[0], caption, "caption"))
    return tuple(qas)


def sample(split: str, index: int, seed: int = 0, cfg: VQAConfig | None = None) -> Sample:
    """Image `index` of `split`, its scene and its questions; the same arguments give the same sample."""
    cfg = cfg or VQAConfig()
    rng = _rng(seed, split, index)
    scene = make_scene(rng, cfg)
    image = render(scene, cfg, rng)
    wording = _rng(seed, split, index, 1) if cfg.phrasings != "classic" else None
    extra = _rng(seed, split, index, 3) if cfg.exists == "pair" else None
    qas = ask(scene, rng, cfg, wording, extra)
    if cfg.camera:
        cam = _rng(seed, split, index, 2)
        if cam.random() < cfg.camera:
            image, frame = camera_frame(image, cam, cfg.camera_style)
            scene = replace(scene, frame=frame)
    return Sample(image, scene, qas)


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


def vocabulary_text(phrasings: str = "classic") -> list[str]:
    """Every word the questions and answers can use, one phrase per line (for tokenizer training):
    the templates of one phrasing set (never the held-out ones for a model that is evaluated on them)."""
    if phrasings not in SETS:
        raise ConfigError(f"vocabulary_text: expected one of {', '.join(SETS)}, got {phrasings!r}")
    lines = [t for ts in SETS[phrasings].values() for t, _ in ts]
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
