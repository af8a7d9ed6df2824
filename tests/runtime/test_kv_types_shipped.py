"""Quantized KV caches (q8_0, q4_0) against the F16 cache on the shipped model's Q4_0 export
(tests/data): torch-free. docs/decoder.md has the measured numbers over all 13 golden questions."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import shipped_data as S
from helpers.decoder_ref import kl_top1

pytest.importorskip("tinygptv_edge.runtime.language.decoder")
from tinygptv_edge.runtime.language.decoder import Decoder  # noqa: E402

STEPS = 16


def run(kv_type: str, question: dict, tokens: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """All logits of the golden prompt, then STEPS decode steps: greedy when `tokens` is None, else
    those tokens (teacher-forced, so every cache type sees the same positions)."""
    with Decoder(S.language_file("Q4_0"), n_ctx=256, n_threads=2, kv_type=kv_type) as dec:
        out = [dec.eval_embeddings(S.prompt_embeds(dec, question["question"], question["image"]), True)]
        greedy = tokens is None
        tokens = [] if greedy else tokens
        for i in range(STEPS):
            if greedy:
                tokens.append(int(np.argmax(out[-1][-1])))
            out.append(dec.eval_tokens([tokens[i]])[None])
    return np.concatenate(out), tokens


# tolerances a few times what these 4 questions gave when written (docs/decoder.md: all 13)
@pytest.mark.parametrize(("kv_type", "max_kl", "min_top1"), [("q8_0", 1e-4, 0.99), ("q4_0", 5e-3, 0.9)])
def test_quantized_kv_close_to_f16_on_the_shipped_model(kv_type, max_kl, min_top1):
    for q in S.manifest()["questions"][:4]:
        base, tokens = run("f16", q, None)
        got, _ = run(kv_type, q, tokens)
        kl, top1 = kl_top1(base, got)
        assert kl <= max_kl and top1 >= min_top1, (q["question"], kv_type, kl, top1)
        if kv_type == "q8_0":  # the same greedy answer
            assert (got[-STEPS - 1 : -1].argmax(-1) == tokens).all()
