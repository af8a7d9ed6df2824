"""Where INT8 hurts: SQNR of every quantized activation, from onnxruntime's `qdq_loss_debug`.

    float pre.onnx --save every tensor--> activations_fp32 --+
    qdq   int8.onnx --save every tensor--> activations_qdq  --+--> per activation X:
        qdq_sqnr   = SQNR(X before Q, X after Q->DQ)      local noise of quantizing X alone
        model_sqnr = SQNR(X in FP32 graph, X after Q->DQ)  everything upstream included
    node score = lowest qdq_sqnr among its quantized inputs; the k lowest are the "most sensitive"

SQNR = 20 log10(|x| / |x - y|) in dB; higher is better.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tinygptv_edge.export.staging import write_texts
from tinygptv_edge.runtime.metrics import sqnr_db_from_sums

DQ_SUFFIX = "_DequantizeLinear_Output"
REPORT_JSON = "sqnr.json"
REPORT_TABLE = "sqnr.txt"


@dataclass
class TensorSqnr:
    tensor: str
    qdq_sqnr: float  # dB
    model_sqnr: float  # dB
    nodes: list[str] = field(default_factory=list)  # quantized nodes reading this activation


@dataclass
class Diagnostics:
    rows: list[TensorSqnr]  # sorted by qdq_sqnr, worst first
    images: int

    def node_scores(self) -> dict[str, float]:
        """Quantized node -> lowest qdq SQNR of its inputs."""
        scores: dict[str, float] = {}
        for r in self.rows:
            for n in r.nodes:
                scores[n] = min(scores.get(n, np.inf), r.qdq_sqnr)
        return scores

    def most_sensitive(self, k: int) -> list[str]:
        scores = self.node_scores()
        return sorted(scores, key=lambda n: (scores[n], n))[:k]

    def to_dict(self) -> dict:
        return {"images": self.images, "unit": "dB", "tensors": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        width = max([len(r.tensor) for r in self.rows] + [6])
        lines = [f"{'tensor':<{width}}  {'qdq dB':>8}  {'model dB':>8}  nodes", "-" * (width + 30)]
        lines += [
            f"{r.tensor:<{width}}  {r.qdq_sqnr:8.2f}  {r.model_sqnr:8.2f}  {', '.join(r.nodes)}"
            for r in self.rows
        ]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """`sqnr.json` and `sqnr.txt` in `folder`, each written to a temp file and renamed."""
        texts = {REPORT_JSON: json.dumps(self.to_dict(), indent=1), REPORT_TABLE: self.table()}
        json_path, table_path = write_texts(folder, texts, "diagnostics")
        return json_path, table_path


def _quantized_consumers(qdq: onnx.ModelProto, op_types: tuple[str, ...]) -> dict[str, list[str]]:
    """Activation name -> names of `op_types` nodes that read it through a DequantizeLinear."""
    weights = {t.name for t in qdq.graph.initializer}
    dq_src = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    q_src = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    out: dict[str, list[str]] = {}
    for node in qdq.graph.node:
        if node.op_type not in op_types:
            continue
        for name in node.input:
            quantized = dq_src.get(name)
            if quantized is None or quantized in weights:
                continue
            act = q_src.get(quantized, quantized)
            out.setdefault(act, []).append(node.name)
    return out


def _saved_outputs(sess, feeds: dict) -> dict[str, list[np.ndarray]]:
    """Run an augmented graph once: saved tensor name -> [flattened value] (collect_activations' shape)."""
    from onnxruntime.quantization import qdq_loss_debug

    postfix = getattr(qdq_loss_debug, "_TENSOR_SAVE_POSTFIX", "_ReshapedSavedOutput")
    names = [o.name for o in sess.get_outputs()]
    return {
        n[: -len(postfix)]: [v]
        for n, v in zip(names, sess.run(None, feeds), strict=True)
        if n.endswith(postfix)
    }


def _sqnr(signal: float, noise: float) -> float:
    """20 log10(|x| / |x - y|) from sums of squares, clamped like onnxruntime's helper."""
    return sqnr_db_from_sums(signal, noise, floor=float(np.finfo(np.float32).eps) ** 2)


def diagnose(
    float_path: Path, qdq_path: Path, pixels: np.ndarray, op_types: tuple[str, ...], work: Path
) -> Diagnostics:
    """Per-activation SQNR of the QDQ graph vs the float graph on `pixels` (N,3,S,S).

    Images are run one at a time and only sums of squares are kept, so memory holds one image's
    activations (onnxruntime's `collect_activations` keeps every image's).
    """
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import (
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from tinygptv_edge.runtime.contract import VISION_INPUT

    work.mkdir(parents=True, exist_ok=True)
    large = any(p.with_name(p.name + ".data").exists() for p in (float_path, qdq_path))
    aug_f, aug_q = work / "float.aug.onnx", work / "qdq.aug.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(aug_f), save_as_external_data=large)
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q), save_as_external_data=large)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every saved tensor
    opts.log_severity_level = 3
    sess_f = ort.InferenceSession(str(aug_f), opts, providers=["CPUExecutionProvider"])
    sess_q = ort.InferenceSession(str(aug_q), opts, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}  # name -> [|pre|^2, |pre - post|^2, |float|^2, |float - post|^2]
    for i in range(len(pixels)):
        feeds = {VISION_INPUT: np.ascontiguousarray(pixels[i : i + 1], dtype=np.float32)}
        match = create_activation_matching(_saved_outputs(sess_q, feeds), _saved_outputs(sess_f, feeds))
        for name, m in match.items():
            pre, post = m["pre_qdq"][0].astype(np.float64), m["post_qdq"][0].astype(np.float64)
            ref = m["float"][0].astype(np.float64) if m.get("float") else pre
            acc = sums.setdefault(name, np.zeros(4))
            acc += [np.dot(pre, pre), np.sum((pre - post) ** 2), np.dot(ref, ref), np.sum((ref - post) ** 2)]
    consumers = _quantized_consumers(onnx.load(str(qdq_path), load_external_data=False), op_types)
    rows = [
        TensorSqnr(name, _sqnr(a[0], a[1]), _sqnr(a[2], a[3]), consumers.get(name, []))
        for name, a in sums.items()
    ]
    rows.sort(key=lambda r: (r.qdq_sqnr, r.tensor))
    return Diagnostics(rows, len(pixels))
