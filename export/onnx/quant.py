"""Quantized vision graphs from the FP32 export: static INT8 (QDQ), weight-only INT4, a dynamic baseline.

    vision.fp32.onnx [--fuse (fuse.py): SkipLayerNorm, BiasGelu; parity vs FP32]-->
        --quant_pre_process--> pre.onnx --quantize_static(QDQ, per-channel, calibration images)-->
        --gate (gate.py) on held-out images: min and mean cosine vs FP32 --fails and fallback_k > 0-->
        [SQNR per activation (diag.py); keep the 1, 2, 4, ... <= k lowest-SQNR nodes in float,
         re-quantize with the cached ranges, until the gate passes] --> vision.int8.onnx
    vision.fp32.onnx [--fuse] --MatMulNBits (4-bit blocks)--> gate --> vision.int4.onnx

Nothing is published unless the quantized graph gives finite outputs whose per-image cosine with
the FP32 graph reaches the gate on held-out images: the `check` pixels, or when none are given the
last quarter (at most 8) of the calibration pixels, which are then not used to calibrate.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tinygptv_edge.export.onnx.calib_data import ArrayReader, check_pixels
from tinygptv_edge.export.onnx.diag import Diagnostics, diagnose
from tinygptv_edge.export.onnx.export import PROTOBUF_LIMIT, read_metadata, set_metadata
from tinygptv_edge.export.onnx.fuse import FuseConfig, FuseReport, check_fused_parity, fuse_graph
from tinygptv_edge.export.onnx.gate import (
    INT4_HINT,
    CheckResult,
    compare,
    enforce,
    image_names,
    reference_outputs,
)
from tinygptv_edge.export.onnx.presets import Int4Config, QuantPreset
from tinygptv_edge.export.staging import check_free_space, check_writable, full_disk_error, stage_dir
from tinygptv_edge.runtime.config import PreprocessConfig
from tinygptv_edge.runtime.contract import ONNX_META, VISION_FILE_INT8, VISION_INPUT, VISION_OUTPUT
from tinygptv_edge.runtime.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    OutputPathError,
    QuantizationError,
)

VISION_FILE_INT8_DYNAMIC = "vision.int8-dynamic.onnx"
VISION_FILE_INT4 = "vision.int4.onnx"
QUANT_META_KEY = "tinygptv.quantization"  # JSON: preset, method, excluded nodes, cosine vs FP32
MAX_CHECK_IMAGES = 8
FUSE_PARITY_IMAGES = 2


@dataclass
class QuantResult:
    path: Path
    kind: str  # "static", "dynamic" or "int4"
    cosine: float  # min per-image cosine vs FP32 on the held-out images
    max_abs: float
    excluded: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    diagnostics: Diagnostics | None = None
    check: CheckResult | None = None
    fused: FuseReport | None = None
    attempts: list[tuple[int, float, float]] = field(default_factory=list)  # (nodes in float, min, mean)

    @property
    def mean_cosine(self) -> float:
        return self.check.mean if self.check else self.cosine


def split_holdout(calibration: np.ndarray, check: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out): `check` when given, else the last quarter (1..8) of the calibration
    pixels, which are then not calibrated on."""
    if check is not None:
        return calibration, check
    n = len(calibration)
    if n < 2:
        raise CalibrationError(
            f"calibration pixels: expected >= 2 images (some are held out for the gate) or separate "
            f"check pixels, got {n}"
        )
    k = min(MAX_CHECK_IMAGES, max(1, n // 4))
    return calibration[: n - k], calibration[n - k :]


def preprocess_config(fp32_path: str | Path) -> PreprocessConfig:
    """The preprocessing recorded in the graph's metadata_props."""
    meta = read_metadata(onnx.load(str(fp32_path), load_external_data=False))
    try:
        return PreprocessConfig(
            image_size=int(meta[ONNX_META["image_size"]]),
            mean=tuple(json.loads(meta[ONNX_META["mean"]])),
            std=tuple(json.loads(meta[ONNX_META["std"]])),
            resample=meta[ONNX_META["resample"]],
        )
    except (KeyError, ValueError) as e:
        raise ExportError(
            f"{fp32_path}: expected tinygptv preprocessing metadata, got none or bad ({e})"
        ) from e


def _model_bytes(path: Path) -> int:
    """Graph file + the external data its tensors refer to (wherever it lives)."""
    model = onnx.load(str(path), load_external_data=False)
    external = sum(
        int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "length"
    )
    return path.stat().st_size + external


def expand_exclusions(patterns: tuple[str, ...] | list[str], graph: onnx.ModelProto, op_types) -> list[str]:
    """Names of the quantizable nodes (`op_types`) matched by the globs.

    A glob that matches no such node is a ConfigError: most likely a typo.
    """
    names = [n.name for n in graph.graph.node if n.op_type in op_types]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"exclude pattern {pat!r}: expected to match {'/'.join(op_types)} nodes, matched none"
            )
        out += [h for h in hits if h not in out]
    return out


def _quant_types(preset: QuantPreset):
    from onnxruntime.quantization import CalibrationMethod, QuantType

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }
    return qt[preset.activation_type], qt[preset.weight_type], methods[preset.method]


def _calibrate(pre: Path, pixels: np.ndarray, preset: QuantPreset, cache: Path, large: bool) -> None:
    """Ranges (or histograms) of every tensor around the quantized ops, saved as a calibration cache.

    One image per `collect_data` call: quantize_static would keep all images' intermediate outputs
    at once (docs/benchmarks.md, figures behind decisions in code); here only one image's are alive
    at a time.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    _, _, method = _quant_types(preset)
    with tempfile.TemporaryDirectory(prefix="calib.", dir=cache.parent) as work:
        calibrator = create_calibrator(
            pre,
            list(preset.op_types),
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=method,
            use_external_data_format=large,
            # ranges from the two-sided histogram: the one-sided (absolute) one cannot bin a
            # near-constant tensor (e.g. a softmax over few keys) and numpy raises
            extra_options={"symmetric": False, "percentile": preset.percentile},
        )
        for i in range(len(pixels)):
            calibrator.collect_data(ArrayReader(pixels[i : i + 1], pixels.shape[-1]))
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator


def _run_static(
    pre: Path, out: Path, pixels: np.ndarray, preset: QuantPreset, exclude: list[str], cache: Path
):
    """quantize_static with the ranges of `cache` (calibrated first when it does not exist)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    act, weight, method = _quant_types(preset)
    large = _model_bytes(pre) > PROTOBUF_LIMIT // 2
    extra = {
        "ActivationSymmetric": preset.activation_symmetric,
        "WeightSymmetric": True,
        # no Q/DQ on MatMul/Conv outputs: the ops between them (LayerNorm, Softmax, GELU, residual
        # adds) read float tensors and run in float; DQ -> MatMul becomes MatMulIntegerToFloat
        "OpTypesToExcludeOutputQuantization": list(preset.op_types),
    }
    try:
        if not cache.is_file():
            _calibrate(pre, pixels, preset, cache, large)
        quantize_static(
            str(pre),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(preset.op_types),
            per_channel=preset.per_channel,
            reduce_range=preset.reduce_range,
            activation_type=act,
            weight_type=weight,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            calibrate_method=method,
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
    except (ValueError, RuntimeError, AssertionError, TypeError) as e:
        raise QuantizationError(f"onnxruntime static quantization ({preset.method}) failed: {e}") from e


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(path: Path, pixels: np.ndarray) -> np.ndarray:
    """image_embeds of `pixels`, one image at a time (B, Q, H)."""
    sess = _session(path)
    return np.concatenate(
        [sess.run([VISION_OUTPUT], {VISION_INPUT: pixels[i : i + 1]})[0] for i in range(len(pixels))]
    )


class _Gate:
    """FP32 outputs of the held-out pixels, computed once; `measure` compares a quantized graph."""

    def __init__(self, fp32: Path, pixels: np.ndarray, names: list[str]):
        self.pixels, self.names = pixels, names
        self.want = reference_outputs(run_graph(fp32, pixels))

    def measure(self, quantized: Path) -> CheckResult:
        return compare(run_graph(quantized, self.pixels), self.want, self.names)


def _stamp_and_publish(fp32: Path, staged: Path, final: Path, res: CheckResult, info: dict) -> None:
    """Stamp the gate's numbers into the staged graph's metadata and move it into place."""
    meta = read_metadata(onnx.load(str(fp32), load_external_data=False))
    meta[QUANT_META_KEY] = json.dumps(
        {
            **info,
            "cosine_vs_fp32": round(res.min, 6),
            "cosine_mean_vs_fp32": round(res.mean, 6),
            "heldout_images": len(res.cosines),
            "worst_images": [[n, round(c, 6)] for n, c in res.worst()],
        }
    )
    _publish(staged, final, meta)


def _publish(staged: Path, final: Path, meta: dict[str, str]) -> None:
    """Write metadata into `staged` (weights untouched), then rename it (and its .data) into place."""
    proto = onnx.load(str(staged), load_external_data=False)
    set_metadata(proto, meta)
    onnx.save(proto, str(staged))
    data, data_final = staged.with_name(staged.name + ".data"), final.with_name(final.name + ".data")
    if data.exists():
        data.replace(data_final)
    elif data_final.exists():
        data_final.unlink()
    staged.replace(final)


def _prepare(fp32: Path, tmp: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    large = _model_bytes(fp32) > PROTOBUF_LIMIT // 2
    try:
        quant_pre_process(
            str(fp32),
            str(pre),
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            external_data_location="pre.onnx.data" if large else None,
        )
    except Exception as e:  # onnxruntime raises bare Exceptions here
        raise QuantizationError(f"quant_pre_process of {fp32} failed: {e}") from e
    return pre


def _fuse(fp32: Path, tmp: Path, gate: _Gate, say) -> tuple[Path, FuseReport]:
    """The fused FP32 graph in `tmp`, parity-checked against the FP32 graph on held-out pixels."""
    say("fusing (SkipLayerNormalization, BiasGelu)")
    fused = tmp / "fused.onnx"
    report = fuse_graph(fp32, fused, FuseConfig())
    k = FUSE_PARITY_IMAGES
    check_fused_parity(fused, gate.pixels[:k], gate.want[:k], report)
    return fused, report


def _io_paths(fp32_path: str | Path, out_path: str | Path | None, default: str) -> tuple[Path, Path, int]:
    """(the FP32 graph, which must exist; the output path, whose folder must be writable; the graph's
    input side S) for each quantizer."""
    fp32 = Path(fp32_path)
    if not fp32.is_file():
        raise ExportError(f"FP32 vision graph not found: {fp32}")
    final = Path(out_path) if out_path else fp32.with_name(default)
    check_writable(final.parent)
    return fp32, final, preprocess_config(fp32).image_size


def _check_scratch(fp32: Path, tmp: Path, final: Path, graphs: float) -> None:
    """Refuse before writing when the staged files (`graphs` times the FP32 graph and its weights, the
    ones that exist at the same time) cannot fit on the disk holding `tmp`."""
    check_free_space(tmp, int(graphs * _model_bytes(fp32)), str(final))


def _raise_if_disk_full(final: Path, tmp: Path, e: Exception) -> None:
    """onnxruntime writes some graphs from C++ without reporting a full disk; the truncated file fails a
    later step (a protobuf DecodeError, a QuantizationError): said as the full disk it is."""
    if not isinstance(e, OutputPathError):
        full = full_disk_error(final, tmp.parent, e)
        if full is not None:
            raise full from e


def _fallback_steps(k: int) -> list[int]:
    """Node counts tried in turn: 1, 2, 4, ... up to k (k last)."""
    steps, n = [], 1
    while n < k:
        steps.append(n)
        n *= 2
    return [*steps, k] if k else []


def quantize_vision(
    fp32_path: str | Path,
    calibration: np.ndarray,
    preset: QuantPreset,
    out_path: str | Path | None = None,
    check: np.ndarray | None = None,
    diagnostics_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    check_names: list[str] | None = None,
) -> QuantResult:
    """Static INT8 (QDQ) of the FP32 vision graph, calibrated on `calibration` pixels (N,3,S,S).

    `check` pixels (held-out images, named by `check_names`) decide whether the result is published;
    without them the last calibration images are held out (`split_holdout`). When the gate fails and
    `preset.fallback_k` > 0, the lowest-SQNR nodes are kept in float, 1, 2, 4, ... up to k of them,
    until it passes. With `diagnostics_dir`, the SQNR tables and the held-out report are written there.
    """
    fp32, final, S = _io_paths(fp32_path, out_path, VISION_FILE_INT8)
    calibration = check_pixels(calibration, S, "calibration pixels")
    if check is not None:
        check = check_pixels(check, S, "check pixels")
    calibration, check = split_holdout(calibration, check)
    calibration = calibration[: preset.max_images]
    say = progress or (lambda _msg: None)
    tmp = stage_dir(final)
    try:
        # staged at once: the fused graph, the pre-processed one, onnxruntime's augmented copy (same size)
        _check_scratch(fp32, tmp, final, 2 + preset.fuse)
        say("running FP32 on the held-out images")
        gate = _Gate(fp32, check, image_names(len(check), check_names))
        src, fused = _fuse(fp32, tmp, gate, say) if preset.fuse else (fp32, None)
        say("pre-processing (shape inference, graph optimisation)")
        pre = _prepare(src, tmp)
        graph = onnx.load(str(pre), load_external_data=False)
        excluded = expand_exclusions(preset.exclude, graph, preset.op_types)
        staged, cache = tmp / final.name, tmp / "calibration.json"
        say(f"calibrating ({preset.method}, {len(calibration)} images) and quantizing")
        _run_static(pre, staged, calibration, preset, excluded, cache)
        say("checking held-out images")
        res = gate.measure(staged)
        attempts = [(0, res.min, res.mean)]
        diag, fallback = None, []
        passes = res.passes(preset.min_cosine, preset.mean_cosine)
        if diagnostics_dir is not None or (preset.fallback_k and not passes):
            say("measuring SQNR per activation")
            diag = diagnose(pre, staged, calibration[:MAX_CHECK_IMAGES], preset.op_types, tmp / "diag")
        if preset.fallback_k and not passes:
            ranked = diag.most_sensitive(preset.fallback_k)
            for n in _fallback_steps(len(ranked)):
                fallback = ranked[:n]
                say(f"gate failed (min {res.min:.4f}, mean {res.mean:.4f}): {n} node(s) in float")
                _run_static(pre, staged, calibration, preset, excluded + fallback, cache)
                res = gate.measure(staged)
                attempts.append((n, res.min, res.mean))
                if res.passes(preset.min_cosine, preset.mean_cosine):
                    break
        if diagnostics_dir is not None:
            diag.write(diagnostics_dir)
            res.write(diagnostics_dir)
        enforce(res, preset.min_cosine, preset.mean_cosine)
        info = {
            "kind": "static",
            "preset": preset.to_dict(),
            "excluded": excluded,
            "fallback": fallback,
            "fused": fused.fused if fused else {},
        }
        _stamp_and_publish(fp32, staged, final, res, info)
    except OSError as e:
        raise OutputPathError(f"cannot write {final}: {e}") from e
    except Exception as e:
        _raise_if_disk_full(final, tmp, e)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantResult(final, "static", res.min, res.max_abs, excluded, fallback, diag, res, fused, attempts)


def _nbits_quantizer():
    """onnxruntime's MatMulNBitsQuantizer; its module calls logging.basicConfig(level=INFO) when first
    imported, which would print every later INFO record of every library: the root logger is restored."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    return MatMulNBitsQuantizer


def quantize_vision_int4(
    fp32_path: str | Path,
    check: np.ndarray,
    cfg: Int4Config | None = None,
    out_path: str | Path | None = None,
    check_names: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantResult:
    """Weight-only INT4 (onnxruntime MatMulNBits) of every MatMul with a constant weight.

    Needs no calibration; `check` (held-out) pixels gate it like INT8 (`cfg.min_cosine`, `cfg.mean_cosine`).
    """
    import logging

    MatMulNBitsQuantizer = _nbits_quantizer()
    cfg = cfg or Int4Config()
    fp32, final, S = _io_paths(fp32_path, out_path, VISION_FILE_INT4)
    check = check_pixels(check, S, "check pixels")
    say = progress or (lambda _msg: None)
    tmp = stage_dir(final)
    try:
        _check_scratch(fp32, tmp, final, cfg.fuse + 0.25)  # the fused graph, the INT4 one
        say("running FP32 on the held-out images")
        gate = _Gate(fp32, check, image_names(len(check), check_names))
        src, fused = _fuse(fp32, tmp, gate, say) if cfg.fuse else (fp32, None)
        say(f"INT4 weights (block {cfg.block_size}, accuracy level {cfg.accuracy_level})")
        model = onnx.load(str(src))
        excluded = expand_exclusions(cfg.exclude, model, ("MatMul",))
        logging.disable(logging.INFO)  # the quantizer logs every node at INFO
        try:
            q = MatMulNBitsQuantizer(
                model,
                bits=4,
                block_size=cfg.block_size,
                is_symmetric=cfg.symmetric,
                accuracy_level=cfg.accuracy_level,
                nodes_to_exclude=excluded,
                op_types_to_quantize=("MatMul",),
            )
            q.process()
        except (ValueError, RuntimeError, AssertionError, TypeError) as e:
            raise QuantizationError(f"onnxruntime MatMulNBits quantization failed: {e}") from e
        finally:
            logging.disable(logging.NOTSET)
        staged = tmp / final.name
        quantized = q.model.model
        del model, q
        large = quantized.ByteSize() > PROTOBUF_LIMIT - 64 * 1024**2
        onnx.save(quantized, str(staged), save_as_external_data=large, location=staged.name + ".data")
        del quantized
        say("checking held-out images")
        res = gate.measure(staged)
        enforce(res, cfg.min_cosine, cfg.mean_cosine, INT4_HINT)
        info = {"kind": "int4", "int4": cfg.to_dict(), "excluded": excluded}
        info["fused"] = fused.fused if fused else {}
        _stamp_and_publish(fp32, staged, final, res, info)
    except OSError as e:
        raise OutputPathError(f"cannot write {final}: {e}") from e
    except Exception as e:
        _raise_if_disk_full(final, tmp, e)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantResult(final, "int4", res.min, res.max_abs, excluded, [], None, res, fused)


def quantize_vision_dynamic(
    fp32_path: str | Path,
    preset: QuantPreset,
    check: np.ndarray,
    out_path: str | Path | None = None,
) -> QuantResult:
    """The baseline: weights INT8 per channel, activations quantized at run time (MatMul/Gemm only)."""
    from onnxruntime.quantization import quantize_dynamic

    fp32, final, S = _io_paths(fp32_path, out_path, VISION_FILE_INT8_DYNAMIC)
    check = check_pixels(check, S, "check pixels")
    _, weight, _ = _quant_types(preset)
    tmp = stage_dir(final)
    try:
        _check_scratch(fp32, tmp, final, 1.25)  # the pre-processed graph, the INT8 one
        gate = _Gate(fp32, check, image_names(len(check), None))
        pre = _prepare(fp32, tmp)
        graph = onnx.load(str(pre), load_external_data=False)
        excluded = expand_exclusions(preset.exclude, graph, preset.op_types)
        staged = tmp / final.name
        try:
            quantize_dynamic(
                str(pre),
                str(staged),
                op_types_to_quantize=[op for op in preset.op_types if op != "Conv"],
                per_channel=preset.per_channel,
                reduce_range=preset.reduce_range,
                weight_type=weight,
                nodes_to_exclude=excluded,
                use_external_data_format=_model_bytes(pre) > PROTOBUF_LIMIT // 2,
            )
        except (ValueError, RuntimeError, AssertionError) as e:
            raise QuantizationError(f"onnxruntime quantize_dynamic failed: {e}") from e
        res = gate.measure(staged)
        enforce(res, preset.min_cosine, preset.mean_cosine)
        info = {"kind": "dynamic", "preset": preset.to_dict(), "excluded": excluded}
        _stamp_and_publish(fp32, staged, final, res, info)
    except OSError as e:
        raise OutputPathError(f"cannot write {final}: {e}") from e
    except Exception as e:
        _raise_if_disk_full(final, tmp, e)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantResult(final, "dynamic", res.min, res.max_abs, excluded, check=res)
