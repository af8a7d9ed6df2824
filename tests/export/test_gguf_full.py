"""Full-size GGUF export (slow): Phi-2 dimensions streamed from a single folder, peak RSS bounded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gguf_full.py"


def test_full_size_q4_k_m_mix_and_memory(tmp_path):
    res = subprocess.run(
        [sys.executable, str(BENCH), "--work", str(tmp_path), "--levels", "Q4_K_M"],
        capture_output=True,
        text=True,
        check=True,
    )
    print(res.stdout)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("Q4_K_M"))
    fields = line.split(maxsplit=5)
    rss_ratio, types = float(fields[3]), ast.literal_eval(fields[5])
    assert rss_ratio < 2.0  # peak RSS below twice the fp16 model
    # 32 blocks: qkv at Q5_K; ffn_down at Q6_K on 16 blocks (0-3, 6, 9, ..., 27, 28-31), plus output
    assert types == {"F32": 355, "Q5_K": 32, "Q6_K": 17, "Q4_K": 1 + 32 + 32 + 16}
