"""The flags every runtime command (`run`, `bench`, `serve`) spells the same way, added in one place.

add_model_args(group)    --dist, --vision, --language: which exported files to load
add_runtime_args(group)  --threads, --n-ctx, --low-memory auto|on|off
add_kv_type_arg(group)   --kv-type f16|f32|q8_0|q4_0
"""

from __future__ import annotations

import argparse


def add_model_args(group: argparse._ActionsContainer) -> None:
    group.add_argument("--dist", default="dist", help="where `make export-onnx export-gguf` wrote the models")
    group.add_argument(
        "--vision", help="vision ONNX file (default: DIST/vision.int8.onnx, else vision.fp32.onnx)"
    )
    group.add_argument("--language", help="language GGUF file (default: DIST/language.q4_0.gguf, else any)")


def add_runtime_args(group: argparse._ActionsContainer) -> None:
    group.add_argument("--threads", type=int, help="CPU threads for both models (default: the cores)")
    group.add_argument("--n-ctx", type=int, help="context length (default: the model's)")
    group.add_argument(
        "--low-memory",
        nargs="?",
        choices=["auto", "on", "off"],
        const="on",
        default="auto",
        help="one model resident at a time (2 GB boards); auto (default): when MemAvailable is short of "
        "both models, see docs/device-bench.md; a bare --low-memory means on",
    )


def add_kv_type_arg(group: argparse._ActionsContainer) -> None:
    from ..language.ggml_runtime import KV_TYPES

    group.add_argument(
        "--kv-type",
        choices=list(KV_TYPES),
        default="f16",
        help="KV cache type (default f16); q8_0 / q4_0 take about 0.64x / 0.34x of f16's memory at full "
        "size for a small loss (docs/decoder.md)",
    )
