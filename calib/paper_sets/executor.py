"""Running the shards: in this process (serial), or as Ray tasks on a cluster (`--ray [ADDRESS]`).

    shards (paper set x cell x item range) --run_shard--> predictions per shard
        serial: one after another, here
        ray:    ray.init(address) (a local cluster when none); each paper set's items are put in the
                object store once; one task per shard (num_cpus = threads), failed tasks retried
                (`retries`), progress as they finish; results gathered by shard, not by arrival
    -> {shard: predictions}: the same for both, so the report is the same

Model files are read from their paths on the node that runs a task: on several machines they must be
on a path every node sees (a shared file system, or the same copy at the same path), or, with
`ship_models`, they are put in the object store once and each node writes them to its temp folder
on first use (checked by sha256). Paper-set images are always read from their paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tinygptv_edge.runtime.errors import ReportError

from .base import PaperSet
from .runner import RunSpec, Shard, run_shard

Progress = Callable[[str, int, int], None]
ShardFn = Callable[..., list]  # run_shard(shard, items, task, spec)


def run_serial(shards: list[Shard], sets: dict[str, PaperSet], spec: RunSpec,
               progress: Progress | None = None, fn: ShardFn = run_shard) -> dict[Shard, list]:  # fmt: skip
    say = progress or (lambda *_: None)
    out = {}
    for i, sh in enumerate(shards):
        b = sets[sh.paper_set]
        out[sh] = fn(sh, b.items[sh.start : sh.stop], b.task, spec)
        say("shards", i + 1, len(shards))
    return out


def run_ray(
    shards: list[Shard],
    sets: dict[str, PaperSet],
    spec: RunSpec,
    address: str | None = None,
    progress: Progress | None = None,
    retries: int = 2,
    fn: ShardFn = run_shard,
    init_kwargs: dict | None = None,
    ship_models: bool = False,
    ship_dir: str | None = None,
) -> dict[Shard, list]:
    """Run every shard as a Ray task; `address` None starts (or joins) a local cluster."""
    try:
        import ray
    except ImportError as e:
        raise ReportError("--ray needs Ray: pip install 'tinygptv-edge[ray]'") from e
    if retries < 0:
        raise ReportError(f"retries: expected >= 0, got {retries}")
    say = progress or (lambda *_: None)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, **(init_kwargs or {"include_dashboard": False, "log_to_driver": False}))
    try:
        remote = ray.remote(_task).options(num_cpus=spec.threads, max_retries=retries, retry_exceptions=True)
        items = {name: ray.put(b.items) for name, b in sets.items()}  # shipped once per paper set
        shipped = _ship(ray, spec, ship_dir) if ship_models else None
        pending = {
            remote.remote(fn, sh, items[sh.paper_set], sets[sh.paper_set].task, spec, shipped): sh
            for sh in shards
        }
        out: dict[Shard, list] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                sh = pending.pop(ref)
                try:
                    out[sh] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise ReportError(
                        f"shard {sh.paper_set} {sh.vision} + {sh.language} items {sh.start}..{sh.stop - 1} "
                        f"failed after {retries} retries: {e}"
                    ) from e
                say("shards", len(out), len(shards))
        return {sh: out[sh] for sh in shards}
    finally:
        if started:
            ray.shutdown()


def _task(fn: ShardFn, shard: Shard, items: list, task, spec: RunSpec, shipped: dict | None) -> list:
    if shipped is not None:
        spec = _local_spec(spec, shipped)
    return fn(shard, items[shard.start : shard.stop], task, spec)


def _ship(ray, spec: RunSpec, ship_dir: str | None) -> dict:
    """{"dir": where nodes write them, "files": model file -> [(name, sha256, object ref)]} for each
    file and its ONNX external-data file, each put in the object store once."""
    out = {}
    for p in dict.fromkeys([*spec.vision_paths.values(), *spec.language_paths.values()]):
        files = [Path(p)]
        if Path(p + ".data").is_file():
            files.append(Path(p + ".data"))
        out[p] = []
        for f in files:
            data = f.read_bytes()
            out[p].append((f.name, hashlib.sha256(data).hexdigest(), ray.put(data)))
    return {"dir": ship_dir or str(Path(tempfile.gettempdir()) / "tinygptv-edge-ray"), "files": out}


def _local_spec(spec: RunSpec, shipped: dict) -> RunSpec:
    """The spec with each model file replaced by this node's copy (written once, verified, renamed)."""
    import ray

    local = {}
    for p, files in shipped["files"].items():
        key = hashlib.sha256("".join(sha for _, sha, _ in files).encode()).hexdigest()[:20]
        folder = Path(shipped["dir"]) / key  # the files keep their names (an ONNX file finds its .data)
        for name, sha, ref in files:
            dst = folder / name
            if dst.is_file():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_bytes(ray.get(ref))
            if hashlib.sha256(tmp.read_bytes()).hexdigest() != sha:
                tmp.unlink()
                raise ReportError(f"shipped model file {name}: expected sha256 {sha}, found another")
            os.replace(tmp, dst)
        local[p] = str(folder / files[0][0])
    return dataclasses.replace(
        spec,
        vision_paths={k: local[v] for k, v in spec.vision_paths.items()},
        language_paths={k: local[v] for k, v in spec.language_paths.items()},
    )
