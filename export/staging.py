"""Temporary names for outputs being written, and the cleanup of those a killed export left behind.

Every exporter writes `OUT` as a hidden sibling first, verifies it, then renames it into place:

    .OUT.<pid>.<8 hex>.tmp        a file (GGUF) or a folder (ONNX export/quantization, checkpoints)

A SIGKILL between the two leaves that sibling behind. The pid in its name tells the next export to
the same folder whether the writer is gone: if no such process runs, the leftover is removed and
reported on the `tinygptv_edge.export` logger (a live pid is left alone: that export may still run).

Disk full and read-only folders: `check_free_space` refuses an export whose staged files cannot fit
before anything is written (the sizes are known up front: tensor bytes, the FP32 graph); a failure
while the disk is full anyway (another writer took the space, an estimate was short) becomes an
`OutputPathError` through `full_disk_error`, also when a foreign writer (onnxruntime's C++) left a
truncated file without an error and a later step failed on reading it. Staged files go in every case.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from tinygptv_edge.runtime.checks import process_alive
from tinygptv_edge.runtime.errors import OutputPathError

LOG = logging.getLogger("tinygptv_edge.export")
STAGED = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def staged_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written there (before any long work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputPathError(
            f"output folder {folder} is not writable: expected a writable folder, got {e}"
        ) from e
    return folder


def stage_file(out: str | Path) -> Path:
    """An empty hidden file beside `out` (stale leftovers in that folder are cleaned first)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent)
        tmp = staged_path(out)
        with open(tmp, "xb"):  # the usual file mode (mkstemp would make it 0600)
            pass
    except OSError as e:
        raise OutputPathError(f"cannot write {out}: {e}") from e
    return tmp


def stage_dir(out: str | Path) -> Path:
    """An empty hidden folder beside `out` (stale leftovers in that folder are cleaned first)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent)
        tmp = staged_path(out)
        tmp.mkdir()
    except OSError as e:
        raise OutputPathError(f"cannot write {out}: {e}") from e
    return tmp


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove the staged outputs in `folder` whose writing process no longer runs; return them."""
    removed = []
    for path in Path(folder).iterdir():
        m = STAGED.match(path.name)
        if m is None or process_alive(int(m["pid"])):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:  # another export cleaned it first
            continue
        LOG.warning("removed %s, left by an export that was killed (pid %s)", path, m["pid"])
        removed.append(path)
    return removed


def write_texts(folder: str | Path, texts: dict[str, str], what: str) -> list[Path]:
    """Each `name: text` as `folder/name`, written to a temp file in `folder` and renamed into place
    (a failed write leaves no temp file)."""
    folder = Path(folder)
    out = []
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            tmp = staged_path(folder / name)
            tmp.write_text(text)
            os.replace(tmp, folder / name)
            out.append(folder / name)
    except OSError as e:
        raise OutputPathError(f"cannot write {what} to {folder}: {e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return out


FULL_BELOW = 1 << 20  # a file system with less free space than this counts as full


def check_free_space(folder: str | Path, need: int, what: str) -> None:
    """OutputPathError when the file system holding `folder` has less than `need` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no statvfs here: the writes themselves will tell
    if free < need:
        raise OutputPathError(
            f"cannot write {what}: expected at least {_mib(need)} free in {folder} for its staged files, "
            f"found {_mib(free)}"
        )


def full_disk_error(what: str | Path, folder: str | Path, error: BaseException) -> OutputPathError | None:
    """An OutputPathError for `error` when the file system holding `folder` is (nearly) full, else None:
    a step that failed on a full disk failed because of it, whatever the library's own message says."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= FULL_BELOW:
        return None
    first = str(error).splitlines()[0] if str(error) else ""
    return OutputPathError(
        f"cannot write {what}: the disk holding {folder} is full ({_mib(free)} free); "
        f"the failed step said: {type(error).__name__}: {first[:300]}"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
