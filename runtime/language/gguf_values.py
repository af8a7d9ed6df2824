"""Value checks of GGUF tensor data: NaN/inf anywhere a float is stored, and block scales of the right sign.

A quantized tensor stores its floats as fp16 fields inside each block (the scale `d`, and for some
types a minimum `m` / `dmin`); the packed integers around them cannot be NaN. So a tensor is finite
iff its F32/F16/BF16 elements are, or, for a quantized type, iff the fp16 fields of every block are.
The table below names those fields by byte offset in the block (ggml `ggml-common.h` `block_*`).

ggml's quantizers write the super-block scales `d` and `dmin` of Q4_K and Q5_K as non-negative
numbers (max_scale / 63, max_min / 63). Bytes of another type relabelled as Q4_K (Q4_0 blocks take
exactly as many bytes for rows of 256) put packed quants there, whose sign bit is set in about half
the blocks: the same scan refuses them. Everything is done on the bit patterns, in chunks, through
`pread` (the mapping is not touched, so nothing becomes resident), with numpy's loops releasing the
GIL so that two threads scan at once.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import GGUFModelError, NonFiniteTensorError
from .gguf_file import GGUFFile, TensorInfo

CHUNK = 8 << 20  # bytes read per step (rounded down to whole blocks)


@dataclass(frozen=True)
class FloatFields:
    """Where the floats of one block are: fp16 fields at `fp16` byte offsets; `signed=False` ones >= 0."""

    fp16: tuple[int, ...] = ()
    unsigned: tuple[int, ...] = ()  # fp16 fields that ggml always writes >= 0
    word: int = 0  # plain float elements: 4 (F32), 2 (F16) or -2 (BF16); 0 for quantized blocks


# ggml type name -> float fields of its block (block sizes: runtime/gguf_file.GGML_TYPES)
FIELDS = {
    "F32": FloatFields(word=4),
    "F16": FloatFields(word=2),
    "BF16": FloatFields(word=-2),
    "Q4_0": FloatFields(fp16=(0,)),
    "Q4_1": FloatFields(fp16=(0, 2)),
    "Q5_0": FloatFields(fp16=(0,)),
    "Q5_1": FloatFields(fp16=(0, 2)),
    "Q8_0": FloatFields(fp16=(0,)),
    "Q2_K": FloatFields(fp16=(80, 82)),
    "Q3_K": FloatFields(fp16=(108,)),
    "Q4_K": FloatFields(unsigned=(0, 2)),
    "Q5_K": FloatFields(unsigned=(0, 2)),
    "Q6_K": FloatFields(fp16=(208,)),
    "IQ4_NL": FloatFields(fp16=(0,)),
    "IQ4_XS": FloatFields(fp16=(0,)),
    "IQ3_S": FloatFields(fp16=(0,)),
    "IQ2_S": FloatFields(fp16=(0,)),
}


def bad_values(raw: np.ndarray, type_name: str, block_bytes: int) -> tuple[int, int]:
    """(non-finite values, negative unsigned scales) in `raw`, whole blocks of `type_name` as uint8.

    The common case (nothing wrong) costs one masked maximum per field: max(x & E) == E exactly when
    some x has every exponent bit E set. Only a failing tensor is counted in full.
    """
    f = FIELDS[type_name]
    if f.word:  # plain float elements
        dtype, exp = {4: (np.uint32, 0x7F800000), 2: (np.uint16, 0x7C00), -2: (np.uint16, 0x7F80)}[f.word]
        bits = raw.view(dtype)
        if not bits.size or (bits & dtype(exp)).max() != exp:
            return 0, 0
        return int(np.count_nonzero((bits & dtype(exp)) == exp)), 0
    nonfinite = negative = 0
    for o in f.fp16:  # the high byte of a little-endian fp16 holds its sign and 5 exponent bits
        hi = raw[o + 1 :: block_bytes]
        if hi.size and (hi & 0x7C).max() == 0x7C:
            nonfinite += int(np.count_nonzero((hi & 0x7C) == 0x7C))
    for o in f.unsigned:  # high byte >= 0x7C: inf/NaN (0x7C..0x7F) or negative (0x80..)
        hi = raw[o + 1 :: block_bytes]
        if hi.size and hi.max() >= 0x7C:
            nonfinite += int(np.count_nonzero((hi & 0x7C) == 0x7C))
            negative += int(np.count_nonzero((hi >= 0x80) & ((hi & 0x7C) != 0x7C)))
    return nonfinite, negative


def _scan_one(fd: int, t: TensorInfo, buf: np.ndarray) -> tuple[int, int]:
    step = max(t.type.nbytes, len(buf) // t.type.nbytes * t.type.nbytes)
    nonfinite = negative = 0
    for start in range(0, t.nbytes, step):
        n = min(step, t.nbytes - start)
        if os.preadv(fd, [buf[:n].data], t.offset + start) != n:  # into one reused buffer: no page faults
            raise OSError(f"short read of {n} bytes at {t.offset + start}: the file changed on disk")
        a, b = bad_values(buf[:n], t.type.name, t.type.nbytes)
        nonfinite, negative = nonfinite + a, negative + b
    return nonfinite, negative


def check_values(gf: GGUFFile, names: list[str] | None = None, threads: int = 2) -> None:
    """Raise NonFiniteTensorError (or GGUFModelError for a negative K-quant scale) naming the tensor.

    Memory stays at one CHUNK per thread whatever the file holds, so a refused file costs no more
    than that (the decoder runs this before it allocates or repacks any weight).
    """
    tensors = [gf.tensors[n] for n in (names if names is not None else gf.tensors)]
    tensors = [t for t in tensors if t.type.name in FIELDS]
    buffers: dict[int, np.ndarray] = {}  # one per worker thread

    def scan(fd: int, t: TensorInfo) -> tuple[int, int]:
        buf = buffers.setdefault(threading.get_ident(), np.empty(CHUNK, dtype=np.uint8))
        return _scan_one(fd, t, buf)

    with open(gf.path, "rb") as f, ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda t: scan(f.fileno(), t), tensors))
    for t, counts in zip(tensors, results, strict=True):
        _raise(gf, t, *counts)


def _raise(gf: GGUFFile, t: TensorInfo, nonfinite: int, negative: int) -> None:
    if nonfinite:
        raise NonFiniteTensorError(t.name, nonfinite, str(gf.path))
    if negative:
        raise GGUFModelError(
            f"{gf.path}: tensor {t.name!r}: {negative} {t.type.name} block(s) with a negative "
            f"super-block scale (d/dmin): expected >= 0 as ggml writes them; found data of "
            f"another type labelled as {t.type.name}?"
        )
