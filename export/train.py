"""Train the shipped default model from scratch on the synthetic VQA set (`make train-default`).

    seed --> tokenizer (byte-level BPE on prose + the VQA prompts and answers)
         --> small_config() TinyGPT-V, initialised N(0, 0.02)
         --> AdamW, linear warmup, cosine decay; each step: a batch of images with all their questions
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinygptv_edge.calib.vqa import VQAConfig, iter_samples, vocabulary_text
from tinygptv_edge.runtime.config import TinyGPTVConfig, small_config
from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.tokenizer import Tokenizer

from .model.phi import RMSNorm
from .model.tinygptv import TinyGPTV
from .train_data import Encoded, encode_samples, exact_by_type, forward_rows, loss_and_exact

METRICS = "training.json"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    train_images: int = 6000
    val_images: int = 150
    test_images: int = 400
    steps: int = 2400
    images_per_step: int = 16
    questions_per_image: int = 2  # drawn at random from the image's 5-7 questions
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    vocab_size: int = 512
    eval_every: int = 300
    threads: int = 1  # OpenMP threads oversubscribe a shared CPU: 1 thread ran 9x faster than 2 here

    def __post_init__(self) -> None:
        names = ("train_images", "val_images", "test_images", "steps", "images_per_step", "threads")
        for name in (*names, "questions_per_image"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name}: expected > 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"TrainConfig.lr: expected 0 < lr < 1, got {self.lr}")
        if self.images_per_step > self.train_images:
            raise ConfigError(
                f"TrainConfig: images_per_step {self.images_per_step} > train_images {self.train_images}"
            )


@dataclass
class TrainResult:
    model: TinyGPTV
    tokenizer_dir: Path
    losses: list[float]
    val: list[tuple[int, dict[str, float]]]
    seconds: float


def build_tokenizer(cfg: TrainConfig, model_cfg: TinyGPTVConfig, folder: Path) -> Tokenizer:
    """Train the BPE on the shipped prose plus full prompts and answers of the first training images."""
    from .tokenizer_train import save_tokenizer, train_bpe

    lines = vocabulary_text()
    for s in iter_samples("train", min(cfg.train_images, 500), cfg.seed):
        for qa in s.qas:
            lines.append(model_cfg.prompt.first_turn(qa.question) + qa.answer + model_cfg.prompt.separator)
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
    nn.init.normal_(enc.pos_embed, std=0.2)  # patch features start near unit scale: make position visible
    nn.init.normal_(model.vision.qformer.query_tokens, std=0.02)
    for block in enc.blocks:
        nn.init.zeros_(block.attn.q_bias)
        nn.init.zeros_(block.attn.v_bias)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def encode_split(split: str, n: int, cfg: TrainConfig, model_cfg: TinyGPTVConfig, tok: Tokenizer) -> Encoded:
    return encode_samples(iter_samples(split, n, cfg.seed, VQAConfig()), model_cfg, tok)


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
    tok = build_tokenizer(cfg, small_config(cfg.vocab_size), tok_dir)
    model_cfg = small_config(tok.vocab_size)
    progress("data", 0, 1, {})
    train_set = encode_split("train", cfg.train_images, cfg, model_cfg, tok)
    val_set = encode_split("validation", cfg.val_images, cfg, model_cfg, tok)
    progress("data", 1, 1, {"rows": len(train_set.image)})

    model = TinyGPTV(model_cfg)
    init_weights(model)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    order = np.random.default_rng(cfg.seed)
    n_img = len(train_set.pixels)
    perm, pos = order.permutation(n_img), 0
    by_image = np.split(np.arange(len(train_set.image)), np.flatnonzero(np.diff(train_set.image.numpy())) + 1)
    losses: list[float] = []
    val: list[tuple[int, dict[str, float]]] = []
    for step in range(cfg.steps):
        if pos + cfg.images_per_step > n_img:
            perm, pos = order.permutation(n_img), 0
        images = perm[pos : pos + cfg.images_per_step]
        pos += cfg.images_per_step
        rows = torch.tensor(
            [r for i in images for r in order.permutation(by_image[i])[: cfg.questions_per_image]]
        )
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits, targets = forward_rows(model, train_set, rows, tok.eos_id)
        loss, exact = loss_and_exact(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        info = {"loss": losses[-1], "exact": float(exact.float().mean())}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = exact_by_type(model, val_set, tok.eos_id)
            val.append((step + 1, acc))
            info["val"] = acc["all"]
        progress("train", step + 1, cfg.steps, info)
    model.eval()
    return TrainResult(model, tok_dir, losses, val, time.perf_counter() - t0)


@torch.no_grad()
def evaluate_greedy(
    model: TinyGPTV,
    tok: Tokenizer,
    split: str = "test",
    n_images: int = 400,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Exact match of `TinyGPTV.answer` (greedy, cut at the separator) per question type."""
    from tinygptv_edge.runtime.preprocess import preprocess

    counts: dict[str, list[int]] = {}
    for i, s in enumerate(iter_samples(split, n_images, seed, VQAConfig())):
        pixels = torch.from_numpy(preprocess(s.image, model.cfg.preprocess))[None]
        for qa in s.qas:
            got = model.answer(qa.question, tok, pixels, max_new_tokens=16)
            c = counts.setdefault(qa.qtype, [0, 0])
            c[0] += got == qa.answer
            c[1] += 1
        if progress:
            progress(i + 1, n_images)
    table = {t: {"correct": c, "total": n, "accuracy": c / n} for t, (c, n) in sorted(counts.items())}
    correct, total = sum(c for c, _ in counts.values()), sum(n for _, n in counts.values())
    table["all"] = {"correct": correct, "total": total, "accuracy": correct / total}
    return table


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


def save_default(result: TrainResult, cfg: TrainConfig, test: dict, out: str | Path) -> Path:
    """The single-checkpoint folder plus training.json and the loss curve, written atomically."""
    from .single import save_single

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
            "validation": [{"step": s, **a} for s, a in result.val],
            "test_greedy_exact_match": test,
            "parameters": sum(p.numel() for p in result.model.parameters()),
        }
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        for name in (METRICS, LOSS_CSV, LOSS_PNG):
            (tmp / name).replace(out / name)
    out.chmod(0o755)  # mkdtemp made it private; it ships as package data
    for f in out.iterdir():
        f.chmod(0o644)
    return out
