"""Full-size checks (slow): real TinyGPT-V dimensions synthesized and loaded on this machine."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")


from tinygptv_edge.runtime.memory import peak_rss_bytes  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def _peak_rss_gib() -> float:
    return peak_rss_bytes() / 2**30


def test_full_size_synthesizes_and_loads(tmp_path):
    from tinygptv_edge.export.checkpoints.loaders import load_tinygptv
    from tinygptv_edge.export.checkpoints.synth import synth_preset, synthesize

    cfg, dtype = synth_preset("full")
    t0 = time.perf_counter()
    res = synthesize(tmp_path, cfg, seed=0, dtype=dtype)
    t_synth = time.perf_counter() - t0
    rss_synth = _peak_rss_gib()
    t0 = time.perf_counter()
    model, summary = load_tinygptv(phi2=res.phi2, eva=res.eva, blip2=res.blip2, stage=res.stage)
    t_load = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(
        f"\nfull size: synth {t_synth:.0f} s (peak RSS {rss_synth:.1f} GiB), load {t_load:.0f} s, "
        f"peak RSS {_peak_rss_gib():.1f} GiB, {n / 1e9:.2f} B parameters"
    )
    print(summary.format())
    assert model.cfg.language.hidden == 2560 and len(model.language.layers) == 32
    assert len(model.vision.encoder.blocks) == 39
    assert len(summary.lora_merged) == 64
    with torch.no_grad():
        emb = model.embed_image(torch.zeros(1, 3, 224, 224))
        assert emb.shape == (1, 32, 2560) and bool(torch.isfinite(emb).all())
        logits = model.language(emb)
        assert logits.shape == (1, 32, 51200) and bool(torch.isfinite(logits).all())
