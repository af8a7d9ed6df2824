"""The files the report measures: every chosen level exported once from one source model, then reused.

    model --export_vision--> vision.fp32.onnx --quantize_vision(method)--> vision.int8-<method>.onnx
      |                                     \\--quantize_vision_dynamic--> vision.int8-dynamic.onnx
      |                                     \\--quantize_vision_int4--> vision.int4.onnx
      \\--export_gguf(level[, imatrix])--> language.<level>.gguf
    calibration (images + questions, hashed) feeds the static INT8 ranges and the importance matrix

`manifest.json` beside the files records what each was built from (source hash, calibration hash,
settings); a file whose record matches is reused, anything else is rebuilt. The INT8 gate of the
exporter (cosine vs FP32) is lowered so that a level the exporter would refuse is still measured;
its note says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tinygptv_edge.export.onnx.presets import QuantPreset
from tinygptv_edge.runtime.errors import TinyGPTVError
from tinygptv_edge.runtime.memory_plan import BUDGET_KV_TYPES, kv_bytes_per_position, vision_file_bytes

from .levels import LanguageLevel, VisionLevel
from .metrics import bits_per_weight

MANIFEST = "manifest.json"
REPORT_GATE = 1e-6  # min_cosine used for the report's builds (the exporter's own gate is noted)


@dataclass
class Calibration:
    """Calibration inputs: pixels (N,3,S,S) for the INT8 ranges, (pixels, question) for the imatrix."""

    pixels: np.ndarray
    questions: list[str]
    source: str  # where they came from, for the report

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.pixels, dtype=np.float32).tobytes())
        h.update(json.dumps(self.questions).encode())
        return h.hexdigest()

    def pairs(self):
        for i, px in enumerate(self.pixels):
            yield px, self.questions[i % len(self.questions)]


@dataclass
class Artifact:
    half: str  # "vision" | "language"
    level: str
    path: str = ""
    file_bytes: int = 0  # everything a user ships for this half (an ONNX graph + its .data)
    params: int = 0
    bpw: float = math.nan  # 8 * weight bytes / parameters
    note: str = ""  # e.g. the exporter's gate, fallbacks
    error: str = ""  # the build failed: the level is reported, not evaluated
    # language: the KV cache's bytes per position for each budget KV type, and the trained context
    # (from the GGUF header): with file_bytes, what the predicted low-memory peak is made of
    kv_bytes_per_position: dict[str, int] = field(default_factory=dict)
    n_ctx_train: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def onnx_params(path: Path) -> int:
    """Elements of the FP32 graph's float initializers (the weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return int(sum(math.prod(t.dims) for t in proto.graph.initializer if t.data_type in floats))


def gguf_weights(path: Path) -> tuple[int, int]:
    """(parameters, tensor data bytes) of a GGUF file."""
    from tinygptv_edge.runtime.language.gguf_file import GGUFFile

    gf = GGUFFile.open(path)
    try:
        return (
            int(sum(math.prod(t.shape) for t in gf.tensors.values())),
            int(sum(t.nbytes for t in gf.tensors.values())),
        )
    finally:
        gf.close()


class Builder:
    """Exports the chosen levels of `model` into `folder`, reusing files the manifest vouches for."""

    def __init__(
        self,
        model,
        tokenizer,
        sources: dict[str, str],
        folder: str | Path,
        calibration: Calibration,
        preset: QuantPreset,
        progress: Callable[[str], None] | None = None,
    ):
        self.model, self.tokenizer, self.sources = model, tokenizer, sources
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.calib, self.preset = calibration, preset
        self.say = progress or (lambda _m: None)
        mf = self.folder / MANIFEST
        self.manifest: dict[str, dict] = json.loads(mf.read_text()) if mf.is_file() else {}
        self._imatrix = None
        self._vision_params = 0

    # -- bookkeeping --------------------------------------------------------------------------------
    def _key(self, file: str, settings: dict) -> str:
        blob = json.dumps({"file": file, "sources": self.sources, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _fresh(self, file: str, key: str) -> bool:
        rec = self.manifest.get(file)
        return bool(rec and rec.get("key") == key and (self.folder / file).is_file())

    def _record(self, file: str, key: str, note: str) -> None:
        self.manifest[file] = {"key": key, "note": note}
        tmp = self.folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))
        tmp.replace(self.folder / MANIFEST)

    # -- vision -------------------------------------------------------------------------------------
    def vision(self, level: VisionLevel) -> Artifact:
        art = Artifact("vision", level.name)
        try:
            path = self._build_vision(level)
        except TinyGPTVError as e:
            art.error = str(e)
            return art
        if not self._vision_params:
            self._vision_params = onnx_params(self.folder / "vision.fp32.onnx")
        art.path = str(path)
        art.file_bytes = vision_file_bytes(path)
        art.params = self._vision_params
        art.bpw = bits_per_weight(art.file_bytes, art.params)
        art.note = self.manifest[level.file]["note"]
        return art

    def _build_vision(self, level: VisionLevel) -> Path:
        from tinygptv_edge.export.onnx.export import ExportConfig, export_vision
        from tinygptv_edge.export.onnx.presets import Int4Config
        from tinygptv_edge.export.onnx.quant import (
            quantize_vision,
            quantize_vision_dynamic,
            quantize_vision_int4,
        )

        out = self.folder / level.file
        if level.kind == "fp32":
            key = self._key(level.file, {})
            if not self._fresh(level.file, key):
                self.say(f"exporting {level.file}")
                export_vision(self.model, self.folder, self.sources, ExportConfig(file_name=level.file))
                self._record(level.file, key, "")
            return out
        fp32 = self._build_vision(VisionLevel("fp32", "fp32"))
        preset = self.preset.replace(min_cosine=REPORT_GATE, mean_cosine=REPORT_GATE)
        if level.kind == "static":
            preset = preset.replace(method=level.method)
        int4 = Int4Config(min_cosine=REPORT_GATE, mean_cosine=REPORT_GATE)
        settings = {
            "preset": int4.to_dict() if level.kind == "int4" else preset.to_dict(),
            "calibration": self.calib.sha256,
            "fp32": self._sha(fp32),
        }
        key = self._key(level.file, settings)
        if not self._fresh(level.file, key):
            self.say(f"quantizing {level.file}")
            if level.kind == "static":
                res = quantize_vision(fp32, self.calib.pixels, preset, out_path=out)
                gate = (self.preset.min_cosine, self.preset.mean_cosine)
            elif level.kind == "int4":
                res = quantize_vision_int4(fp32, self.calib.pixels[:8], int4, out_path=out)
                gate = (Int4Config().min_cosine, Int4Config().mean_cosine)
            else:
                res = quantize_vision_dynamic(fp32, preset, self.calib.pixels[:8], out_path=out)
                gate = (self.preset.min_cosine, self.preset.mean_cosine)
            note = f"cosine vs FP32 mean {res.mean_cosine:.4f}, min {res.cosine:.4f}"
            note += " on held-out calibration images" if level.kind == "static" else " on calibration images"
            if res.cosine < gate[0] or res.mean_cosine < gate[1]:
                note += f"; below the exporter's gate (min {gate[0]}, mean {gate[1]}): it would refuse it"
            self._record(level.file, key, note)
        return out

    def _sha(self, path: Path) -> str:
        from tinygptv_edge.runtime.image_cache import file_sha256

        return file_sha256(path)

    # -- language -----------------------------------------------------------------------------------
    def language(self, level: LanguageLevel) -> Artifact:
        art = Artifact("language", level.name)
        try:
            path = self._build_language(level)
        except TinyGPTVError as e:
            art.error = str(e)
            return art
        params, data_bytes = gguf_weights(path)
        art.path, art.file_bytes, art.params = str(path), path.stat().st_size, params
        art.bpw = bits_per_weight(data_bytes, params)
        art.note = self.manifest[level.file]["note"]
        for kv in BUDGET_KV_TYPES:
            art.kv_bytes_per_position[kv], art.n_ctx_train = kv_bytes_per_position(path, kv)
        return art

    def imatrix(self):
        if self._imatrix is None:
            from tinygptv_edge.export.gguf.imatrix import collect_imatrix

            self.say(f"importance matrix over {len(self.calib.pixels)} calibration pairs")
            self._imatrix = collect_imatrix(
                self.model,
                self.tokenizer,
                self.calib.pairs(),
                dataset=f"calibration {self.calib.sha256[:12]}",
            )
        return self._imatrix

    def _build_language(self, level: LanguageLevel) -> Path:
        from tinygptv_edge.export.gguf.export import export_gguf

        out = self.folder / level.file
        settings = {"ftype": level.ftype, "imatrix": self.calib.sha256 if level.imatrix else None}
        key = self._key(level.file, settings)
        if not self._fresh(level.file, key):
            self.say(f"exporting {level.file}")
            im = self.imatrix() if level.imatrix else None
            rep = export_gguf(self.model, self.tokenizer, out, level.ftype, imatrix=im, sha256=self.sources)
            fb = [f"{t.name} {t.qtype.name}" for t in rep.fallbacks]
            self._record(level.file, key, ("row-length fallbacks: " + ", ".join(fb)) if fb else "")
        return out
