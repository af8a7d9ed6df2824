"""Scene supervision: what `make train-default` uses in place of a pretrained EVA and Q-Former.

The real TinyGPT-V starts from an EVA ViT and a Q-Former pretrained on millions of images. The
default model has no such checkpoint, so training teaches its vision tower to see the synthetic
scenes through linear heads that are dropped when the model is saved:

    pixels -> encoder -> ln_vision -> tokens (B, 1+P, Wv)  --token head--> per patch: colour, kind,
                                                                             offset to the centre
           -> qformer -> proj1 -> proj2 -> embeds (B, Q, H)  --slot heads--> token c < 6: colour c's
                                                                             present, kind, (x, y);
                                                                             token 6: count; 7: background

Every question type is a function of what the slot heads read (colours are distinct within an
image, so a colour names a shape). The dense token head gives every patch its own label: the
encoder learns kinds from it far faster than from one label per image.

During VQA training the word-anchor heads read a middle decoder layer at the colour and kind words
of the question ("the red ..."): the decoder learns to look the named shape up in the image first,
and the answer only has to read it from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.train.vqa import BACKGROUNDS, COLOURS, NUMBERS, SHAPES, Scene, shape_mask
from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.errors import ConfigError

IGNORE = -100
MASK_SIZE = 256  # shapes are rasterised at this size to label patches
MIN_COVER = 0.25  # a patch belongs to the shape covering at least this fraction of it

N_COLOURS, N_KINDS, N_BACKGROUNDS, N_COUNTS = len(COLOURS), len(SHAPES), len(BACKGROUNDS), len(NUMBERS)


@dataclass
class SceneTargets:
    """Labels for N images: per colour (C), per patch (P), per image."""

    present: torch.Tensor  # (N, C) float 0/1
    kind: torch.Tensor  # (N, C) long, IGNORE where the colour is absent
    xy: torch.Tensor  # (N, C, 2) centre, fractions of the side
    count: torch.Tensor  # (N,) long
    background: torch.Tensor  # (N,) long
    patch_colour: torch.Tensor  # (N, P) long, 0 = background, 1 + colour index
    patch_kind: torch.Tensor  # (N, P) long, 0 = background, 1 + kind index
    patch_offset: torch.Tensor  # (N, P, 2) shape centre minus patch centre (0 on background)

    def __getitem__(self, idx: torch.Tensor) -> SceneTargets:
        return SceneTargets(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def patch_labels(scene: Scene, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(colour, kind, offset) per patch of a grid x grid patch grid, in the encoder's row-major order."""
    cell = MASK_SIZE // grid
    mask = shape_mask(scene, grid * cell)  # (g*c, g*c)
    blocks = mask.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    colour = np.zeros(grid * grid, np.int64)
    kind = np.zeros(grid * grid, np.int64)
    offset = np.zeros((grid * grid, 2), np.float32)

    def label(p: int, s) -> None:
        row, col = divmod(p, grid)
        colour[p] = 1 + list(COLOURS).index(s.colour)
        kind[p] = 1 + SHAPES.index(s.kind)
        x, y = scene.frame.place(s.x, s.y)  # in the model's input (a camera frame may squeeze the scene)
        offset[p] = (x - (col + 0.5) / grid, y - (row + 0.5) / grid)

    for p, block in enumerate(blocks):
        cover = np.bincount(block, minlength=len(scene.shapes) + 1)[1:]  # pixels of each shape
        if cover.max() >= MIN_COVER * cell * cell:
            label(p, scene.shapes[int(cover.argmax())])
    # a shape too small to cover MIN_COVER of any patch still labels the patch under its centre
    # (if nothing larger did): otherwise small shapes would teach the encoder nothing
    for i, s in enumerate(scene.shapes):
        x, y = scene.frame.place(s.x, s.y)
        col, row = (min(grid - 1, max(0, int(v * grid))) for v in (x, y))
        p = row * grid + col
        if colour[p] == 0 and (blocks[p] == i + 1).any():
            label(p, s)
    return colour, kind, offset


def mirror(pixels: torch.Tensor, t: SceneTargets, flip: torch.Tensor) -> tuple[torch.Tensor, SceneTargets]:
    """The images where `flip` (N,) bool is set, mirrored left-right, and their labels to match.

    Every kind is its own mirror image (the triangle points up), so a mirrored scene is another valid
    scene: x -> 1 - x, patch columns reversed, patch offsets' x negated. Colours, kinds, count and
    background stay.
    """
    grid = math.isqrt(t.patch_colour.shape[1])
    f = flip.view(-1, 1, 1, 1)
    pixels = torch.where(f, pixels.flip(-1), pixels)

    def cols(x: torch.Tensor) -> torch.Tensor:  # (N, P, ...) -> the same with each row's columns reversed
        g = x.reshape(x.shape[0], grid, grid, *x.shape[2:]).flip(2).reshape(x.shape)
        return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), g, x)

    sign = torch.tensor([-1.0, 1.0])
    shown = flip.view(-1, 1, 1) & t.present.bool()[..., None]  # absent colours keep their (0, 0)
    xy = torch.where(shown, torch.stack([1 - t.xy[..., 0], t.xy[..., 1]], -1), t.xy)
    offset = cols(torch.where(flip.view(-1, 1, 1), t.patch_offset * sign, t.patch_offset))
    return pixels, replace(
        t, xy=xy, patch_colour=cols(t.patch_colour), patch_kind=cols(t.patch_kind), patch_offset=offset
    )


def scene_targets(scenes: Iterable[Scene], cfg: TinyGPTVConfig) -> SceneTargets:
    grid = cfg.vision.image_size // cfg.vision.patch_size
    colours = list(COLOURS)
    rows = []
    for scene in scenes:
        present = np.zeros(N_COLOURS, np.float32)
        kind = np.full(N_COLOURS, IGNORE, np.int64)
        xy = np.zeros((N_COLOURS, 2), np.float32)
        for s in scene.shapes:
            c = colours.index(s.colour)
            present[c], kind[c], xy[c] = 1.0, SHAPES.index(s.kind), scene.frame.place(s.x, s.y)
        rows.append(
            (present, kind, xy, len(scene.shapes), BACKGROUNDS.index(scene.background))
            + patch_labels(scene, grid)
        )
    return SceneTargets(*(torch.from_numpy(np.stack([np.asarray(r[i]) for r in rows])) for i in range(8)))


class SceneHeads(nn.Module):
    """A linear read-out over each encoder patch token; slot read-outs over the image embeddings.

    The image embeddings are read as slots: query token c (c < 6) holds colour c's shape (present,
    kind, centre), read by one linear map shared by the six slots; token 6 holds the count and token
    7 the background. The decoder then finds "the red shape" at a fixed image position, and "the
    circle" by the same kind code in whichever slot holds it.
    """

    def __init__(self, cfg: TinyGPTVConfig):
        super().__init__()
        if cfg.qformer.num_query_tokens < N_COLOURS + 2:
            raise ConfigError(
                f"scene slots: expected >= {N_COLOURS + 2} query tokens, got {cfg.qformer.num_query_tokens}"
            )
        hidden = cfg.projection.out_features
        self.token = nn.Linear(cfg.vision.width, 1 + N_COLOURS + 1 + N_KINDS + 2)
        self.shape = nn.Linear(hidden, 1 + N_KINDS + 2)  # present, kind, (x, y)
        self.count = nn.Linear(hidden, N_COUNTS)
        self.background = nn.Linear(hidden, N_BACKGROUNDS)

    def forward(self, model: TinyGPTV, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        v = model.vision
        tokens = v.ln_vision(v.encoder(pixels))  # (B, 1+P, Wv)
        embeds = v.proj2(v.proj1(v.qformer(tokens)))  # (B, Q, H)
        t = self.token(tokens[:, 1:])  # (B, P, 14): the cls token has no patch label
        patch_colour, patch_kind, patch_offset = t.split([1 + N_COLOURS, 1 + N_KINDS, 2], dim=-1)
        present, kind, xy = self.shape(embeds[:, :N_COLOURS]).split([1, N_KINDS, 2], dim=-1)  # (B, C, .)
        return {
            "present": present[..., 0],  # (B, C) logits
            "kind": kind,  # (B, C, kinds)
            "xy": xy,  # (B, C, 2)
            "count": self.count(embeds[:, N_COLOURS]),
            "background": self.background(embeds[:, N_COLOURS + 1]),
            "patch_colour": patch_colour,
            "patch_kind": patch_kind,
            "patch_offset": patch_offset,
        }


def scene_loss(out: dict[str, torch.Tensor], t: SceneTargets) -> torch.Tensor:
    """Sum of the cross-entropies and (x10) squared position errors of every head."""
    fg = t.patch_colour > 0
    position = ((out["xy"] - t.xy) ** 2).sum(-1)  # (B, C)
    offset = ((out["patch_offset"] - t.patch_offset) ** 2).sum(-1)  # (B, P)
    return (
        F.binary_cross_entropy_with_logits(out["present"], t.present)
        + F.cross_entropy(out["kind"].flatten(0, 1), t.kind.flatten(), ignore_index=IGNORE)
        + 10 * (position * t.present).sum() / t.present.sum().clamp(min=1)
        + F.cross_entropy(out["count"], t.count)
        + F.cross_entropy(out["background"], t.background)
        + F.cross_entropy(out["patch_colour"].flatten(0, 1), t.patch_colour.flatten())
        + F.cross_entropy(out["patch_kind"].flatten(0, 1), t.patch_kind.flatten())
        + 10 * (offset * fg).sum() / fg.sum().clamp(min=1)
    )


@torch.no_grad()
def scene_accuracy(
    heads: SceneHeads, model: TinyGPTV, pixels: torch.Tensor, t: SceneTargets
) -> dict[str, float]:
    """What the scene head reads off the image embeddings: the accuracies the decoder can hope for."""
    out = heads(model, pixels)
    shown = t.kind != IGNORE
    xy_err = (out["xy"] - t.xy).abs().amax(-1)[shown]  # (shapes,) worse of |dx|, |dy|

    def acc(hit: torch.Tensor) -> float:
        return float(hit.float().mean())

    return {
        "present": acc(((out["present"] > 0).float() == t.present).all(-1)),
        "kind": acc(out["kind"].argmax(-1)[shown] == t.kind[shown]),
        "xy_within_0.05": acc(xy_err < 0.05),
        "count": acc(out["count"].argmax(-1) == t.count),
        "background": acc(out["background"].argmax(-1) == t.background),
    }


# ---- word anchors: the decoder's middle layer learns to look up the shape a question names ----


@dataclass(frozen=True)
class Anchors:
    """Where each row's question names a colour or a kind: (row, position in the suffix, word index)."""

    colour: list[tuple[int, int, int]]
    kind: list[tuple[int, int, int]]


def find_anchors(suffixes: list[list[int]], tokenizer) -> Anchors:
    """Positions of the colour and kind words (each one token of the project's BPE) in each suffix."""

    def ids(words) -> dict[int, int]:
        out = {}
        for i, w in enumerate(words):
            t = tokenizer.encode(" " + w)
            if len(t) != 1:
                raise ConfigError(f"word anchors: expected ' {w}' to be one token, got {len(t)}")
            out[t[0]] = i
        return out

    colour_ids, kind_ids = ids(COLOURS), ids(SHAPES)
    colour, kind = [], []
    for r, suffix in enumerate(suffixes):
        for p, t in enumerate(suffix):
            if t in colour_ids:
                colour.append((r, p, colour_ids[t]))
            elif t in kind_ids:
                kind.append((r, p, kind_ids[t]))
    return Anchors(colour, kind)


class AnchorHeads(nn.Module):
    """Linear read-outs of a decoder layer's output at the named words.

    At a colour word: that colour's kind (or absent), left/right and top/bottom half.
    At a kind word: the colour of the one shape of that kind (or none, or several).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.Linear(hidden, N_KINDS + 1 + 2 + 2)
        self.kind = nn.Linear(hidden, N_COLOURS + 2)


def anchor_loss(
    heads: AnchorHeads,
    hidden: torch.Tensor,
    rows: list[int],
    image_of_row: torch.Tensor,
    anchors: Anchors,
    scenes: SceneTargets,
    offset: int | torch.Tensor,
) -> torch.Tensor:
    """`hidden` (N, T, H) for batch rows `rows`; suffix position p sits at `offset + p` (`offset`: one
    for every row, or per batch row)."""
    where = {r: j for j, r in enumerate(rows)}
    loss = hidden.new_zeros(())
    col = [(where[r], p, c) for r, p, c in anchors.colour if r in where]
    if col:
        j, p, c = (torch.tensor(v) for v in zip(*col, strict=True))
        img = image_of_row[torch.tensor(rows)[j]]
        out = heads.colour(hidden[j, p + (offset if isinstance(offset, int) else offset[j])])  # (A, 9)
        present = scenes.present[img, c].bool()
        kind = torch.where(present, scenes.kind[img, c], N_KINDS)
        side = (scenes.xy[img, c] > 0.5).long()  # (A, 2)
        side = torch.where(present[:, None], side, IGNORE)
        loss = loss + F.cross_entropy(out[:, : N_KINDS + 1], kind)
        loss = loss + F.cross_entropy(out[:, N_KINDS + 1 : N_KINDS + 3], side[:, 0], ignore_index=IGNORE)
        loss = loss + F.cross_entropy(out[:, N_KINDS + 3 :], side[:, 1], ignore_index=IGNORE)
    kd = [(where[r], p, k) for r, p, k in anchors.kind if r in where]
    if kd:
        j, p, k = (torch.tensor(v) for v in zip(*kd, strict=True))
        img = image_of_row[torch.tensor(rows)[j]]
        has = scenes.kind[img] == k[:, None]  # (A, C): colours whose shape is of kind k
        n = has.sum(1)
        target = torch.where(n == 1, has.long().argmax(1), torch.where(n == 0, N_COLOURS, N_COLOURS + 1))
        at = p + (offset if isinstance(offset, int) else offset[j])
        loss = loss + F.cross_entropy(heads.kind(hidden[j, at]), target)
    return loss
