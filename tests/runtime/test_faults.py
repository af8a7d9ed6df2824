"""Issue #32: the pipeline under file-system faults (its disk cache folder going read-only or full)."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
from helpers.fsfaults import fill, listing, read_only, tmpfs

pytest.importorskip("tinygptv_edge.runtime.language.decoder")
from helpers.shipped_data import DATA, images, language_file  # noqa: E402

from tinygptv_edge.runtime.pipeline import Pipeline  # noqa: E402
from tinygptv_edge.runtime.sampling import GREEDY  # noqa: E402

SHORT = GREEDY.replace(max_new_tokens=4)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_pipeline_keeps_answering_when_the_cache_folder_becomes_unwritable(tmp_path, caplog, fault):
    pics = [DATA / name for name in images()[:3]]
    with tmpfs(tmp_path / "cache", "4m") as cache:
        with Pipeline(DATA / "vision.int8.onnx", language_file("Q4_0"), n_ctx=256, n_threads=1,
                      image_cache_dir=cache) as pipe:  # fmt: skip
            first = pipe.ask("What is it?", pics[0], SHORT)
            assert len([n for n in os.listdir(cache) if n.endswith(".e1")]) == 1
            with contextlib.ExitStack() as stack:
                if fault == "read-only":
                    stack.enter_context(read_only(cache))
                else:
                    fill(cache)
                before = listing(cache)
                with caplog.at_level(logging.WARNING, logger="tinygptv_edge.runtime"):
                    second = pipe.ask("What is it?", pics[1], SHORT)
                    again = pipe.ask("What is it?", pics[0], SHORT)  # the entry written before the fault
                assert listing(cache) == before  # nothing partial left
            assert second.text is not None and again.text == first.text
            assert pipe.image_cache.disk_error is not None
            assert "disk cache writes off" in caplog.text
        # a restart reads what was written before the fault
        with Pipeline(DATA / "vision.int8.onnx", language_file("Q4_0"), n_ctx=256, n_threads=1,
                      image_cache_dir=cache) as pipe:  # fmt: skip
            answer = pipe.ask("What is it?", pics[0], SHORT)
            assert answer.text == first.text and pipe.image_cache.disk_hits == 1
