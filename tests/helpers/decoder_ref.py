"""The decoder against the torch reference: logits, KL / top-1 agreement, greedy tokens (test code only)."""

from __future__ import annotations

import numpy as np

from tinygptv_edge.runtime.metrics import kl_divergence


def ref_logits(phi, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return phi(phi.embed(torch.tensor([ids]))).numpy()[0]  # (T, V)


def kl_top1(p_logits: np.ndarray, q_logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(p || q) over positions and the top-1 agreement."""
    kl = kl_divergence(p_logits, q_logits).mean()
    return float(kl), float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean())


def greedy_ref(phi, ids, steps):
    import torch

    out, ids = [], list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(phi(phi.embed(torch.tensor([ids])))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def greedy_dec(dec, ids, steps):
    out = []
    logits = dec.eval_tokens(ids)
    for _ in range(steps):
        nxt = int(logits.argmax())
        out.append(nxt)
        logits = dec.eval_tokens([nxt])
    return out
