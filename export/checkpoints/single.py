"""The single checkpoint the project ships: one folder, one safetensors file under official names.

    model.safetensors      every tensor, LoRA merged, under TinyGPT-V's own names
                           (`visual_encoder.*`, `ln_vision.*`, `query_tokens`, `Qformer.bert.*`,
                           `llama_proj*`, `llama_model.model.*`, `llama_model.lm_head.*`)
    config.json            TinyGPTVConfig (runtime/config.py)
    tokenizer.json, tokenizer_config.json

Writes go to a temporary folder that is verified, then renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tinygptv_edge.export.checkpoints import names as N
from tinygptv_edge.export.checkpoints.bounds import check_config_fits
from tinygptv_edge.export.checkpoints.loaders import Collector, LoadSummary, qformer_table
from tinygptv_edge.export.checkpoints.safeio import iter_safetensors, safetensors_keys
from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.staging import stage_dir
from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.errors import CheckpointError, MissingKeysError, UnexpectedKeysError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def single_table(cfg: TinyGPTVConfig) -> dict[str, str]:
    """Official name -> canonical name for every tensor of the model."""
    eva = N.expand(N.EVA_GLOBAL + N.EVA_BLOCK, range(cfg.vision.depth))
    phi = {**N.expand(N.PHI_GLOBAL), **N.expand(N.PHI_LAYER, range(cfg.language.layers))}
    return {
        **{N.SINGLE_VISION_PREFIX + k: v for k, v in eva.items()},
        **qformer_table(cfg),
        **N.expand(N.PROJECTION),
        **{N.SINGLE_LM_PREFIX + k: v for k, v in phi.items()},
    }


def save_single(model: TinyGPTV, tokenizer_dir: str | Path, out: str | Path, dtype=torch.float32) -> Path:
    """Write `model` as the single checkpoint folder `out` (atomically replaced)."""
    from safetensors.torch import save_file

    out = Path(out)
    cfg = model.cfg
    canonical_to_official = {v: k for k, v in single_table(cfg).items()}
    sd = model.state_dict()
    unmapped = [k for k in sd if k not in canonical_to_official]
    if unmapped:
        raise UnexpectedKeysError(unmapped, "reference model (no official name)")
    tensors = {canonical_to_official[k]: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    tmp = stage_dir(out)
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "model": cfg.name})
        cfg.save(tmp / CONFIG)
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
        if not (tmp / "tokenizer.json").is_file():
            raise CheckpointError(f"no tokenizer.json in {tokenizer_dir}")
        load_single(tmp)  # verify before publishing
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_single(folder: str | Path, cfg: TinyGPTVConfig | None = None) -> tuple[TinyGPTV, LoadSummary]:
    """Read a single-checkpoint folder; every tensor must be present and mapped.

    `cfg` replaces the folder's config.json (its sizes must match the weights)."""
    folder = Path(folder)
    cfg = cfg or TinyGPTVConfig.load(folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in {folder}")
    check_config_fits(cfg, safetensors_keys(weights), str(weights))
    with torch.device("meta"):
        model = TinyGPTV(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    summary = LoadSummary(sources=[str(weights)], add_bos=cfg.prompt.add_bos)
    col = Collector(shapes, summary)
    table = single_table(cfg)
    unexpected = []
    for name, t in iter_safetensors(weights):
        if name in table:
            col.put(table[name], t, str(weights))
        else:
            unexpected.append(name)
    if unexpected:
        raise UnexpectedKeysError(unexpected, str(weights))
    official = {v: k for k, v in table.items()}
    missing = [official[k] for k in col.missing()]
    if missing:
        raise MissingKeysError(missing, str(weights))
    model.load_state_dict(col.tensors, strict=True, assign=True)
    return model.eval(), summary
