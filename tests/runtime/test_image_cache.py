"""ImageCache (runtime/image_cache.py): LRU order, keys, and the disk tier across 'restarts'."""

from __future__ import annotations

import contextlib
import hashlib
import os

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
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.e1"]  # no temp files left
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


# ---------------------------------------------------------------------------------------------
# issue #32: crash-safe disk entries (checksum, versioned format, torn writes), unwritable folders
# ---------------------------------------------------------------------------------------------


def entry(c: ImageCache, key: str):
    return c.folder / f"{key}.e1"


def test_every_truncation_and_every_flipped_byte_is_a_miss_then_recomputed(tmp_path):
    """A torn entry (power lost between write and rename, a copy cut short) at every byte offset, and a
    corrupt one at every byte: never served, deleted, and the next put writes it whole."""
    c = ImageCache(0, tmp_path, "model", (Q, H))
    c.put("k", emb(7))
    path = entry(c, "k")
    whole = path.read_bytes()
    assert len(whole) == 52 + Q * H * 4  # header: magic, version, rows, cols, sha256
    served = 0
    for cut in range(len(whole)):
        path.write_bytes(whole[:cut])
        served += ImageCache(0, tmp_path, "model", (Q, H)).get("k") is not None
        assert not path.exists()  # dropped
    for i in range(len(whole)):
        bad = bytearray(whole)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        served += ImageCache(0, tmp_path, "model", (Q, H)).get("k") is not None
        assert not path.exists()
    path.write_bytes(whole + b"\0")  # longer than the shape says
    served += c.get("k") is not None
    assert served == 0
    c.put("k", emb(7))
    assert path.read_bytes() == whole
    np.testing.assert_array_equal(ImageCache(0, tmp_path, "model", (Q, H)).get("k"), emb(7))


def test_entry_of_another_key_or_shape_is_not_served(tmp_path):
    c = ImageCache(0, tmp_path, "model", (Q, H))
    c.put("a", emb(1))
    entry(c, "a").rename(entry(c, "b"))  # the checksum covers the key
    assert c.get("b") is None and not entry(c, "b").exists()
    c.put("a", emb(1))
    assert ImageCache(0, tmp_path, "model", (Q, H + 1)).get("a") is None


def test_old_unversioned_entries_are_dropped_and_recomputed(tmp_path):
    """Format 0 was `<key>.npy` without a checksum: dropped on lookup (not crashed on), then rewritten."""
    np.save(tmp_path / "k.npy", emb(3))  # an old, well-formed entry
    (tmp_path / "t.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")  # an old, torn one
    c = ImageCache(4, tmp_path, "model", (Q, H))
    assert c.get("k") is None and c.get("t") is None
    assert not (tmp_path / "k.npy").exists() and not (tmp_path / "t.npy").exists() and c.dropped == 2
    c.put("k", emb(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.e1"]


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".k.{p.pid}.0123abcd.tmp"
    stale.write_bytes(b"half an entry")
    live = tmp_path / f".k.{os.getppid()}.0123abcd.tmp"  # a writer that still runs
    live.write_bytes(b"being written")
    ImageCache(4, tmp_path, "model", (Q, H))
    assert not stale.exists() and live.exists()


# A long-lived process that forks one writer per repetition (no interpreter start per kill): the writer
# rewrites 8 entries of 320 KiB, each value a function of its key, until it is SIGKILLed.
ZYGOTE = """
import os, sys
import numpy as np
from tinygptv_edge.runtime.image_cache import ImageCache
folder = sys.argv[1]
for line in sys.stdin:
    rep = int(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        c = ImageCache(0, folder, "model", (32, 2560))
        os.write(w, b"r")
        i = rep
        while True:
            c.put(f"{i % 8:032x}", np.full((32, 2560), i % 8, np.float32) + np.arange(2560, dtype=np.float32))
            i += 1
    os.close(w)
    os.read(r, 1)
    os.close(r)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("dead", flush=True)
"""


def test_writers_killed_mid_entry_never_leave_a_served_corrupt_entry(tmp_path):
    """100 writers, each SIGKILLed after a random 0.2-3 entry writes' time of rewriting 8 entries (320 KiB
    each, so many kills land mid-entry); after each kill a fresh cache reads all 8: every entry is whole
    or a miss, and the temporary files the killed writer left are removed when the next cache opens."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(0)
    kills = torn_temps = served = wrong = 0
    # kill after 0.2-3 entry writes of this machine (emulated CPUs write far slower than this one), so
    # some kills land mid-entry and some entries are whole
    probe = ImageCache(0, tmp_path / "probe", "model", (32, 2560))
    t0 = time.perf_counter()
    for j in range(3):
        probe.put(f"{j:032x}", np.zeros((32, 2560), np.float32))
    one_put = (time.perf_counter() - t0) / 3
    pipe = subprocess.PIPE
    argv = [sys.executable, "-c", ZYGOTE, str(tmp_path)]
    # cwd: not the checkout, whose tinygptv_edge/ lacks the mapped runtime/ (as an installed package has it)
    zygote = subprocess.Popen(argv, stdin=pipe, stdout=pipe, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    try:
        for rep in range(100):
            assert time.monotonic() < deadline, f"only {rep} repetitions in 240 s"
            zygote.stdin.write(f"{rep}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.2, 3.0) * one_put)
            os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "dead"
            kills += 1
            torn_temps += sum(p.name.endswith(".tmp") for p in tmp_path.iterdir())
            reader = ImageCache(0, tmp_path, "model", (32, 2560))  # removes the dead writer's temp files
            assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            for j in range(8):
                got = reader.get(f"{j:032x}")
                if got is not None:
                    served += 1
                    want = np.full((32, 2560), j, np.float32) + np.arange(2560, dtype=np.float32)
                    wrong += not np.array_equal(got, want)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
        zygote.stdout.close()
    print(f"kills {kills}, killed mid-entry {torn_temps}, entries served {served}, corrupt served {wrong}")
    assert kills == 100 and wrong == 0 and served > 0 and torn_temps > 0


def test_unwritable_folder_at_open_is_a_typed_error(tmp_path):
    from helpers.fsfaults import read_only, tmpfs

    from tinygptv_edge.runtime.errors import OutputPathError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="image cache folder .*file/cache: expected a folder"):
        ImageCache(4, tmp_path / "file" / "cache")
    with tmpfs(tmp_path / "mnt", "64k") as mnt, read_only(mnt):
        with pytest.raises(OutputPathError, match="expected a folder this process can write, found"):
            ImageCache(4, mnt)
        assert os.listdir(mnt) == []


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_disk_tier_that_becomes_unwritable_falls_back_to_memory(tmp_path, caplog, fault):
    """The folder goes read-only or fills up while the cache runs: put() does not raise, leaves no temp
    file, says why (`disk_error`, a warning), and memory and reads keep working."""
    import logging

    from helpers.fsfaults import fill, read_only, tmpfs

    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        c = ImageCache(4, mnt, "model", (Q, H))
        c.put("a", emb(1))
        before = sorted(os.listdir(mnt))
        with contextlib.ExitStack() as stack:
            if fault == "read-only":
                stack.enter_context(read_only(mnt))
            else:
                stack.enter_context(contextlib.nullcontext(fill(mnt)))
                before = sorted(os.listdir(mnt))
            with caplog.at_level(logging.WARNING, logger="tinygptv_edge.runtime"):
                c.put("b", emb(2))
            assert sorted(os.listdir(mnt)) == before  # nothing partial
            assert c.disk_error and ("Read-only" in c.disk_error or "No space" in c.disk_error)
            assert "disk cache writes off" in caplog.text
            np.testing.assert_array_equal(c.get("b"), emb(2))  # memory tier
            c.clear()
            np.testing.assert_array_equal(c.get("a"), emb(1))  # disk reads still work


def test_full_disk_at_open_reads_and_does_not_write(tmp_path):
    from helpers.fsfaults import fill, listing, tmpfs

    with tmpfs(tmp_path / "mnt", "64k") as mnt:
        ImageCache(4, mnt, "model", (Q, H)).put("a", emb(1))
        fill(mnt)
        before = listing(mnt)
        c = ImageCache(4, mnt, "model", (Q, H))  # no error: the entries are still worth reading
        assert "No space left" in c.disk_error
        np.testing.assert_array_equal(c.get("a"), emb(1))
        c.put("b", emb(2))
        assert listing(mnt) == before
