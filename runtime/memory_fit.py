"""What fits this board: the files measured, and every language level of the model, against its memory.

    GGUF header (tensor shapes, types, alignment, KV geometry) --estimate_level_bytes--> file bytes per level
    vision file + language bytes + KV bytes/position --memory_plan.low_memory_need--> predicted peak
    peak vs MemAvailable --> fits / does not

A level's size is computed, not exported: every 2-D weight at the level's base type (`output.weight`
at its output type), re-typed when its rows are not whole blocks of that type (ggml_types.fit_type,
the exporter's fallback chain too), 1-D tensors at F32, each tensor aligned as the file aligns them,
plus this file's own header.
The mixes' bumps (Q4_K_M's Q5_K attn_qkv and Q6_K ffn_down on some layers, ...) are not modelled, so a
mixed level reads a few percent small; `tests/runtime/test_memory_fit.py` holds LEVEL_TYPES against the
exporter's levels (export/gguf/quant.py), which the runtime may not import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError
from .language.ggml_types import BY_NAME, fit_type
from .memory_plan import BUDGET_KV_TYPES, kv_bytes_per_position, low_memory_need, plan_memory

# level -> (type of its 2-D weights, type of output.weight): export/gguf/quant.py LEVELS' `base` and
# `output` (F32/F16/Q8_0 keep the base for the output); the +imat variants are the same size
LEVEL_TYPES: dict[str, tuple[str, str]] = {
    "F32": ("F32", "F32"),
    "F16": ("F16", "F16"),
    "Q8_0": ("Q8_0", "Q8_0"),
    "Q5_K_M": ("Q5_K", "Q6_K"),
    "Q4_K_M": ("Q4_K", "Q6_K"),
    "Q4_0": ("Q4_0", "Q6_K"),
    "IQ4_XS": ("IQ4_XS", "Q6_K"),
    "Q3_K_M": ("Q3_K", "Q6_K"),
    "Q3_K_S": ("Q3_K", "Q6_K"),
    "IQ3_S": ("IQ3_S", "Q6_K"),
    "Q2_K": ("Q2_K", "Q6_K"),
    "IQ2_M": ("IQ2_S", "Q5_K"),
}
OUTPUT_TENSOR = "output.weight"


def tensor_type(level: str, name: str, shape: tuple[int, ...]) -> str:
    """The type `level` gives tensor `name` (ggml order: shape[0] is the row), bumps left out."""
    if level not in LEVEL_TYPES:
        raise ConfigError(f"language level: expected one of {', '.join(LEVEL_TYPES)}, got {level!r}")
    base, output = LEVEL_TYPES[level]
    if len(shape) < 2 or not name.endswith(".weight"):
        return "F32"
    qtype = base
    if name == OUTPUT_TENSOR and base not in ("F32", "F16"):
        qtype = "Q8_0" if shape[0] % BY_NAME[base].block else output
    return fit_type(qtype, shape[0])


def estimate_level_bytes(language: str | Path) -> dict[str, int]:
    """File bytes of every level in LEVEL_TYPES for the model in this GGUF (read from its header only)."""
    from .language.gguf_file import GGUFFile

    gf = GGUFFile.open(language)
    try:
        infos, align, header = list(gf.tensors.values()), gf.alignment, gf.data_offset
    finally:
        gf.close()
    out = {}
    for level in LEVEL_TYPES:
        data = 0
        for t in infos:
            n = 1
            for d in t.shape:
                n *= d
            nbytes = BY_NAME[tensor_type(level, t.name, t.shape)].row_nbytes(n)
            data = -(-data // align) * align + nbytes  # each tensor starts aligned
        out[level] = header + data
    return out


@dataclass(frozen=True)
class LevelFit:
    level: str
    language_bytes: int  # estimated file size
    low_memory_peak_bytes: dict[str, int]  # KV type -> predicted low-memory peak
    fits: dict[str, bool | None]  # KV type -> peak <= MemAvailable (None: MemAvailable unknown)


def what_fits(
    vision: str | Path,
    language: str | Path,
    available: int | None,
    total: int | None,
    n_ctx: int | None = None,
    kv_type: str = "f16",
) -> dict:
    """The table `tinygptv-edge bench` prints: these files' predicted peaks vs MemAvailable, the mode
    `--low-memory auto` would pick, and every language level's low-memory peak with each KV type."""
    plan = plan_memory("auto", vision, language, n_ctx, available, kv_type)  # the files themselves
    v = plan.vision_bytes
    per_pos = {}
    for kv in BUDGET_KV_TYPES:
        per_pos[kv], trained = kv_bytes_per_position(language, kv)

    def fits(need: int) -> bool | None:
        return None if plan.available is None else need <= plan.available

    levels = []
    for level, nbytes in estimate_level_bytes(language).items():
        peaks = {kv: low_memory_need(v, nbytes, per_pos[kv], trained, n_ctx) for kv in BUDGET_KV_TYPES}
        levels.append(LevelFit(level, nbytes, peaks, {kv: fits(p) for kv, p in peaks.items()}))
    return {
        "mem_total_bytes": total,
        "mem_available_bytes": plan.available,
        "kv_type": kv_type,
        "vision_bytes": v,
        "language_bytes": plan.language_bytes,
        "resident_need_bytes": plan.resident_need,
        "low_memory_need_bytes": plan.low_memory_need,
        "fits_resident": fits(plan.resident_need),
        "fits_low_memory": fits(plan.low_memory_need),
        "auto_mode": "low-memory" if plan.low_memory else "resident",
        "levels": [asdict(x) for x in levels],
    }
