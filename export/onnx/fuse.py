"""Transformer fusions of the FP32 vision graph before quantization (onnxruntime's optimizer).

    vision.fp32.onnx --onnxruntime.transformers.optimize_model(model_type "vit", python fusions
        only, opt_level 0)--> fused graph --rename the fused nodes after the module they replace-->
        --parity vs the FP32 graph (same tolerances as the export)--> fused.onnx

Fusions (`FuseConfig`): LayerNorm(x + y) -> SkipLayerNormalization (the residual add and, where the
MatMul bias sits before it, the bias folded in), Add(bias) + Gelu -> BiasGelu, and optionally
q/k/v + softmax attention -> Attention. Attention is off by default for INT8: the fused op owns its
QKV weights, which static QDQ quantization leaves in float (onnxruntime's QDQ registry has no
Attention), so the QKV MatMuls, a third of the attention FLOPs, would lose INT8.

Why optimize_model and not optimum's `ORTOptimizer`: optimum wraps the same optimizer but needs a
transformers `PretrainedConfig` (model type, heads, hidden size) of a model it knows; this graph is a
custom EVA ViT + Q-Former, so the config would be invented. The optimizer names fused nodes
`SkipLayerNorm_AddBias_3`, `Attention_0`; `rename_fused` names them after the tensors they write
(`/vision/encoder/blocks.0/norm2/SkipLayerNormalization`), so exclusions and SQNR reports stay readable.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tinygptv_edge.runtime.contract import VISION_INPUT, VISION_OUTPUT
from tinygptv_edge.runtime.errors import ConfigError, ExportError, ParityError

FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu")


@dataclass(frozen=True)
class FuseConfig:
    """Which fusions run. `heads`/`hidden` 0: detected from the graph's Reshape shapes."""

    attention: bool = False
    skip_layer_norm: bool = True
    bias_gelu: bool = True
    heads: int = 0
    hidden: int = 0

    def __post_init__(self) -> None:
        for name in ("heads", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"FuseConfig.{name}: expected an integer >= 0, got {v!r}")


@dataclass
class FuseReport:
    path: Path
    fused: dict[str, int]  # fused op type -> node count in the result
    renamed: int
    max_abs: float = 0.0
    min_cosine: float = 1.0
    names: list[str] = field(default_factory=list)  # the fused nodes' names

    def format(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.fused.items())) or "none"
        return f"fused: {ops}; parity vs FP32 max |diff| {self.max_abs:.3g}, min cosine {self.min_cosine:.8f}"


def count_fused(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter(n.op_type for n in model.graph.node if n.op_type in FUSED_OPS)
    return dict(c)


def rename_fused(model: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Give nodes the optimizer created a name under the module whose tensor they write.

    A fused node writes a tensor of the original graph (a SkipLayerNormalization writes the output of
    the LayerNorm it replaces); its new name is that producer's module path + its op type, e.g.
    `/vision/encoder/blocks.3/norm2/SkipLayerNormalization`. Initializers the optimizer created and
    only that node reads become `<node>/input<i>`. Returns the number of nodes renamed.
    """
    producer = {o: n.name for n in original.graph.node for o in n.output}
    old_names = {n.name for n in original.graph.node}
    old_inits = {t.name for t in original.graph.initializer}
    taken = {n.name for n in model.graph.node}
    readers = Counter(i for n in model.graph.node for i in n.input)
    inits = {t.name: t for t in model.graph.initializer}
    renamed = 0
    for node in model.graph.node:
        if node.name in old_names:
            continue
        src = next((producer[o] for o in node.output if o in producer), None)
        if src is None or "/" not in src:
            continue
        base = f"{src.rsplit('/', 1)[0]}/{node.op_type}"
        new, i = base, 1
        while new in taken:
            new, i = f"{base}_{i}", i + 1
        taken.add(new)
        node.name = new
        renamed += 1
        for slot, name in enumerate(node.input):
            if name in inits and name not in old_inits and readers[name] == 1:
                inits[name].name = f"{new}/input{slot}"
                node.input[slot] = inits[name].name
    return renamed


def _fusion_options(cfg: FuseConfig):
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("vit")
    opts.enable_attention = cfg.attention
    opts.enable_skip_layer_norm = cfg.skip_layer_norm
    opts.enable_bias_skip_layer_norm = cfg.skip_layer_norm
    opts.enable_bias_gelu = cfg.bias_gelu
    opts.enable_gelu = True  # Erf-GELU -> Gelu, needed before BiasGelu
    opts.enable_gelu_approximation = False  # FastGelu (tanh) changes the numbers
    opts.enable_embed_layer_norm = False
    return opts


SMALL_TENSOR = 1 << 16  # bytes: external tensors under this are read for the fusions (shapes, constants)


def _load_small(src: Path, limit: int) -> onnx.ModelProto:
    """`src` with only its external tensors under `limit` bytes read into memory.

    The fusions look at graph structure and small constants (GELU's sqrt(2), biases' shapes); the large
    weights stay references to the source's data file (loading a full-size graph whole for the
    optimizer took several times its size in RSS: docs/benchmarks.md).
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if int(info.get("length", limit)) < limit:
            load_external_data_for_tensor(t, str(src.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return model


def fuse_graph(src: Path, dst: Path, cfg: FuseConfig | None = None) -> FuseReport:
    """Fuse `src` into `dst`. Large weights are never all in memory: they are copied from `src`'s
    external data file into `<dst>.data` one tensor at a time."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = cfg or FuseConfig()
    original = onnx.load(str(src), load_external_data=False)
    small = _load_small(src, SMALL_TENSOR if not cfg.attention else 1 << 62)  # attention concatenates QKV
    logging.disable(logging.WARNING)  # every fusion at INFO; "specify num_heads" (detected) at WARNING
    try:
        # the optimizer's shape inference checks external tensors relative to the working folder
        with contextlib.chdir(src.parent):
            opt = optimize_model(
                small,
                model_type="vit",
                num_heads=cfg.heads,
                hidden_size=cfg.hidden,
                optimization_options=_fusion_options(cfg),
                opt_level=0,
                use_gpu=False,
            )
    except Exception as e:  # the optimizer raises bare Exceptions / AssertionErrors
        raise ExportError(f"onnxruntime transformer optimizer failed on {src}: {e}") from e
    finally:
        logging.disable(logging.NOTSET)
    model = opt.model
    renamed = rename_fused(model, original)
    del original
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # streamed tensor by tensor into dst's own data file: onnx and onnxruntime refuse data files
        # outside the model's folder, symlinks and hard links
        from tinygptv_edge.export.onnx.export import merge_external_data

        merge_external_data(model, src.parent, dst.with_name(dst.name + ".data"))
    onnx.save(model, str(dst))
    names = [n.name for n in model.graph.node if n.op_type in FUSED_OPS]
    return FuseReport(dst, count_fused(model), renamed, names=names)


FUSE_MIN_COSINE = 0.99999
FUSE_REL_ATOL = 1e-4  # max |fused - fp32| over max |fp32|: fusion only reorders float sums


def check_fused_parity(fused: Path, pixels: np.ndarray, want: np.ndarray, report: FuseReport) -> FuseReport:
    """The fused graph against the FP32 graph's outputs `want` on `pixels` (the FP32 graph itself
    passed the parity check against the torch reference at export); ParityError lists every failure."""
    import onnxruntime as ort

    from tinygptv_edge.export.onnx.check import sample_cosine

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(fused), opts, providers=["CPUExecutionProvider"])
    got = np.concatenate(
        [sess.run([VISION_OUTPUT], {VISION_INPUT: pixels[i : i + 1]})[0] for i in range(len(pixels))]
    )
    del sess
    failures: list[str] = []
    atol = FUSE_REL_ATOL * max(1.0, float(np.abs(want).max()))
    if not np.isfinite(got).all():
        failures.append(f"fused graph: {int((~np.isfinite(got)).sum())} non-finite values")
    else:
        report.max_abs = float(np.abs(got - want).max())
        report.min_cosine = float(sample_cosine(got, want).min())
        if not report.max_abs <= atol:
            failures.append(f"max |fused - fp32| expected <= {atol:.3g}, got {report.max_abs:.3g}")
        if not report.min_cosine >= FUSE_MIN_COSINE:
            failures.append(f"cosine vs fp32 expected >= {FUSE_MIN_COSINE}, got {report.min_cosine:.8f}")
    if failures:
        failures.append("(export-onnx --no-fuse quantizes the unfused graph)")
        raise ParityError(failures, str(fused))
    return report
