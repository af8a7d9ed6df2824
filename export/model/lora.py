"""peft-style LoRA: merged as W + (alpha / r) * B @ A, or kept apart for an unmerged forward."""

from __future__ import annotations

import torch
from torch import nn


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W (out, in) + scale * B (out, r) @ A (r, in), computed in fp32."""
    return weight.float() + scale * (b.float() @ a.float())


class LoraLinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T: the forward peft runs before merging (dropout off)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(a.float())
        self.lora_B = nn.Parameter(b.float())
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:  # so callers that read .weight still see the base
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)


def attach(model: nn.Module, module_name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Replace the nn.Linear at dotted `module_name` by a LoraLinear around it."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, child)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{module_name} is a {type(base).__name__}, expected nn.Linear")
    setattr(parent, child, LoraLinear(base, a, b, scale))
