"""Synthetic checkpoints: random weights written in exactly the official file formats.

    OUT/phi-2/                          config.json, tokenizer files, *.safetensors (+ index)
    OUT/eva_vit_g.pth                   plain state dict, `stored_depth` blocks, 224 px pos_embed
    OUT/blip2_pretrained_flant5xxl.pth  {'model': Q-Former + its unused text branch + extras}
    OUT/TinyGPT-V_for_Stage{N}.pth      {'model': projections, LoRA pairs, norm weights}

Tensors are made one file at a time so the full size fits in memory. The random values are
reproducible from the seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygptv_edge.export.checkpoints import names as N
from tinygptv_edge.export.checkpoints.loaders import PHI_LAYOUTS, qformer_table
from tinygptv_edge.export.checkpoints.tokenizer_train import save_tokenizer, train_bpe
from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.runtime.config import TinyGPTVConfig, full_config, tiny_config
from tinygptv_edge.runtime.errors import ConfigError

EVA_FILE = "eva_vit_g.pth"
BLIP2_FILE = "blip2_pretrained_flant5xxl.pth"
PHI_DIR = "phi-2"


def stage_file(stage: int) -> str:
    return f"TinyGPT-V_for_Stage{stage}.pth"


@dataclass
class SynthResult:
    out: Path
    phi2: Path
    eva: Path
    blip2: Path
    stage: Path
    cfg: TinyGPTVConfig
    # canonical name -> tensor of the base files, and the LoRA pairs (only kept when `keep=True`)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    stage_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Rand:
    """Deterministic random tensors: a fresh generator per tensor name, seeded from (seed, name)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(
        self, name: str, shape: tuple[int, ...], std: float = 0.02, mean: float = 0.0
    ) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + _stable_hash(name)) % (2**63))
        return torch.randn(shape, generator=g) * std + mean


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for b in s.encode():
        h = ((h ^ b) * 1099511628211) % (2**64)
    return h


def canonical_init(name: str, shape: tuple[int, ...], rand: Rand) -> torch.Tensor:
    """Random value for a canonical tensor: norm weights near 1, biases and weights small."""
    last = name.rsplit(".", 1)
    is_norm = any(s in name for s in ("norm", "ln_vision", "layernorm"))
    if is_norm and last[-1] == "weight":
        return rand(name, shape, std=0.05, mean=1.0)
    if last[-1] in ("bias", "q_bias", "v_bias"):
        return rand(name, shape, std=0.02)
    if name.endswith(("embed_tokens.weight", "pos_embed", "cls_token", "query_tokens")):
        return rand(name, shape, std=0.5 if "query_tokens" in name else 0.02)
    fan_in = shape[1] if len(shape) >= 2 else shape[0]
    if len(shape) == 4:  # conv
        fan_in = shape[1] * shape[2] * shape[3]
    return rand(name, shape, std=fan_in**-0.5)


def model_shapes(cfg: TinyGPTVConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = TinyGPTV(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _atomic_torch_save(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- Phi-2 folder -----------------------------------------------------------------------------


def _phi_official_tensors(
    cfg: TinyGPTVConfig, layout: str, values: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Official (layout) name -> tensor, from canonical values; TinyGPT-V's added norms left out."""
    lm = cfg.language
    added = {t.format(i=i) for t in N.ADDED_NORMS for i in range(lm.layers)}
    if layout == "msft":
        table = {**N.expand(N.PHI_MSFT_GLOBAL), **N.expand(N.PHI_MSFT_LAYER, range(lm.layers))}
    else:
        table = {**N.expand(N.PHI_GLOBAL), **N.expand(N.PHI_LAYER, range(lm.layers))}
    for official, canonical in table.items():
        if canonical in added:
            continue
        t = values(canonical)
        if canonical.endswith(("query_key_value.weight", "query_key_value.bias")):
            fused = t.reshape(lm.heads, 3, lm.head_dim, *t.shape[1:])  # (heads, 3, d, ...)
            if layout == "hf":
                for j, proj in enumerate("qkv"):
                    yield (
                        official.replace("query_key_value", f"{proj}_proj"),
                        fused[:, j].reshape(lm.hidden, *t.shape[1:]).contiguous(),
                    )
                continue
            if layout == "msft":
                t = fused.transpose(0, 1).reshape(t.shape).contiguous()
        yield official, t


def phi2_config_json(cfg: TinyGPTVConfig, layout: str, dtype: torch.dtype) -> dict:
    lm = cfg.language
    if layout == "msft":
        return {
            "model_type": "phi-msft",
            "architectures": ["PhiForCausalLM"],
            "vocab_size": lm.vocab_size,
            "n_embd": lm.hidden,
            "n_layer": lm.layers,
            "n_head": lm.heads,
            "n_inner": lm.intermediate,
            "n_positions": lm.max_positions,
            "rotary_dim": lm.rotary_dim,
            "layer_norm_epsilon": lm.layer_norm_eps,
            "activation_function": "gelu_new",
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
    return {
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden,
        "num_hidden_layers": lm.layers,
        "num_attention_heads": lm.heads,
        "num_key_value_heads": lm.heads,
        "intermediate_size": lm.intermediate,
        "max_position_embeddings": lm.max_positions,
        "rope_theta": lm.rope_theta,
        "partial_rotary_factor": lm.partial_rotary_factor,
        "layer_norm_eps": lm.layer_norm_eps,
        "hidden_act": lm.hidden_act,
        "qk_layernorm": layout == "tinygptv",
        "bos_token_id": None,
        "eos_token_id": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_phi2_folder(
    cfg: TinyGPTVConfig,
    out: Path,
    layout: str,
    values: Callable[[str], torch.Tensor],
    tokenizer_src: Path,
    dtype: torch.dtype,
    shard_bytes: int = 2 << 30,
) -> None:
    from safetensors.torch import save_file

    if layout not in PHI_LAYOUTS:
        raise ConfigError(f"Phi-2 layout: expected one of {PHI_LAYOUTS}, got {layout!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(phi2_config_json(cfg, layout, dtype), indent=2) + "\n")
    for f in tokenizer_src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    shard: dict[str, torch.Tensor] = {}
    shard_names: list[list[str]] = []
    tmp_paths: list[Path] = []
    size = total = 0

    def flush() -> None:
        tmp = out / f".shard-{len(tmp_paths)}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        tmp_paths.append(tmp)
        shard_names.append(list(shard))
        shard.clear()

    for name, t in _phi_official_tensors(cfg, layout, values):
        t = t.to(dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(tmp_paths)
    if n == 1:
        os.replace(tmp_paths[0], out / "model.safetensors")
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(zip(tmp_paths, shard_names, strict=True)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- the whole set ------------------------------------------------------------------------------


def synthesize(
    out: str | Path,
    cfg: TinyGPTVConfig,
    *,
    seed: int = 0,
    phi_layout: str = "hf",
    peft_style: str = "0.2.0",
    dtype: torch.dtype = torch.float32,
    keep: bool = False,
    tokenizer_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SynthResult:
    """Write a full set of official-format checkpoints for `cfg` into `out`."""
    if peft_style not in ("0.2.0", "new"):
        raise ConfigError(f"peft_style: expected '0.2.0' or 'new', got {peft_style!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rand = Rand(seed)
    shapes = model_shapes(cfg)
    say = progress or (lambda _msg: None)
    kept: dict[str, torch.Tensor] = {}

    def value(canonical: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        t = canonical_init(canonical, shape or shapes[canonical], rand)
        if keep:
            kept[canonical] = t
        return t

    # tokenizer
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else out / ".tokenizer"
    if tokenizer_dir is None:
        say("training tokenizer")
        vocab = min(cfg.language.vocab_size, 50295)
        save_tokenizer(train_bpe(vocab), tok_dir, max_length=cfg.language.max_positions)

    say("writing phi-2 folder")
    phi_dir = out / PHI_DIR
    write_phi2_folder(cfg, phi_dir, phi_layout, value, tok_dir, dtype)

    say(f"writing {EVA_FILE}")
    eva_path = out / EVA_FILE
    _atomic_torch_save(_eva_state_dict(cfg, shapes, rand, value, dtype), eva_path)

    say(f"writing {BLIP2_FILE}")
    blip2_path = out / BLIP2_FILE
    _atomic_torch_save({"model": _blip2_state_dict(cfg, rand, value, dtype)}, blip2_path)

    say(f"writing {stage_file(cfg.stage)}")
    stage_path = out / stage_file(cfg.stage)
    stage_sd, stage_plain, lora = _stage_state_dict(cfg, shapes, rand, peft_style)
    _atomic_torch_save({"model": stage_sd}, stage_path)
    result = SynthResult(out, phi_dir, eva_path, blip2_path, stage_path, cfg)
    if keep:
        result.base, result.stage_tensors, result.lora = kept, stage_plain, lora
    if tokenizer_dir is None:
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
    return result


def _eva_state_dict(cfg, shapes, rand, value, dtype) -> dict[str, torch.Tensor]:
    v = cfg.vision
    sd: dict[str, torch.Tensor] = {}
    pre_grid = v.pretrain_image_size // v.patch_size
    for official, canonical in N.expand(N.EVA_GLOBAL + N.EVA_BLOCK, range(v.depth)).items():
        if official == "pos_embed":  # stored at the pretraining size
            t = value(canonical, (1, 1 + pre_grid**2, v.width))
        else:
            t = value(canonical)
        sd[official] = t.to(dtype)
    # the unused last block(s): present in the file, never loaded
    for i in range(v.depth, v.stored_depth):
        for official, canonical in N.expand(N.EVA_BLOCK, [i]).items():
            ref = canonical.replace(f"blocks.{i}.", "blocks.0.")
            sd[official] = canonical_init(canonical, shapes[ref], rand).to(dtype)
    return sd


def _blip2_state_dict(cfg, rand, value, dtype) -> dict[str, torch.Tensor]:
    q = cfg.qformer
    sd = {official: value(canonical).to(dtype) for official, canonical in qformer_table(cfg).items()}
    # parts of the BLIP-2 file that TinyGPT-V never uses
    extras = {
        "Qformer.bert.embeddings.word_embeddings.weight": (30522 if q.hidden == 768 else 128, q.hidden),
        "Qformer.bert.embeddings.position_embeddings.weight": (512, q.hidden),
        "Qformer.cls.predictions.bias": (30522 if q.hidden == 768 else 128,),
        "Qformer.cls.predictions.transform.dense.weight": (q.hidden, q.hidden),
        "t5_proj.weight": (64, q.hidden),
        "t5_proj.bias": (64,),
        "temp": (),
    }
    for i in range(q.layers):
        extras[f"Qformer.bert.encoder.layer.{i}.intermediate.dense.weight"] = (q.intermediate, q.hidden)
        extras[f"Qformer.bert.encoder.layer.{i}.output.dense.weight"] = (q.hidden, q.intermediate)
        extras[f"Qformer.bert.encoder.layer.{i}.output.LayerNorm.weight"] = (q.hidden,)
    for name, shape in extras.items():
        sd[name] = rand(name, shape).to(dtype)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    return sd


def _stage_state_dict(cfg, shapes, rand, peft_style):
    """Trained tensors only, as TinyGPT-V's runner saves them: projections, LoRA, norm weights."""
    lm = cfg.language
    sd: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for official, canonical in N.expand(N.PROJECTION).items():
        sd[official] = plain[canonical] = canonical_init(canonical, shapes[canonical], rand)
    pre = N.STAGE_LM_PREFIX
    norms = ["self_attn.q_layernorm", "self_attn.k_layernorm", "post_layernorm", "input_layernorm"]
    ad = ".default" if peft_style == "new" else ""
    for i in range(lm.layers):
        for norm in norms:
            canonical = f"language.layers.{i}.{norm}.weight"
            t = rand("stage." + canonical, shapes[canonical], std=0.05, mean=1.0)
            sd[f"{pre}model.layers.{i}.{norm}.weight"] = plain[canonical] = t
        for module, fan_out in (("query_key_value", 3 * lm.hidden), ("dense", lm.hidden)):
            base = f"{pre}model.layers.{i}.self_attn.{module}"
            a = rand(f"{base}.A", (cfg.lora.r, lm.hidden), std=lm.hidden**-0.5)
            b = rand(f"{base}.B", (fan_out, cfg.lora.r), std=0.02)
            sd[f"{base}.lora_A{ad}.weight"], sd[f"{base}.lora_B{ad}.weight"] = a, b
            lora[f"language.layers.{i}.self_attn.{module}.weight"] = (a, b)
    canonical = "language.final_layernorm.weight"
    t = rand("stage." + canonical, shapes[canonical], std=0.05, mean=1.0)
    sd[f"{pre}model.final_layernorm.weight"] = plain[canonical] = t
    return sd, plain, lora


def synth_preset(size: str, stage: int = 3) -> tuple[TinyGPTVConfig, torch.dtype]:
    """The config and storage dtype of `--size tiny|full` (full is stored in fp16 like the originals)."""
    if size == "tiny":
        return tiny_config(stage), torch.float32
    if size == "full":
        return full_config(stage), torch.float16
    raise ConfigError(f"size: expected 'tiny' or 'full', got {size!r}")
