"""Typed errors shared by the exporters and the runtime. Messages say what was expected and what was found."""

from __future__ import annotations


class TinyGPTVError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(TinyGPTVError, ValueError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(TinyGPTVError):
    """A checkpoint cannot be read or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle was refused: it needs code execution, or torch is too old to load it safely."""


class MissingKeysError(CheckpointError):
    """Tensors the model needs are absent from the checkpoint(s)."""

    def __init__(self, keys: list[str], source: str = ""):
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:20]) + (
            f", ... ({len(self.keys)} in all)" if len(self.keys) > 20 else ""
        )
        where = f" in {source}" if source else ""
        super().__init__(f"missing {len(self.keys)} tensor(s){where}: {shown}")


class UnexpectedKeysError(CheckpointError):
    """Tensors in a checkpoint that no rule maps onto the model."""

    def __init__(self, keys: list[str], source: str = ""):
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:20]) + (
            f", ... ({len(self.keys)} in all)" if len(self.keys) > 20 else ""
        )
        where = f" in {source}" if source else ""
        super().__init__(f"{len(self.keys)} unexpected tensor(s){where}: {shown}")


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from the model's."""

    def __init__(self, name: str, expected: tuple[int, ...], got: tuple[int, ...], source: str = ""):
        self.name, self.expected, self.got = name, tuple(expected), tuple(got)
        where = f" in {source}" if source else ""
        super().__init__(f"{name}{where}: expected shape {self.expected}, got {self.got}")


class NonFiniteTensorError(CheckpointError):
    """A tensor holds NaN or infinity."""

    def __init__(self, name: str, count: int, source: str = ""):
        self.name, self.count = name, count
        where = f" in {source}" if source else ""
        super().__init__(f"{name}{where}: {count} non-finite value(s)")


class ExportError(TinyGPTVError):
    """An export could not be completed or failed its verification."""


class ImageError(TinyGPTVError, ValueError):
    """An image cannot be used: unreadable, truncated, too large, or of a refused format."""


class ParityError(ExportError):
    """An exported graph disagrees with the PyTorch reference; `failures` lists every failed check."""

    def __init__(self, failures: list[str], where: str = ""):
        self.failures = list(failures)
        head = f"parity check failed for {where}" if where else "parity check failed"
        super().__init__(f"{head} ({len(self.failures)} problem(s)):\n  " + "\n  ".join(self.failures))


class CalibrationError(TinyGPTVError, ValueError):
    """Calibration data cannot be used: no images, non-finite values or a wrong shape."""


class QuantizationError(ExportError):
    """A quantized graph could not be built or failed its checks (non-finite outputs, too far from FP32)."""


class OutputPathError(ExportError):
    """An output location cannot be created or written."""


class ImageFormatError(ImageError):
    """An image file is in a format outside the allow-list (or in no format Pillow knows)."""


class ImageTooLargeError(ImageError):
    """An image exceeds the pixel or byte cap (a decompression-bomb guard)."""


class ModelFileError(TinyGPTVError):
    """A model file is missing, unreadable, or lacks what the runtime needs."""


class ModelMismatchError(ModelFileError):
    """The vision and language files do not fit together (embedding width, image token count)."""


class PipelineBusyError(TinyGPTVError, RuntimeError):
    """A pipeline call was made while another is running (same thread, or the wait timed out)."""


class GGUFFormatError(CheckpointError, ValueError):
    """A GGUF file is truncated or corrupt: bad magic, counts, lengths, offsets or duplicate names."""


class GGUFModelError(CheckpointError, ValueError):
    """A well-formed GGUF that is not the model the runtime expects: architecture, keys or tensor types."""


class ContextOverflowError(TinyGPTVError, ValueError):
    """More positions were asked of the decoder than its context holds."""

    def __init__(self, n_past: int, n_new: int, n_ctx: int):
        self.n_past, self.n_new, self.n_ctx = n_past, n_new, n_ctx
        super().__init__(
            f"context overflow: {n_past} cached + {n_new} new token(s) = {n_past + n_new} positions, "
            f"but the context holds {n_ctx}"
        )


class EvalSetError(ConfigError):
    """An evaluation set (questions.jsonl + images) is missing, malformed or names absent images."""


class ReportError(TinyGPTVError):
    """The accuracy report cannot be produced: a level failed to build or evaluate, or bad options."""


class FormatVersionError(ModelFileError):
    """A model file written by a newer exporter than this runtime reads (its format version is higher)."""

    def __init__(self, path: str, found: int, supported: int):
        self.path, self.found, self.supported = str(path), found, supported
        super().__init__(
            f"{self.path}: written by format version {found}, this runtime reads up to {supported}: "
            "upgrade tinygptv-edge"
        )


class ClosedError(TinyGPTVError, RuntimeError):
    """An object (decoder, pipeline) was used after `close()`."""


class NumericsError(TinyGPTVError, ValueError):
    """A model produced NaN or infinity where numbers were expected (its weights or inputs are broken)."""


class BackendError(ModelFileError):
    """onnxruntime, ggml or tokenizers failed on a model file or an input: the message names the file."""
