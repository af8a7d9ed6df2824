"""The vision graph as ONNX: `TinyGPTV.vision` traced to `vision.fp32.onnx`, verified, then published.

    pixel_values (batch,3,S,S) --/vision/encoder--> --/vision/ln_vision--> --/vision/qformer-->
        --/vision/proj1--> --/vision/proj2--> image_embeds (batch,Q,H)

Exporter choice (torch 2.13): the TorchScript exporter (`dynamo=False`) names every node after its
module path (`/vision/qformer/layers.3/cross_attn/query/MatMul`) and keeps GELU/LayerNorm as plain
ops. The dynamo exporter gives flat names (`node_linear_12`, the path only in node metadata), so
exclusion lists and reports would be unreadable, and it is slower (docs/benchmarks.md).

Weights over 2 GB are written as one external data file `<name>.data` beside the graph. Every
export is checked against the PyTorch reference (`check.check_parity`) before it is renamed
into place: on any failure nothing is published.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from tinygptv_edge.export.model.tinygptv import TinyGPTV
from tinygptv_edge.export.onnx.check import ParityConfig, ParityReport, check_parity
from tinygptv_edge.export.staging import check_free_space, check_writable, full_disk_error, stage_dir
from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.contract import (
    BATCH_AXIS,
    ONNX_FORMAT_VERSION,
    ONNX_META,
    VISION_FILE_FP32,
    VISION_INPUT,
    VISION_OUTPUT,
)
from tinygptv_edge.runtime.errors import ExportError, OutputPathError

PROTOBUF_LIMIT = 2 * 1024**3  # bytes; above this the weights go to external data
MIN_OPSET = 17


@dataclass(frozen=True)
class ExportConfig:
    """How the graph is written. `parity` holds the tolerances of the check after export."""

    opset: int = 17
    file_name: str = VISION_FILE_FP32
    external_data: bool | None = None  # None: only when the weights exceed PROTOBUF_LIMIT
    parity: ParityConfig = field(default_factory=ParityConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ExportError(f"opset: expected an integer >= {MIN_OPSET}, got {self.opset!r}")
        if not self.file_name.endswith(".onnx") or "/" in self.file_name:
            raise ExportError(f"file_name: expected a plain '*.onnx' name, got {self.file_name!r}")


@dataclass
class ExportResult:
    path: Path
    external_data: Path | None
    parity: ParityReport
    n_nodes: int


class _Root(nn.Module):
    """Holds the tower under the attribute `vision` so node names start with `/vision/`."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)  # (B, 3, S, S) -> (B, Q, H)


def vision_metadata(cfg: TinyGPTVConfig, sources: dict[str, str]) -> dict[str, str]:
    """metadata_props of the vision graph (runtime/contract.py ONNX_META), values as strings."""
    pre = cfg.preprocess
    return {
        ONNX_META["image_size"]: str(pre.image_size),
        ONNX_META["mean"]: json.dumps(list(pre.mean)),
        ONNX_META["std"]: json.dumps(list(pre.std)),
        ONNX_META["resample"]: pre.resample,
        ONNX_META["stage"]: str(cfg.stage),
        ONNX_META["num_query_tokens"]: str(cfg.qformer.num_query_tokens),
        ONNX_META["embed_dim"]: str(cfg.projection.out_features),
        ONNX_META["source_sha256"]: json.dumps(dict(sorted(sources.items()))),
        ONNX_META["config"]: json.dumps(cfg.to_dict(), sort_keys=True),
        ONNX_META["format_version"]: str(ONNX_FORMAT_VERSION),
    }


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace the keys of `meta` in model.metadata_props, keeping other keys."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    for key, value in [*kept, *meta.items()]:
        model.metadata_props.add(key=key, value=value)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def name_weights(model: onnx.ModelProto) -> int:
    """Rename exporter-generated initializers (`onnx::MatMul_752`) after the node that reads them.

    The weight of `/vision/encoder/blocks.0/mlp/fc1/MatMul` becomes
    `/vision/encoder/blocks.0/mlp/fc1/MatMul/weight` (stored transposed, as MatMul reads it).
    Initializers read by several nodes keep their names. Returns the number renamed.
    """
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    taken = {t.name for t in model.graph.initializer}
    renamed = 0
    for init in model.graph.initializer:
        users = consumers.get(init.name, [])
        if not init.name.startswith("onnx::") or len(users) != 1:
            continue
        node, slot = users[0]
        role = "weight" if node.op_type in ("MatMul", "Gemm", "Conv") and slot == 1 else f"input{slot}"
        new = f"{node.name}/{role}"
        if new in taken:
            continue
        taken.add(new)
        node.input[slot] = new
        init.name = new
        renamed += 1
    return renamed


def fix_io_shapes(model: onnx.ModelProto, cfg: TinyGPTVConfig) -> None:
    """Declare the contract's shapes: (batch,3,S,S) in, (batch,Q,H) out.

    The tracer leaves the query axis symbolic (it flows from `query_tokens.expand`), although it
    is fixed by the config.
    """
    S, Q, H = cfg.vision.image_size, cfg.qformer.num_query_tokens, cfg.projection.out_features
    for value, dims in (
        (model.graph.input[0], (BATCH_AXIS, 3, S, S)),
        (model.graph.output[0], (BATCH_AXIS, Q, H)),
    ):
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            if isinstance(d, str):
                shape.dim.add().dim_param = d
            else:
                shape.dim.add().dim_value = d


def merge_external_data(model: onnx.ModelProto, src_dir: Path, data_path: Path) -> None:
    """Stream the exporter's one-file-per-tensor external data into the single file `data_path`.

    `model` was loaded without its external data; only the references are rewritten, so at no
    point are all weights held twice in memory.
    """
    offset = 0
    with open(data_path, "wb") as out:
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in init.external_data}
            src = src_dir / info["location"]
            start, length = int(info.get("offset", 0)), info.get("length")
            pad = (-offset) % 4096  # page-align every tensor (lets onnxruntime mmap them)
            out.write(b"\0" * pad)
            offset += pad
            with open(src, "rb") as f:
                f.seek(start)
                n = _copy(f, out, None if length is None else int(length))
            del init.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(n))):
                init.external_data.add(key=key, value=value)
            offset += n


def _copy(src, dst, length: int | None, chunk: int = 1 << 24) -> int:
    """Copy `length` bytes (all when None) from `src` to `dst` in chunks; returns the count."""
    n = 0
    while length is None or n < length:
        block = src.read(chunk if length is None else min(chunk, length - n))
        if not block:
            break
        dst.write(block)
        n += len(block)
    return n


def _torch_export(model: TinyGPTV, path: Path, opset: int) -> None:
    S = model.cfg.vision.image_size
    dummy = torch.zeros(1, 3, S, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; see module doc
        torch.onnx.export(
            _Root(model.vision).eval(),
            (dummy,),
            str(path),
            input_names=[VISION_INPUT],
            output_names=[VISION_OUTPUT],
            dynamic_axes={VISION_INPUT: {0: BATCH_AXIS}, VISION_OUTPUT: {0: BATCH_AXIS}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_vision(
    model: TinyGPTV,
    out_dir: str | Path,
    sources: dict[str, str] | None = None,
    cfg: ExportConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `model.vision` to `out_dir/cfg.file_name`, check parity, then publish atomically.

    `model` is a TinyGPTV, or any module with the same `.vision` (VisionTower) and `.cfg`
    (the benchmark exports a full-size tower without building the language model).

    `sources` maps checkpoint file names to their sha256 (recorded in metadata_props).
    Raises ParityError (nothing written) when onnxruntime and torch disagree.
    """
    cfg = cfg or ExportConfig()
    say = progress or (lambda _msg: None)
    out_dir = check_writable(out_dir)
    final = out_dir / cfg.file_name
    external = cfg.external_data
    if external is None:
        external = _weight_bytes(model.vision) > PROTOBUF_LIMIT - 64 * 1024**2
    model = model.eval()
    tmp = stage_dir(final)
    try:
        # the traced graph and the named one exist at the same time, each the size of the weights
        check_free_space(tmp, 2 * _weight_bytes(model.vision), str(final))
        raw_dir = tmp / "raw"
        raw_dir.mkdir()
        say("tracing the vision tower")
        _torch_export(model, raw_dir / "vision.onnx", cfg.opset)
        say("naming weights and writing metadata")
        proto = onnx.load(str(raw_dir / "vision.onnx"), load_external_data=False)
        name_weights(proto)
        fix_io_shapes(proto, model.cfg)
        set_metadata(proto, vision_metadata(model.cfg, sources or {}))
        proto.producer_name = "tinygptv-edge"
        staged = tmp / cfg.file_name
        data = tmp / (cfg.file_name + ".data")
        has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        if has_external:
            merge_external_data(proto, raw_dir, data)
            onnx.save(proto, str(staged))
        elif external:
            onnx.save(proto, str(staged), save_as_external_data=True, location=data.name, size_threshold=1024)
        else:
            onnx.save(proto, str(staged))
        n_nodes = len(proto.graph.node)
        del proto
        shutil.rmtree(raw_dir)
        say("checking parity with the PyTorch reference")
        report = check_parity(model, staged, cfg.parity)  # raises ParityError
        say("publishing")
        data_final = out_dir / data.name
        if data.exists():
            data.replace(data_final)
        elif data_final.exists():
            data_final.unlink()  # a stale weight file of an earlier, larger export
        staged.replace(final)
    except OSError as e:
        raise OutputPathError(f"cannot write {final}: {e}") from e
    except Exception as e:  # torch.onnx.export and onnx.save report a full disk in their own ways
        full = None if isinstance(e, OutputPathError) else full_disk_error(final, tmp.parent, e)
        if full is not None:
            raise full from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(final, data_final if data_final.exists() else None, report, n_nodes)
