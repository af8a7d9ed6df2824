"""Phi-2 as modified by TinyGPT-V, with a KV cache.

Reference: TinyGPT-V `modeling_phi.py` (PhiAttention, PhiDecoderLayer). Per layer (parallel block):

    h    = input_layernorm(x)
    q,k,v = split(query_key_value(h))             # fused layout (heads, 3, head_dim)
    q, k = q_layernorm(q), k_layernorm(k)         # LayerNorm over head_dim, shared by all heads
    q, k = rope(q), rope(k)                       # first rotary_dim dims, NeoX rotate-half
    attn = post_layernorm(dense(softmax(q k^T / sqrt(head_dim) + causal) v))   # RMSNorm
    x    = x + attn + fc2(gelu_new(fc1(h)))

Attention is computed in fp32 (Phi-2 overflows fp16 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tinygptv_edge.runtime.config import LanguageConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (LlamaRMSNorm, computed in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim) for NeoX-style rotation (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of x (B, heads, T, head_dim); pass the rest through."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


@dataclass
class KVCache:
    """Per-layer keys and values (B, heads, T, head_dim), grown by concatenation."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @classmethod
    def empty(cls, layers: int) -> KVCache:
        return cls([None] * layers, [None] * layers)

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class PhiAttention(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.qk_norm_eps)
        self.k_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.qk_norm_eps)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, C = h.shape
        qkv = self.query_key_value(h).view(B, T, self.heads, 3, self.head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # (B, T, heads, head_dim)
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, heads, T, head_dim), fp32
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        S = k.shape[2]
        past = S - T  # positions already in the cache before this call
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, S)
        # query t (absolute position past + t) sees keys 0..past+t
        causal = torch.ones(T, S, dtype=torch.bool, device=h.device).tril(diagonal=past)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C).to(h.dtype)
        return self.dense(y)


class PhiMlp(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_new(self.fc1(x)))


class PhiLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg)
        self.post_layernorm = RMSNorm(cfg.hidden, eps=cfg.post_norm_eps)
        self.mlp = PhiMlp(cfg)

    def forward(self, x, cos, sin, cache, layer):
        h = self.input_layernorm(x)
        attn = self.post_layernorm(self.self_attn(h, cos, sin, cache, layer))
        return x + attn + self.mlp(h)


class PhiModel(nn.Module):
    """Token embeddings, the layers, final LayerNorm and the biased lm_head."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(PhiLayer(cfg) for _ in range(cfg.layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.cfg.layers)

    def hidden_states(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, H) embeddings -> (B, T, H) final hidden states; appends to `cache` if given."""
        past = cache.length if cache is not None else 0
        T = inputs_embeds.shape[1]
        if past + T > self.cfg.max_positions:
            raise ValueError(
                f"sequence of {past + T} positions exceeds max_positions {self.cfg.max_positions}"
            )
        positions = torch.arange(past, past + T, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, self.cfg.rotary_dim, self.cfg.rope_theta)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        return self.final_layernorm(x)

    def forward(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, H) embeddings -> (B, T, vocab) logits."""
        return self.lm_head(self.hidden_states(inputs_embeds, cache))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)
