"""GGUF quantization levels: which ggml type each tensor gets, and the quantizer itself.

A level is a named preset (F32 ... Q6_K, the mixes Q4_K_M, Q5_K_M, and the smaller levels for
two-gigabyte boards: Q3_K_M, Q3_K_S, Q2_K, IQ4_XS, IQ3_S, IQ2_M). The type of one tensor is decided in
three steps, each a small table:

    1-D (norms, biases)                     -> F32, always
    base type of the level, then its bumps  -> e.g. Q4_K_M: attn_qkv Q5_K, some ffn_down Q6_K
    row length the type cannot take         -> fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
                                               Q2_K/Q3_K -> Q4_0, i-quants -> IQ4_NL, a 32-block type
                                               that still does not fit -> F16)

The rules restate the facts of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for this
model (Phi-2: fused attn_qkv, one KV head per query head so n_gqa = 1, no experts, not Falcon): the
output matrix of a quantized level is kept at Q6_K (Q5_K at the IQ2 levels; Q8_0 when its rows are not
a multiple of the base type's block, or when the level is Q8_0 already); Q4_K_M / Q5_K_M raise a fused
attn_qkv to Q5_K / Q6_K and ffn_down to Q6_K on the first and last eighth of the layers and every
third layer between. For the smaller levels, llama.cpp (2025 on) counts the fused attn_qkv with
attn_v ("attention-v-like"), so attn_v's rules apply to it:

    Q3_K_M   attn_qkv Q5_K on layers 0-1, else Q4_K; attn_output Q4_K;
             ffn_down Q5_K on the first sixteenth of the layers, else Q4_K; ffn_up Q3_K
    Q3_K_S   every matrix Q3_K (llama.cpp has no bump for it at n_gqa 1)
    Q2_K     attn_qkv, attn_output, ffn_down Q3_K; ffn_up and token_embd Q2_K
    IQ4_XS   every matrix IQ4_XS; without an importance matrix ffn_down is Q5_K on the first eighth
    IQ3_S    every matrix IQ3_S (the n_gqa >= 4 bump does not apply)
    IQ2_M    base IQ2_S; attn_qkv, attn_output, token_embd IQ3_S; ffn_down IQ3_S on the first eighth;
             output Q5_K. IQ2_S needs an importance matrix (llama.cpp refuses it without one)

`pure=True` turns every bump off (llama-quantize --pure).

Blocks come from ggml's own `ggml_quantize_chunk` (ggml-python), so they are what llama.cpp writes;
with an importance matrix ggml takes its weighted search path. The i-quants' codebooks ("grids") are
built by `ggml_quantize_init` before the first chunk.
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


def use_more_bits(layer: int, n_layers: int) -> bool:
    """First and last eighth of the layers, and every third layer between (llama.cpp's rule)."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


# which layers a bump covers: (layer, n_layers) -> bool, named as llama.cpp's conditions read
LAYER_RULES = {
    "all": lambda i, n: True,
    "more_bits": use_more_bits,
    "first_eighth": lambda i, n: i < n // 8,
    "first_sixteenth": lambda i, n: i < n // 16,
    "first_two": lambda i, n: i < 2,  # llama.cpp counts attn_v tensors: i_attention_wv < 2
}


@dataclass(frozen=True)
class Bump:
    """Tensors whose name matches `pattern` get `qtype`, on the layers `layers` names (LAYER_RULES);
    `imatrix` True / False: only with / without an importance matrix (None: either way)."""

    pattern: str  # regex on the GGUF tensor name
    qtype: Q
    layers: str = "all"
    imatrix: bool | None = None

    def __post_init__(self) -> None:
        if self.layers not in LAYER_RULES:
            raise ConfigError(
                f"bump {self.pattern}: layers {self.layers!r}, expected one of {list(LAYER_RULES)}"
            )

    def applies(self, name: str, n_layers: int, has_imatrix: bool) -> bool:
        if not re.fullmatch(self.pattern, name):
            return False
        if self.imatrix is not None and self.imatrix != has_imatrix:
            return False
        if self.layers == "all":
            return True
        layer = _layer_of(name)
        return layer is not None and LAYER_RULES[self.layers](layer, n_layers)


@dataclass(frozen=True)
class Level:
    name: str
    base: Q  # type of every 2-D weight unless a rule says otherwise
    file_type: LlamaFileType
    bumps: tuple[Bump, ...] = ()
    output: Q = Q.Q6_K  # output.weight at a quantized level (llama.cpp: Q6_K, Q5_K at the IQ2 levels)

    def __post_init__(self) -> None:
        for qtype in (self.base, *(b.qtype for b in self.bumps)):
            if qtype not in SUPPORTED:
                raise ConfigError(f"level {self.name}: type {qtype.name} is not supported")

    @property
    def quantized(self) -> bool:
        return self.base not in (Q.F32, Q.F16)


SUPPORTED = tuple(Q[name] for name in ggml_types.WEIGHT_TYPES)  # what the runtime's decoder runs

_QKV, _DOWN = r"blk\.\d+\.attn_qkv\.weight", r"blk\.\d+\.ffn_down\.weight"
_OUT, _EMBD = r"blk\.\d+\.attn_output\.weight", r"token_embd\.weight"
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
        Level("Q4_K_M", Q.Q4_K, F.MOSTLY_Q4_K_M, (Bump(_QKV, Q.Q5_K), Bump(_DOWN, Q.Q6_K, "more_bits"))),
        Level("Q5_K_M", Q.Q5_K, F.MOSTLY_Q5_K_M, (Bump(_QKV, Q.Q6_K), Bump(_DOWN, Q.Q6_K, "more_bits"))),
        # the smaller levels (two-gigabyte boards); rules in the module docstring
        Level(
            "Q3_K_M",
            Q.Q3_K,
            F.MOSTLY_Q3_K_M,
            (
                Bump(_QKV, Q.Q4_K),
                Bump(_QKV, Q.Q5_K, "first_two"),
                Bump(_OUT, Q.Q4_K),
                Bump(_DOWN, Q.Q4_K),
                Bump(_DOWN, Q.Q5_K, "first_sixteenth"),
            ),
        ),
        Level("Q3_K_S", Q.Q3_K, F.MOSTLY_Q3_K_S),
        Level("Q2_K", Q.Q2_K, F.MOSTLY_Q2_K, (Bump(_QKV, Q.Q3_K), Bump(_OUT, Q.Q3_K), Bump(_DOWN, Q.Q3_K))),
        Level("IQ4_XS", Q.IQ4_XS, F.MOSTLY_IQ4_XS, (Bump(_DOWN, Q.Q5_K, "first_eighth", imatrix=False),)),
        Level("IQ3_S", Q.IQ3_S, F.MOSTLY_IQ3_S),
        Level(
            "IQ2_M",
            Q.IQ2_S,
            F.MOSTLY_IQ2_M,
            (
                Bump(_QKV, Q.IQ3_S),
                Bump(_OUT, Q.IQ3_S),
                Bump(_EMBD, Q.IQ3_S),
                Bump(_DOWN, Q.IQ3_S, "first_eighth"),
            ),
            output=Q.Q5_K,
        ),
    )
}
DEFAULT_LEVEL = "Q4_0"

# a row length the type cannot take -> the type to use instead (runtime/language/ggml_types.py's table,
# which the runtime's memory estimate follows too)
FALLBACK: dict[Q, Q] = {Q[a]: Q[b] for a, b in ggml_types.ROW_FALLBACK.items()}
LAST_RESORT = Q[ggml_types.LAST_RESORT]  # every row length fits
# types ggml quantizes badly without an importance matrix: the exporter refuses them without one
# (llama.cpp's rule for IQ2_S, which spares token_embd)
NEEDS_IMATRIX = (Q.IQ2_S,)

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
    # bench/quant_bounds.py at 512 and 2560 values a row (worst of both, then about doubled)
    Q.Q3_K: Bound(5.7e-1, 2e-4, 3.7e-1),
    Q.Q2_K: Bound(8.6e-1, 2e-4, 6e-1),
    Q.IQ4_XS: Bound(4.3e-1, 2e-4, 2.6e-1),
    Q.IQ4_NL: Bound(2.7e-1, 4e-5, 2.5e-1),
    Q.IQ3_S: Bound(8.6e-1, 2e-4, 4.4e-1),
    Q.IQ2_S: Bound(1.35, 2e-4, 1.0),  # only with an importance matrix (NEEDS_IMATRIX) but for token_embd
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


def _layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m[1]) if m else None


def wanted_type(
    level: Level,
    name: str,
    shape: tuple[int, ...],
    n_layers: int,
    pure: bool = False,
    has_imatrix: bool = False,
) -> Q:
    """The type the level asks for, before the row-length fallback (the last matching bump wins)."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return Q.F32
    if not level.quantized or pure:
        return level.base
    if name == OUTPUT_TENSOR:
        if level.base == Q.Q8_0 or shape[-1] % block_size(level.base):
            return Q.Q8_0
        return level.output
    qtype = level.base
    for bump in level.bumps:
        if bump.applies(name, n_layers, has_imatrix):
            qtype = bump.qtype
    return qtype


def fit_type(qtype: Q, n_per_row: int) -> Q:
    """Follow the fallback table until the row length is a multiple of the type's block."""
    return Q[ggml_types.fit_type(qtype.name, n_per_row)]


def choose_type(
    level: Level,
    name: str,
    shape: tuple[int, ...],
    n_layers: int,
    pure: bool = False,
    has_imatrix: bool = False,
) -> Q:
    """Final ggml type of tensor `name` (numpy shape, rows last-axis contiguous) at `level`."""
    return fit_type(wanted_type(level, name, shape, n_layers, pure, has_imatrix), shape[-1])


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
    ggml.ggml_quantize_init(int(qtype))  # the i-quants' grids, once per process (a no-op for the others)
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
