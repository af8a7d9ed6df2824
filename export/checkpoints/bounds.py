"""Config sizes checked against the tensors a checkpoint holds, before anything is built from them.

A config.json can say anything (10^8 layers); the weights file cannot hold more layers than it has
tensors for. Each layer count of the config is compared with the distinct layer indices found in the
tensor names (read from the file's header or index, no tensor data), so a model, a name table or a
graph is never sized by a number the file does not back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tinygptv_edge.runtime.config import TinyGPTVConfig
from tinygptv_edge.runtime.errors import CheckpointError

# config field -> the layer index in official tensor names (Phi-2 HF / original, EVA, Q-Former)
LAYER_INDEX = {
    "language.layers": re.compile(r"(?:^|\.)(?:model\.layers|transformer\.h)\.(\d+)\."),
    "vision.depth": re.compile(r"(?:^|\.)blocks\.(\d+)\."),
    "qformer.layers": re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\."),
}


def layers_held(keys: Iterable[str], field: str) -> int:
    """How many distinct layer indices of `field`'s kind the tensor names carry."""
    pattern = LAYER_INDEX[field]
    return len({m[1] for k in keys if isinstance(k, str) and (m := pattern.search(k))})


def check_layers(value: int, keys: Iterable[str], field: str, source: str) -> None:
    held = layers_held(keys, field)
    if value > held:
        raise CheckpointError(
            f"{source}: config {field} = {value}: expected at most {held}, the layers its tensors hold"
        )


def check_config_fits(
    cfg: TinyGPTVConfig, keys: Iterable[str], source: str, fields=tuple(LAYER_INDEX)
) -> None:
    keys = list(keys)
    values = {"language.layers": cfg.language.layers, "vision.depth": cfg.vision.depth,
              "qformer.layers": cfg.qformer.layers}  # fmt: skip
    for field in fields:
        check_layers(values[field], keys, field, source)
