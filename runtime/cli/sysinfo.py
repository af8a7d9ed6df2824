"""What `tinygptv-edge bench` reports about the machine: CPU, the features ggml and onnxruntime see,
the native kernels' path, and a measured memory read bandwidth.

Bandwidth: each of n threads takes the max of its slice of one byte buffer far larger than the caches
(uint8: 64 bytes per AVX-512 / 16 per NEON instruction, so the reduction outruns memory; a float32 max
ran at about half the uint8 speed here, compute-bound); NumPy's reductions release the GIL, so the
slices are read concurrently, as ggml's threads read the weights when decoding. Best of `repeats`,
after one untimed pass.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ConfigError

MIB = 1024**2


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (x86: model name; ARM: implementer and part ids)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        return fields["model name"]
    if "CPU part" in fields:  # aarch64 Linux: e.g. implementer 0x41 (Arm), part 0xd0b (Cortex-A76)
        return f"implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    return platform.processor() or platform.machine()


def ggml_cpu_features(ggml) -> dict[str, bool]:
    """Every `ggml_cpu_has_*` this ggml build exports -> its answer (functions absent from the build
    are left out)."""
    out = {}
    for name in sorted(n for n in dir(ggml) if n.startswith("ggml_cpu_has_")):
        try:
            out[name.removeprefix("ggml_cpu_has_")] = bool(getattr(ggml, name)())
        except (RuntimeError, AttributeError, OSError):  # declared by the bindings, not in the library
            continue
    return out


def onnxruntime_info() -> dict:
    """What onnxruntime says about itself and the CPU (it exposes no instruction-set list)."""
    import onnxruntime as ort

    info = {
        "version": ort.__version__,
        "device": ort.get_device(),
        "providers": ort.get_available_providers(),
    }
    with contextlib.suppress(AttributeError):
        info["build"] = ort.get_build_info()
    with contextlib.suppress(AttributeError, StopIteration, RuntimeError):  # onnxruntime >= 1.22
        info["cpu_vendor"] = next(
            d.device.vendor for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"
        )
    return info


def memory_bandwidth(n_threads: int, size_bytes: int = 256 * MIB, repeats: int = 5) -> dict:
    """Read bandwidth in bytes/s over a `size_bytes` buffer with n threads (module docstring)."""
    if n_threads < 1 or repeats < 1 or size_bytes < MIB:
        raise ConfigError(
            f"memory_bandwidth: expected n_threads >= 1, repeats >= 1, size >= 1 MiB; "
            f"got {n_threads}, {repeats}, {size_bytes} bytes"
        )
    buf = np.ones(size_bytes, np.uint8)  # written once: every page is resident
    chunks = np.array_split(buf, n_threads)
    best = float("inf")
    with ThreadPoolExecutor(n_threads) as pool:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))
            if i:  # the first pass warms the threads and TLBs
                best = min(best, time.perf_counter() - t0)
    return {"read_bytes_s": buf.nbytes / best, "buffer_bytes": buf.nbytes, "threads": n_threads}


def machine_info() -> dict:
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
