"""Argument and file checks shared by the runtime, and the one wrapper for errors of foreign libraries.

    check_threads(n)           1 .. max_threads(), so no thread count reaches OpenMP or onnxruntime unbounded
    check_count(v, what, hi)   a positive int not above a bound derived from the input
    path_arg(value, what)      a str or os.PathLike naming a file (None, bytes, numbers: a ConfigError)
    regular_file(path, what)   refuses FIFOs, devices and folders before open() could block on them
    check_model_file(path, k)  the file's first bytes against its kind: a GGUF given as the vision model
                               (or an ONNX as the language model) is named as such, with the right flag
    check_memory(nbytes, what) refuses an allocation larger than the machine's physical memory
    foreign(library, where)    onnxruntime / ggml / tokenizers exceptions -> one typed error naming the file

Every check raises a `TinyGPTVError` subclass whose message names what was checked, the expected range
and the value found.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TypeGuard

from .errors import BackendError, ConfigError, TinyGPTVError

THREADS_PER_CORE = 4  # more threads than 4 per core only adds contention; far below OpenMP's limits


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return THREADS_PER_CORE * max(cpu_count(), os.cpu_count() or 1)


def check_threads(n: int | None, what: str = "n_threads") -> int | None:
    """None (the library picks) or an int in 1..max_threads()."""
    if n is None:
        return None
    hi = max_threads()
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= hi:
        raise ConfigError(f"{what}: expected an integer in 1..{hi} ({THREADS_PER_CORE} per CPU), got {n!r}")
    return n


def check_count(value: object, what: str, hi: int | None = None, lo: int = 1) -> int:
    """An int in lo..hi (hi None: no upper bound)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{what}: expected an integer {rng}, got {value!r}")
    return value


def is_path(value: object) -> TypeGuard[str | os.PathLike[str]]:
    """A str or an os.PathLike whose path is text (bytes paths are not taken anywhere in the package)."""
    if isinstance(value, str):
        return True
    if isinstance(value, os.PathLike):
        try:
            return isinstance(os.fspath(value), str)
        except TypeError:  # __fspath__ returned something that is no path
            return False
    return False


def path_arg(value: object, what: str) -> Path:
    """`value` as a Path: a non-empty str or an os.PathLike; anything else (None, bytes, a number) is a
    ConfigError naming the argument, before any file is looked at."""
    if not is_path(value) or not os.fspath(value):
        shown = type(value).__name__
        if value is None:
            shown = "None"
        elif isinstance(value, (str, bytes, int, float)):
            shown += f" {value!r}"
        raise ConfigError(f"{what}: expected a path (str or os.PathLike), got {shown}")
    return Path(value)


def regular_file(path: str | Path, what: str, error: type[TinyGPTVError] = BackendError) -> Path:
    """`path` as a Path if it is a regular file (stat does not block on a FIFO; open() would)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise error(f"{what} not found: {path} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path}: expected a regular file, found {file_kind(st.st_mode)}")
    return path


MODEL_KINDS = {  # kind -> (what it is, the flag and Pipeline argument it goes to)
    "gguf": ("a GGUF file (the language model)", "--language (Pipeline's `language`)"),
    "onnx": ("an ONNX file (the vision model)", "--vision (Pipeline's `vision`)"),
}


def file_magic(path: str | Path) -> str | None:
    """'gguf' or 'onnx' when a regular file's first bytes say so, else None (unreadable, or another kind).

    GGUF starts with b"GGUF"; an ONNX ModelProto with field 1 (ir_version, a small varint) and then
    field 2, 3 or 4 (producer name / version, domain): tag bytes 0x08 .. 0x12 / 0x1a / 0x22."""
    if not_regular(path) is not None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"GGUF":
        return "gguf"
    if len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in (0x12, 0x1A, 0x22, 0x3A, 0x42):
        return "onnx"
    return None


def check_model_file(path: str | Path, kind: str, error: type[TinyGPTVError]) -> None:
    """Refuse a model file of the other kind (`kind`: "gguf" or "onnx"), saying where it belongs."""
    found = file_magic(path)
    if found is not None and found != kind:
        what, flag = MODEL_KINDS[found]
        raise error(f"{path}: this looks like {what}, not {MODEL_KINDS[kind][0]}: pass it as {flag}")


def not_regular(path: str | Path) -> str | None:
    """What `path` is when it exists and is not a regular file ('a FIFO (named pipe)', ...), else None."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


MAX_JSON_BYTES = 64 << 20  # a config.json or tokenizer.json (Phi-2's tokenizer.json: ~2 MB)


def small_file(
    path: str | Path, what: str, error: type[TinyGPTVError] = ConfigError, limit: int = MAX_JSON_BYTES
) -> Path:
    """A regular file of at most `limit` bytes, checked before it is read into memory."""
    path = regular_file(path, what, error)
    size = path.stat().st_size
    if size > limit:
        raise error(f"{what} {path}: expected at most {limit} bytes, found {size}")
    return path


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, what: str) -> None:
    """Refuse `nbytes` when the machine has less physical memory than that (nothing allocated yet)."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise ConfigError(
            f"{what}: needs {nbytes / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB "
            "of memory"
        )


@contextlib.contextmanager
def foreign(library: str, where: str, error: type[TinyGPTVError] = BackendError) -> Iterator[None]:
    """Turn any exception a foreign library raises (its own types) into `error` naming `where`.

    Our own typed errors, MemoryError, KeyboardInterrupt and generator control flow pass through.
    """
    try:
        yield
    except (TinyGPTVError, MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        detail = text[0] if text else type(e).__name__
        raise error(f"{where}: {library} failed: {type(e).__name__}: {detail}") from e


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (its temporary files are then left alone). Another user's
    process, or a number the OS refuses to look up, counts as alive."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True
