"""`--low-memory auto`: resident or low-memory mode, from the memory actually available.

    resident   = vision file + language file + KV cache at the resident context (trained, 2048) + margin
    low-memory = max(vision file, language file + KV cache at LOW_MEMORY_ALLOC) + margin

Both models keep about their file size in RAM (the ONNX initializers are loaded, with an external-data
file `X.onnx.data` beside the graph counted too; the GGUF is mapped and read in full per token), the KV
cache (of `kv_type`: F16 by default, Q8_0/Q4_0 smaller) fills as a conversation grows (in low-memory
mode it is allocated for LOW_MEMORY_ALLOC positions and grows to LOW_MEMORY_CTX as the conversation
needs), and MARGIN covers Python, onnxruntime, ggml's graphs and activations (the full-size model's
measured peaks against its file sizes: docs/benchmarks.md, figures behind decisions in code). Auto picks
resident mode when MemAvailable (/proc/meminfo: free memory plus reclaimable cache) covers it.

The same two formulas (`resident_need`, `low_memory_need`) price a budget the user states
(`--memory-budget 1.5G`, parsed by `parse_size`): the report's cells, the exporters' choice of levels
and `tinygptv-edge bench`'s table of what fits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .checks import check_model_file
from .errors import ConfigError, ModelFileError
from .pipeline import LOW_MEMORY_ALLOC, LOW_MEMORY_CTX

MODES = ("auto", "on", "off")
MIB = 1024**2
GIB = 1024**3
MARGIN = 600 * MIB
BUDGET_KV_TYPES = ("f16", "q8_0", "q4_0")  # the KV types a memory budget is priced with

# a size as users write it: a number, then an optional unit; every unit is a power of 1024
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024**4}
SIZE_HELP = "a size: 1.5G, 1500M, 1.5GiB, 800MB; K/M/G (and KB/MB/GB) are powers of 1024, so 1.5G = 1.5 GiB"


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size such as `1.5G`, `1500M`, `1.5GiB` or `800MB` (case-insensitive; a bare number is
    bytes). K, M, G, T mean KiB, MiB, GiB, TiB with or without the B: boards state their RAM in binary
    units and MemAvailable counts in them. `flag` names the option in the error."""
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if m is None or (m[3] and m[3].lower() == "ib" and not m[2]):
        raise ConfigError(f"{flag}: expected {SIZE_HELP}, got {text!r}")
    n = float(m[1]) * _UNITS[m[2].lower()]
    if not math.isfinite(n) or n < 1:
        raise ConfigError(f"{flag}: expected a size of at least 1 byte, got {text!r}")
    return int(n)


def format_size(n: int) -> str:
    """Bytes for people: GiB from 1 GiB on, else MiB."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.2f} MiB"


def _meminfo(key: str, meminfo: str | Path) -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def mem_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable (Linux), or None where the kernel does not say."""
    return _meminfo("MemAvailable", meminfo)


def mem_total_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemTotal (Linux), or None where the kernel does not say."""
    return _meminfo("MemTotal", meminfo)


def vision_file_bytes(path: str | Path) -> int:
    """What a vision model holds: the ONNX graph plus its external-data file `X.onnx.data`, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def resident_need(
    vision: int, language: int, kv_per_pos: int, n_ctx_train: int, n_ctx: int | None = None
) -> int:
    """Bytes both models resident need: files + KV cache at the resident context + MARGIN."""
    return vision + language + kv_per_pos * (n_ctx or n_ctx_train) + MARGIN


def low_memory_need(
    vision: int, language: int, kv_per_pos: int, n_ctx_train: int, n_ctx: int | None = None
) -> int:
    """Bytes low-memory mode peaks at: the larger of the vision model alone and the language model with
    its KV cache at the positions Pipeline allocates first (LOW_MEMORY_ALLOC at most), + MARGIN."""
    low_ctx = min(n_ctx or min(n_ctx_train, LOW_MEMORY_CTX), LOW_MEMORY_ALLOC)
    return max(vision, language + kv_per_pos * low_ctx) + MARGIN


def kv_bytes_per_position(language: str | Path, kv_type: str = "f16") -> tuple[int, int]:
    """(KV cache bytes per position of `kv_type`, the trained context), from the GGUF header."""
    from .language.decoder_model import read_hparams
    from .language.ggml_runtime import KV_TYPES, kv_row_nbytes
    from .language.gguf_file import GGUFFile

    if kv_type not in KV_TYPES:
        raise ConfigError(f"--kv-type: expected one of {sorted(KV_TYPES)}, got {kv_type!r}")
    gf = GGUFFile.open(language)
    try:
        hp = read_hparams(gf)
    finally:
        gf.close()
    return 2 * hp.n_layer * kv_row_nbytes(kv_type, hp.n_head, hp.head_dim), hp.n_ctx_train  # K and V


@dataclass(frozen=True)
class MemoryPlan:
    low_memory: bool
    mode: str  # what was asked: auto | on | off
    available: int | None  # MemAvailable, bytes
    resident_need: int
    low_memory_need: int
    vision_bytes: int = 0  # the files it was planned with (the vision graph with its .onnx.data)
    language_bytes: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"low-memory mode: expected one of {MODES}, got {self.mode!r}")

    @property
    def need(self) -> int:
        """About what the chosen mode needs."""
        return self.low_memory_need if self.low_memory else self.resident_need

    @property
    def tight(self) -> bool:
        """The chosen mode may not fit (expect swapping or the OOM killer)."""
        return self.available is not None and self.available < self.need

    @property
    def reason(self) -> str:
        gib = 1024**3
        picked = "low-memory" if self.low_memory else "resident"
        if self.available is None:
            return f"{picked} mode (--low-memory {self.mode}; MemAvailable unknown)"
        return (
            f"{picked} mode (--low-memory {self.mode}): {self.available / gib:.2f} GiB available, "
            f"resident needs about {self.resident_need / gib:.2f} GiB, "
            f"low-memory {self.low_memory_need / gib:.2f} GiB"
        )


def plan_memory(
    mode: str,
    vision: str | Path | None,
    language: str | Path,
    n_ctx: int | None = None,
    available: int | None = None,
    kv_type: str = "f16",
) -> MemoryPlan:
    """Resolve `mode` (auto | on | off) for these model files; `available` defaults to MemAvailable."""
    if mode not in MODES:
        raise ConfigError(f"--low-memory: expected one of {MODES}, got {mode!r}")
    for label, path, kind in (("vision", vision, "an ONNX file"), ("language", language, "a GGUF file")):
        if path is not None and not Path(path).is_file():
            raise ModelFileError(f"{label} model not found: {path} (expected {kind})")
    if vision is not None:  # the language file is checked as it is opened below
        check_model_file(vision, "onnx", ModelFileError)
    vision_bytes = vision_file_bytes(vision) if vision is not None else 0
    language_bytes = Path(language).stat().st_size
    per_pos, trained = kv_bytes_per_position(language, kv_type)  # the contexts Pipeline picks per mode
    resident = resident_need(vision_bytes, language_bytes, per_pos, trained, n_ctx)
    low = low_memory_need(vision_bytes, language_bytes, per_pos, trained, n_ctx)
    if available is None:
        available = mem_available_bytes()
    if mode == "auto":
        low_memory = available is not None and available < resident
    else:
        low_memory = mode == "on"
    return MemoryPlan(low_memory, mode, available, resident, low, vision_bytes, language_bytes)
