"""GGUF quantization levels: which ggml type each tensor gets, and the quantizer itself.

A level is a named preset (F32 ... Q6_K, and the mixes Q4_K_M, Q5_K_M). The type of one tensor is
decided in three steps, each a small table:

    1-D (norms, biases)                     -> F32, always
    base type of the level, then its bumps  -> e.g. Q4_K_M: attn_qkv Q5_K, some ffn_down Q6_K
    row length the type cannot take         -> fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
                                               a legacy type that still does not fit -> F16)

The rules follow the facts of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp): the output
matrix of a quantized level is kept at Q6_K (Q8_0 when its rows are not a multiple of 256, or when
the level is Q8_0 already); Q4_K_M / Q5_K_M raise a fused attn_qkv to Q5_K / Q6_K and ffn_down to
Q6_K on the first and last eighth of the layers and every third layer between. `pure=True` turns
every bump off (llama-quantize --pure).

Blocks come from ggml's own `ggml_quantize_chunk` (ggml-python), so they are what llama.cpp writes;
with an importance matrix ggml takes its weighted search path.
"""

from __future__ import annotations

import ctypes
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from tinygptv_edge.runtime.checks import check_threads
from tinygptv_edge.runtime.errors import ConfigError, ExportError
from tinygptv_edge.runtime.language import ggml_types

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Bump:
    """Tensors whose name matches `pattern` get `qtype`; `more_bits_layers` limits it to those layers."""

    pattern: str  # regex on the GGUF tensor name
    qtype: Q
    more_bits_layers: bool = False


@dataclass(frozen=True)
class Level:
    name: str
    base: Q  # type of every 2-D weight unless a rule says otherwise
    file_type: LlamaFileType
    bumps: tuple[Bump, ...] = ()

    def __post_init__(self) -> None:
        if self.base not in SUPPORTED:
            raise ConfigError(f"level {self.name}: base type {self.base.name} is not supported")

    @property
    def quantized(self) -> bool:
        return self.base not in (Q.F32, Q.F16)


SUPPORTED = tuple(Q[name] for name in ggml_types.WEIGHT_TYPES)  # what the runtime's decoder runs

_QKV, _DOWN = r"blk\.\d+\.attn_qkv\.weight", r"blk\.\d+\.ffn_down\.weight"
F = LlamaFileType

LEVELS: dict[str, Level] = {
    lv.name: lv
    for lv in (
        Level("F32", Q.F32, F.ALL_F32),
        Level("F16", Q.F16, F.MOSTLY_F16),
        Level("Q8_0", Q.Q8_0, F.MOSTLY_Q8_0),
        Level("Q5_0", Q.Q5_0, F.MOSTLY_Q5_0),
        Level("Q5_1", Q.Q5_1, F.MOSTLY_Q5_1),
        Level("Q4_0", Q.Q4_0, F.MOSTLY_Q4_0),
        Level("Q4_1", Q.Q4_1, F.MOSTLY_Q4_1),
        # plain K-quant levels: every weight at the type (llama.cpp's nearest file types are *_S)
        Level("Q4_K", Q.Q4_K, F.MOSTLY_Q4_K_S),
        Level("Q5_K", Q.Q5_K, F.MOSTLY_Q5_K_S),
        Level("Q6_K", Q.Q6_K, F.MOSTLY_Q6_K),
        Level("Q4_K_M", Q.Q4_K, F.MOSTLY_Q4_K_M, (Bump(_QKV, Q.Q5_K), Bump(_DOWN, Q.Q6_K, True))),
        Level("Q5_K_M", Q.Q5_K, F.MOSTLY_Q5_K_M, (Bump(_QKV, Q.Q6_K), Bump(_DOWN, Q.Q6_K, True))),
    )
}
DEFAULT_LEVEL = "Q4_0"

# a row length the type cannot take -> the type to use instead (then checked again)
FALLBACK: dict[Q, Q] = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
LAST_RESORT = Q.F16  # every row length fits

OUTPUT_TENSOR = "output.weight"


@dataclass(frozen=True)
class Bound:
    """How far a dequantized tensor may be from its source (checked after every write).

    Without an importance matrix, per row: max |dequant - source| <= row_max * max |source| + floor
    (`floor` covers fp16 block scales that go subnormal on tiny rows). With one, the quantizer may
    trade unimportant columns away, so the check is over the tensor, weighted by the imatrix:
    sqrt(sum im (dequant - source)^2 / sum im source^2) <= weighted.
    Measured on Gaussian, Student-t, uniform and outlier rows scaled 1e-3..4, with random, log-normal,
    half-zero and outlier-channel importance, then about doubled.
    """

    row_max: float
    floor: float
    weighted: float


BOUNDS: dict[Q, Bound] = {
    Q.F32: Bound(0.0, 0.0, 0.0),
    Q.F16: Bound(1e-3, 1e-7, 1e-3),
    Q.Q8_0: Bound(1.5e-2, 1e-5, 3e-2),
    Q.Q6_K: Bound(2.5e-1, 2e-4, 1.6e-1),
    Q.Q5_0: Bound(1.25e-1, 2e-5, 1.4e-1),
    Q.Q5_1: Bound(7e-2, 2e-5, 9e-2),
    Q.Q5_K: Bound(2e-1, 2e-4, 1.4e-1),
    Q.Q4_0: Bound(2.5e-1, 4e-5, 2.6e-1),
    Q.Q4_1: Bound(1.4e-1, 2e-5, 1.7e-1),
    Q.Q4_K: Bound(2.7e-1, 2e-4, 2e-1),
}
F16_MAX = 65504.0  # every non-F32 type stores values or block scales as fp16


def get_level(name: str) -> Level:
    level = LEVELS.get(name.upper())
    if level is None:
        raise ConfigError(f"unknown GGUF level {name!r}; expected one of {', '.join(LEVELS)}")
    return level


def block_size(qtype: Q) -> int:
    return ggml_types.GGML_TYPES[int(qtype)].block


def row_nbytes(qtype: Q, n_per_row: int) -> int:
    return ggml_types.GGML_TYPES[int(qtype)].row_nbytes(n_per_row)


def tensor_nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * row_nbytes(qtype, shape[-1])


def use_more_bits(layer: int, n_layers: int) -> bool:
    """First and last eighth of the layers, and every third layer between (llama.cpp's rule)."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m[1]) if m else None


def wanted_type(level: Level, name: str, shape: tuple[int, ...], n_layers: int, pure: bool = False) -> Q:
    """The type the level asks for, before the row-length fallback."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return Q.F32
    if not level.quantized or pure:
        return level.base
    if name == OUTPUT_TENSOR:
        if level.base == Q.Q8_0:
            return Q.Q8_0
        return Q.Q6_K
    qtype = level.base
    for bump in level.bumps:
        if re.fullmatch(bump.pattern, name):
            layer = _layer_of(name)
            if bump.more_bits_layers and (layer is None or not use_more_bits(layer, n_layers)):
                continue
            qtype = bump.qtype
    return qtype


def fit_type(qtype: Q, n_per_row: int) -> Q:
    """Follow the fallback table until the row length is a multiple of the type's block."""
    while n_per_row % block_size(qtype):
        qtype = FALLBACK.get(qtype, LAST_RESORT)
    return qtype


def choose_type(level: Level, name: str, shape: tuple[int, ...], n_layers: int, pure: bool = False) -> Q:
    """Final ggml type of tensor `name` (numpy shape, rows last-axis contiguous) at `level`."""
    return fit_type(wanted_type(level, name, shape, n_layers, pure), shape[-1])


# ---------------------------------------------------------------------------------------------
# quantizer (ggml)
# ---------------------------------------------------------------------------------------------

_F32P = ctypes.POINTER(ctypes.c_float)


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def quantize(
    data: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
    """(rows, n_per_row) float32 -> the tensor's bytes in `qtype`: uint8 (rows, row_nbytes), or F32/F16.

    Quantized types go through `ggml_quantize_chunk` (rows split over `threads`; ctypes releases the
    GIL); `imatrix` (n_per_row,) weighs each column. ggml is loaded through the runtime's
    `load_ggml()`, so a decoder made later in the same process still gets its OpenMP defaults.
    """
    from tinygptv_edge.runtime.language.ggml_runtime import load_ggml

    ggml = load_ggml()

    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    rows, n = data.reshape(-1, data.shape[-1]).shape
    if n % block_size(qtype):
        raise ExportError(f"{qtype.name} cannot take rows of {n} values (block {block_size(qtype)})")
    im_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise ExportError(f"importance matrix: expected shape ({n},), got {imatrix.shape}")
        im_ptr = imatrix.ctypes.data_as(_F32P)
    nbytes = row_nbytes(qtype, n)
    out = np.empty((rows, nbytes), dtype=np.uint8)
    src, dst = data.ctypes.data_as(_F32P), out.ctypes.data

    def run(r0: int, count: int) -> int:
        # `start` counts values; ggml offsets src by it and dst by start / n rows
        return ggml.ggml_quantize_chunk(int(qtype), src, dst, r0 * n, count, n, im_ptr)

    threads = check_threads(threads, "quantizer threads") or default_threads()
    step = max(1, -(-rows // (4 * threads)), (1 << 16) // n)  # >= 64 Ki values a job
    jobs = [(r0, min(step, rows - r0)) for r0 in range(0, rows, step)]
    if threads == 1 or len(jobs) == 1:
        written = sum(run(*j) for j in jobs)
    else:
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(lambda j: run(*j), jobs))
    if written != out.nbytes:
        raise ExportError(f"ggml_quantize_chunk wrote {written} bytes of {qtype.name}, expected {out.nbytes}")
    return out.reshape(*data.shape[:-1], nbytes)
