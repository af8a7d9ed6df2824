"""Model configuration: one small dataclass per model part, real TinyGPT-V sizes as defaults.

This module is the shared contract between the exporters (torch), the runtime (no torch) and the
tests. It imports only the standard library. Unknown keys are ignored on load so a config written by
a newer version still reads.

Sources: TinyGPT-V `minigpt4/models/{eva_vit.py,Qformer.py,minigpt4.py,minigpt_v2.py}`,
`modeling_phi.py`, `minigpt4/processors/blip_processors.py`, `minigpt4/conversation/conversation.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .checks import small_file
from .errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from `data`, ignoring unknown keys and recursing into nested configs."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls.__name__, f.name))
        if sub is not None:
            value = _from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name}: expected a positive integer, got {value!r}")


def _check_real(obj: Any, name: str, lo: float, hi: float, closed_hi: bool = False) -> None:
    """A finite number in (lo, hi) (or (lo, hi] with closed_hi)."""
    v = getattr(obj, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v < hi or closed_hi and v == hi):
        end = "]" if closed_hi else ")"
        raise ConfigError(
            f"{type(obj).__name__}.{name}: expected a finite number in ({lo}, {hi}{end}, got {v!r}"
        )


@dataclass(frozen=True)
class VisionConfig:
    """EVA ViT-g (LAVIS `create_eva_vit_g`), pre-norm blocks, no final norm."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # blocks used; the checkpoint stores `stored_depth`
    stored_depth: int = 40
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    eps: float = 1e-6
    pretrain_image_size: int = 224  # pos_embed grid stored in eva_vit_g.pth

    def __post_init__(self) -> None:
        _check_positive(self, "image_size", "patch_size", "width", "depth", "heads", "mlp_hidden")
        _check_real(self, "eps", 0, 1)
        if self.width % self.heads:
            raise ConfigError(f"VisionConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.stored_depth < self.depth:
            raise ConfigError(f"VisionConfig: stored_depth {self.stored_depth} < depth {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid**2


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former (BERT-base), query path only; cross-attention on layers 0, 2, ..."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    eps: float = 1e-12
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    vision_width: int = 1408  # key/value width of the cross-attention (EVA width)

    def __post_init__(self) -> None:
        _check_positive(self, "hidden", "layers", "heads", "intermediate", "num_query_tokens", "vision_width")
        _check_real(self, "eps", 0, 1)
        if self.hidden % self.heads:
            raise ConfigError(f"QFormerConfig: hidden {self.hidden} is not divisible by heads {self.heads}")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


@dataclass(frozen=True)
class ProjectionConfig:
    """`llama_proj` Linear(in, mid) then `llama_proj2` Linear(mid, out)."""

    in_features: int = 768
    mid_features: int = 4096
    out_features: int = 2560

    def __post_init__(self) -> None:
        _check_positive(self, "in_features", "mid_features", "out_features")


@dataclass(frozen=True)
class LanguageConfig:
    """Phi-2 as modified by TinyGPT-V (QK LayerNorm, post-attention RMSNorm, parallel block)."""

    vocab_size: int = 51200
    hidden: int = 2560
    layers: int = 32
    heads: int = 32
    intermediate: int = 10240
    max_positions: int = 2048
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.4
    layer_norm_eps: float = 1e-5  # input_layernorm, final_layernorm
    qk_norm_eps: float = 1e-5  # q_layernorm, k_layernorm (LayerNorm over head_dim)
    post_norm_eps: float = 1e-6  # post_layernorm (RMSNorm)
    hidden_act: str = "gelu_new"

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions")
        _check_real(self, "rope_theta", 0, math.inf)
        _check_real(self, "partial_rotary_factor", 0, 1, closed_hi=True)
        for name in ("layer_norm_eps", "qk_norm_eps", "post_norm_eps"):
            _check_real(self, name, 0, 1)
        if self.hidden % self.heads:
            raise ConfigError(f"LanguageConfig: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"LanguageConfig: rotary dims {self.rotary_dim} must be even and <= head_dim {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)


@dataclass(frozen=True)
class LoraConfig:
    """peft LoRA as TinyGPT-V trains it; merged as W + (alpha / r) * B @ A."""

    r: int = 64
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query_key_value", "dense")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# BLIP-2 / CLIP normalisation (Blip2ImageEvalProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SYSTEM_PROMPT = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
IMAGE_PLACEHOLDER = "<ImageHere>"


@dataclass(frozen=True)
class PromptConfig:
    """How a question becomes the decoder's prompt; generation stops at `separator` (end_sym).

    A turn is `user_template.format(question=...) + assistant_prefix`; the image goes where
    IMAGE_PLACEHOLDER stands. Stages 1-3 follow conversation.py (SeparatorStyle.SINGLE, "###");
    stage 4 follows its training template 'Instruct: {} /n Output: '. `add_bos`: a BOS token before
    the first turn. The project's own models are trained with one (`export/train/data.py`); the
    official TinyGPT-V inference feeds none (`get_context_emb` tokenizes each piece with the Phi-2
    tokenizer, which adds no BOS), so official checkpoints are loaded with False. It travels in the
    GGUF as `tokenizer.ggml.add_bos_token`.
    """

    system: str = SYSTEM_PROMPT
    separator: str = "###"
    user_template: str = "Human: <Img><ImageHere></Img> {question}###"
    text_user_template: str = "Human: {question}###"
    assistant_prefix: str = "Assistant: "
    add_bos: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.add_bos, bool):
            raise ConfigError(f"PromptConfig.add_bos: expected true or false, got {self.add_bos!r}")
        for name in ("system", "separator", "user_template", "text_user_template", "assistant_prefix"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"PromptConfig.{name}: expected a string, got {type(value).__name__}")
            if len(value) > MAX_PROMPT_TEXT:
                raise ConfigError(
                    f"PromptConfig.{name}: expected at most {MAX_PROMPT_TEXT} characters, got {len(value)}"
                )
        for name, slots in (("user_template", 1), ("text_user_template", 0)):
            _check_template(name, getattr(self, name), slots)
        for name in ("system", "separator", "assistant_prefix"):
            if IMAGE_PLACEHOLDER in getattr(self, name):
                raise ConfigError(f"PromptConfig.{name}: expected no {IMAGE_PLACEHOLDER}, found one")

    def first_turn(self, question: str, with_image: bool = True) -> str:
        """The full prompt of a conversation's first turn."""
        head = f"{self.system}{self.separator}" if self.system else ""
        return head + self.turn(question, with_image)

    def turn(self, question: str, with_image: bool = True) -> str:
        template = self.user_template if with_image else self.text_user_template
        return template.format(question=question) + self.assistant_prefix


MAX_PROMPT_TEXT = 1 << 16  # characters in one prompt field: a template, not a document


def _check_template(name: str, template: str, image_slots: int) -> None:
    """One `{question}` field and nothing else for str.format; `image_slots` IMAGE_PLACEHOLDERs."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # a lone brace
        raise ConfigError(f"PromptConfig.{name}: not a valid template ({e}): {template!r}") from None
    if [f for f, _, _ in fields] != ["question"] or any(spec or conv for _, spec, conv in fields):
        found = ", ".join("{" + f + "}" for f, _, _ in fields) or "none"
        raise ConfigError(
            f"PromptConfig.{name}: expected exactly one {{question}} placeholder (literal braces as "
            f"{{{{ }}}}), found {found} in {template!r}"
        )
    n = template.count(IMAGE_PLACEHOLDER)
    if n != image_slots:
        raise ConfigError(f"PromptConfig.{name}: expected {image_slots} {IMAGE_PLACEHOLDER}, found {n}")


STAGE4_PROMPT = PromptConfig(
    system="",
    separator="###",
    user_template="Instruct: <Img><ImageHere></Img> {question} /n Output: ",
    text_user_template="Instruct: {question} /n Output: ",
    assistant_prefix="",
)

# `--template`: the turn templates by name; `stage_prompt` picks the one a stage was trained with.
PROMPT_TEMPLATES = {"chat": PromptConfig(), "instruct": STAGE4_PROMPT}


def stage_prompt(stage: int) -> PromptConfig:
    """Stages 1-3: the "###Human: ... ###Assistant: " chat; stage 4: 'Instruct: {} /n Output: '."""
    return STAGE4_PROMPT if stage == 4 else PromptConfig()


MAX_IMAGE_SIZE = 4096  # model input side in pixels (TinyGPT-V: 224 or 448)
NORM_RANGE = 1e3  # |mean| and std bounds: pixels are in [0, 1]
MIN_STD = 1e-6  # a smaller std turns pixels into infinities in float32
RESAMPLE_NAMES = ("bicubic", "bilinear")


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class PreprocessConfig:
    """Blip2ImageEvalProcessor: RGB, bicubic resize to (S, S), to [0, 1], normalise."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        s = self.image_size
        if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"PreprocessConfig.image_size: expected an integer 1..{MAX_IMAGE_SIZE}, got {s!r}"
            )
        for name, lo, hi in (("mean", -NORM_RANGE, NORM_RANGE), ("std", MIN_STD, NORM_RANGE)):
            v = getattr(self, name)
            ok = isinstance(v, (tuple, list)) and len(v) == 3
            ok = ok and all(_real(x) and lo <= x <= hi for x in v)
            if not ok:
                raise ConfigError(f"PreprocessConfig.{name}: expected 3 numbers in [{lo}, {hi}], got {v!r}")
        if self.resample not in RESAMPLE_NAMES:
            raise ConfigError(
                f"PreprocessConfig.resample: expected one of {RESAMPLE_NAMES}, got {self.resample!r}"
            )


_NESTED: dict[tuple[str, str], type] = {}


@dataclass(frozen=True)
class TinyGPTVConfig:
    """The whole model. `stage` 1-3 use 224 px and the Vicuna-style prompt, 4 uses 448 px."""

    name: str = "tinygptv"
    stage: int = 3
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3, 4):
            raise ConfigError(f"TinyGPTVConfig.stage: expected 1, 2, 3 or 4, got {self.stage!r}")
        if self.qformer.vision_width != self.vision.width:
            raise ConfigError(
                f"Q-Former cross-attention width {self.qformer.vision_width} "
                f"!= vision width {self.vision.width}"
            )
        if self.projection.in_features != self.qformer.hidden:
            raise ConfigError(
                f"llama_proj input {self.projection.in_features} != Q-Former hidden {self.qformer.hidden}"
            )
        if self.projection.out_features != self.language.hidden:
            raise ConfigError(
                f"llama_proj2 output {self.projection.out_features} != language hidden {self.language.hidden}"
            )

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.vision.image_size)

    @property
    def num_image_tokens(self) -> int:
        return self.qformer.num_query_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyGPTVConfig:
        """Unknown keys are ignored; without a "prompt" object the stage's template applies."""
        try:
            cfg = _from_dict(cls, data)
        except TypeError as e:  # a field of the wrong kind
            raise ConfigError(f"bad TinyGPT-V config: {e}") from e
        if isinstance(data, dict) and "prompt" not in data:
            cfg = cfg.replace(prompt=stage_prompt(cfg.stage))
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TinyGPTVConfig:
        small_file(path, "config")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"cannot read config {path}: {e}") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def replace(self, **changes: Any) -> TinyGPTVConfig:
        return dataclasses.replace(self, **changes)


_NESTED.update(
    {
        ("TinyGPTVConfig", "vision"): VisionConfig,
        ("TinyGPTVConfig", "qformer"): QFormerConfig,
        ("TinyGPTVConfig", "projection"): ProjectionConfig,
        ("TinyGPTVConfig", "language"): LanguageConfig,
        ("TinyGPTVConfig", "lora"): LoraConfig,
        ("TinyGPTVConfig", "prompt"): PromptConfig,
    }
)


# ---------------------------------------------------------------------------------------------
# Named presets
# ---------------------------------------------------------------------------------------------


def full_config(stage: int = 3) -> TinyGPTVConfig:
    """Real TinyGPT-V dimensions. Stage 4 runs the ViT at 448 px with the Phi-2 instruct prompt."""
    if stage == 4:
        return TinyGPTVConfig(stage=4, vision=VisionConfig(image_size=448), prompt=stage_prompt(4))
    return TinyGPTVConfig(stage=stage)


def tiny_config(stage: int = 3, vocab_size: int = 512) -> TinyGPTVConfig:
    """A few-second model for unit tests: every code path of the full model, tiny widths."""
    vision = VisionConfig(
        image_size=56 if stage != 4 else 112,
        patch_size=14,
        width=64,
        depth=2,
        stored_depth=3,
        heads=4,
        mlp_hidden=172,
        pretrain_image_size=56,
    )
    qformer = QFormerConfig(
        hidden=32, layers=3, heads=4, intermediate=64, num_query_tokens=4, vision_width=64
    )
    language = LanguageConfig(
        vocab_size=vocab_size,
        hidden=64,
        layers=2,
        heads=4,
        intermediate=128,
        max_positions=256,
        partial_rotary_factor=0.5,
    )
    return TinyGPTVConfig(
        name="tinygptv-tiny",
        stage=stage,
        vision=vision,
        qformer=qformer,
        projection=ProjectionConfig(in_features=32, mid_features=96, out_features=64),
        language=language,
        lora=LoraConfig(r=4, alpha=8.0),
        prompt=stage_prompt(stage),
    )


def small_config(vocab_size: int = 512) -> TinyGPTVConfig:
    """The small TinyGPT-V: trainable from scratch on a CPU in minutes.

    Same code paths as the full model; 64 px images in a 4 x 4 grid of 16 px patches. The shipped
    default model is this with a 128 px input (an 8 x 8 grid: `export/train/loop.model_config` with
    the recipe of `make train-default`; its config.json says so). Language widths are
    multiples of 256 so every GGUF type applies (K-quants need rows of 256); head_dim 64 with
    partial rotary 0.5 (32 rotary dims).
    """
    vision = VisionConfig(
        image_size=64,
        patch_size=16,
        width=128,
        depth=3,
        stored_depth=3,
        heads=4,
        mlp_hidden=512,
        pretrain_image_size=64,
    )
    qformer = QFormerConfig(
        hidden=128, layers=2, heads=4, intermediate=512, num_query_tokens=8, vision_width=128
    )
    language = LanguageConfig(
        vocab_size=vocab_size,
        hidden=256,
        layers=3,
        heads=4,
        intermediate=512,
        max_positions=512,
        partial_rotary_factor=0.5,
    )
    return TinyGPTVConfig(
        name="tinygptv-small",
        stage=3,
        vision=vision,
        qformer=qformer,
        projection=ProjectionConfig(in_features=128, mid_features=256, out_features=256),
        language=language,
        lora=LoraConfig(r=8, alpha=16.0),
        prompt=PromptConfig(),
    )


PRESETS = {"full": full_config, "tiny": tiny_config, "small": small_config}
