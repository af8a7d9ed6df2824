"""Train the shipped default model from scratch on the synthetic VQA set (`make train-default`).

    seed --> tokenizer (byte-level BPE on prose + the VQA prompts and answers)
         --> small_config() TinyGPT-V: vision N(0, 1/fan_in) + 2-D sin-cos positions, decoder N(0, 0.02)
         --> stage 1, vision pretraining: encoder + Q-Former + projections learn the scenes through
             the linear heads of `scene.py` (the stand-in for a pretrained EVA and Q-Former)
         --> stage 2, VQA: AdamW, linear warmup, cosine decay; each step a batch of images with some of
             their questions; the answer loss plus the scene loss, the vision tower at a lower rate
         --> greedy exact match per question type (validation during training, test at the end)
         --> export/default_model/ (single-checkpoint folder) + training.json + loss curve

Deterministic by seed: fixed data, torch.manual_seed, a seeded batch order, a fixed thread count.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinygptv_edge.export.model.phi import RMSNorm
from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.train.data import (
    Encoded,
    add_conversations,
    encode_samples,
    exact_by_type,
    forward_rows,
    loss_and_exact,
    row_offsets,
)
from tinygptv_edge.export.train.scene import (
    AnchorHeads,
    SceneHeads,
    SceneTargets,
    anchor_loss,
    find_anchors,
    mirror,
    scene_accuracy,
    scene_loss,
    scene_targets,
)
from tinygptv_edge.export.train.vqa import (
    CAMERA_STYLES,
    CONVERSATION_SPLITS,
    DATASETS,
    EXISTS_MODES,
    GREETINGS,
    HELLO_ANSWER,
    THANKS,
    THANKS_ANSWER,
    ConversationConfig,
    VQAConfig,
    answer_of_type,
    conversations,
    eval_split,
    iter_samples,
    vocabulary_text,
)
from tinygptv_edge.runtime.checks import check_threads
from tinygptv_edge.runtime.config import TinyGPTVConfig, small_config
from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.text.tokenizer import Tokenizer

METRICS = "training.json"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    data: str = "varied"  # scene settings of the training and validation images (vqa.DATASETS)
    train_images: int = 6000
    val_images: int = 150
    test_images: int = 400
    eval_images: int = 150  # images of each other evaluation split (test-phrasing, -layout, -camera)
    pretrain_steps: int = 2000
    pretrain_images_per_step: int = 32
    pretrain_lr: float = 5e-4
    pretrain_mirror: bool = False  # stage 1: mirror half the images left-right (labels to match)
    steps: int = 4000
    images_per_step: int = 16
    questions_per_image: int = 2  # drawn at random from the image's 5-7 questions
    lr: float = 2e-3
    vision_lr: float = 2e-4  # stage 2 rate of the (pretrained) vision tower
    scene_weight: float = 1.0  # stage 2 weight of the scene loss next to the answer loss
    anchor_weight: float = 1.0  # stage 2 weight of the word-anchor loss on the decoder's middle layer
    anchor_layer: int = 1
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    vocab_size: int = 512
    image_size: int = 64  # the model's square input (small_config: 64)
    patch_size: int = 16  # its patches (small_config: 16, a 4 x 4 grid)
    vision_width: int = 128  # EVA encoder width (small_config: 128; heads of 32, MLP 4x)
    vision_depth: int = 3  # EVA encoder blocks (small_config: 3)
    eval_every: int = 300
    easy_weight: float = 0.4  # count and caption questions are drawn this much less often (learnt first)
    threads: int = 1  # OpenMP threads oversubscribe a shared CPU: 1 ran faster than 2 (docs/benchmarks.md)
    # issue #31 (defaults: the shipped model's recipe): a conversation (vqa.conversation, 2-4 questions,
    # greetings, thanks, a second image) about this share of the training images, each a row of its own
    # in every batch that holds its image; the exists questions ("one" or "pair"); the camera chain
    # ("v1" or "v2") and share of camera frames (None: the data's own); a noisy background's sigma range.
    conversations: float = 0.0
    exists: str = "one"
    camera_style: str = "v1"
    camera: float | None = None
    noisy_sigma: tuple[float, float] = (10.0, 25.0)

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ConfigError(f"TrainConfig.data: expected one of {', '.join(DATASETS)}, got {self.data!r}")
        names = ("train_images", "val_images", "test_images", "eval_images", "steps", "images_per_step")
        names += ("threads",)
        for name in (*names, "questions_per_image", "pretrain_images_per_step"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name}: expected > 0, got {getattr(self, name)}")
        check_threads(self.threads, "TrainConfig.threads")
        if not 0 <= self.conversations <= 1:
            raise ConfigError(f"TrainConfig.conversations: expected 0..1, got {self.conversations}")
        if self.exists not in EXISTS_MODES or self.camera_style not in CAMERA_STYLES:
            raise ConfigError(
                f"TrainConfig: expected exists in {EXISTS_MODES} and camera_style in {CAMERA_STYLES}, "
                f"got {self.exists!r}, {self.camera_style!r}"
            )
        self.scene_data()  # checks camera and noisy_sigma
        for name in ("pretrain_steps", "scene_weight", "anchor_weight", "anchor_layer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name}: expected >= 0, got {getattr(self, name)}")
        if self.image_size % self.patch_size or not 2 <= self.image_size // self.patch_size <= 16:
            raise ConfigError(
                f"TrainConfig: expected image_size {self.image_size} to be 2-16 patches of "
                f"patch_size {self.patch_size}"
            )
        if self.vision_width % 32 or not 32 <= self.vision_width <= 1024 or not 1 <= self.vision_depth <= 24:
            raise ConfigError(
                "TrainConfig: expected vision_width a multiple of 32 in 32..1024 and vision_depth 1..24, "
                f"got {self.vision_width}, {self.vision_depth}"
            )
        for name in ("lr", "vision_lr", "pretrain_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: expected 0 < {name} < 1, got {getattr(self, name)}")
        for name in ("images_per_step", "pretrain_images_per_step"):
            if getattr(self, name) > self.train_images:
                raise ConfigError(
                    f"TrainConfig: {name} {getattr(self, name)} > train_images {self.train_images}"
                )

    def scene_data(self) -> VQAConfig:
        """The scene settings of the training and validation images: `data` with this recipe's exists
        questions, camera chain and noisy backgrounds."""
        base = DATASETS[self.data]
        return replace(
            base,
            exists=self.exists,
            camera_style=self.camera_style,
            camera=base.camera if self.camera is None else self.camera,
            noisy_sigma=tuple(self.noisy_sigma),
        )


@dataclass
class TrainResult:
    model: TinyGPTV
    tokenizer_dir: Path
    losses: list[float]
    val: list[tuple[int, dict[str, float]]]
    seconds: float
    scene: dict[str, float]  # validation accuracies of the scene head after vision pretraining


def model_config(cfg: TrainConfig, vocab_size: int) -> TinyGPTVConfig:
    """small_config() with the recipe's input, patch size and encoder width and depth (language widths
    untouched: every GGUF type still applies)."""
    base = small_config(vocab_size)
    want = (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_depth)
    v = base.vision
    if want == (v.image_size, v.patch_size, v.width, v.depth):
        return base
    vision = replace(
        v,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        pretrain_image_size=cfg.image_size,
        width=cfg.vision_width,
        depth=cfg.vision_depth,
        stored_depth=cfg.vision_depth,
        heads=cfg.vision_width // 32,
        mlp_hidden=4 * cfg.vision_width,
    )
    return replace(base, vision=vision, qformer=replace(base.qformer, vision_width=cfg.vision_width))


def build_tokenizer(cfg: TrainConfig, model_cfg: TinyGPTVConfig, folder: Path) -> Tokenizer:
    """Train the BPE on the shipped prose plus full prompts and answers of the first training images."""
    from tinygptv_edge.export.checkpoints.tokenizer_train import save_tokenizer, train_bpe

    data = cfg.scene_data()
    lines = vocabulary_text(data.phrasings)
    prompt = model_cfg.prompt
    for s in iter_samples("train", min(cfg.train_images, 500), cfg.seed, data):
        for qa in s.qas:
            lines.append(prompt.first_turn(qa.question) + qa.answer + prompt.separator)
            if cfg.conversations:  # the later-turn template, as Chat writes it after an answer
                lines.append(
                    prompt.separator + prompt.turn(qa.question, False) + qa.answer + prompt.separator
                )
    if cfg.conversations:
        for text, answer in [(g, HELLO_ANSWER) for g in GREETINGS] + [(t, THANKS_ANSWER) for t in THANKS]:
            lines.append(prompt.first_turn(text, False) + answer + prompt.separator)
            lines.append(prompt.separator + prompt.turn(text, False) + answer + prompt.separator)
    save_tokenizer(train_bpe(cfg.vocab_size, extra_text=lines), folder)
    return Tokenizer.from_file(folder)


def init_weights(model: TinyGPTV) -> None:
    """Vision side variance-preserving, language side GPT-2 style.

    The vision tower, Q-Former and projections get N(0, 1/fan_in) weights so that each image
    leaves a clear mark on its embeddings from step one (with GPT-2's 0.02 everywhere the image
    embeddings of different images differed by about 1%, and training sat at answer priors).
    The decoder keeps N(0, 0.02). Biases zero, norms at one, learned tokens N(0, 0.02).
    """
    for prefix, module in (("vision", model.vision), ("language", model.language)):
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                fan_in = m.weight[0].numel()
                std = fan_in**-0.5 if prefix == "vision" else 0.02
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    enc = model.vision.encoder
    nn.init.normal_(enc.cls_token, std=0.02)
    with torch.no_grad():  # smooth in x and y, unit scale like the patch features: position is readable
        grid = enc.cfg.image_size // enc.cfg.patch_size
        enc.pos_embed[0, 0].zero_()
        enc.pos_embed[0, 1:] = sincos_2d(grid, enc.cfg.width)
    nn.init.normal_(model.vision.qformer.query_tokens, std=0.02)
    for block in enc.blocks:
        nn.init.zeros_(block.attn.q_bias)
        nn.init.zeros_(block.attn.v_bias)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) MAE-style position table, row-major: [sin(x w), cos(x w), sin(y w), cos(y w)]."""
    w = 100.0 ** -(torch.arange(width // 4) / (width // 4))  # (width/4,) frequencies
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    xw, yw = x.flatten()[:, None] * w, y.flatten()[:, None] * w  # (grid^2, width/4)
    return torch.cat([xw.sin(), xw.cos(), yw.sin(), yw.cos()], dim=1)


def _param_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: float = 1.0
) -> list[dict]:
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]


def lr_at(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` (a multiplier of the peak rate)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def pick_questions(rng: np.random.Generator, rows: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` of an image's question rows, without replacement, in proportion to `weight`."""
    p = weight[rows] / weight[rows].sum()
    return rng.choice(rows, size=min(n, len(rows)), replace=False, p=p)


def encode_split(
    split: str,
    n: int,
    cfg: TrainConfig,
    model_cfg: TinyGPTVConfig,
    tok: Tokenizer,
    conversation_share: float = 0.0,
) -> tuple[Encoded, SceneTargets]:
    """The split's images and questions, and with `conversation_share` a conversation about that share
    of its images (`vqa.conversations`, laid out as the runtime's Chat does: `data.add_conversations`)."""
    scenes, qas = [], []

    def samples():
        for s in iter_samples(split, n, cfg.seed, cfg.scene_data()):
            scenes.append(s.scene)
            qas.append(s.qas)
            yield s

    encoded = encode_samples(samples(), model_cfg, tok)
    if conversation_share:
        convs = conversations(qas, split, cfg.seed, conversation_share, ConversationConfig())
        encoded = add_conversations(encoded, convs, model_cfg, tok)
    return encoded, scene_targets(scenes, model_cfg)


def pretrain_vision(
    model: TinyGPTV,
    heads: SceneHeads,
    pixels: torch.Tensor,
    targets: SceneTargets,
    cfg: TrainConfig,
    progress: Callable[[str, int, int, dict], None],
) -> None:
    """Stage 1: the vision tower and the scene heads on the scene loss alone."""
    named = list(model.vision.named_parameters()) + list(heads.named_parameters())
    opt = torch.optim.AdamW(_param_groups(named, cfg.weight_decay), lr=cfg.pretrain_lr, betas=(0.9, 0.98))
    order = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.pretrain_lr * lr_at(step, cfg.pretrain_steps, cfg.warmup, cfg.min_lr_ratio)
        idx = torch.randint(0, len(pixels), (cfg.pretrain_images_per_step,), generator=order)
        x, t = pixels[idx], targets[idx]
        if cfg.pretrain_mirror:
            x, t = mirror(x, t, torch.rand(len(idx), generator=order) < 0.5)
        loss = scene_loss(heads(model, x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        opt.step()
        progress("pretrain", step + 1, cfg.pretrain_steps, {"loss": loss.item()})


def train(
    cfg: TrainConfig,
    work_dir: str | Path,
    progress: Callable[[str, int, int, dict], None] | None = None,
) -> TrainResult:
    """Train from scratch; `progress(stage, done, total, info)` is called along the way."""
    progress = progress or (lambda *a: None)
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work_dir = Path(work_dir)
    tok_dir = work_dir / "tokenizer"
    tok = build_tokenizer(cfg, model_config(cfg, cfg.vocab_size), tok_dir)
    model_cfg = model_config(cfg, tok.vocab_size)
    if cfg.anchor_layer >= model_cfg.language.layers:
        raise ConfigError(
            f"TrainConfig.anchor_layer: expected < {model_cfg.language.layers} decoder layers, "
            f"got {cfg.anchor_layer}"
        )
    progress("data", 0, 1, {})
    train_set, train_scenes = encode_split("train", cfg.train_images, cfg, model_cfg, tok, cfg.conversations)
    val_set, val_scenes = encode_split("validation", cfg.val_images, cfg, model_cfg, tok)
    progress("data", 1, 1, {"rows": len(train_set.image)})

    model = TinyGPTV(model_cfg)
    init_weights(model)
    heads = SceneHeads(model_cfg)
    pretrain_vision(model, heads, train_set.pixels, train_scenes, cfg, progress)
    scene = scene_accuracy(heads, model, val_set.pixels, val_scenes)
    progress("scene", 1, 1, scene)

    anchor_heads = AnchorHeads(model_cfg.language.hidden)
    conv_rows = train_set.conversation or [False] * len(train_set.suffix)
    # word anchors on questions of one turn (a conversation's words may be about another image)
    anchors = find_anchors([[] if c else t for t, c in zip(train_set.suffix, conv_rows, strict=True)], tok)
    captured: list[torch.Tensor] = []  # the anchor layer's output of each forward (only if it is used)
    hook = model.language.layers[cfg.anchor_layer].register_forward_hook(
        lambda m, i, o: captured.append(o) if cfg.anchor_weight else None
    )
    named = list(model.language.named_parameters()) + list(heads.named_parameters())
    named += list(anchor_heads.named_parameters())
    groups = _param_groups(named, cfg.weight_decay)
    groups += _param_groups(list(model.vision.named_parameters()), cfg.weight_decay, cfg.vision_lr / cfg.lr)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    order = np.random.default_rng(cfg.seed)
    n_img = len(train_set.pixels)
    perm, pos = order.permutation(n_img), 0
    by_image = np.split(np.arange(len(train_set.image)), np.flatnonzero(np.diff(train_set.image.numpy())) + 1)
    weight = np.array([cfg.easy_weight if t in ("count", "caption") else 1.0 for t in train_set.qtype])
    is_conv = np.array(conv_rows, dtype=bool)
    weight[is_conv] = 0.0  # a conversation row is added to every batch that holds its image
    losses: list[float] = []
    val: list[tuple[int, dict[str, float]]] = []
    for step in range(cfg.steps):
        if pos + cfg.images_per_step > n_img:
            perm, pos = order.permutation(n_img), 0
        images = perm[pos : pos + cfg.images_per_step]
        pos += cfg.images_per_step
        rows = torch.tensor(
            [r for i in images for r in pick_questions(order, by_image[i], weight, cfg.questions_per_image)]
            + [r for i in images for r in by_image[i] if is_conv[r]]
        )
        model.train()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_scale"] * lr_at(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        captured.clear()
        if is_conv.any():  # conversation rows apart (not padding the short rows to their length)
            conv_sel = torch.from_numpy(is_conv[rows.numpy()])
            rows_c, rows = rows[conv_sel], rows[~conv_sel]
            vision: dict[int, torch.Tensor] = {}
            if len(rows_c):
                loss_c, exact_c = loss_and_exact(*forward_rows(model, train_set, rows_c, tok.eos_id, vision))
            captured.clear()
            logits, targets = forward_rows(model, train_set, rows, tok.eos_id, vision)
            loss, exact = loss_and_exact(logits, targets)
            if len(rows_c):
                loss = (loss * len(rows) + loss_c * len(rows_c)) / (len(rows) + len(rows_c))
                exact = torch.cat([exact, exact_c])
        else:
            logits, targets = forward_rows(model, train_set, rows, tok.eos_id)
            loss, exact = loss_and_exact(logits, targets)
        total = loss
        if cfg.anchor_weight:
            hidden = captured[-1]  # (N, Q + width, H): the batch rows, after the prefix
            total = total + cfg.anchor_weight * anchor_loss(
                anchor_heads,
                hidden,
                rows.tolist(),
                train_set.image,
                anchors,
                train_scenes,
                row_offsets(train_set, rows.tolist(), model_cfg.qformer.num_query_tokens)
                if train_set.general
                else model_cfg.qformer.num_query_tokens,
            )
        if cfg.scene_weight:
            idx = torch.from_numpy(images)
            total = total + cfg.scene_weight * scene_loss(
                heads(model, train_set.pixels[idx]), train_scenes[idx]
            )
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        info = {"loss": losses[-1], "exact": float(exact.float().mean())}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = exact_by_type(model, val_set, tok.eos_id)
            val.append((step + 1, acc))
            info["val"] = acc["all"]
        progress("train", step + 1, cfg.steps, info)
    hook.remove()
    model.eval()
    return TrainResult(model, tok_dir, losses, val, time.perf_counter() - t0, scene)


@torch.no_grad()
def evaluate_greedy(
    model: TinyGPTV,
    tok: Tokenizer,
    split: str = "test",
    n_images: int = 400,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Exact match of `TinyGPTV.answer` (greedy, cut at the separator) per question type, on an
    evaluation split (`vqa.EVAL_SPLITS`: test, test-phrasing, test-layout, test-camera; a conversation
    split such as test-conversation: `evaluate_conversations`)."""
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    if split in CONVERSATION_SPLITS:
        return evaluate_conversations(model, tok, split, n_images, seed, progress)

    counts: dict[str, list[int]] = {}
    stream, scene_cfg = eval_split(split)
    for i, s in enumerate(iter_samples(stream, n_images, seed, scene_cfg)):
        pixels = torch.from_numpy(preprocess(s.image, model.cfg.preprocess))[None]
        for qa in s.qas:
            got = model.answer(qa.question, tok, pixels, max_new_tokens=16)
            c = counts.setdefault(qa.qtype, [0, 0, 0])
            c[0] += got == qa.answer
            c[1] += 1
            c[2] += answer_of_type(qa.qtype, qa.question, got)
        if progress:
            progress(i + 1, n_images)
    counts = dict(sorted(counts.items()))
    counts["all"] = [sum(c[i] for c in counts.values()) for i in range(3)]
    return _table(counts)


def _table(counts: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    return {
        t: {"correct": c, "total": n, "accuracy": c / n if n else 0.0, "of_type": k / n if n else 0.0}
        for t, (c, n, k) in counts.items()
    }


@torch.no_grad()
def evaluate_conversations(
    model: TinyGPTV,
    tok: Tokenizer,
    split: str = "test-conversation",
    n_images: int = 150,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Greedy exact match in conversations (`vqa.CONVERSATION_SPLITS`): every image opens one, each
    turn's prompt laid out by the runtime's `Chat` after the model's own earlier answers (as `run --chat`
    and `Pipeline.chat` hold them). Per question type and "all" (every turn) as `evaluate_greedy`; and
    "turn k" (k-th turn), "question k" (k-th question about an image: small talk not counted),
    "follow-ups" (questions after the first turn), "second image" (questions about
    a second image attached mid-conversation), "chat" (greetings, thanks), and "alone: ..." of the same
    image questions each asked alone (a first turn with its image)."""
    from tinygptv_edge.runtime.pipeline import layout_chat
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    stream, scene_cfg = eval_split(split)
    samples = list(iter_samples(stream, n_images, seed, scene_cfg))
    pixels = torch.from_numpy(np.stack([preprocess(s.image, model.cfg.preprocess) for s in samples]))
    embeds = model.embed_image(pixels)  # (N, Q, H)
    convs = conversations([s.qas for s in samples], stream, seed, 1.0, CONVERSATION_SPLITS[split])
    prompt, q, sep = model.cfg.prompt, model.cfg.qformer.num_query_tokens, model.cfg.prompt.separator
    lm = model.language
    counts: dict[str, list[int]] = {}
    alone_cache: dict[tuple[int, str], str] = {}

    def add(key: str, ok: bool, typed: bool) -> None:
        c = counts.setdefault(key, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + ok, c[1] + 1, c[2] + typed

    for ci, conv in enumerate(convs):
        chat = layout_chat(tok, q, prompt)
        attached_second, n_asked = False, 0
        for k, turn in enumerate(conv.turns):
            positions = chat.next_positions(turn.question, [] if turn.attach is None else [str(turn.attach)])
            parts, run = [], []
            for pos in positions:
                if isinstance(pos, int):
                    run.append(pos)
                    continue
                if run:
                    parts.append(lm.embed(torch.tensor(run)))
                    run = []
                parts.append(embeds[int(pos[0]), pos[1]][None])
            if run:
                parts.append(lm.embed(torch.tensor(run)))
            ids = model.generate(torch.cat(parts)[None], 16, (tok.eos_id,), tok, sep)
            got = model.answer_text(ids, tok)
            ok = got == turn.answer
            typed = answer_of_type(turn.qtype, turn.question, got)
            add(turn.qtype, ok, typed)
            add("all", ok, typed)
            add(f"turn {k + 1}", ok, typed)
            if turn.about is not None:
                n_asked += 1
                add(f"question {n_asked}", ok, typed)
            if turn.attach is not None and turn.attach != conv.image:
                attached_second = True
            if turn.about is not None:
                key = (turn.about, turn.question)
                if key not in alone_cache:
                    alone_cache[key] = model.answer(
                        turn.question, tok, pixels[turn.about][None], max_new_tokens=16
                    )
                alone = alone_cache[key] == turn.answer
                add("alone: all", alone, True)
                if k > 0:
                    add("follow-ups", ok, typed)
                    add("alone: follow-ups", alone, True)
                if attached_second:
                    add("second image", ok, typed)
                    add("alone: second image", alone, True)
            else:
                add("chat", ok, typed)
            # the history as Turn._commit records it: the tokens before the separator, then the separator
            text = tok.decode(ids)
            cut = text.find(sep)
            kept = list(ids)
            if cut >= 0:
                while kept and len(tok.decode(kept)) > cut:
                    kept.pop()
            leftover = text[len(tok.decode(kept)) : cut] if cut >= 0 else ""
            chat.extend(positions + kept, {}, leftover + sep)
        if progress:
            progress(ci + 1, len(convs))
    order = sorted(counts, key=lambda t: (t.startswith("alone"), t.startswith(("turn", "question")), t))
    return _table({t: counts[t] for t in order})


def write_loss_curve(losses: list[float], folder: Path, smooth: int = 20) -> None:
    """loss.csv (step, loss, moving average) and loss.png drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    avg = [float(np.mean(losses[max(0, i - smooth + 1) : i + 1])) for i in range(len(losses))]
    rows = ["step,loss,moving_average"] + [
        f"{i + 1},{v:.6f},{a:.6f}" for i, (v, a) in enumerate(zip(losses, avg, strict=True))
    ]
    (folder / LOSS_CSV).write_text("\n".join(rows) + "\n")
    W, H, m = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    top = max(losses)
    lo = math.log10(max(min(losses), 1e-4))
    hi = math.log10(top)

    def pt(i: int, v: float) -> tuple[float, float]:
        y = (math.log10(max(v, 1e-4)) - lo) / max(hi - lo, 1e-9)
        return m + (W - 2 * m) * i / max(1, len(losses) - 1), H - m - (H - 2 * m) * y

    d.rectangle([m, m, W - m, H - m], outline="black")
    d.line([pt(i, v) for i, v in enumerate(losses)], fill=(170, 190, 235), width=1)
    d.line([pt(i, v) for i, v in enumerate(avg)], fill=(20, 60, 200), width=2)
    d.text(
        (m, 10), f"training loss (log scale), {len(losses)} steps: {top:.3g} -> {avg[-1]:.3g}", fill="black"
    )
    img.save(folder / LOSS_PNG)


def save_default(
    result: TrainResult, cfg: TrainConfig, test: dict, out: str | Path, splits: dict | None = None
) -> Path:
    """The single-checkpoint folder plus training.json and the loss curve, written atomically.

    `test`: the greedy table of the test split; `splits`: those of the other evaluation splits."""
    from tinygptv_edge.export.checkpoints.single import save_single

    out = Path(out)
    save_single(result.model, result.tokenizer_dir, out)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        write_loss_curve(result.losses, tmp)
        metrics = {
            "seed": cfg.seed,
            "train_config": asdict(cfg),
            "train_seconds": round(result.seconds, 1),
            "torch": torch.__version__,
            "final_loss": float(np.mean(result.losses[-20:])),
            "scene_after_pretraining": result.scene,
            "validation": [{"step": s, **a} for s, a in result.val],
            "test_greedy_exact_match": test,
            "eval_splits_greedy_exact_match": splits or {},
            "parameters": sum(p.numel() for p in result.model.parameters()),
        }
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        for name in (METRICS, LOSS_CSV, LOSS_PNG):
            (tmp / name).replace(out / name)
    out.chmod(0o755)  # mkdtemp made it private; it ships as package data
    for f in out.iterdir():
        f.chmod(0o644)
    return out
