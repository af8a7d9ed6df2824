"""Issue #32 on the export side: a full disk or a read-only folder under export-gguf / export-onnx ends in
an OutputPathError naming the output, with nothing partial left behind (tmpfs mounts: root only)."""

from __future__ import annotations

import pytest
from helpers.fsfaults import read_only, tmpfs

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from helpers.images import write_images  # noqa: E402

from tinygptv_edge.cli import main  # noqa: E402
from tinygptv_edge.export.onnx import calib_data as R  # noqa: E402
from tinygptv_edge.export.onnx import quant as Q  # noqa: E402
from tinygptv_edge.export.onnx.export import export_vision  # noqa: E402
from tinygptv_edge.export.onnx.presets import get_preset  # noqa: E402
from tinygptv_edge.runtime.errors import OutputPathError  # noqa: E402


def files(folder) -> list[str]:
    """Every file under `folder` (hidden staged files included; empty folders are not output)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return export_vision(tiny.model, tmp_path_factory.mktemp("fp32")).path


@pytest.fixture(scope="module")
def pixels(tiny, tmp_path_factory):
    return R.load_folder(write_images(tmp_path_factory.mktemp("calib"), 6), tiny.cfg.preprocess)


@pytest.mark.parametrize("command", ["export-gguf", "export-onnx"])
def test_export_to_a_disk_too_small_is_refused_before_writing(tiny_single, tmp_path, capsys, command):
    extra = ["-q", "F32"] if command == "export-gguf" else ["--no-int8"]
    with tmpfs(tmp_path / "mnt", "64k") as mnt:
        assert main([command, "--model", str(tiny_single), "--out", str(mnt / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert "free in" in err and "for its staged files, found" in err
        assert files(mnt) == []


@pytest.mark.parametrize("command", ["export-gguf", "export-onnx"])
def test_export_to_a_read_only_folder(tiny_single, tmp_path, capsys, command):
    extra = ["-q", "F32"] if command == "export-gguf" else ["--no-int8"]
    with tmpfs(tmp_path / "mnt", "8m") as mnt, read_only(mnt):
        for out in (mnt, mnt / "sub"):
            assert main([command, "--model", str(tiny_single), "--out", str(out), *extra]) == 2
            assert "Read-only file system" in capsys.readouterr().err
        assert files(mnt) == []


def test_gguf_writer_hitting_a_full_disk(tiny, tmp_path, monkeypatch):
    """The disk fills up while the file is written (the free-space check passed: another writer took the
    space): an OutputPathError, and the staged file is gone."""
    from tinygptv_edge.export.gguf import export as G

    monkeypatch.setattr(G, "check_free_space", lambda *a: None, raising=False)
    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        with pytest.raises(OutputPathError, match=r"language.f32.gguf: the disk holding .* is full"):
            G.export_gguf(tiny.model, tiny.tokenizer, mnt / "language.f32.gguf", "F32")
        assert files(mnt) == []


def test_onnx_export_hitting_a_full_disk(tiny, tmp_path, monkeypatch):
    from tinygptv_edge.export.onnx import export as E

    monkeypatch.setattr(E, "check_free_space", lambda *a: None, raising=False)
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        with pytest.raises(OutputPathError, match="cannot write .*vision.fp32.onnx"):
            E.export_vision(tiny.model, mnt)
        assert files(mnt) == []


def test_int8_scratch_that_cannot_fit_is_refused_before_writing(fp32, pixels, tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        with pytest.raises(OutputPathError, match="free in .* for its staged files, found"):
            Q.quantize_vision(fp32, pixels, get_preset("x86-avx2"), out_path=mnt / "vision.int8.onnx")
        assert files(mnt) == []


@pytest.mark.parametrize("free_kib", [900, 1500])
def test_int8_quantizer_on_a_disk_that_fills_up(fp32, pixels, tmp_path, monkeypatch, free_kib):
    """With 1500 KiB free, onnxruntime's C++ wrote the pre-processed graph truncated without an error and
    calibration failed on protobuf's DecodeError (a raw traceback); with 900 KiB pre-processing failed as a
    QuantizationError. Both are the full disk: an OutputPathError naming the output."""
    monkeypatch.setattr(Q, "_check_scratch", lambda *a: None, raising=False)
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        (mnt / "filler.bin").write_bytes(b"\0" * ((4096 - free_kib) << 10))
        with pytest.raises(OutputPathError, match=r"vision.int8.onnx: the disk holding .* is full"):
            Q.quantize_vision(fp32, pixels, get_preset("x86-avx2"), out_path=mnt / "vision.int8.onnx")
        assert files(mnt) == ["filler.bin"]


def test_calibration_images_all_or_none(tmp_path):
    """export-onnx draws OUT/calib-images when absent and takes a non-empty folder as the set next time:
    a disk that filled up halfway used to leave a partial set behind, silently reused."""
    from tinygptv_edge.export.onnx.cli import default_calibration_folder

    with tmpfs(tmp_path / "mnt", "96k") as mnt:
        with pytest.raises(OutputPathError, match=r"cannot write 40 calibration images to .*calib-images"):
            default_calibration_folder(mnt / "out", 40)
        assert files(mnt) == []
    folder = default_calibration_folder(tmp_path / "out", 3)
    assert files(folder) == ["calib_00000.png", "calib_00001.png", "calib_00002.png"]


@pytest.mark.parametrize("mode", [[], ["--render-only"]])
def test_report_to_a_read_only_folder_fails_before_measuring(tmp_path, capsys, monkeypatch, mode):
    """`report` measures for minutes to hours before it writes: a read-only --out is refused first."""
    from tinygptv_edge.calib import report_run

    monkeypatch.setattr(report_run, "make_report", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(report_run, "write_outputs", lambda *a, **k: pytest.fail("rendered"))
    with tmpfs(tmp_path / "mnt", "64k") as mnt, read_only(mnt):
        for out in (mnt, mnt / "report"):
            assert main(["report", "--out", str(out), *mode]) == 2
            err = capsys.readouterr().err
            assert f"output folder {out} is not writable" in err and "Read-only file system" in err
        assert files(mnt) == []
