"""INT8 vision graphs from the FP32 export: static QDQ calibrated on images, and a dynamic baseline.

    vision.fp32.onnx --quant_pre_process--> pre.onnx --quantize_static(QDQ, per-channel,
        calibration over images)--> [diagnose: SQNR per activation --fall back k nodes--> requantize
        with the cached ranges] --verify vs FP32 (finite, cosine)--> vision.int8.onnx

Nothing is published unless the quantized graph gives finite outputs whose cosine with the FP32
graph reaches `preset.min_cosine` on the check images.
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
from tinygptv_edge.export.onnx.check import sample_cosine
from tinygptv_edge.export.onnx.diag import Diagnostics, diagnose
from tinygptv_edge.export.onnx.export import PROTOBUF_LIMIT, check_writable, read_metadata, set_metadata
from tinygptv_edge.export.onnx.presets import QuantPreset
from tinygptv_edge.export.staging import stage_dir
from tinygptv_edge.runtime.config import PreprocessConfig
from tinygptv_edge.runtime.contract import ONNX_META, VISION_FILE_INT8, VISION_INPUT, VISION_OUTPUT
from tinygptv_edge.runtime.errors import ConfigError, ExportError, OutputPathError, QuantizationError

VISION_FILE_INT8_DYNAMIC = "vision.int8-dynamic.onnx"
QUANT_META_KEY = "tinygptv.quantization"  # JSON: preset, method, excluded nodes, cosine vs FP32
MAX_CHECK_IMAGES = 8


@dataclass
class QuantResult:
    path: Path
    kind: str  # "static" or "dynamic"
    cosine: float  # min per-image cosine vs FP32 on the check images
    max_abs: float
    excluded: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    diagnostics: Diagnostics | None = None


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
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


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
    at once (over a gigabyte per image at full size: docs/benchmarks.md); here only one image's are alive
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


def verify(fp32: Path, quantized: Path, pixels: np.ndarray, min_cosine: float) -> tuple[float, float]:
    """(min cosine, max |diff|) of the quantized graph vs FP32; QuantizationError when unusable."""
    want, got = run_graph(fp32, pixels), run_graph(quantized, pixels)
    bad = int(got.size - np.isfinite(got).sum())
    if bad:
        raise QuantizationError(
            f"quantized graph: expected finite outputs, got {bad} NaN/inf value(s); not written"
        )
    bad = int(want.size - np.isfinite(want).sum())
    if bad:
        raise QuantizationError(
            f"check images: the FP32 graph itself gives {bad} NaN/inf value(s), so INT8 cannot be verified; "
            "expected check pixels the FP32 graph handles"
        )
    cos = float(sample_cosine(got, want).min())
    if not cos >= min_cosine:
        raise QuantizationError(
            f"quantized graph: expected cosine vs FP32 >= {min_cosine}, got {cos:.5f} "
            f"on {len(pixels)} image(s); "
            "not written (try another --method, --exclude nodes or --fallback-k)"
        )
    return cos, float(np.abs(got - want).max())


def _verify_and_publish(fp32, staged, final, check, preset, info: dict) -> tuple[float, float]:
    """Check the staged INT8 graph against FP32, stamp its metadata, and move it into place."""
    cos, max_abs = verify(fp32, staged, check, preset.min_cosine)
    meta = read_metadata(onnx.load(str(fp32), load_external_data=False))
    meta[QUANT_META_KEY] = json.dumps({**info, "cosine_vs_fp32": round(cos, 6)})
    _publish(staged, final, meta)
    return cos, max_abs


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


def quantize_vision(
    fp32_path: str | Path,
    calibration: np.ndarray,
    preset: QuantPreset,
    out_path: str | Path | None = None,
    check: np.ndarray | None = None,
    diagnostics_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantResult:
    """Static INT8 (QDQ) of the FP32 vision graph, calibrated on `calibration` pixels (N,3,S,S).

    `check` pixels (default: the first calibration images) decide whether the result is published.
    With `diagnostics_dir` (or `preset.fallback_k`), per-activation SQNR is measured; its JSON and
    table go to `diagnostics_dir`.
    """
    fp32 = Path(fp32_path)
    if not fp32.is_file():
        raise ExportError(f"FP32 vision graph not found: {fp32}")
    final = Path(out_path) if out_path else fp32.with_name(VISION_FILE_INT8)
    check_writable(final.parent)
    S = preprocess_config(fp32).image_size
    calibration = check_pixels(calibration, S, "calibration pixels")[: preset.max_images]
    check = check_pixels(check, S, "check pixels") if check is not None else calibration[:MAX_CHECK_IMAGES]
    say = progress or (lambda _msg: None)
    tmp = stage_dir(final)
    try:
        say("pre-processing (shape inference, graph optimisation)")
        pre = _prepare(fp32, tmp)
        graph = onnx.load(str(pre), load_external_data=False)
        excluded = expand_exclusions(preset.exclude, graph, preset.op_types)
        staged, cache = tmp / final.name, tmp / "calibration.json"
        say(f"calibrating ({preset.method}, {len(calibration)} images) and quantizing")
        _run_static(pre, staged, calibration, preset, excluded, cache)
        diag, fallback = None, []
        if diagnostics_dir is not None or preset.fallback_k:
            say("measuring SQNR per activation")
            diag = diagnose(pre, staged, calibration[:MAX_CHECK_IMAGES], preset.op_types, tmp / "diag")
            if preset.fallback_k:
                fallback = diag.most_sensitive(preset.fallback_k)
                say(f"re-quantizing with {len(fallback)} node(s) in float")
                _run_static(pre, staged, calibration, preset, excluded + fallback, cache)
            if diagnostics_dir is not None:
                diag.write(diagnostics_dir)
        say("verifying against FP32")
        info = {"kind": "static", "preset": preset.to_dict(), "excluded": excluded, "fallback": fallback}
        cos, max_abs = _verify_and_publish(fp32, staged, final, check, preset, info)
    except OSError as e:
        raise OutputPathError(f"cannot write {final}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantResult(final, "static", cos, max_abs, excluded, fallback, diag)


def quantize_vision_dynamic(
    fp32_path: str | Path,
    preset: QuantPreset,
    check: np.ndarray,
    out_path: str | Path | None = None,
) -> QuantResult:
    """The baseline: weights INT8 per channel, activations quantized at run time (MatMul/Gemm only)."""
    from onnxruntime.quantization import quantize_dynamic

    fp32 = Path(fp32_path)
    if not fp32.is_file():
        raise ExportError(f"FP32 vision graph not found: {fp32}")
    final = Path(out_path) if out_path else fp32.with_name(VISION_FILE_INT8_DYNAMIC)
    check_writable(final.parent)
    check = check_pixels(check, preprocess_config(fp32).image_size, "check pixels")
    _, weight, _ = _quant_types(preset)
    tmp = stage_dir(final)
    try:
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
        info = {"kind": "dynamic", "preset": preset.to_dict(), "excluded": excluded}
        cos, max_abs = _verify_and_publish(fp32, staged, final, check, preset, info)
    except OSError as e:
        raise OutputPathError(f"cannot write {final}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantResult(final, "dynamic", cos, max_abs, excluded)
