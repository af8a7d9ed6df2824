"""The ggml tensor types this project reads and writes: one table (ggml.h `enum ggml_type`, `type_traits`).

The GGUF reader checks tensor extents with it, the decoder allocates from it, the exporter sizes what it
writes with it, the k-quant kernel picks its types from it; tests hold it against ggml-python's
`ggml_type_size` / `ggml_blck_size` and gguf-py's `GGML_QUANT_SIZES`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: `block` elements take `nbytes` bytes."""

    name: str
    block: int
    nbytes: int

    def row_nbytes(self, n: int) -> int:
        """Bytes of `n` elements (a whole number of blocks)."""
        return n // self.block * self.nbytes


# ggml type id -> traits
GGML_TYPES = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    # i-quants: codebook ("grid") types; ggml_quantize_init builds their tables before quantizing
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    30: GGMLType("BF16", 1, 2),
}
TYPE_IDS = {t.name: i for i, t in GGML_TYPES.items()}
BY_NAME = {t.name: t for t in GGML_TYPES.values()}

# the types a 2-D weight may have in a tinygptv GGUF: what the exporter writes and the decoder runs
WEIGHT_TYPES = (
    *("F32", "F16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"),
    *("Q2_K", "Q3_K", "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ2_S"),  # the smaller levels (two-gigabyte boards)
)
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")  # 256-element super-blocks; runtime/language/kernels/ takes these
QK_K = 256

# a row length the type cannot take (not whole blocks) -> the type used instead, checked again;
# LAST_RESORT takes every row length (llama.cpp's table; the exporter and the memory estimate follow it)
ROW_FALLBACK = {
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "IQ4_XS": "IQ4_NL",
    "IQ3_S": "IQ4_NL",
    "IQ2_S": "IQ4_NL",
}
LAST_RESORT = "F16"


def fit_type(name: str, n_per_row: int) -> str:
    """Follow ROW_FALLBACK from type `name` until rows of `n_per_row` are whole blocks."""
    while n_per_row % BY_NAME[name].block:
        name = ROW_FALLBACK.get(name, LAST_RESORT)
    return name
