"""Running the shards: in this process (serial), or as Ray tasks on a cluster (`--ray [ADDRESS]`).

    shards (benchmark x cell x item range) --run_shard--> predictions per shard
        serial: one after another, here
        ray:    ray.init(address) (a local cluster when none); each benchmark's items are put in the
                object store once; one task per shard (num_cpus = threads), failed tasks retried
                (`retries`), progress as they finish; results gathered by shard, not by arrival
    -> {shard: predictions}: the same for both, so the report is the same

Model files and images are read from their paths on the node that runs a task: on several machines
they must be on a path every node sees (a shared file system, or the same copy at the same path).
"""

from __future__ import annotations

from collections.abc import Callable

from tinygptv_edge.runtime.errors import ReportError

from .base import Benchmark
from .runner import RunSpec, Shard, run_shard

Progress = Callable[[str, int, int], None]
ShardFn = Callable[..., list]  # run_shard(shard, items, task, spec)


def run_serial(shards: list[Shard], benches: dict[str, Benchmark], spec: RunSpec,
               progress: Progress | None = None, fn: ShardFn = run_shard) -> dict[Shard, list]:  # fmt: skip
    say = progress or (lambda *_: None)
    out = {}
    for i, sh in enumerate(shards):
        b = benches[sh.bench]
        out[sh] = fn(sh, b.items[sh.start : sh.stop], b.task, spec)
        say("shards", i + 1, len(shards))
    return out


def run_ray(
    shards: list[Shard],
    benches: dict[str, Benchmark],
    spec: RunSpec,
    address: str | None = None,
    progress: Progress | None = None,
    retries: int = 2,
    fn: ShardFn = run_shard,
    init_kwargs: dict | None = None,
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
        items = {name: ray.put(b.items) for name, b in benches.items()}  # shipped once per benchmark
        pending = {remote.remote(fn, sh, items[sh.bench], benches[sh.bench].task, spec): sh for sh in shards}
        out: dict[Shard, list] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                sh = pending.pop(ref)
                try:
                    out[sh] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise ReportError(
                        f"shard {sh.bench} {sh.vision} + {sh.language} items {sh.start}..{sh.stop - 1} "
                        f"failed after {retries} retries: {e}"
                    ) from e
                say("shards", len(out), len(shards))
        return {sh: out[sh] for sh in shards}
    finally:
        if started:
            ray.shutdown()


def _task(fn: ShardFn, shard: Shard, items: list, task, spec: RunSpec) -> list:
    return fn(shard, items[shard.start : shard.stop], task, spec)
