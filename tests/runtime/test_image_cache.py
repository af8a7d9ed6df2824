"""ImageCache (runtime/image_cache.py): LRU order, keys, and the disk tier across 'restarts'."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tinygptv_edge.runtime.errors import ConfigError
from tinygptv_edge.runtime.image_cache import ImageCache, file_sha256

Q, H = 3, 4


def emb(v: float) -> np.ndarray:
    return np.full((Q, H), v, np.float32)


def px(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)


def test_lru_order_and_size():
    c = ImageCache(2)
    c.put("a", emb(1))
    c.put("b", emb(2))
    assert c.get("a") is not None  # a is now the most recent
    c.put("c", emb(3))
    assert "b" not in c and "a" in c and "c" in c and len(c) == 2
    off = ImageCache(0)
    off.put("a", emb(1))
    assert off.get("a") is None and len(off) == 0
    with pytest.raises(ConfigError, match="image_cache_size"):
        ImageCache(-1)


def test_keys_follow_pixels_and_model():
    c = ImageCache(4)
    assert c.key(px(1)) == c.key(px(1).copy()) != c.key(px(2))
    assert c.key(px(1)) == hashlib.sha256(px(1).tobytes()).hexdigest()[:32]  # memory-only: pixels alone
    assert ImageCache(4, model_id="m1").key(px(1)) != ImageCache(4, model_id="m2").key(px(1))


def test_disk_tier_survives_a_restart(tmp_path):
    a = ImageCache(4, tmp_path, "model", (Q, H))
    key = a.key(px(1))
    a.put(key, emb(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.npy"]  # no temp files left
    b = ImageCache(4, tmp_path, "model", (Q, H))  # a new process
    got = b.get(key)
    np.testing.assert_array_equal(got, emb(5))
    assert b.disk_hits == 1 and b.get(key) is not None and b.disk_hits == 1  # then from memory
    with pytest.raises(ConfigError, match="shape"):
        b.put("x", np.zeros((2, 2), np.float32))


def test_disk_tier_bad_files_are_misses(tmp_path):
    c = ImageCache(4, tmp_path, "model", (Q, H))
    (tmp_path / "trunc.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "shape.npy", np.zeros((2, 2), np.float32))
    np.save(tmp_path / "dtype.npy", np.zeros((Q, H), np.float64))
    assert c.get("trunc") is None and c.get("shape") is None and c.get("dtype") is None
    c.put("trunc", emb(1))
    assert ImageCache(4, tmp_path, "model", (Q, H)).get("trunc") is not None


def test_file_sha256(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 3_000_001)
    assert file_sha256(f, chunk=1000) == hashlib.sha256(b"x" * 3_000_001).hexdigest()


def test_onnx_sha256_covers_the_external_data(tmp_path):
    """The disk cache's model key: a re-quantization that rewrote only `<name>.data` changes it."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tinygptv_edge.runtime.image_cache import onnx_sha256

    def save(weights: np.ndarray, path):
        w = numpy_helper.from_array(weights, "w")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
        onnx.save(helper.make_model(graph), str(path), save_as_external_data=True,
                  location=path.name + ".data", size_threshold=0)  # fmt: skip

    path = tmp_path / "v.onnx"
    save(np.ones((64, 64), np.float32), path)
    first, graph = onnx_sha256(path), file_sha256(path)
    data = tmp_path / "v.onnx.data"
    data.write_bytes((2 * np.ones((64, 64), np.float32)).tobytes())  # new weights, same graph file
    assert file_sha256(path) == graph and onnx_sha256(path) != first
