"""Assemble the reference model from the files users have.

Sources (any subset that covers the model):
  a. a Phi-2 Hugging Face folder in any of three layouts (HF q/k/v; TinyGPT-V query_key_value;
     Microsoft's original Wqkv), safetensors or .bin;
  b. `eva_vit_g.pth` (40 blocks stored, `depth` used; pos_embed resized bicubically when needed);
  c. `blip2_pretrained_flant5xxl.pth` (`Qformer.bert.*`, `query_tokens`, `ln_vision.*`);
  d. `TinyGPT-V_for_Stage{1..4}.pth` overlaid on those, peft LoRA merged;
  e. the single checkpoint the project ships (see `single.py`).

Each tensor goes through the name tables in `names.py`; anything unmapped, missing or of the
wrong shape raises a typed error naming it. Tolerated gaps are listed in the `LoadSummary`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygptv_edge.export.checkpoints import names as N
from tinygptv_edge.export.checkpoints.bounds import check_layers
from tinygptv_edge.export.checkpoints.safeio import (
    check_finite,
    iter_safetensors,
    load_pickle,
    safetensors_keys,
    tensor_dict,
    weight_tensor,
)
from tinygptv_edge.export.model import lora as lora_ops
from tinygptv_edge.export.model.phi import PhiModel
from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.model.vision import interpolate_pos_embed
from tinygptv_edge.runtime.checks import small_file
from tinygptv_edge.runtime.config import LanguageConfig, TinyGPTVConfig, full_config
from tinygptv_edge.runtime.errors import (
    CheckpointError,
    ConfigError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
)


@dataclass
class LoadSummary:
    """What a load did: where tensors came from and every gap that was tolerated."""

    sources: list[str] = field(default_factory=list)
    loaded: int = 0
    defaulted: list[str] = field(default_factory=list)  # left at their initial value
    ignored: dict[str, int] = field(default_factory=dict)  # source -> tensors ignored by rule
    lora_merged: list[str] = field(default_factory=list)
    lora_attached: list[str] = field(default_factory=list)
    lora_rank: int | None = None  # read from the tensor shapes
    lora_alpha: float | None = None  # from the config (peft 0.2.0 files do not record it)
    pos_embed: str | None = None
    layout: str | None = None
    add_bos: bool | None = None  # the prompt's BOS rule the model was loaded with
    template: str | None = None  # the prompt's turn template, by name

    def format(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {len(self.sources)} source(s)"]
        lines += [f"  source: {s}" for s in self.sources]
        if self.layout:
            lines.append(f"  Phi-2 layout: {self.layout}")
        for src, n in self.ignored.items():
            lines.append(f"  ignored by rule: {n} tensor(s) of {src}")
        if self.defaulted:
            kinds = sorted({re.sub(r"\.\d+\.", ".N.", k) for k in self.defaulted})
            lines.append(f"  left at initial value: {len(self.defaulted)} tensor(s): {', '.join(kinds)}")
        if self.lora_rank is not None:
            alpha = self.lora_alpha
            lines.append(
                f"  LoRA rank {self.lora_rank} (from the tensor shapes), alpha {alpha:g} (from the config), "
                f"scale {alpha / self.lora_rank:g}"
            )
        if self.lora_merged:
            lines.append(f"  LoRA merged into {len(self.lora_merged)} linear layer(s)")
        if self.lora_attached:
            lines.append(f"  LoRA attached unmerged to {len(self.lora_attached)} linear layer(s)")
        if self.template:
            lines.append(f"  prompt template: {self.template}")
        if self.add_bos is not None:
            lines.append(f"  BOS before the first turn: {'yes' if self.add_bos else 'no'}")
        if self.pos_embed:
            lines.append(f"  pos_embed: {self.pos_embed}")
        return "\n".join(lines)


class Collector:
    """Canonical name -> tensor, with the target shapes of the model checked on arrival."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], summary: LoadSummary):
        self.shapes, self.summary = shapes, summary
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, t: torch.Tensor, source: str) -> None:
        if name not in self.shapes:
            raise UnexpectedKeysError([name], source)
        if tuple(t.shape) != self.shapes[name]:
            raise ShapeMismatchError(name, self.shapes[name], tuple(t.shape), source)
        t = weight_tensor(name, t, source)
        if name not in self.tensors:
            self.summary.loaded += 1
        self.tensors[name] = t

    def missing(self) -> list[str]:
        return [k for k in self.shapes if k not in self.tensors]


# ---------------------------------------------------------------------------------------------
# Phi-2 folders
# ---------------------------------------------------------------------------------------------

PHI_LAYOUTS = ("hf", "tinygptv", "msft")


def phi2_config(folder: str | Path) -> LanguageConfig:
    """LanguageConfig from a Phi-2 `config.json` (transformers `phi` or original `phi-msft` keys)."""
    path = small_file(Path(folder) / "config.json", "Phi-2 config", CheckpointError)
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"cannot read Phi-2 config {path}: {e}") from e
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(c).__name__}")

    def get(key: str, kind: type | tuple[type, ...] = int, default=None):
        value = c.get(key, default)
        if value is None and default is None:
            raise CheckpointError(f"{path}: missing config key {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {key}: expected {_kind_name(kind)}, got {value!r}")
        return value

    number = (int, float)
    try:
        if "n_embd" in c:  # phi-msft
            hidden, heads = get("n_embd"), get("n_head")
            rotary = get("rotary_dim", int, 32)
            return LanguageConfig(
                vocab_size=get("vocab_size"),
                hidden=hidden,
                layers=get("n_layer"),
                heads=heads,
                intermediate=get("n_inner", int, 4 * hidden) if c.get("n_inner") else 4 * hidden,
                max_positions=get("n_positions", int, 2048),
                partial_rotary_factor=rotary / (hidden // heads) if heads > 0 and hidden >= heads else 0.0,
                layer_norm_eps=get("layer_norm_epsilon", number, 1e-5),
                qk_norm_eps=get("layer_norm_epsilon", number, 1e-5),
            )
        return LanguageConfig(
            vocab_size=get("vocab_size"),
            hidden=get("hidden_size"),
            layers=get("num_hidden_layers"),
            heads=get("num_attention_heads"),
            intermediate=get("intermediate_size"),
            max_positions=get("max_position_embeddings", int, 2048),
            rope_theta=float(get("rope_theta", number, 10000.0)),
            partial_rotary_factor=get("partial_rotary_factor", number, 0.4),
            layer_norm_eps=get("layer_norm_eps", number, 1e-5),
            qk_norm_eps=get("layer_norm_eps", number, 1e-5),
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _kind_name(kind) -> str:
    return "a number" if isinstance(kind, tuple) else "an integer"


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin")
    if not files:
        raise CheckpointError(f"no *.safetensors or *.bin weights in {folder}")
    return files


def _iter_weight_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        yield from iter_safetensors(path)
    else:
        yield from tensor_dict(load_pickle(path), path).items()


def _weight_file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return safetensors_keys(path)
    return list(tensor_dict(load_pickle(path), path))


def _phi2_keys(folder: str | Path) -> list[str]:
    return [k for f in weight_files(Path(folder)) for k in _weight_file_keys(f)]


def detect_phi_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(".self_attn.q_proj." in k for k in keys):
        return "hf"
    if any(".mixer.Wqkv." in k for k in keys):
        return "msft"
    if any(".self_attn.query_key_value." in k for k in keys):
        return "tinygptv"
    raise CheckpointError("unrecognised Phi-2 layout: no q_proj, Wqkv or query_key_value tensors found")


def fuse_qkv(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """HF q, k, v (H*d, ...) -> fused rows ordered (heads, 3, head_dim)."""
    q, k, v = (p.reshape(heads, -1, *p.shape[1:]) for p in parts)  # (heads, d, ...)
    return torch.stack([q, k, v], dim=1).reshape(-1, *parts[0].shape[1:])


def msft_to_fused(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Wqkv rows ordered (3, heads, head_dim) -> (heads, 3, head_dim)."""
    x = t.reshape(3, heads, -1, *t.shape[1:])
    return x.transpose(0, 1).reshape(t.shape)


def iter_phi2(
    folder: str | Path, cfg: LanguageConfig, summary: LoadSummary, prefix: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, tensor) from a Phi-2 folder; the qkv layout is converted."""
    folder = Path(folder)
    files = weight_files(folder)
    keys = [k for f in files for k in _weight_file_keys(f)]
    layout = summary.layout = detect_phi_layout(keys)
    table = _phi_table(layout, range(cfg.layers))
    pending: dict[str, list] = {}
    source = str(folder)
    for f in files:
        for name, t in _iter_weight_file(f):
            if not name.startswith(prefix):
                raise UnexpectedKeysError([name], source)
            key = name[len(prefix) :]
            if N.matches_any(key, N.PHI_IGNORED):
                summary.ignored[source] = summary.ignored.get(source, 0) + 1
                continue
            if key in table:
                canonical = table[key]
                if layout == "msft" and canonical.endswith(
                    ("query_key_value.weight", "query_key_value.bias")
                ):
                    t = msft_to_fused(t, cfg.heads)
                yield canonical, t
                continue
            m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
            if layout == "hf" and m:
                i, which, param = int(m[1]), "qkv".index(m[2]), m[3]
                if i >= cfg.layers:
                    raise UnexpectedKeysError([name], source)
                slot = pending.setdefault(
                    f"language.layers.{i}.self_attn.query_key_value.{param}", [None] * 3
                )
                slot[which] = t
                continue
            raise UnexpectedKeysError([name], source)
    for canonical, parts in pending.items():
        if any(p is None for p in parts):
            missing = [f"{canonical} ({'qkv'[j]}_proj)" for j, p in enumerate(parts) if p is None]
            raise MissingKeysError(missing, source)
        yield canonical, fuse_qkv(parts, cfg.heads)


def _phi_table(layout: str, layers: range) -> dict[str, str]:
    if layout == "msft":
        return {**N.expand(N.PHI_MSFT_GLOBAL), **N.expand(N.PHI_MSFT_LAYER, layers)}
    return {**N.expand(N.PHI_GLOBAL), **N.expand(N.PHI_LAYER, layers)}


# ---------------------------------------------------------------------------------------------
# Vision sources
# ---------------------------------------------------------------------------------------------


def iter_eva(
    path: str | Path, cfg: TinyGPTVConfig, summary: LoadSummary
) -> Iterator[tuple[str, torch.Tensor]]:
    """eva_vit_g.pth: a plain state dict; blocks >= depth are ignored by rule; pos_embed resized."""
    sd = tensor_dict(load_pickle(path), path)
    yield from _eva_tensors(sd, "", cfg, summary, str(path))


def _eva_tensors(sd, prefix, cfg, summary, source) -> Iterator[tuple[str, torch.Tensor]]:
    table = {prefix + k: v for k, v in N.expand(N.EVA_GLOBAL + N.EVA_BLOCK, range(cfg.vision.depth)).items()}
    unused = re.compile(re.escape(prefix) + r"blocks\.(\d+)\..*")
    for name, t in sd.items():
        if name in table:
            if name == prefix + "pos_embed":
                t = _resize_pos_embed(t, cfg, summary)
            yield table[name], t
            continue
        m = unused.fullmatch(name)
        if m and cfg.vision.depth <= int(m[1]) < cfg.vision.stored_depth:
            summary.ignored[source] = summary.ignored.get(source, 0) + 1
            continue
        raise UnexpectedKeysError([name], source)


def _resize_pos_embed(t: torch.Tensor, cfg: TinyGPTVConfig, summary: LoadSummary) -> torch.Tensor:
    grid = cfg.vision.grid
    if t.ndim != 3 or t.shape[0] != 1 or t.shape[1] < 2:
        raise ShapeMismatchError("pos_embed", (1, 1 + grid * grid, cfg.vision.width), tuple(t.shape))
    old = math.isqrt(t.shape[1] - 1)
    if old * old != t.shape[1] - 1:
        raise ShapeMismatchError(
            f"pos_embed (1 + {t.shape[1] - 1} positions: not a square grid)",
            (1, 1 + grid * grid, cfg.vision.width),
            tuple(t.shape),
        )
    if old != grid:
        summary.pos_embed = f"interpolated bicubically from {old}x{old} to {grid}x{grid}"
        return interpolate_pos_embed(t.float(), grid)
    return t


def iter_blip2(
    path: str | Path, cfg: TinyGPTVConfig, summary: LoadSummary
) -> Iterator[tuple[str, torch.Tensor]]:
    """blip2_pretrained_flant5xxl.pth: {'model': state_dict}; only the query path is taken."""
    sd = tensor_dict(load_pickle(path), path, wrapper="model")
    table = qformer_table(cfg)
    source = str(path)
    for name, t in sd.items():
        if name in table:
            yield table[name], t
        elif N.matches_any(name, N.QFORMER_IGNORED):
            summary.ignored[source] = summary.ignored.get(source, 0) + 1
        else:
            raise UnexpectedKeysError([name], source)


def qformer_table(cfg: TinyGPTVConfig) -> dict[str, str]:
    layers = range(cfg.qformer.layers)
    cross = [i for i in layers if cfg.qformer.has_cross_attention(i)]
    return {
        **N.expand(N.QFORMER_GLOBAL),
        **N.expand(N.QFORMER_LAYER, layers),
        **N.expand(N.QFORMER_CROSS_LAYER, cross),
    }


# ---------------------------------------------------------------------------------------------
# Stage checkpoints (LoRA)
# ---------------------------------------------------------------------------------------------


@dataclass
class StageTensors:
    plain: list[tuple[str, torch.Tensor]]  # canonical name -> tensor (overlay)
    lora: dict[str, dict[str, torch.Tensor]]  # canonical weight name -> {'A': ..., 'B': ...}
    rank: int | None = None  # the LoRA rank, read from the shapes (None: no LoRA pairs)


def read_stage(path: str | Path, cfg: TinyGPTVConfig, summary: LoadSummary) -> StageTensors:
    """TinyGPT-V_for_StageN.pth: {'model': trained tensors}; peft 0.2.0 or newer key styles."""
    sd = tensor_dict(load_pickle(path), path, wrapper="model")
    source = str(path)
    layers = range(cfg.language.layers)
    phi = {**N.expand(N.PHI_GLOBAL), **N.expand(N.PHI_LAYER, layers)}
    other = {
        **N.expand(N.PROJECTION),
        **qformer_table(cfg),
        **{
            N.SINGLE_VISION_PREFIX + k: v
            for k, v in N.expand(N.EVA_GLOBAL + N.EVA_BLOCK, range(cfg.vision.depth)).items()
        },
    }
    out = StageTensors([], {})
    unexpected = []
    for name, t in sd.items():
        if name in other:
            if name == N.SINGLE_VISION_PREFIX + "pos_embed":
                t = _resize_pos_embed(t, cfg, summary)
            out.plain.append((other[name], t))
            continue
        if not name.startswith(N.STAGE_LM_PREFIX):
            unexpected.append(name)
            continue
        key = name[len(N.STAGE_LM_PREFIX) :]
        m = N.LORA_RE.fullmatch(key)
        if m:
            weight = phi.get(m["module"] + ".weight")
            if weight is None or m["module"].rsplit(".", 1)[-1] not in cfg.lora.targets:
                unexpected.append(name)
                continue
            out.lora.setdefault(weight, {})[m["ab"]] = t
            continue
        m = N.BASE_LAYER_RE.fullmatch(key)
        if m:
            key = f"{m['module']}.{m['param']}"
        if key in phi:
            out.plain.append((phi[key], t))
        else:
            unexpected.append(name)
    if unexpected:
        raise UnexpectedKeysError(unexpected, source)
    for weight, pair in out.lora.items():
        if set(pair) != {"A", "B"}:
            raise MissingKeysError([f"{weight}: lora_{'A' if 'A' not in pair else 'B'}"], source)
    out.rank = lora_rank(out.lora, source)
    return out


def lora_rank(lora: dict[str, dict[str, torch.Tensor]], source: str) -> int | None:
    """The rank r of every pair: A (r, in), B (out, r), the same r in every layer; None without pairs.

    peft keeps r and alpha in its adapter config, which TinyGPT-V's stage files do not carry: the
    rank is read from the shapes, alpha comes from the config.
    """
    ranks: dict[int, str] = {}
    for weight, pair in lora.items():
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise CheckpointError(
                f"{source}: {weight}: expected lora_A (r, in) and lora_B (out, r) with the same r, "
                f"got A {tuple(a.shape)} B {tuple(b.shape)}"
            )
        ranks.setdefault(int(a.shape[0]), weight)
    if len(ranks) > 1:
        seen = ", ".join(f"{r} ({w})" for r, w in ranks.items())
        raise CheckpointError(f"{source}: expected one LoRA rank across layers, got {seen}")
    return next(iter(ranks), None)


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def _meta_model(cfg: TinyGPTVConfig) -> TinyGPTV:
    with torch.device("meta"):
        return TinyGPTV(cfg)


def _initial_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Init of a norm parameter: weights 1, biases 0 (nn.LayerNorm / RMSNorm defaults)."""
    return torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)


def _finish(
    model: torch.nn.Module,
    col: Collector,
    tolerated: set[str],
    sources: str,
    strip: str = "",
) -> None:
    """Default the tolerated gaps, refuse any other, and load; `strip` is removed from every name."""
    missing = col.missing()
    hard = [k for k in missing if k not in tolerated]
    if hard:
        raise MissingKeysError(hard, sources)
    for k in missing:
        col.tensors[k] = _initial_value(k, col.shapes[k])
        col.summary.defaulted.append(k)
    state = {k.removeprefix(strip): v for k, v in col.tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()


def _expand_names(templates: list[str], layers: int) -> set[str]:
    return {t.format(i=i) for t in templates for i in range(layers)}


def load_phi2(folder: str | Path, cfg: LanguageConfig | None = None) -> tuple[PhiModel, LoadSummary]:
    """A Phi-2 folder alone as the modified language model (TinyGPT-V's norms at their init)."""
    cfg = cfg or phi2_config(folder)
    check_layers(cfg.layers, _phi2_keys(folder), "language.layers", str(folder))
    summary = LoadSummary(sources=[str(folder)])
    with torch.device("meta"):
        model = PhiModel(cfg)
    shapes = {f"language.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    col = Collector(shapes, summary)
    for name, t in iter_phi2(folder, cfg, summary):
        col.put(name, t, str(folder))
    _finish(model, col, _expand_names(N.ADDED_NORMS, cfg.layers), str(folder), strip="language.")
    return model, summary


def official_config(phi2: str | Path, stage_num: int = 3) -> TinyGPTVConfig:
    """Real sizes for `stage_num` with the language part from the Phi-2 folder's config.json, and the
    prompt as the official inference builds it: the stage's template, no BOS (`OFFICIAL_ADD_BOS`)."""
    cfg = full_config(stage_num)
    prompt = dataclasses.replace(cfg.prompt, add_bos=OFFICIAL_ADD_BOS)
    try:
        return cfg.replace(language=phi2_config(phi2), prompt=prompt)
    except ConfigError as e:  # vision and Q-Former sizes are in no checkpoint: only a config has them
        raise ConfigError(f"{e} (the Phi-2 in {phi2} is not TinyGPT-V's size: pass --config JSON)") from e


# TinyGPT-V's demo and evaluation (`conversation.py` `get_context_emb`) tokenize every prompt piece with
# the Phi-2 (CodeGen) tokenizer, which adds no BOS; only its training code prepends one.
OFFICIAL_ADD_BOS = False


def load_tinygptv(
    *,
    phi2: str | Path,
    eva: str | Path,
    blip2: str | Path,
    stage: str | Path | None = None,
    stage_num: int = 3,
    cfg: TinyGPTVConfig | None = None,
    merge_lora: bool = True,
) -> tuple[TinyGPTV, LoadSummary]:
    """Assemble TinyGPT-V from the base files, with a stage checkpoint overlaid (LoRA merged).

    `cfg` defaults to `official_config(phi2, stage_num)`. The LoRA rank is read from the stage
    file's tensor shapes (the config's `lora.r` is replaced by it); alpha comes from the config.
    Without `stage`, TinyGPT-V's added norms keep their initial values and the projections must come
    from somewhere else: that is an error.
    """
    if cfg is None:
        cfg = official_config(phi2, stage_num)
    else:  # a user's config: its vision and Q-Former depths against the files (official ones are fixed)
        check_layers(cfg.vision.depth, tensor_dict(load_pickle(eva), eva), "vision.depth", str(eva))
        keys = tensor_dict(load_pickle(blip2), blip2, wrapper="model")
        check_layers(cfg.qformer.layers, keys, "qformer.layers", str(blip2))
    check_layers(cfg.language.layers, _phi2_keys(phi2), "language.layers", str(phi2))
    summary = LoadSummary(sources=[str(p) for p in (phi2, eva, blip2, stage) if p is not None])
    st = read_stage(stage, cfg, summary) if stage is not None else StageTensors([], {})
    if st.rank is not None:
        cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, r=st.rank))
        summary.lora_rank, summary.lora_alpha = st.rank, cfg.lora.alpha
    summary.add_bos = cfg.prompt.add_bos
    model = _meta_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    col = Collector(shapes, summary)
    for name, t in iter_phi2(phi2, cfg.language, summary):
        col.put(name, t, str(phi2))
    for name, t in iter_eva(eva, cfg, summary):
        col.put(name, t, str(eva))
    for name, t in iter_blip2(blip2, cfg, summary):
        col.put(name, t, str(blip2))
    for name, t in st.plain:
        col.put(name, t, str(stage))
    tolerated = _expand_names(N.NEVER_SAVED, cfg.language.layers)
    if stage is None:
        tolerated |= _expand_names(N.ADDED_NORMS, cfg.language.layers)
    _apply_lora(col, st.lora, cfg, merge_lora, str(stage))
    _finish(model, col, tolerated, ", ".join(summary.sources))
    for weight, pair in st.lora.items() if not merge_lora else ():
        lora_ops.attach(model, weight.rsplit(".", 1)[0], pair["A"], pair["B"], cfg.lora.scale)
        summary.lora_attached.append(weight)
    return model, summary


def _apply_lora(col: Collector, lora: dict, cfg: TinyGPTVConfig, merge: bool, source: str) -> None:
    if not merge:
        return
    for weight, pair in lora.items():
        if weight not in col.tensors:
            raise MissingKeysError([weight], f"base weights (LoRA in {source} needs them)")
        merged = lora_ops.merge(col.tensors[weight], pair["A"], pair["B"], cfg.lora.scale)
        check_finite(weight, merged, f"{source} after LoRA merge")
        col.tensors[weight] = merged
        col.summary.lora_merged.append(weight)
