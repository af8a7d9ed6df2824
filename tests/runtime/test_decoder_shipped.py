"""The decoder on the shipped model (export/default_model/): F32 parity with the reference, 32 greedy
tokens identical, and KL divergence / top-1 agreement of Q8_0 and Q4_0 against F32 (printed)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.decoder_ref import greedy_dec, greedy_ref, kl_top1, ref_logits

from tinygptv_edge.runtime.language.decoder import Decoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    from tinygptv_edge.export.checkpoints.default import default_model_dir, load_default
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.runtime.errors import CheckpointError
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    try:
        model, _ = load_default()
    except CheckpointError as e:
        pytest.skip(str(e))
    tok = Tokenizer.from_file(default_model_dir())
    out = tmp_path_factory.mktemp("shipped")
    files = {t: export_gguf(model, tok, out / f"shipped.{t}.gguf", t).path for t in ("F32", "Q8_0", "Q4_0")}
    return model, tok, files


def test_shipped_parity(shipped):
    model, tok, files = shipped
    phi = model.language
    ids = [tok.bos_id, *tok.encode("Human: What is in the picture? Describe the colours.###Assistant: ")]
    ref = ref_logits(phi, ids)
    with Decoder(files["F32"], n_ctx=256, kv_type="f32") as dec:
        got = dec.eval_tokens(ids, all_logits=True)
        err = np.abs(got - ref).max() / (ref.max() - ref.min())
        assert err <= 1e-3, err
        dec.reset()
        assert greedy_dec(dec, ids, 32) == greedy_ref(phi, ids, 32)
    with Decoder(files["F32"], n_ctx=256) as dec:
        base = dec.eval_tokens(ids, all_logits=True)
    for level in ("Q8_0", "Q4_0"):
        with Decoder(files[level], n_ctx=256) as dec:
            kl, top1 = kl_top1(base, dec.eval_tokens(ids, all_logits=True))
        print(f"shipped {level} vs F32: KL {kl:.3e}, top-1 agreement {top1:.3f}")
        assert top1 >= 0.5
