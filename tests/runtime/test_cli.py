"""The CLI: thin wrappers over the library, typed errors become exit code 2 with a message."""

from __future__ import annotations

import pytest

from tinygptv_edge.cli import main


@pytest.mark.torch
def test_synth_cli_writes_the_official_files(tmp_path, capsys):
    pytest.importorskip("torch")  # synth writes .pth files
    assert (
        main(["synth", "--size", "tiny", "--out", str(tmp_path), "--stage", "4", "--phi-layout", "msft"]) == 0
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {"phi-2", "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "TinyGPT-V_for_Stage4.pth"} <= names
    assert (tmp_path / "phi-2" / "tokenizer.json").is_file()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.torch
def test_cli_reports_typed_errors(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from tinygptv_edge.export.checkpoints import synth

    def boom(*a, **k):
        from tinygptv_edge.runtime.errors import ConfigError

        raise ConfigError("expected X, got Y")

    monkeypatch.setattr(synth, "synthesize", boom)
    assert main(["synth", "--out", str(tmp_path)]) == 2
    assert "error: expected X, got Y" in capsys.readouterr().err
