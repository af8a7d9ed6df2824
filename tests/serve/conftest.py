"""Fixtures the server tests share: the tiny model's exports (made once a session), a live server and a
Pipeline on them (one per module, so each module starts from an empty cache)."""

from __future__ import annotations

import pytest
from helpers.serve import LiveServer, export_files, loader


@pytest.fixture(scope="session")
def files(tiny, tmp_path_factory):
    return export_files(tiny, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(files):
    with LiveServer(loader(files)) as s:
        yield s


@pytest.fixture(scope="module")
def pipe(files):
    from tinygptv_edge.runtime.pipeline import Pipeline

    p = Pipeline(files[0], files[1], n_threads=1)
    yield p
    p.close()
