"""A validating GGUF reader: header, metadata and tensor table checked with limits; data memory-mapped.

Format: `docs/gguf.md` of the ggml repository (version 2 and 3, little-endian):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x      (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` | tensor data (offsets relative to here, each aligned)

Every count, length and offset is checked against the bytes that are left before it is used, so a
truncated or corrupt file raises `GGUFFormatError` instead of reading past the end, allocating a huge
list or handing a bad pointer to C. This module needs no ggml and no `gguf` package.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_model_file, not_regular, path_arg
from ..errors import GGUFFormatError
from .ggml_types import GGML_TYPES, GGMLType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array
BOOL, STRING, ARRAY = 7, 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
VALUE_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
    7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}  # fmt: skip
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)  # the integer value types above
FLOAT_TYPES = (6, 12)


@dataclass(frozen=True)
class GGUFLimits:
    """Upper bounds on what a header may declare (far above any real model, far below a hang)."""

    max_kv: int = 1 << 16
    max_tensors: int = 1 << 16
    max_string: int = 1 << 24  # bytes in one string
    max_array: int = 1 << 24  # items in one array
    max_dims: int = 4
    max_alignment: int = 1 << 16

    def __post_init__(self) -> None:
        for name in ("max_kv", "max_tensors", "max_string", "max_array", "max_dims", "max_alignment"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GGUFLimits.{name} must be positive")


@dataclass(frozen=True)
class Field:
    """One metadata value: `type` is its GGUF value type; arrays carry `item_type`."""

    type: int
    value: Any
    item_type: int | None = None

    @property
    def type_name(self) -> str:
        name = VALUE_TYPE_NAMES[self.type]
        return f"array[{VALUE_TYPE_NAMES[self.item_type]}]" if self.item_type is not None else name


@dataclass(frozen=True)
class TensorInfo:
    """`shape` is in ggml order (ne0 = the contiguous axis); `offset` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def type(self) -> GGMLType:
        return GGML_TYPES[self.type_id]


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; errors name the byte position."""

    def __init__(self, buf: memoryview, path: str, limits: GGUFLimits):
        self.buf, self.pos, self.path, self.limits = buf, 0, path, limits

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: at byte {self.pos}: {what}")

    def need(self, n: int, what: str) -> None:
        left = len(self.buf) - self.pos
        if n > left:
            raise self.fail(f"truncated {what}: expected {n} byte(s), {left} left in the file")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"{what} length")
        if n > self.limits.max_string:
            raise self.fail(f"{what}: length {n} exceeds the limit of {self.limits.max_string} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8: {e}") from None

    def value(self, vtype: int, what: str) -> Field:
        if vtype in SCALAR_FORMATS:
            return Field(vtype, self.scalar(SCALAR_FORMATS[vtype], what))
        if vtype == STRING:
            return Field(vtype, self.string(what))
        if vtype == ARRAY:
            item = self.scalar("I", f"{what} item type")
            n = self.scalar("Q", f"{what} length")
            if n > self.limits.max_array:
                raise self.fail(f"{what}: array length {n} exceeds the limit of {self.limits.max_array}")
            if item in SCALAR_FORMATS:
                size = struct.calcsize("<" + SCALAR_FORMATS[item])
                self.need(n * size, f"{what} ({n} items)")
                arr = np.frombuffer(self.buf, dtype="<" + SCALAR_FORMATS[item], count=n, offset=self.pos)
                self.pos += n * size
                return Field(vtype, arr.copy(), item)
            if item == STRING:
                self.need(n * 8, f"{what} ({n} strings)")  # each string has at least its u64 length
                return Field(vtype, [self.string(f"{what}[{i}]") for i in range(n)], item)
            raise self.fail(f"{what}: unsupported array item type {item} (nested arrays are refused)")
        raise self.fail(f"{what}: unknown value type {vtype}, expected one of {sorted(VALUE_TYPE_NAMES)}")


@dataclass
class GGUFFile:
    """An opened, validated GGUF file. `data` is a read-only uint8 view of the whole mapped file."""

    path: Path
    version: int
    fields: dict[str, Field]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    data: np.ndarray = field(repr=False)
    _mm: mmap.mmap | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, limits: GGUFLimits | None = None) -> GGUFFile:
        path = path_arg(path, "GGUF file path")
        limits = limits or GGUFLimits()
        kind = not_regular(path)  # open() on a FIFO would block until a writer comes
        if kind is not None:
            raise GGUFFormatError(f"cannot open GGUF {path}: expected a regular file, found {kind}")
        check_model_file(path, "gguf", GGUFFormatError)
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise GGUFFormatError(f"{path}: {size} byte(s) is too short for a GGUF header (24 bytes)")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFFormatError(f"cannot open GGUF {path}: {e}") from e
        try:
            return cls._parse(path, mm, limits)
        except BaseException:
            mm.close()
            raise

    @classmethod
    def _parse(cls, path: Path, mm: mmap.mmap, limits: GGUFLimits) -> GGUFFile:
        buf = memoryview(mm)
        try:
            cur = _Cursor(buf, str(path), limits)
            magic = bytes(buf[:4])
            if magic != MAGIC:
                raise cur.fail(f"bad magic: expected {MAGIC!r}, got {magic!r}")
            cur.pos = 4
            version = cur.scalar("I", "version")
            if version not in VERSIONS:
                raise cur.fail(f"unsupported GGUF version {version}, expected one of {VERSIONS}")
            n_tensors = cur.scalar("Q", "tensor count")
            n_kv = cur.scalar("Q", "metadata count")
            if n_tensors > limits.max_tensors:
                raise cur.fail(f"tensor count {n_tensors} exceeds the limit of {limits.max_tensors}")
            if n_kv > limits.max_kv:
                raise cur.fail(f"metadata count {n_kv} exceeds the limit of {limits.max_kv}")

            fields: dict[str, Field] = {}
            for i in range(n_kv):
                key = cur.string(f"metadata key #{i}")
                if key in fields:
                    raise cur.fail(f"duplicate metadata key {key!r}")
                vtype = cur.scalar("I", f"value type of {key!r}")
                fields[key] = cur.value(vtype, repr(key))

            alignment = DEFAULT_ALIGNMENT
            if "general.alignment" in fields:
                f = fields["general.alignment"]
                a = f.value
                if f.type != 4 or a <= 0 or a & (a - 1) or a > limits.max_alignment:
                    raise GGUFFormatError(
                        f"{path}: general.alignment: expected a uint32 power of two <= "
                        f"{limits.max_alignment}, got {f.type_name} {a!r}"
                    )
                alignment = int(a)

            infos = []
            for i in range(n_tensors):
                name = cur.string(f"tensor name #{i}")
                n_dims = cur.scalar("I", f"dimension count of {name!r}")
                if not 1 <= n_dims <= limits.max_dims:
                    raise cur.fail(f"tensor {name!r}: expected 1..{limits.max_dims} dimensions, got {n_dims}")
                shape = tuple(cur.scalar("Q", f"dimension of {name!r}") for _ in range(n_dims))
                type_id = cur.scalar("I", f"type of {name!r}")
                offset = cur.scalar("Q", f"offset of {name!r}")
                infos.append((name, shape, type_id, offset))
            data_offset = -(-cur.pos // alignment) * alignment
            tensors = _check_tensors(path, infos, alignment, data_offset, len(buf))
        finally:
            buf.release()
        data = np.frombuffer(mm, dtype=np.uint8)
        return cls(path, version, fields, tensors, alignment, data_offset, data, mm)

    # ------------------------------------------------------------------------------------------
    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` (a read-only view into the mapping, no copy)."""
        t = self.tensors[name]
        return self.data[t.offset : t.offset + t.nbytes]

    def tensor_array(self, name: str) -> np.ndarray:
        """An F32/F16 tensor as a numpy array in numpy order (reversed ggml shape), no copy."""
        t = self.tensors[name]
        dtype = {"F32": np.float32, "F16": np.float16}.get(t.type.name)
        if dtype is None:
            raise GGUFFormatError(f"{self.path}: tensor {name!r} is {t.type.name}, not F32/F16")
        return self.tensor_bytes(name).view(dtype).reshape(t.shape[::-1])

    @property
    def base_address(self) -> int:
        return self.data.ctypes.data

    def close(self) -> None:
        if self._mm is not None:
            self.data = np.empty(0, dtype=np.uint8)
            with contextlib.suppress(BufferError):  # a view is still alive; the mapping goes with it
                self._mm.close()
            self._mm = None


def _check_tensors(
    path: Path,
    infos: list[tuple[str, tuple[int, ...], int, int]],
    alignment: int,
    data_offset: int,
    size: int,
) -> dict[str, TensorInfo]:
    """Types known, shapes whole blocks, offsets aligned, extents inside the file and disjoint."""
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, rel in infos:
        if name in tensors:
            raise GGUFFormatError(f"{path}: duplicate tensor {name!r}")
        if type_id not in GGML_TYPES:
            raise GGUFFormatError(
                f"{path}: tensor {name!r}: unknown ggml type {type_id}, expected one of "
                + ", ".join(f"{i} ({t.name})" for i, t in GGML_TYPES.items())
            )
        traits = GGML_TYPES[type_id]
        if any(d <= 0 for d in shape):
            raise GGUFFormatError(f"{path}: tensor {name!r}: every dimension must be >= 1, got {shape}")
        if shape[0] % traits.block:
            raise GGUFFormatError(
                f"{path}: tensor {name!r}: first dimension {shape[0]} is not a multiple of the "
                f"{traits.name} block size {traits.block}"
            )
        n = 1
        for d in shape:
            n *= d
        nbytes = traits.row_nbytes(n)
        if rel % alignment:
            raise GGUFFormatError(f"{path}: tensor {name!r}: offset {rel} is not aligned to {alignment}")
        start = data_offset + rel
        if start + nbytes > size:
            raise GGUFFormatError(
                f"{path}: tensor {name!r}: data [{start}, {start + nbytes}) runs past the end of the "
                f"file ({size} bytes): truncated file or bad offset"
            )
        tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)
    spans = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(spans, spans[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise GGUFFormatError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the file")
    return tensors
