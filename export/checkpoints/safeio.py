"""Reading checkpoint files safely: safetensors, or pickles only through `weights_only=True`.

Pickles are refused outright on torch < 2.6 (whose weights_only unpickler had known bypasses),
and there is no fallback to a full unpickler: a file that needs one is an error.
"""

from __future__ import annotations

import pickle
import zipfile
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


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from a .safetensors file (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def safetensors_keys(path: str | Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
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


def check_finite(name: str, t: torch.Tensor, source: str = "") -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteTensorError(name, int((~torch.isfinite(t)).sum()), source)
