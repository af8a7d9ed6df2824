"""Our Phi-2 (with TinyGPT-V's three norms switched off) equals transformers' PhiForCausalLM.

This checks, against an independent implementation, the Hugging Face q/k/v -> fused
(heads, 3, head_dim) conversion, partial NeoX rotary, the parallel block, gelu_new, the final
LayerNorm and the biased lm_head. The three added norms are covered by their own tests.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
nn = torch.nn


transformers = pytest.importorskip("transformers")


def test_phi_matches_transformers_without_the_added_norms(tmp_path):
    from tinygptv_edge.export.checkpoints.loaders import load_phi2
    from tinygptv_edge.export.checkpoints.synth import synth_preset, synthesize

    cfg, dtype = synth_preset("tiny")
    res = synthesize(tmp_path, cfg, seed=3, phi_layout="hf", dtype=dtype)
    ours, _ = load_phi2(res.phi2)
    for layer in ours.layers:
        layer.self_attn.q_layernorm = nn.Identity()
        layer.self_attn.k_layernorm = nn.Identity()
        layer.post_layernorm = nn.Identity()
    hf = transformers.PhiForCausalLM.from_pretrained(str(res.phi2), torch_dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 301, 2, 99, 45, 45, 7, 8]])
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ours.embed(ids))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
