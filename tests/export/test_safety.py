"""Pickles: refused when they need code execution, never run, and refused outright on old torch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")


from tinygptv_edge.export.checkpoints import safeio  # noqa: E402
from tinygptv_edge.runtime.errors import CheckpointError, UnsafeCheckpointError  # noqa: E402


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_zip(path, marker):
    torch.save({"model": {"w": torch.zeros(2)}, "evil": Payload(str(marker))}, path)


def test_malicious_pickle_is_refused_and_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "eva_vit_g.pth"
    _malicious_zip(path, marker)
    with pytest.raises(UnsafeCheckpointError, match="not a plain tensor checkpoint"):
        safeio.load_pickle(path)
    assert not marker.exists()


def test_legacy_raw_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(CheckpointError):
        safeio.load_pickle(path)
    assert not marker.exists()


def test_env_override_cannot_turn_weights_only_off(tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 must not make the loader run the payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "stage.pth"
    _malicious_zip(path, marker)
    code = (
        "import sys\n"
        "from tinygptv_edge.export.checkpoints.safeio import load_pickle\n"
        "from tinygptv_edge.runtime.errors import UnsafeCheckpointError\n"
        f"try:\n    load_pickle({str(path)!r})\nexcept UnsafeCheckpointError:\n    sys.exit(3)\n"
    )
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert not marker.exists()


def test_pickles_refused_on_old_torch(tmp_path, monkeypatch):
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.zeros(2)}, path)
    assert set(safeio.load_pickle(path)) == {"w"}
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UnsafeCheckpointError, match="torch 2.5.1"):
        safeio.load_pickle(path)


def test_missing_file_and_wrong_wrapper(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        safeio.load_pickle(tmp_path / "nope.pth")
    path = tmp_path / "flat.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="expected a dict with key 'model'"):
        safeio.tensor_dict(safeio.load_pickle(path), path, wrapper="model")
