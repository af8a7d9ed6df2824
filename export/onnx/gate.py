"""The gate of a quantized vision graph: per-image cosine vs FP32 on held-out images, mean and minimum.

    held-out pixels --FP32 graph--> want (once)
    held-out pixels --quantized graph--> got --per image cosine--> CheckResult(mean, min, worst images)
    passes(min_cosine, mean_cosine): min >= min_cosine and mean >= mean_cosine

The mean hides the one image a user meets at cosine 0.95 (issue #17); both are gated, and the report
(`heldout.json`, `heldout.txt` with --diagnostics) lists the images worst first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygptv_edge.export.staging import write_texts
from tinygptv_edge.runtime.errors import QuantizationError

REPORT_JSON = "heldout.json"
REPORT_TABLE = "heldout.txt"
SHOW_WORST = 5


@dataclass
class CheckResult:
    cosines: np.ndarray  # (N,) per held-out image
    names: list[str]
    max_abs: float

    @property
    def mean(self) -> float:
        return float(self.cosines.mean())

    @property
    def min(self) -> float:
        return float(self.cosines.min())

    def passes(self, min_cosine: float, mean_cosine: float) -> bool:
        return self.min >= min_cosine and self.mean >= mean_cosine

    def worst(self, n: int = SHOW_WORST) -> list[tuple[str, float]]:
        order = np.argsort(self.cosines, kind="stable")[:n]
        return [(self.names[i], float(self.cosines[i])) for i in order]

    def format_worst(self, n: int = SHOW_WORST) -> str:
        return ", ".join(f"{name} {c:.5f}" for name, c in self.worst(n))

    def summary(self) -> str:
        n = len(self.cosines)
        return f"cosine vs FP32 on {n} held-out image(s): mean {self.mean:.5f}, min {self.min:.5f}"

    def to_dict(self) -> dict:
        return {
            "images": len(self.cosines),
            "cosine_mean": round(self.mean, 6),
            "cosine_min": round(self.min, 6),
            "max_abs": self.max_abs,
            "worst": [{"image": n, "cosine": round(c, 6)} for n, c in self.worst(len(self.cosines))],
        }

    def table(self) -> str:
        rows = self.worst(len(self.cosines))
        width = max([len(n) for n, _ in rows] + [5])
        lines = [self.summary(), f"{'image':<{width}}  cosine", "-" * (width + 10)]
        return "\n".join(lines + [f"{n:<{width}}  {c:.6f}" for n, c in rows]) + "\n"

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """`heldout.json` and `heldout.txt` in `folder`, each written to a temp file and renamed."""
        texts = {REPORT_JSON: json.dumps(self.to_dict(), indent=1), REPORT_TABLE: self.table()}
        json_path, table_path = write_texts(folder, texts, "the held-out report")
        return json_path, table_path


def image_names(n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"image {i}" for i in range(n)]
    if len(names) != n:
        raise QuantizationError(f"check image names: expected {n}, got {len(names)}")
    return [str(x) for x in names]


def reference_outputs(want: np.ndarray) -> np.ndarray:
    """The FP32 graph's outputs on the check images; refused when the reference itself is not finite."""
    bad = int(want.size - np.isfinite(want).sum())
    if bad:
        raise QuantizationError(
            f"check images: the FP32 graph itself gives {bad} NaN/inf value(s), so the quantized graph "
            "cannot be verified; expected check pixels the FP32 graph handles"
        )
    return want


def compare(got: np.ndarray, want: np.ndarray, names: list[str]) -> CheckResult:
    """Per-image cosine of `got` vs `want`; QuantizationError when `got` is not finite."""
    from tinygptv_edge.export.onnx.check import sample_cosine

    bad = int(got.size - np.isfinite(got).sum())
    if bad:
        raise QuantizationError(
            f"quantized graph: expected finite outputs, got {bad} NaN/inf value(s); not written"
        )
    return CheckResult(sample_cosine(got, want), names, float(np.abs(got - want).max()))


INT8_HINT = "try another --method, --exclude nodes or a larger --fallback-k"
INT4_HINT = "try a smaller --int4-block or --exclude nodes"


def enforce(res: CheckResult, min_cosine: float, mean_cosine: float, hint: str = INT8_HINT) -> None:
    """QuantizationError naming what failed and the worst images, unless the gate passes."""
    if res.passes(min_cosine, mean_cosine):
        return
    raise QuantizationError(
        f"quantized graph: expected per-image minimum cosine vs FP32 >= {min_cosine} and mean >= "
        f"{mean_cosine}, got min {res.min:.5f}, mean {res.mean:.5f} on {len(res.cosines)} held-out "
        f"image(s) (worst: {res.format_worst()}); not written ({hint})"
    )
