"""The language model (LoRA merged) as one GGUF v3 file, at any level, verified before it is published.

    source (model or single folder)            canonical names, torch tensors
        |  plan: name map (contract) -> shape check -> ggml type per tensor (quant)
        v
    GGUFWriter: header, metadata (meta), tensor infos
        |  per tensor: fetch -> finite check -> qkv rows (heads,3,d) -> (3,heads,d) -> quantize -> write
        v
    OUT.tmp  --verify: re-read, name/shape/type, dequantize vs source within BOUNDS-->  rename to OUT

Only one tensor (and its quantized bytes) is held at a time beyond what the source holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tinygptv_edge.export.gguf.quant import (
    BOUNDS,
    DEFAULT_LEVEL,
    F16_MAX,
    NEEDS_IMATRIX,
    Level,
    Q,
    fit_type,
    get_level,
    quantize,
    tensor_nbytes,
    wanted_type,
)
from tinygptv_edge.export.gguf.source import LanguageSource, expected_shapes, model_source
from tinygptv_edge.export.staging import check_free_space, full_disk_error, stage_file
from tinygptv_edge.runtime import contract as C
from tinygptv_edge.runtime.errors import (
    ExportError,
    MissingKeysError,
    NonFiniteTensorError,
    OutputPathError,
    ShapeMismatchError,
    UnexpectedKeysError,
)

if TYPE_CHECKING:
    from tinygptv_edge.export.gguf.imatrix import Imatrix

# progress(phase, done, total): phase is "write" or "verify", counted in tensors
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TensorPlan:
    name: str  # GGUF name
    source: str  # canonical name
    shape: tuple[int, ...]  # numpy order: (rows, n_per_row) or (n,)
    qtype: Q
    wanted: Q  # what the level asked for before the row-length fallback
    nbytes: int
    qkv: bool = False  # fused q/k/v rows, reordered for GGUF (contract)


@dataclass
class GGUFReport:
    path: Path
    level: str
    tensors: list[TensorPlan]
    max_rel_error: dict[str, float] = field(default_factory=dict)  # GGUF name -> error (verify_gguf)
    imatrix_used: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @property
    def fallbacks(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.qtype != t.wanted]

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.qtype.name] = out.get(t.qtype.name, 0) + 1
        return out


def canonical_to_gguf(n_layers: int) -> dict[str, str]:
    return {t.canonical: t.gguf for t in C.language_tensors(n_layers)}


def plan_tensors(
    src: LanguageSource, level: Level, pure: bool = False, has_imatrix: bool = False
) -> list[TensorPlan]:
    """Map, check and type every tensor, in the contract's order (`has_imatrix`: the level's bumps that
    depend on an importance matrix, as llama.cpp's do)."""
    L = src.cfg.language
    names = canonical_to_gguf(L.layers)
    unmapped = [k for k in src.shapes if k not in names]
    if unmapped:
        raise UnexpectedKeysError(unmapped, f"{src.label} (no GGUF name)")
    missing = [k for k in names if k not in src.shapes]
    if missing:
        raise MissingKeysError(missing, src.label)
    want = expected_shapes(L)
    for k, shape in src.shapes.items():
        if shape != want[k]:
            raise ShapeMismatchError(k, want[k], shape, src.label)
    plans = []
    for t in C.language_tensors(L.layers):
        shape = want[t.canonical]
        wanted = wanted_type(level, t.gguf, shape, L.layers, pure, has_imatrix)
        qtype = fit_type(wanted, shape[-1])
        plans.append(
            TensorPlan(t.gguf, t.canonical, shape, qtype, wanted, tensor_nbytes(qtype, shape), t.qkv)
        )
    return plans


def qkv_to_gguf(a: np.ndarray, heads: int) -> np.ndarray:
    """Fused qkv rows (heads, 3, head_dim) -> (3, heads, head_dim): q block, k block, v block."""
    tail = a.shape[1:]
    x = a.reshape(heads, 3, -1, *tail)  # (heads, 3, head_dim, ...)
    return np.ascontiguousarray(x.swapaxes(0, 1)).reshape(a.shape)


def gguf_array(src: LanguageSource, plan: TensorPlan) -> np.ndarray:
    """The source tensor as float32 numpy, finite-checked, in the GGUF row order."""
    t = src.fetch(plan.source)
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float32).cpu().numpy()
    a = np.asarray(t, dtype=np.float32)
    if a.shape != plan.shape:
        raise ShapeMismatchError(plan.source, plan.shape, a.shape, src.label)
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise NonFiniteTensorError(plan.source, bad, src.label)
    peak = float(np.abs(a).max()) if a.size else 0.0
    if plan.qtype != Q.F32 and peak > F16_MAX:
        raise ExportError(
            f"{plan.source} in {src.label}: |value| up to {peak:.4g} exceeds the fp16 range ({F16_MAX}) "
            f"that {plan.qtype.name} stores; export at F32 or rescale the weights"
        )
    if plan.qkv:
        a = qkv_to_gguf(a, src.cfg.language.heads)
    return a


def export_gguf(
    model,
    tokenizer,
    out_path: str | Path,
    ftype: str = DEFAULT_LEVEL,
    *,
    imatrix: Imatrix | Mapping[str, np.ndarray] | None = None,
    sha256: dict[str, str] | None = None,
    pure: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> GGUFReport:
    """Write `model.language` (a TinyGPTV, LoRA merged) as GGUF at level `ftype` ("F32" ... "Q5_K_M").

    `imatrix`: an Imatrix (imatrix.collect_imatrix) or GGUF weight name -> (n_per_row,) mean
    squared input; used by the quantized types only.
    `sha256`: source file name -> hash, stored in the file. `threads`: quantizer threads (default: the
    CPU count, at most 16). Returns what was written and verified.
    """
    return export_source(
        model_source(model, tokenizer, sha256),
        out_path,
        ftype,
        imatrix=imatrix,
        pure=pure,
        progress=progress,
        threads=threads,
    )


def export_source(
    src: LanguageSource,
    out_path: str | Path,
    ftype: str = DEFAULT_LEVEL,
    *,
    imatrix: Imatrix | Mapping[str, np.ndarray] | None = None,
    imatrix_info: dict[str, int | str] | None = None,
    pure: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> GGUFReport:
    """`export_gguf` for any LanguageSource; the file appears at `out_path` only once verified."""
    from gguf import GGUFWriter

    from tinygptv_edge.export.gguf.imatrix import Imatrix
    from tinygptv_edge.export.gguf.meta import write_metadata

    if isinstance(imatrix, Imatrix):
        imatrix_info = {**imatrix.info(), **(imatrix_info or {})}
        imatrix = imatrix.values
    level = get_level(ftype)
    has_imatrix = imatrix is not None and level.quantized
    plans = plan_tensors(src, level, pure, has_imatrix)
    imatrix = _check_imatrix(imatrix, plans) if has_imatrix else None
    _check_needs_imatrix(plans, imatrix, level)
    out = Path(out_path)
    tmp = stage_file(out)
    report = GGUFReport(out, level.name, plans, imatrix_used=sorted(imatrix or {}))
    try:
        check_free_space(tmp.parent, sum(p.nbytes for p in plans), str(out))  # at least the tensor data
        w = GGUFWriter(str(tmp), C.GGUF_ARCH)
        info = dict(imatrix_info or {}) if imatrix else None
        write_metadata(w, src.cfg, src.tokenizer, level, src.sha256, info)
        for p in plans:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plans):
            data = quantize(gguf_array(src, p), p.qtype, (imatrix or {}).get(p.name), threads)
            w.write_tensor_data(data)
            if progress:
                progress("write", i + 1, len(plans))
        w.close()
        report.max_rel_error = verify_gguf(tmp, src, plans, progress, imatrix)
        os.replace(tmp, out)
    except OSError as e:  # a short write of a full disk says only "32768 requested and 28984 written"
        raise full_disk_error(out, tmp.parent, e) or OutputPathError(f"cannot write {out}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return report


def _check_needs_imatrix(plans: list[TensorPlan], imatrix: Mapping | None, level: Level) -> None:
    """The types of NEEDS_IMATRIX only with an importance matrix entry (token_embd spared, as llama.cpp
    spares it: its rows are looked up, not multiplied)."""
    for p in plans:
        if p.qtype in NEEDS_IMATRIX and p.name != "token_embd.weight" and p.name not in (imatrix or {}):
            raise ExportError(
                f"level {level.name}: {p.name} is {p.qtype.name}, which needs an importance matrix; "
                "export with --imatrix (computed from images) or pick another level"
            )


def _check_imatrix(imatrix: Mapping[str, np.ndarray], plans: list[TensorPlan]) -> dict[str, np.ndarray]:
    by_name = {p.name: p for p in plans}
    out = {}
    for name, values in imatrix.items():
        p = by_name.get(name)
        if p is None or len(p.shape) != 2:
            raise ExportError(f"importance matrix entry {name!r} names no 2-D weight of the model")
        v = np.asarray(values, dtype=np.float32)
        if v.shape != (p.shape[1],):
            raise ExportError(f"importance matrix {name}: expected shape ({p.shape[1]},), got {v.shape}")
        if not np.isfinite(v).all() or (v < 0).any():
            raise ExportError(f"importance matrix {name}: values must be finite and >= 0")
        out[name] = v
    return out


def verify_gguf(
    path: str | Path,
    src: LanguageSource,
    plans: list[TensorPlan],
    progress: Progress | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Re-read `path`: every tensor's name, shape and type as planned, and its values within BOUNDS.

    Tensor data are read one tensor at a time (not through the reader's whole-file mapping, whose
    touched pages would add up to the file size). Returns GGUF name -> the measured error (row max
    |err| / max |source|; with an imatrix entry, the tensor's weighted relative RMS).
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ExportError(f"written file {path} does not read back: {e}") from e
    arch = reader.fields.get(C.GGUF_GENERAL_KEYS["architecture"])
    if arch is None or arch.contents() != C.GGUF_ARCH:
        raise ExportError(f"{path}: expected architecture {C.GGUF_ARCH!r}, got {arch and arch.contents()!r}")
    got = [t.name for t in reader.tensors]
    if got != [p.name for p in plans]:
        raise ExportError(f"{path}: expected tensors {[p.name for p in plans][:5]}..., got {got[:5]}...")
    layout = [(t, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    del reader
    errors = {}
    with open(path, "rb") as f:
        for i, ((t, offset, nbytes), p) in enumerate(zip(layout, plans, strict=True)):
            shape = tuple(int(n) for n in reversed(t.shape))
            if shape != p.shape or Q(t.tensor_type) != p.qtype or nbytes != p.nbytes:
                raise ExportError(
                    f"{path}: {p.name} expected {p.qtype.name} {p.shape} ({p.nbytes} bytes), got "
                    f"{Q(t.tensor_type).name} {shape} ({nbytes} bytes)"
                )
            f.seek(offset)
            raw = np.frombuffer(f.read(nbytes), dtype=np.uint8)
            if raw.size != nbytes:
                raise ExportError(f"{path}: {p.name} is truncated ({raw.size} of {nbytes} bytes)")
            im = (imatrix or {}).get(p.name)
            errors[p.name] = _check_values(p, raw, gguf_array(src, p), im, path)
            if progress:
                progress("verify", i + 1, len(plans))
    return errors


def _check_values(p: TensorPlan, raw: np.ndarray, ref: np.ndarray, im: np.ndarray | None, path) -> float:
    """Dequantize `raw` (gguf-py, independent of ggml) and hold it to the type's bound against `ref`.

    Rows are checked in chunks so a large tensor needs no float64 copy of itself.
    """
    from gguf.quants import dequantize

    bound, n = BOUNDS[p.qtype], p.shape[-1]
    rows_raw, rows_ref = raw.reshape(-1, raw.size // ref.reshape(-1, n).shape[0]), ref.reshape(-1, n)
    worst = num = den = 0.0
    step = max(1, (1 << 22) // n)
    for r0 in range(0, rows_ref.shape[0], step):
        x = rows_ref[r0 : r0 + step]
        d = dequantize(rows_raw[r0 : r0 + step], p.qtype).reshape(x.shape)
        if not np.isfinite(d).all():
            raise ExportError(f"{path}: {p.name} ({p.qtype.name}) dequantizes to non-finite values")
        diff = (d - x).astype(np.float64)
        if im is not None and p.qtype != Q.F32:
            num += float((im * diff**2).sum())
            den += float((im * x.astype(np.float64) ** 2).sum())
            continue
        err = np.abs(diff).max(axis=1)
        scale = np.abs(x).max(axis=1).astype(np.float64)
        bad = err > bound.row_max * scale + bound.floor
        if bad.any():
            row = int(np.argmax(bad))
            raise ExportError(
                f"{path}: {p.name} ({p.qtype.name}) row {r0 + row} dequantizes {err[row]:.3g} away from "
                f"the source; expected at most {bound.row_max} x row max {scale[row]:.3g} + {bound.floor}"
            )
        worst = max(worst, float((err / np.maximum(scale, 1e-30)).max()))
    if im is not None and p.qtype != Q.F32:
        worst = float(np.sqrt(num / den)) if den > 0 else 0.0
        if worst > bound.weighted:
            raise ExportError(
                f"{path}: {p.name} ({p.qtype.name}) imatrix-weighted relative error {worst:.3g} "
                f"exceeds its bound {bound.weighted}"
            )
    return worst
