"""INT8 quantization settings of the vision graph: one validated dataclass, named presets per target CPU.

    preset        activations  weights  reduce_range   why
    x86-vnni      uint8        int8     no             VNNI (vpdpbusd) multiplies u8 x s8 at full rate
    x86-avx2      uint8        int8     yes            no VNNI: 7-bit weights avoid s16 saturation
    arm           int8         int8     no             ARM dot-product kernels (sdot) take s8 x s8

Activations are asymmetric in every preset (a zero point per tensor; the kernels fold it in through
row sums). A symmetric int8 range for the arm preset wasted half of it on the post-GELU and softmax
activations, which are nearly all positive: cosine 0.982 vs FP32 on a held-out image of the shipped
model, against 0.998 asymmetric (tests/runtime/test_shipped_exports.py).

Only MatMul, Gemm and Conv are quantized by default (QDQ, per-channel weights); LayerNorm, Softmax
and GELU stay in float between them. Exclusions are node-name globs on the exported graph
(`/vision/qformer/*`, `/vision/encoder/blocks.0/attn/*`).

The gate (both INT8 and INT4): on held-out images (not the calibration images) the per-image minimum
cosine vs FP32 must reach `min_cosine` and the mean `mean_cosine`; the worst image is what a user meets.
`Int4Config`: weight-only INT4 (onnxruntime MatMulNBits, blocks of `block_size` along K, one fp32
scale per block); `accuracy_level` 4 computes in int8 (activations quantized per block at run time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tinygptv_edge.runtime.errors import ConfigError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
QUANT_TYPES = ("uint8", "int8")
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class QuantPreset:
    """Static QDQ quantization of the vision graph for one target."""

    name: str = "x86-vnni"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    op_types: tuple[str, ...] = QUANTIZABLE_OPS
    method: str = "minmax"  # one of CALIBRATION_METHODS
    percentile: float = 99.999  # for method "percentile"
    exclude: tuple[str, ...] = ()  # node-name globs kept in float
    fallback_k: int = 0  # at most this many nodes (lowest SQNR first) kept in float until the gate passes
    min_cosine: float = 0.98  # gate: per-image minimum cosine vs FP32 on held-out images
    mean_cosine: float = 0.995  # gate: mean cosine vs FP32 on held-out images
    max_images: int = 64  # calibration images used at most
    fuse: bool = True  # onnxruntime transformer fusions (export/onnx/fuse.py) before quantizing

    def __post_init__(self) -> None:
        if self.activation_type not in QUANT_TYPES:
            raise ConfigError(f"activation_type: expected one of {QUANT_TYPES}, got {self.activation_type!r}")
        if self.weight_type not in QUANT_TYPES:
            raise ConfigError(f"weight_type: expected one of {QUANT_TYPES}, got {self.weight_type!r}")
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"method: expected one of {CALIBRATION_METHODS}, got {self.method!r}")
        bad = [op for op in self.op_types if op not in QUANTIZABLE_OPS]
        if not self.op_types or bad:
            raise ConfigError(
                f"op_types: expected a non-empty subset of {QUANTIZABLE_OPS}, got {self.op_types!r}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile: expected in (50, 100], got {self.percentile!r}")
        if not isinstance(self.fallback_k, int) or self.fallback_k < 0:
            raise ConfigError(f"fallback_k: expected an integer >= 0, got {self.fallback_k!r}")
        _check_gate(self.min_cosine, self.mean_cosine)
        if not isinstance(self.max_images, int) or self.max_images < 1:
            raise ConfigError(f"max_images: expected a positive integer, got {self.max_images!r}")
        if any(not isinstance(p, str) or not p for p in self.exclude):
            raise ConfigError(f"exclude: expected non-empty node-name globs, got {self.exclude!r}")

    def replace(self, **changes) -> QuantPreset:
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_gate(min_cosine: float, mean_cosine: float) -> None:
    for name, v in (("min_cosine", min_cosine), ("mean_cosine", mean_cosine)):
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"{name}: expected in (0, 1], got {v!r}")


INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute


@dataclass(frozen=True)
class Int4Config:
    """Weight-only INT4 of every MatMul with a constant weight (Conv and attention stay float)."""

    block_size: int = 32  # the shipped model: 128 and 64 fall under the 0.99 mean gate (docs/onnx.md)
    accuracy_level: int = 4
    symmetric: bool = False  # a 4-bit zero point per block: closer to FP32 on the tiny model (docs/onnx.md)
    exclude: tuple[str, ...] = ()  # node-name globs kept in float
    min_cosine: float = 0.98
    mean_cosine: float = 0.99
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(f"int4 block_size: expected one of {INT4_BLOCK_SIZES}, got {self.block_size!r}")
        if self.accuracy_level not in INT4_ACCURACY_LEVELS:
            raise ConfigError(
                f"int4 accuracy_level: expected one of {INT4_ACCURACY_LEVELS}, got {self.accuracy_level!r}"
            )
        _check_gate(self.min_cosine, self.mean_cosine)
        if any(not isinstance(p, str) or not p for p in self.exclude):
            raise ConfigError(f"exclude: expected non-empty node-name globs, got {self.exclude!r}")

    def replace(self, **changes) -> Int4Config:
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, QuantPreset] = {
    "x86-vnni": QuantPreset(name="x86-vnni"),
    "x86-avx2": QuantPreset(name="x86-avx2", reduce_range=True),
    "arm": QuantPreset(name="arm", activation_type="int8"),
}


def get_preset(name: str, **overrides) -> QuantPreset:
    """A named preset with some fields changed (`get_preset('arm', method='entropy')`)."""
    if name not in PRESETS:
        raise ConfigError(f"quantization preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
