"""Parity of an exported vision graph with the PyTorch reference, in the manner of optimum's validation.

Both run the same pixels (seeded, at two batch sizes so the dynamic batch axis is exercised);
every check that fails is collected, then one ParityError lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.runtime.contract import BATCH_AXIS, VISION_INPUT, VISION_OUTPUT
from tinygptv_edge.runtime.errors import ConfigError, ParityError
from tinygptv_edge.runtime.metrics import cosine_rows


@dataclass(frozen=True)
class ParityConfig:
    """Tolerances: max |onnx - torch| <= atol and per-sample cosine >= min_cosine."""

    atol: float = 1e-4
    min_cosine: float = 0.99999
    batch_sizes: tuple[int, ...] = (1, 2)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.atol > 0:
            raise ConfigError(f"ParityConfig.atol: expected > 0, got {self.atol!r}")
        if not 0 < self.min_cosine <= 1:
            raise ConfigError(f"ParityConfig.min_cosine: expected in (0, 1], got {self.min_cosine!r}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"ParityConfig.batch_sizes: expected positive sizes, got {self.batch_sizes!r}")


@dataclass
class ParityReport:
    max_abs: float = 0.0
    min_cosine: float = 1.0
    checked: list[int] = field(default_factory=list)  # batch sizes run

    def format(self) -> str:
        return (
            f"parity: max |diff| {self.max_abs:.3g}, min cosine {self.min_cosine:.8f}, batches {self.checked}"
        )


def sample_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened embedding: (B, ...) x (B, ...) -> (B,)."""
    return cosine_rows(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), eps=1e-300)


def sample_pixels(image_size: int, batch: int, seed: int) -> np.ndarray:
    """Normalised-looking pixels (B, 3, S, S): uniform [0, 1] images through the CLIP normalisation."""
    from tinygptv_edge.runtime.config import CLIP_MEAN, CLIP_STD

    rng = np.random.default_rng(seed)
    x = rng.random((batch, 3, image_size, image_size), dtype=np.float32)
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_signature(path: Path, cfg, failures: list[str]) -> None:
    """Input/output names and declared shapes as runtime/contract.py says."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ins, outs = list(graph.input), list(graph.output)
    S, Q, H = cfg.vision.image_size, cfg.qformer.num_query_tokens, cfg.projection.out_features
    want_in, want_out = [BATCH_AXIS, 3, S, S], [BATCH_AXIS, Q, H]
    if [i.name for i in ins] != [VISION_INPUT]:
        failures.append(f"inputs: expected [{VISION_INPUT!r}], got {[i.name for i in ins]}")
    elif _dims(ins[0]) != want_in:
        failures.append(f"{VISION_INPUT} shape: expected {want_in}, got {_dims(ins[0])}")
    if [o.name for o in outs] != [VISION_OUTPUT]:
        failures.append(f"outputs: expected [{VISION_OUTPUT!r}], got {[o.name for o in outs]}")
    elif _dims(outs[0]) != want_out:
        failures.append(f"{VISION_OUTPUT} shape: expected {want_out}, got {_dims(outs[0])}")


def check_parity(model: TinyGPTV, onnx_path: str | Path, cfg: ParityConfig | None = None) -> ParityReport:
    """Run onnxruntime (FP32, CPU) and the torch reference on the same pixels; raise on any mismatch."""
    import onnxruntime as ort

    cfg = cfg or ParityConfig()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    failures: list[str] = []
    _check_signature(Path(onnx_path), model.cfg, failures)
    report = ParityReport()
    if failures:
        raise ParityError(failures, str(onnx_path))
    for i, batch in enumerate(cfg.batch_sizes):
        x = sample_pixels(model.cfg.vision.image_size, batch, cfg.seed + i)
        got = sess.run([VISION_OUTPUT], {VISION_INPUT: x})[0]
        with torch.no_grad():
            want = model.vision(torch.from_numpy(x)).numpy()
        report.checked.append(batch)
        where = f"batch {batch}"
        if got.shape != want.shape:
            failures.append(f"{where}: expected output shape {want.shape}, got {got.shape}")
            continue
        if not np.isfinite(want).all():
            failures.append(
                f"{where}: the torch reference output has {int((~np.isfinite(want)).sum())} non-finite values"
            )
        if not np.isfinite(got).all():
            failures.append(
                f"{where}: onnxruntime output has {int((~np.isfinite(got)).sum())} non-finite values"
            )
            continue
        diff = float(np.abs(got - want).max())
        cos = float(sample_cosine(got, want).min())
        report.max_abs, report.min_cosine = max(report.max_abs, diff), min(report.min_cosine, cos)
        if not diff <= cfg.atol:
            failures.append(f"{where}: max |onnx - torch| expected <= {cfg.atol:g}, got {diff:.3g}")
        if not cos >= cfg.min_cosine:
            failures.append(f"{where}: cosine expected >= {cfg.min_cosine}, got {cos:.8f}")
    if failures:
        raise ParityError(failures, str(onnx_path))
    return report
