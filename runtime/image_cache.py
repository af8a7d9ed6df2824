r"""Image embeddings by the hash of the preprocessed pixels: an LRU in memory, optionally a folder on disk.

    pixels (1,3,S,S) --sha256(model id + bytes)--> key --memory LRU--> (Q, H)
                                                        \--folder/<key>.npy (survives restarts)

The key covers what the vision graph sees (the preprocessed pixels, so two files of the same picture
share it) and, for the disk tier, which graph made the embeddings (`model_id`, e.g. the ONNX file's
sha256), so one folder can serve several models. Disk files are written temp -> verify -> rename; an
unreadable or mis-shaped file counts as a miss and is replaced on the next `put`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

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
        self.shape = tuple(shape) if shape is not None else None
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputPathError(f"image cache folder {self.folder}: cannot create it ({e})") from e
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.disk_hits = 0

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
        self._remember(key, embeds)
        if self.folder is not None:
            self._store(key, embeds)

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
        return self.folder / f"{key}.npy"

    def _load(self, key: str) -> np.ndarray | None:
        if self.folder is None:
            return None
        path = self._path(key)
        try:
            embeds = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # absent, truncated or not an .npy: a miss
        if embeds.dtype != np.float32 or embeds.ndim != 2:
            return None
        if self.shape is not None and embeds.shape != self.shape:
            return None
        return embeds

    def _store(self, key: str, embeds: np.ndarray) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, embeds, allow_pickle=False)
            back = np.load(tmp, allow_pickle=False)
            if back.shape != embeds.shape or not np.array_equal(back, embeds):
                raise OutputPathError(f"image cache: {tmp} did not read back as written")
            os.replace(tmp, self._path(key))
        except OSError as e:
            raise OutputPathError(f"image cache folder {self.folder}: cannot write {key}.npy ({e})") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
