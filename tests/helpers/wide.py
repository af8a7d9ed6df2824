"""The wide random Phi (hidden 256: every matmul takes K-quant blocks) of the decoder and export tests.

Here rather than in tests/conftest.py: `from conftest import ...` names whichever conftest module
pytest registered last (tests/serve/ has one too), so tests import these from helpers.wide.
"""

from __future__ import annotations

import pytest

WIDE_LEVELS = ("F32", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")


def wide_source(tiny, seed: int):
    """A random Phi at hidden 256, so K-quants (256-element blocks) apply to every matmul weight:
    the model and its GGUF export source."""
    from helpers.decoder_gguf import randomize_norms
    from tinygptv_edge.export.gguf.source import model_source
    from tinygptv_edge.export.model.phi import PhiModel
    from tinygptv_edge.runtime.config import LanguageConfig, ProjectionConfig

    lang = LanguageConfig(
        vocab_size=512,
        hidden=256,
        layers=2,
        heads=4,
        intermediate=512,
        max_positions=256,
        partial_rotary_factor=0.5,
    )
    cfg = tiny.cfg.replace(language=lang, projection=ProjectionConfig(32, 96, lang.hidden))
    pytest.importorskip("torch", reason="the export extra (torch) is not installed").manual_seed(seed)
    model = PhiModel(lang).eval()
    randomize_norms(model)
    return model, model_source(model, tiny.tokenizer, cfg=cfg)
