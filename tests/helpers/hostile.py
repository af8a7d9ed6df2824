"""Helpers for the bad-input tests (test code only): byte patches of GGUF files, a subprocess runner
with a memory cap and a timeout."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def key_value_pos(data: bytes, key: str) -> int:
    """Byte position of the u32 value type following metadata key `key`."""
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def patch_scalar(data: bytes, key: str, fmt: str, value) -> bytes:
    """Set the scalar value of `key` (its type unchanged: `fmt` must have the same width)."""
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, key_value_pos(data, key) + 4, value)
    return bytes(b)


def tensor_type_pos(data: bytes, name: str) -> int:
    n = name.encode()
    p = data.index(struct.pack("<Q", len(n)) + n) + 8 + len(n)
    (n_dims,) = struct.unpack_from("<I", data, p)
    return p + 4 + 8 * n_dims


def patch_bytes(data: bytes, pos: int, new: bytes) -> bytes:
    b = bytearray(data)
    b[pos : pos + len(new)] = new
    return bytes(b)


def _limit(mem: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    return apply


def run_limited(code: str, mem: int = GiB, timeout: float = 120, env: dict | None = None):
    """Run `code` in a fresh interpreter capped at `mem` bytes of address space; CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit(mem),
        cwd=ROOT / "tests",  # not the source root: its tinygptv_edge/ would shadow a non-editable install
        env=env,
    )
