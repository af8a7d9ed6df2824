"""A multimodal importance matrix: activation statistics of the language model's matmuls.

For every 2-D weight W (out, in) the quantizer is told how much each input column matters:

    imatrix[W][j] = mean over calibration tokens of x_j^2        # x: the input row W sees, (in,)

The reference model runs on calibration (image, prompt) pairs: the prompt goes through the stage's
template, the image embeddings are spliced in at <ImageHere> (what llama.cpp's text-only imatrix
tool cannot do), and optionally a greedy answer is decoded so answer tokens count too.
Forward pre-hooks on the nn.Linear modules collect the sums; token embeddings have no matmul input
and get none (as in llama.cpp).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinygptv_edge.runtime import contract as C
from tinygptv_edge.runtime.config import IMAGE_PLACEHOLDER
from tinygptv_edge.runtime.errors import ConfigError

DEFAULT_QUESTIONS = (
    "Describe this image in detail.",
    "What objects are in the picture?",
    "What colour is the largest shape?",
    "How many things can you see?",
    "Where is the object in the image?",
)


@dataclass
class Imatrix:
    """GGUF weight name -> mean squared input per column; `counts` tokens seen per weight."""

    values: dict[str, np.ndarray]
    counts: dict[str, int]
    chunks: int  # calibration pairs run
    dataset: str = ""

    def save(self, path: str | Path) -> None:
        """An .npz file: one array per weight, plus the counts (reusable across levels)."""
        meta = {"counts": self.counts, "chunks": self.chunks, "dataset": self.dataset}
        np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **self.values)

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(f["__meta__"].tobytes())
                values = {k: f[k].astype(np.float32) for k in f.files if k != "__meta__"}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"cannot read importance matrix {path}: {e}") from e
        return cls(values, meta["counts"], meta["chunks"], meta.get("dataset", ""))

    def info(self) -> dict[str, int | str]:
        """The `quantize.imatrix.*` metadata llama.cpp writes."""
        out: dict[str, int | str] = {"entries_count": len(self.values), "chunks_count": self.chunks}
        if self.dataset:
            out["dataset"] = self.dataset
        return out


@dataclass
class _Stats:
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 (in,)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, in)
        s = rows.pow(2).sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]


def linear_modules(language: torch.nn.Module) -> dict[str, str]:
    """Module path inside PhiModel -> GGUF weight name, for every matmul weight of the contract."""
    modules = dict(language.named_modules())
    out = {}
    for t in C.language_tensors(len(language.layers)):
        path = t.canonical.removeprefix("language.").removesuffix(".weight")
        if t.role == C.MATMUL and isinstance(modules.get(path), torch.nn.Linear):
            out[path] = t.gguf
    return out


def format_prompt(model, prompt: str, with_image: bool) -> str:
    """A full prompt stays as is; a bare question goes through the stage's first-turn template."""
    if IMAGE_PLACEHOLDER in prompt:
        return prompt
    return model.cfg.prompt.first_turn(prompt, with_image=with_image)


@torch.no_grad()
def collect_imatrix(
    model,
    tokenizer,
    pairs: Iterable[tuple[np.ndarray | torch.Tensor | None, str]],
    answer_tokens: int = 0,
    dataset: str = "",
    progress: Callable[[int], None] | None = None,
) -> Imatrix:
    """Run TinyGPTV `model` on (pixel_values (3,S,S) or None, prompt) pairs and collect the imatrix."""
    language = model.language
    stats = _Stats()
    hooks = []
    for path, gguf_name in linear_modules(language).items():
        module = language.get_submodule(path)
        hooks.append(module.register_forward_pre_hook(lambda _m, args, n=gguf_name: stats.add(n, args[0])))
    chunks = 0
    try:
        for pixels, prompt in pairs:
            pv = None
            if pixels is not None:
                pv = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
                pv = pv[None] if pv.ndim == 3 else pv
                if pv.shape[0] != 1:
                    shape = tuple(pv.shape)
                    raise ConfigError(f"calibration pair: expected one image (3, S, S), got {shape}")
            text = format_prompt(model, prompt, pv is not None)
            embeds = model.prompt_embeds(text, tokenizer, pv)  # (1, T, H)
            if answer_tokens > 0:
                model.generate(embeds, answer_tokens, (tokenizer.eos_id,))
            else:
                language(embeds)
            chunks += 1
            if progress:
                progress(chunks)
    finally:
        for h in hooks:
            h.remove()
    if chunks == 0:
        raise ConfigError("importance matrix: no calibration pairs were given")
    values = {n: (s / stats.counts[n]).float().numpy() for n, s in stats.sums.items()}
    return Imatrix(values, dict(stats.counts), chunks, dataset)
