"""The report's writer on a full disk: a typed error, no temporary file left, the earlier report intact."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")  # report_run builds the levels through the exporters

from helpers.fsfaults import fill, listing, tmpfs  # noqa: E402

from tinygptv_edge.calib.report_run import _write_atomic  # noqa: E402
from tinygptv_edge.runtime.errors import OutputPathError  # noqa: E402


def test_a_full_disk_leaves_the_earlier_report_and_no_temporary_file(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        old = disk / "report.json"
        old.write_text(json.dumps({"schema": 2}))
        filler = fill(disk)
        with pytest.raises(OutputPathError, match="the disk is full"):
            _write_atomic(old, json.dumps({"big": "x" * 200_000}), json.loads)
        assert listing(disk) == ["filler.bin", "report.json"]  # no .report.json.tmp
        assert json.loads(old.read_text()) == {"schema": 2}
        filler.unlink()


def test_a_failed_check_leaves_no_temporary_file(tmp_path):
    def refuse(text: str) -> None:
        raise ValueError("not a report")

    with pytest.raises(ValueError):
        _write_atomic(tmp_path / "report.md", "text", refuse)
    assert listing(tmp_path) == []
