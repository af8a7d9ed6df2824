"""File-system faults for tests (test code only): a small tmpfs that fills up, a folder made read-only.

Root ignores permission bits, so a read-only folder is a tmpfs remounted read-only (root) or a chmod
(anyone else). Where neither is possible (no mount permission in a container) the test is skipped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


def remount(path: Path, mode: str) -> None:
    """`mode` "ro" or "rw" for a tmpfs mounted by `tmpfs`."""
    res = _run("mount", "-o", f"remount,{mode}", str(path))
    assert res.returncode == 0, res.stderr


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` (a tmpfs from `tmpfs` when root) read-only for this process, then writable again."""
    if os.geteuid() == 0:
        remount(path, "ro")
        try:
            yield
        finally:
            remount(path, "rw")
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)


def fill(path: Path) -> Path:
    """Fill the file system holding `path` until a write fails with ENOSPC; the filler file."""
    filler = path / "filler.bin"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    return filler


def listing(path: Path) -> list[str]:
    """Every name under `path`, hidden ones included (what a failed write may have left)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
