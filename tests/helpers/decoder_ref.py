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


def text_imatrix(phi, ids) -> dict[str, np.ndarray]:
    """An importance matrix of reference PhiModel `phi` from token ids alone: GGUF weight name -> mean
    x^2 of each input column (the quantity export/gguf/imatrix.py collects from images)."""
    import torch

    from tinygptv_edge.export.gguf.imatrix import linear_modules

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for path, name in linear_modules(phi).items():

        def hook(_m, args, n=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[n] = sums.get(n, 0) + x.pow(2).mean(0)

        hooks.append(phi.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            phi(phi.embed(torch.tensor([list(ids)])))
    finally:
        for h in hooks:
            h.remove()
    return {n: s.float().numpy() for n, s in sums.items()}
