"""The vision half of the runtime: an onnxruntime session over the exported vision graph.

    pixel_values (B, 3, S, S) float32 --[vision.*.onnx]--> image_embeds (B, Q, H) float32

Everything the runtime needs besides the graph (preprocessing, query-token count, embedding width) is
read from the ONNX metadata written by the exporter (names in runtime/contract.py). The session can be
released and is rebuilt on the next `embed`, which is how the pipeline's low-memory mode frees it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np

from .. import contract as C
from ..checks import check_count, check_model_file, check_threads, foreign, path_arg, regular_file
from ..config import PreprocessConfig
from ..errors import ConfigError, ModelFileError, NumericsError
from ..memory import release_heap

_REQUIRED = ("image_size", "mean", "std", "num_query_tokens", "embed_dim")


def _ort():
    import onnxruntime  # imported on use: `import tinygptv_edge.runtime` stays light

    return onnxruntime


class VisionEncoder:
    """`embed(pixel_values)` -> image embeddings; preprocess_cfg, embed_dim, num_query_tokens: metadata."""

    def __init__(self, path: str | Path, n_threads: int | None = None, low_memory: bool = False):
        self.path = path_arg(path, "vision model path")
        if not self.path.exists():
            raise ModelFileError(
                f"vision model not found: {self.path} (expected an ONNX file, e.g. {C.VISION_FILE_INT8})"
            )
        regular_file(self.path, "vision model", ModelFileError)
        check_model_file(self.path, "onnx", ModelFileError)
        self.n_threads = check_threads(n_threads)
        self.low_memory = low_memory
        self._session = None
        session = self._open()
        meta = session.get_modelmeta().custom_metadata_map
        self.format_version = _format_version(meta, self.path)  # before anything a newer layout may change
        missing = [C.ONNX_META[k] for k in _REQUIRED if C.ONNX_META[k] not in meta]
        if missing:
            raise ModelFileError(f"{self.path}: ONNX metadata lacks {missing}; not from the exporter?")
        try:
            self.preprocess_cfg = PreprocessConfig(
                image_size=int(_value(meta, "image_size")),
                # three each: PreprocessConfig checks
                mean=cast(tuple[float, float, float], tuple(float(v) for v in _value(meta, "mean"))),
                std=cast(tuple[float, float, float], tuple(float(v) for v in _value(meta, "std"))),
                resample=str(_value(meta, "resample", "bicubic")),
            )
            self.num_query_tokens = check_count(_value(meta, "num_query_tokens"), "num_query_tokens", 1 << 16)
            self.embed_dim = check_count(_value(meta, "embed_dim"), "embed_dim", 1 << 20)
            self.stage = check_count(_value(meta, "stage", 0), "stage", 4, lo=0)
        except (TypeError, ValueError, OverflowError, ConfigError) as e:
            raise ModelFileError(f"{self.path}: bad tinygptv.* metadata: {e}") from e
        self._check_io(session)
        self.metadata = dict(meta)
        if low_memory:
            self.release()

    # -- session -------------------------------------------------------------------------------
    def _open(self):
        if self._session is None:
            ort = _ort()
            opts = ort.SessionOptions()
            if self.n_threads:
                opts.intra_op_num_threads = self.n_threads
            # no arena: activation buffers go back to the allocator after each run (lower peak at full
            # size, no measurable cost at batch 1: docs/benchmarks.md); low-memory also drops
            # memory-pattern plans
            opts.enable_cpu_mem_arena = False
            if self.low_memory:
                opts.enable_mem_pattern = False
            with foreign("onnxruntime", f"cannot load vision model {self.path}"):
                self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        return self._session

    def _check_io(self, session) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if C.VISION_INPUT not in inputs or C.VISION_OUTPUT not in outputs:
            raise ModelFileError(
                f"{self.path}: expected input {C.VISION_INPUT!r} and output {C.VISION_OUTPUT!r}, "
                f"got inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        shape = inputs[C.VISION_INPUT].shape  # [batch, 3, S, S]; batch symbolic
        S = self.preprocess_cfg.image_size
        if len(shape) != 4 or list(shape[1:]) != [3, S, S]:
            raise ModelFileError(f"{self.path}: expected input shape (batch, 3, {S}, {S}), got {shape}")

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def release(self) -> None:
        """Drop the session (its weights and buffers); the next `embed` loads it again."""
        self._session = None
        if self.low_memory:
            release_heap()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> VisionEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inference -----------------------------------------------------------------------------
    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, Q, H) float32."""
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        S = self.preprocess_cfg.image_size
        if x.ndim != 4 or x.shape[1:] != (3, S, S):
            raise ConfigError(f"expected pixel_values (B, 3, {S}, {S}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ConfigError("pixel_values: expected finite values, found NaN or infinity")
        session = self._open()
        with foreign("onnxruntime", f"{self.path}: running the vision graph"):
            (out,) = session.run([C.VISION_OUTPUT], {C.VISION_INPUT: x})
        want = (x.shape[0], self.num_query_tokens, self.embed_dim)
        if out.shape != want:
            raise ModelFileError(f"{self.path}: expected image_embeds of shape {want}, got {out.shape}")
        out = np.asarray(out, dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(out)))
        if bad:
            raise NumericsError(
                f"{self.path}: the vision graph produced {bad} NaN/inf value(s) in image_embeds "
                "(expected finite embeddings: its weights or quantization parameters are broken)"
            )
        return out


def _format_version(meta: dict[str, str], path: Path) -> int:
    """The graph's format version (1 when written before versions); FormatVersionError when too new."""
    key = C.ONNX_META["format_version"]
    raw = meta.get(key)
    found = None
    if raw is not None:
        try:
            found = int(raw)
        except ValueError:
            found = 0
        if found < 1:
            raise ModelFileError(f"{path}: metadata {key}: expected a format version >= 1, got {raw!r}")
    return C.check_format_version(found, C.ONNX_FORMAT_VERSION, path)


def _value(meta: dict[str, str], key: str, default=None):
    raw = meta.get(C.ONNX_META[key])
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # plain strings (e.g. the resample name) may be stored unquoted
