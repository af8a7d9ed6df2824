"""The quantization levels the report compares: a table per half of the model.

    vision (ONNX)          fp32 | int8-<method> (static QDQ, per calibration method) | int8-dynamic
                           | int4 (weight-only MatMulNBits)
    language (GGUF)        F32 | F16 | Q8_0 | Q5_K_M | Q4_K_M | Q4_0 | IQ4_XS | Q3_K_M | Q3_K_S | IQ3_S
                           | Q2_K | <level>+imat (importance matrix; IQ2_M only with one)

The reference is fp32 x F32; every other cell is measured against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinygptv_edge.export.onnx.presets import CALIBRATION_METHODS
from tinygptv_edge.runtime.errors import ReportError


@dataclass(frozen=True)
class VisionLevel:
    name: str
    kind: str  # "fp32" | "static" | "dynamic" | "int4"
    method: str = ""  # calibration method of a static level

    @property
    def file(self) -> str:
        return f"vision.{self.name}.onnx"


@dataclass(frozen=True)
class LanguageLevel:
    name: str
    ftype: str  # export.gguf.quant level name
    imatrix: bool = False

    @property
    def file(self) -> str:
        return f"language.{self.name.lower().replace('+', '-')}.gguf"


REFERENCE_VISION = "fp32"
REFERENCE_LANGUAGE = "F32"

VISION_LEVELS: dict[str, VisionLevel] = {
    v.name: v
    for v in (
        VisionLevel("fp32", "fp32"),
        *(VisionLevel(f"int8-{m}", "static", m) for m in CALIBRATION_METHODS),
        VisionLevel("int8-dynamic", "dynamic"),
        VisionLevel("int4", "int4"),
    )
}
_SMALL = ("IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_S", "Q2_K")  # two-gigabyte boards (issue #29)
_PLAIN = ("F32", "F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", *_SMALL)
# Q8_0 ignores an importance matrix in ggml; IQ2_M's IQ2_S weights need one (export/gguf/quant.py)
_WITH_IMATRIX = ("Q5_K_M", "Q4_K_M", "Q4_0", *_SMALL, "IQ2_M")
LANGUAGE_LEVELS: dict[str, LanguageLevel] = {
    lv.name: lv
    for lv in (
        *(LanguageLevel(f, f) for f in _PLAIN),
        *(LanguageLevel(f"{f}+imat", f, True) for f in _WITH_IMATRIX),
    )
}


def pick(names: str | list[str] | None, table: dict, reference: str, what: str) -> list:
    """Levels by name (comma-separated or a list; None = all), the reference always first."""
    if names is None:
        chosen = list(table)
    else:
        chosen = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        chosen = [n for n in chosen if n]
        bad = [n for n in chosen if n not in table]
        if bad:
            raise ReportError(f"{what} levels: expected names from {', '.join(table)}, got {', '.join(bad)}")
    chosen = [reference] + [n for n in dict.fromkeys(chosen) if n != reference]
    return [table[n] for n in chosen]
