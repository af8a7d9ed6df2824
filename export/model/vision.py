"""EVA ViT-g, the ln_vision LayerNorm, the BLIP-2 Q-Former (query path) and the two projections.

Reference: LAVIS / TinyGPT-V `minigpt4/models/eva_vit.py` (create_eva_vit_g) and `Qformer.py`.
Every module here is plain torch so the ONNX exporter sees simple ops with stable names:

    pixels (B,3,S,S)
      -> encoder (EVA ViT-g)        (B, 1+(S/p)^2, Wv)
      -> ln_vision (LayerNorm)      (B, 1+(S/p)^2, Wv)
      -> qformer (queries x-attend) (B, Q, Hq)
      -> proj1 -> proj2             (B, Q, H_lm)     image embeddings for the decoder
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinygptv_edge.runtime.config import ProjectionConfig, QFormerConfig, VisionConfig


class EvaAttention(nn.Module):
    """Multi-head self-attention; qkv has no bias parameter: bias = concat(q_bias, 0, v_bias)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        qkv = qkv.reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        att = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
        y = att.softmax(dim=-1) @ v  # (B, heads, N, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class EvaMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = EvaAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = EvaMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """Patch embedding + cls token + absolute position embedding + `depth` pre-norm blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, grid^2, W)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+grid^2, W)
        for block in self.blocks:
            x = block(x)
        return x


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a (1, 1+g^2, W) position embedding to a `grid` x `grid` patch grid, bicubic.

    The cls position is kept; patch positions are resized as an image (align_corners=False), as
    LAVIS `interpolate_pos_embed` does when the ViT runs at 448 px on a 224 px checkpoint.
    """
    n_old = pos_embed.shape[1] - 1
    old = math.isqrt(n_old)
    if old * old != n_old:
        raise ValueError(f"pos_embed has {n_old} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    width = patches.shape[-1]
    patches = patches.reshape(1, old, old, width).permute(0, 3, 1, 2)  # (1, W, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, width)
    return torch.cat([cls.float(), patches], dim=1).to(pos_embed.dtype)


class QFormerAttention(nn.Module):
    """BERT attention + output (dense, residual, LayerNorm). `kv_width` differs for cross-attention."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Q, H = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, heads, T, head_dim)
            return t.reshape(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, Q, T)
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, Q, H)
        return self.norm(self.dense(y) + x)


class QFormerFfn(nn.Module):
    """`intermediate_query` + `output_query`: LayerNorm(down(gelu(up(x))) + x)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.intermediate)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(F.gelu(self.up(x))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.self_attn = QFormerAttention(cfg, cfg.hidden)
        self.cross_attn = QFormerAttention(cfg, cfg.vision_width) if cfg.has_cross_attention(index) else None
        self.ffn = QFormerFfn(cfg)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image)
        return self.ffn(x)


class QFormer(nn.Module):
    """The query path of BLIP-2's Q-Former: LayerNorm(query_tokens), then the layers."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden))
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.layers))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.query_tokens.expand(image.shape[0], -1, -1))  # (B, Q, Hq)
        for layer in self.layers:
            x = layer(x, image)
        return x


class VisionTower(nn.Module):
    """pixel_values (B,3,S,S) -> image_embeds (B, Q, H_lm): the graph exported to ONNX."""

    def __init__(self, vision: VisionConfig, qformer: QFormerConfig, projection: ProjectionConfig):
        super().__init__()
        self.encoder = EvaViT(vision)
        self.ln_vision = nn.LayerNorm(vision.width)  # torch default eps 1e-5, as in LAVIS
        self.qformer = QFormer(qformer)
        self.proj1 = nn.Linear(projection.in_features, projection.mid_features)  # llama_proj
        self.proj2 = nn.Linear(projection.mid_features, projection.out_features)  # llama_proj2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.ln_vision(self.encoder(pixel_values))
        return self.proj2(self.proj1(self.qformer(image)))
