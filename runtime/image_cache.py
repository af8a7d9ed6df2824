r"""Image embeddings by the hash of the preprocessed pixels: an LRU in memory, optionally a folder on disk.

    pixels (1,3,S,S) --sha256(model id + bytes)--> key --memory LRU--> (Q, H)
                                                        \--folder/<key>.e1 (survives restarts)

The key covers what the vision graph sees (the preprocessed pixels, so two files of the same picture
share it) and, for the disk tier, which graph made the embeddings (`model_id`, e.g. the ONNX file's
sha256), so one folder can serve several models.

Disk entries (format version 1, `<key>.e1`; the version is in the name, so two versions never read
each other's files):

    magic b"TGVEMB\0\0" | version u32 | rows u32 | cols u32 | sha256 (32 bytes) | rows*cols float32 LE

The sha256 covers the key, the version, the shape and the values. An entry is written to a hidden
temporary file `.<key>.<pid>.<8 hex>.tmp`, fsynced, read back and verified, renamed into place, and the
folder fsynced. On read the size (checked before anything is allocated), magic, shape and checksum are
verified; a torn, truncated or corrupt entry, or an entry of the old unversioned format (`<key>.npy`,
no checksum) is deleted and counts as a miss, so the embeddings are recomputed, never served wrong.
Temporary files whose writer is gone (a SIGKILL mid-entry) are removed when a cache opens the folder.

A folder that cannot be created or written when the cache opens (not a folder, read-only, no
permission) is an `OutputPathError`. A full disk at open, or a write that fails later (disk full, the
folder made read-only), leaves nothing behind, is logged on the `tinygptv_edge.runtime` logger and
turns the disk writes off for `DISK_RETRY_S` seconds: the entries already there are still read, and
the caller keeps getting answers from the memory tier and the vision graph (`disk_error` says why).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import struct
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .checks import process_alive
from .errors import ConfigError, OutputPathError


def file_sha256(path: str | Path, chunk: int = 1 << 20, h=None) -> str:
    """sha256 of a file's bytes (hex), read in chunks (into `h` when given)."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# an ONNX TensorProto's external_data entry {key: "location", value: NAME} as protobuf writes it
# (field 1 "location", then field 2 with a one-byte length); the runtime reads no ONNX protobufs
_LOCATION = re.compile(rb"\x0a\x08location\x12([\x01-\x7f])")


def onnx_sha256(path: str | Path) -> str:
    """sha256 over an ONNX graph and the external data files it names (sorted), so that a model whose
    weights changed only in `<name>.data` gets another hash."""
    path = Path(path)
    data = path.read_bytes()
    names = {data[m.end() : m.end() + m.group(1)[0]] for m in _LOCATION.finditer(data)}
    h = hashlib.sha256(data)
    for name in sorted(names):
        extra = path.parent / name.decode("utf-8", "replace")
        h.update(b"\0" + name + b"\0")
        if extra.is_file():
            file_sha256(extra, h=h)
    return h.hexdigest()


LOG = logging.getLogger("tinygptv_edge.runtime")

FORMAT_VERSION = 1
MAGIC = b"TGVEMB\0\0"
_HEADER = struct.Struct("<8sIII32s")  # magic, version, rows, cols, sha256
SUFFIX = f".e{FORMAT_VERSION}"
MAX_ENTRY_BYTES = 256 << 20  # without a known shape: far above (32, 2560) float32 = 320 KiB
DISK_RETRY_S = 60.0  # after a failed write, the disk tier is not written for this long
_TEMP = re.compile(r"^\.(?P<key>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def encode_entry(key: str, embeds: np.ndarray) -> bytes:
    """One disk entry: header with the sha256 of (key, version, shape, values), then the values."""
    payload = np.ascontiguousarray(embeds, dtype="<f4").tobytes()
    rows, cols = embeds.shape
    digest = _digest(key, rows, cols, payload)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, rows, cols, digest) + payload


def decode_entry(key: str, data: bytes, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The embeddings of a disk entry, or None when anything about it is off (torn, corrupt, other key)."""
    if len(data) < _HEADER.size:
        return None
    magic, version, rows, cols, digest = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or rows < 1 or cols < 1:
        return None
    if shape is not None and (rows, cols) != tuple(shape):
        return None
    payload = data[_HEADER.size :]
    if len(payload) != rows * cols * 4 or _digest(key, rows, cols, payload) != digest:
        return None
    return np.frombuffer(payload, dtype="<f4").astype(np.float32).reshape(rows, cols)


def _digest(key: str, rows: int, cols: int, payload: bytes) -> bytes:
    h = hashlib.sha256(key.encode("utf-8"))
    h.update(struct.pack("<III", FORMAT_VERSION, rows, cols))
    h.update(payload)
    return h.digest()


class ImageCache:
    """`get(key)` / `put(key, embeds)`; `size` 0 keeps nothing in memory."""

    def __init__(
        self,
        size: int = 16,
        folder: str | Path | None = None,
        model_id: str = "",
        shape: tuple[int, int] | None = None,
    ):
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ConfigError(f"image_cache_size: expected an integer >= 0, got {size!r}")
        self.size = size
        self.model_id = model_id
        self.shape: tuple[int, int] | None = (int(shape[0]), int(shape[1])) if shape is not None else None
        self.folder = Path(folder) if folder is not None else None
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.disk_hits = 0
        self.dropped = 0  # disk entries deleted as torn, corrupt or of the old format
        self.disk_error: str | None = None  # the last failed disk write, while writes are off
        self._disk_off_until = 0.0
        if self.folder is not None:
            self._open_folder()

    def _open_folder(self) -> None:
        """Create the folder, prove it writable (a probe file), remove what killed writers left."""
        probe = None
        assert self.folder is not None  # only called with a disk tier
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self._temp_path("probe")
            with open(probe, "xb") as f:
                f.write(b"\0")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise OutputPathError(
                    f"image cache folder {self.folder}: expected a folder this process can write, "
                    f"found {e.strerror or e}"
                ) from e
            self._writes_failed(f"image cache folder {self.folder}: {e.strerror}")  # full: reads still work
        finally:
            if probe is not None:
                with contextlib.suppress(OSError):
                    probe.unlink()
        self.clean_stale()

    def clean_stale(self) -> list[Path]:
        """Remove the temporary files in the folder whose writing process no longer runs."""
        removed: list[Path] = []
        if self.folder is None:
            return removed
        try:
            names = os.listdir(self.folder)
        except OSError:
            return removed
        for name in names:
            m = _TEMP.match(name)
            if m is None or process_alive(int(m["pid"])):
                continue
            try:
                os.unlink(self.folder / name)
            except OSError:
                continue
            removed.append(self.folder / name)
        if removed:
            LOG.warning(
                "image cache %s: removed %d temporary file(s) of killed writers", self.folder, len(removed)
            )
        return removed

    def key(self, pixels: np.ndarray) -> str:
        """The cache key of preprocessed pixels (and of this cache's model id)."""
        h = hashlib.sha256(self.model_id.encode("utf-8"))
        h.update(np.ascontiguousarray(pixels).tobytes())
        return h.hexdigest()[:32]

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self.folder is not None and self._path(key).is_file())

    def get(self, key: str) -> np.ndarray | None:
        embeds = self._memory.get(key)
        if embeds is not None:
            self._memory.move_to_end(key)
            return embeds
        embeds = self._load(key)
        if embeds is not None:
            self.disk_hits += 1
            self._remember(key, embeds)
        return embeds

    def put(self, key: str, embeds: np.ndarray) -> None:
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if self.shape is not None and embeds.shape != self.shape:
            raise ConfigError(f"image cache: expected embeddings of shape {self.shape}, got {embeds.shape}")
        if embeds.ndim != 2:
            raise ConfigError(f"image cache: expected 2-D embeddings (tokens, width), got {embeds.shape}")
        self._remember(key, embeds)
        if self.folder is not None and time.monotonic() >= self._disk_off_until:
            try:
                self._store(key, embeds)
                self.disk_error = None
            except OutputPathError as e:  # disk full, read-only: serve from memory, retry later
                self._writes_failed(str(e))

    def _writes_failed(self, why: str) -> None:
        self.disk_error = why
        self._disk_off_until = time.monotonic() + DISK_RETRY_S
        LOG.warning("%s; disk cache writes off for %.0f s", why, DISK_RETRY_S)

    def clear(self) -> None:
        """Forget the memory tier (the disk tier stays)."""
        self._memory.clear()

    # -- tiers ---------------------------------------------------------------------------------
    def _remember(self, key: str, embeds: np.ndarray) -> None:
        if not self.size:
            return
        self._memory[key] = embeds
        self._memory.move_to_end(key)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path:
        """Where the disk tier keeps `key` (only with a disk tier)."""
        assert self.folder is not None
        return self.folder / f"{key}{SUFFIX}"

    def _temp_path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"

    def _load(self, key: str) -> np.ndarray | None:
        if self.folder is None:
            return None
        self._drop(self.folder / f"{key}.npy")  # format 0: no checksum, so never trusted
        path = self._path(key)
        limit = _HEADER.size + (4 * self.shape[0] * self.shape[1] if self.shape else MAX_ENTRY_BYTES)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read(limit + 1) if size <= limit else None
        except OSError:
            return None  # absent or unreadable: a miss
        embeds = decode_entry(key, data, self.shape) if data is not None else None
        if embeds is None:
            self._drop(path)
        return embeds

    def _drop(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:  # a read-only folder: the entry stays, and is checked (and missed) again
            LOG.warning("image cache: cannot remove the bad entry %s (%s)", path, e.strerror or e)
            return
        self.dropped += 1
        LOG.warning("image cache: dropped %s (torn, corrupt or of an older format)", path)

    def _store(self, key: str, embeds: np.ndarray) -> None:
        data = encode_entry(key, embeds)
        tmp = self._temp_path(key)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            with open(tmp, "rb") as f:
                back = f.read(len(data) + 1)
            if decode_entry(key, back, (embeds.shape[0], embeds.shape[1])) is None:
                raise OSError(f"{tmp.name} did not read back as written")
            path = self._path(key)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            why = e.strerror or str(e)
            raise OutputPathError(
                f"image cache folder {self.folder}: cannot write {key}{SUFFIX} ({why})"
            ) from e
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
