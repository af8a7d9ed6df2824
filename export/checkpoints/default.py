"""Where the model the project ships lives: `export/default_model/` (single-checkpoint folder).

It is written by `make train-default` and read by every command that runs without model paths.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tinygptv_edge.runtime.errors import CheckpointError


def default_model_dir() -> Path:
    return Path(str(resources.files("tinygptv_edge.export").joinpath("default_model")))


def load_default():
    """(TinyGPTV, LoadSummary) of the shipped model."""
    from tinygptv_edge.export.checkpoints.single import load_single

    folder = default_model_dir()
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"the shipped default model is missing from {folder}; run `make train-default`")
    return load_single(folder)
