"""One way in: where every model-loading command (export-onnx, export-gguf, reference, report) reads
its model from, and which input files it hashes.

    --model DIR                       the project's single-checkpoint folder (default: the shipped model)
    --phi2 DIR --eva FILE --blip2 FILE [--stage-ckpt FILE] [--stage-num N]
                                      the official TinyGPT-V files (stage 3 unless told)
    --config JSON                     sizes, LoRA alpha, prompt (default: the folder's config.json, or
                                      the real sizes with the language part from the Phi-2 config.json)
    --template chat|instruct          the turn template (default: the one the stage was trained with)
    --bos / --no-bos                  a BOS before the first turn (default: official files no, as the
                                      official inference; a single folder: its config, true for the
                                      models the project trains)

    SourceSpec --config()--> TinyGPTVConfig --load()--> Loaded(model, tokenizer, summary, sha256)
               --language()--> LanguageSource (a single folder streamed, never built whole)

The hashed files are one set whatever the command: a single folder's model.safetensors; the official
Phi-2 weight files, eva, blip2 and the stage file.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tinygptv_edge.export.checkpoints.loaders import LoadSummary
from tinygptv_edge.runtime.config import PROMPT_TEMPLATES, TinyGPTVConfig
from tinygptv_edge.runtime.errors import CheckpointError, ConfigError
from tinygptv_edge.runtime.text.tokenizer import Tokenizer

OFFICIAL = ("phi2", "eva", "blip2")


@dataclass(frozen=True)
class SourceSpec:
    """What the flags name; validated on construction, nothing read until `model_config`/`load`."""

    model: str | None = None
    phi2: str | None = None
    eva: str | None = None
    blip2: str | None = None
    stage_ckpt: str | None = None
    stage_num: int | None = None
    config: str | None = None
    template: str | None = None
    add_bos: bool | None = None

    def __post_init__(self) -> None:
        given = [f"--{n}" for n in OFFICIAL if getattr(self, n)]
        if self.stage_ckpt:
            given.append("--stage-ckpt")
        if self.model and given:
            raise ConfigError(f"source: expected either --model or the official files, got both ({given[0]})")
        if given and len([n for n in OFFICIAL if getattr(self, n)]) < len(OFFICIAL):
            missing = [f"--{n}" for n in OFFICIAL if not getattr(self, n)]
            raise ConfigError(
                f"official source: expected --phi2, --eva and --blip2 together, missing {', '.join(missing)}"
            )
        if self.stage_num is not None and self.stage_num not in (1, 2, 3, 4):
            raise ConfigError(f"--stage-num: expected 1, 2, 3 or 4, got {self.stage_num!r}")
        if self.template is not None and self.template not in PROMPT_TEMPLATES:
            raise ConfigError(
                f"--template: expected one of {sorted(PROMPT_TEMPLATES)}, got {self.template!r}"
            )

    @property
    def official(self) -> bool:
        return bool(self.phi2)

    @property
    def folder(self) -> Path:
        """The single-checkpoint folder (the shipped model when --model is not given)."""
        from tinygptv_edge.export.checkpoints.default import default_model_dir
        from tinygptv_edge.export.checkpoints.single import WEIGHTS

        if self.official:
            raise ConfigError("source: the official files have no single-checkpoint folder")
        if self.model:
            folder = Path(self.model)
            if not (folder / WEIGHTS).is_file():
                raise CheckpointError(f"--model: expected {WEIGHTS} in {folder}, found none")
            return folder
        folder = default_model_dir()
        if not (folder / WEIGHTS).is_file():
            raise CheckpointError(
                f"the shipped default model is missing from {folder}; run `make train-default`"
            )
        return folder

    @property
    def label(self) -> str:
        if self.official:
            files = (self.phi2, self.eva, self.blip2, self.stage_ckpt or "no stage file")
            return f"official files ({', '.join(map(str, files))})"
        return str(self.folder)

    def files(self) -> list[Path]:
        """The input files whose sha256 every export records (one set for every command)."""
        from tinygptv_edge.export.checkpoints.loaders import weight_files
        from tinygptv_edge.export.checkpoints.single import WEIGHTS

        if not self.official:
            return [self.folder / WEIGHTS]
        files = weight_files(Path(self.phi2))
        return files + [Path(p) for p in (self.eva, self.blip2, self.stage_ckpt) if p]

    def sha256(self) -> dict[str, str]:
        from tqdm import tqdm

        from tinygptv_edge.runtime.image_cache import file_sha256

        return {f.name: file_sha256(f) for f in tqdm(self.files(), desc="sha256", unit="file", leave=False)}

    def model_config(self) -> TinyGPTVConfig:
        """The model config after --config, --stage-num, --template and --bos."""
        from tinygptv_edge.export.checkpoints.loaders import OFFICIAL_ADD_BOS, official_config
        from tinygptv_edge.export.checkpoints.single import CONFIG

        if self.official:
            if self.config:
                cfg = TinyGPTVConfig.load(self.config)
                if self.stage_num is not None and self.stage_num != cfg.stage:
                    raise ConfigError(
                        f"--stage-num {self.stage_num} but {self.config} says stage {cfg.stage}: "
                        "expected the same stage"
                    )
            else:
                cfg = official_config(self.phi2, self.stage_num or 3)
            add_bos = OFFICIAL_ADD_BOS
        else:
            cfg = TinyGPTVConfig.load(self.config or self.folder / CONFIG)
            if self.stage_num is not None and self.stage_num != cfg.stage:
                raise ConfigError(
                    f"--stage-num {self.stage_num} but the model in {self.folder} is stage {cfg.stage}: "
                    "a single folder's config has its stage"
                )
            add_bos = cfg.prompt.add_bos
        prompt = PROMPT_TEMPLATES[self.template] if self.template else cfg.prompt
        add_bos = add_bos if self.add_bos is None else self.add_bos
        return cfg.replace(prompt=dataclasses.replace(prompt, add_bos=add_bos))

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.phi2 if self.official else self.folder)

    def load(self) -> Loaded:
        """The reference model (LoRA merged), its tokenizer, the load summary and the file hashes."""
        cfg = self.model_config()
        if self.official:
            from tinygptv_edge.export.checkpoints.loaders import load_tinygptv

            model, summary = load_tinygptv(
                phi2=self.phi2,
                eva=self.eva,
                blip2=self.blip2,
                stage=self.stage_ckpt,
                stage_num=cfg.stage,
                cfg=cfg,
            )
        else:
            from tinygptv_edge.export.checkpoints.single import load_single

            model, summary = load_single(self.folder, cfg)
        summary.template = f"{template_name(cfg.prompt)} (stage {cfg.stage})"
        return Loaded(model, self.tokenizer(), summary, self.sha256(), self.label)

    def language(self, need_model: bool = False):
        """(LanguageSource, Loaded or None): a single folder is streamed unless the model is needed."""
        from tinygptv_edge.export.gguf.source import model_source, single_source

        if self.official or need_model:
            loaded = self.load()
            return model_source(loaded.model, loaded.tokenizer, loaded.sha256), loaded
        return single_source(self.folder, cfg=self.model_config()), None


def template_name(prompt) -> str:
    """The PROMPT_TEMPLATES name of `prompt`'s turn template (BOS aside), or "custom"."""
    for name, t in PROMPT_TEMPLATES.items():
        if dataclasses.replace(t, add_bos=prompt.add_bos) == prompt:
            return name
    return "custom"


@dataclass
class Loaded:
    model: object  # export.model.tinygptv.TinyGPTV
    tokenizer: Tokenizer
    summary: LoadSummary
    sha256: dict[str, str]  # input file name -> sha256
    label: str


# ---------------------------------------------------------------------------------------------
# Flags: the same names on every command
# ---------------------------------------------------------------------------------------------


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The source flags, spelled the same on every command that loads a model."""
    src = p.add_argument_group("model source (default: the shipped model)")
    src.add_argument("--model", help="single-checkpoint folder (model.safetensors + config.json)")
    src.add_argument("--phi2", help="official files: Phi-2 Hugging Face folder")
    src.add_argument("--eva", help="official files: eva_vit_g.pth")
    src.add_argument("--blip2", help="official files: blip2_pretrained_flant5xxl.pth")
    src.add_argument("--stage-ckpt", help="official files: TinyGPT-V_for_StageN.pth")
    src.add_argument("--stage-num", type=int, choices=[1, 2, 3, 4], help="official files: stage (default 3)")
    src.add_argument(
        "--config", help="TinyGPTVConfig JSON (sizes other than the defaults, LoRA alpha, prompt)"
    )
    src.add_argument(
        "--template", choices=sorted(PROMPT_TEMPLATES), help="turn template (default: the stage's own)"
    )
    src.add_argument(
        "--bos",
        dest="add_bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="BOS before the first turn (default: no for official files, a folder's config otherwise)",
    )


def spec_from_args(args: argparse.Namespace) -> SourceSpec:
    return SourceSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SourceSpec)})
