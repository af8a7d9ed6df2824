"""Where the GGUF exporter reads the language model from: tensors by canonical name, one at a time.

Two sources:
  - `model_source`: a loaded reference model (TinyGPTV, LoRA merged by the loaders);
  - `single_source`: the project's single-checkpoint folder, streamed from its memory-mapped
    safetensors file without building the model (the full size never sits in RAM as a whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygptv_edge.export.checkpoints import names as N
from tinygptv_edge.runtime import contract as C
from tinygptv_edge.runtime.config import LanguageConfig, TinyGPTVConfig
from tinygptv_edge.runtime.errors import CheckpointError, UnexpectedKeysError
from tinygptv_edge.runtime.text.tokenizer import Tokenizer


@dataclass
class LanguageSource:
    """The language model of one TinyGPT-V: config, tokenizer, and tensors fetched by canonical name."""

    cfg: TinyGPTVConfig
    tokenizer: Tokenizer
    shapes: dict[str, tuple[int, ...]]  # canonical name ("language.*") -> shape, in source order
    fetch: Callable[[str], torch.Tensor]
    label: str  # where the tensors come from, for error messages
    sha256: dict[str, str] = field(default_factory=dict)  # source file name -> sha256


def expected_shapes(cfg: LanguageConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape the language model must have (PhiModel's parameters), from the contract."""
    return C.language_shapes(
        cfg.layers, cfg.hidden, cfg.intermediate, cfg.vocab_size, cfg.heads, canonical=True
    )


def model_source(
    model, tokenizer: Tokenizer, sha256: dict[str, str] | None = None, cfg: TinyGPTVConfig | None = None
) -> LanguageSource:
    """A loaded TinyGPTV (or a bare PhiModel with `cfg`): its `.language` parameters."""
    language = getattr(model, "language", model)
    cfg = cfg or getattr(model, "cfg", None)
    if not isinstance(cfg, TinyGPTVConfig):
        raise CheckpointError("model_source: pass a TinyGPTV, or a PhiModel together with its TinyGPTVConfig")
    sd = {f"language.{k}": v for k, v in language.state_dict().items()}
    return LanguageSource(
        cfg=cfg,
        tokenizer=tokenizer,
        shapes={k: tuple(v.shape) for k, v in sd.items()},
        fetch=lambda name: sd[name].detach(),
        label="reference model",
        sha256=dict(sha256 or {}),
    )


def single_source(
    folder: str | Path, with_hash: bool = True, cfg: TinyGPTVConfig | None = None
) -> LanguageSource:
    """The single-checkpoint folder (`export/checkpoints/single.py`), language tensors streamed by name.

    `cfg` replaces the folder's config.json."""
    from safetensors import SafetensorError, safe_open

    from tinygptv_edge.export.checkpoints.bounds import check_config_fits
    from tinygptv_edge.export.checkpoints.safeio import safetensors_keys, weight_tensor
    from tinygptv_edge.export.checkpoints.single import CONFIG, WEIGHTS
    from tinygptv_edge.runtime.image_cache import file_sha256

    folder = Path(folder)
    cfg = cfg or TinyGPTVConfig.load(folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in {folder}")
    check_config_fits(cfg, safetensors_keys(weights), str(weights), ("language.layers",))
    layers = range(cfg.language.layers)
    table = {
        N.SINGLE_LM_PREFIX + k: v
        for k, v in {**N.expand(N.PHI_GLOBAL), **N.expand(N.PHI_LAYER, layers)}.items()
    }
    try:
        with safe_open(str(weights), framework="pt") as handle:
            official = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if not name.startswith(N.SINGLE_LM_PREFIX):
                    continue  # vision, Q-Former, projections: not the language model
                if name not in table:
                    raise UnexpectedKeysError([name], str(weights))
                official[table[name]] = name
            shapes = {c: tuple(handle.get_slice(o).get_shape()) for c, o in official.items()}
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from e

    def fetch(canonical: str) -> torch.Tensor:
        # a fresh mapping per tensor: pages read so far are unmapped again, so RSS stays one tensor
        with safe_open(str(weights), framework="pt") as f:
            t = f.get_tensor(official[canonical])
        return weight_tensor(canonical, t, str(weights))

    return LanguageSource(
        cfg=cfg,
        tokenizer=Tokenizer.from_file(folder),
        shapes=shapes,
        fetch=fetch,
        label=str(weights),
        sha256={WEIGHTS: file_sha256(weights)} if with_hash else {},
    )
