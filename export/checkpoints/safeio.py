"""Reading checkpoint files safely: safetensors, or pickles only through `weights_only=True`.

Pickles are refused outright on torch < 2.6 (whose weights_only unpickler had known bypasses),
and there is no fallback to a full unpickler: a file that needs one is an error.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from tinygptv_edge.runtime.errors import CheckpointError, NonFiniteTensorError, UnsafeCheckpointError

MIN_TORCH_FOR_PICKLES = (2, 6)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def load_pickle(path: str | Path) -> dict:
    """torch.load(path, weights_only=True, mmap=True); anything that needs code execution is refused."""
    path = Path(path)
    if _torch_version() < MIN_TORCH_FOR_PICKLES:
        raise UnsafeCheckpointError(
            f"refusing to unpickle {path}: torch {torch.__version__} < 2.6 cannot load pickles safely; "
            "upgrade torch or convert the file to safetensors"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # mmap needs the zip format; the legacy format is read without it.
        mmap = zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing {path}: it is not a plain tensor checkpoint (weights_only unpickler said: "
            f"{str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


# safetensors' own reader caps the header at 100 MB; the length field is checked before it is read.
MAX_SAFETENSORS_HEADER = 100_000_000


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """Tensor name -> header entry (dtype, shape, data_offsets) of a .safetensors file, in file order.

    A name listed twice is refused: JSON readers keep one of the two entries (safetensors the last), so
    which tensor the name means would depend on the reader. The header is read with its length checked
    against the file size before any allocation; safetensors itself checks dtypes and offsets on open."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: expected a safetensors header length (8 bytes), found a file of {size} bytes"
                )
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise CheckpointError(
                    f"{path}: header length: expected at most {min(size - 8, MAX_SAFETENSORS_HEADER)} bytes "
                    f"(the file holds {size}), found {n}"
                )
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    repeated: dict[str, int] = {}  # a key listed twice in one JSON object (a tensor, or an entry's field)

    def pairs(items: list[tuple[str, object]]) -> dict:
        counts = Counter(k for k, _ in items)
        repeated.update((k, c) for k, c in counts.items() if c > 1)
        return dict(items)

    try:
        header = json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"cannot read {path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header: expected a JSON object, found {type(header).__name__}")
    if repeated:
        shown = ", ".join(f"{k!r} ({c} times)" for k, c in sorted(repeated.items())[:5])
        raise CheckpointError(f"{path}: header: expected each tensor name (and field) once, found {shown}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a .safetensors file (header checked by `safetensors_header`, then safetensors)."""
    from safetensors import SafetensorError, safe_open

    safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from a .safetensors file (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    keys = safetensors_keys(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in keys:
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def tensor_dict(obj: dict, path: str | Path, wrapper: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle, optionally under `wrapper` (e.g. {'model': state_dict})."""
    if wrapper is not None:
        if wrapper not in obj:
            shown = sorted(map(repr, obj))[:8]
            raise CheckpointError(f"{path}: expected a dict with key {wrapper!r}, got keys {shown}")
        obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path}: {wrapper!r}: expected a dict of tensors (a state dict), got {type(obj).__name__}"
            )
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(
                f"{path}: expected tensor names (strings) as keys, got {type(k).__name__} {k!r}"
            )
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k] = v
    return out


def weight_tensor(name: str, t: torch.Tensor, source: str = "") -> torch.Tensor:
    """`t` as a float32 model weight: a floating-point dtype (an integer or bool tensor cast to float would
    be garbage weights) and finite. Every loading path (the reference model's `Collector`, the GGUF
    exporter's streamed single folder) takes its tensors through here."""
    if not t.is_floating_point():
        raise CheckpointError(f"{name} in {source}: expected a floating-point tensor, got {t.dtype}")
    t = t.detach().to(torch.float32).contiguous()
    check_finite(name, t, source)
    return t


def check_finite(name: str, t: torch.Tensor, source: str = "") -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteTensorError(name, int((~torch.isfinite(t)).sum()), source)
