"""`tinygptv-edge export-gguf`: the language model as GGUF (default: the shipped model, Q4_0, dist/)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.gguf.quant import DEFAULT_LEVEL, LEVELS
    from tinygptv_edge.runtime.contract import LANGUAGE_FILE

    p = sub.add_parser("export-gguf", help="write the language model (LoRA merged) as a GGUF file")
    p.add_argument("--level", "-q", default=DEFAULT_LEVEL, choices=list(LEVELS), help="quantization level")
    p.add_argument(
        "--out", default="dist", help=f"output folder (file {LANGUAGE_FILE}) or a path ending in .gguf"
    )
    p.add_argument("--model", help="single-checkpoint folder (default: the model the project ships)")
    src = p.add_argument_group("official checkpoints (instead of --model)")
    src.add_argument("--phi2", help="Phi-2 Hugging Face folder")
    src.add_argument("--eva", help="eva_vit_g.pth")
    src.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth")
    src.add_argument("--stage-ckpt", help="TinyGPT-V_for_StageN.pth")
    src.add_argument("--stage", type=int, default=3, choices=[1, 2, 3, 4])
    src.add_argument("--config", help="TinyGPTVConfig JSON for other sizes (default: real sizes)")
    p.add_argument("--threads", type=int, help="quantizer threads (default: CPU count, at most 16)")
    p.add_argument("--pure", action="store_true", help="every weight at the level's type (no mix rules)")
    im = p.add_argument_group("importance matrix (quantized levels)")
    im.add_argument("--imatrix-images", help="folder of calibration images")
    im.add_argument("--prompts", help="text file, one question per line (default: a few generic questions)")
    im.add_argument("--answer-tokens", type=int, default=0, help="greedy answer tokens also counted")
    im.add_argument("--imatrix-out", help="also save the collected importance matrix (.npz)")
    im.add_argument("--imatrix", help="use a saved importance matrix (.npz) instead of collecting one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.gguf.export import export_source
    from tinygptv_edge.export.gguf.quant import get_level
    from tinygptv_edge.runtime.contract import LANGUAGE_FILE

    level = get_level(args.level)
    out = Path(args.out)
    if out.suffix != ".gguf":
        out = out / LANGUAGE_FILE.format(ftype=level.name.lower())
    t0 = time.perf_counter()
    src, model = _load_source(args, need_model=bool(args.imatrix_images))
    imatrix = None
    if args.imatrix:
        from tinygptv_edge.export.gguf.imatrix import Imatrix

        imatrix = Imatrix.load(args.imatrix)
    elif args.imatrix_images:
        imatrix = _collect(args, model, src.tokenizer)
        if args.imatrix_out:
            imatrix.save(args.imatrix_out)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase) or bars.setdefault(phase, tqdm(total=total, desc=phase, unit="tensor"))
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    try:
        report = export_source(
            src, out, level.name, imatrix=imatrix, pure=args.pure, progress=progress, threads=args.threads
        )
    finally:
        for bar in bars.values():
            bar.close()
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.type_counts().items()))
    print(f"wrote {report.path} ({report.nbytes / 2**20:.1f} MiB, {level.name}: {counts})")
    for t in report.fallbacks:
        print(f"  {t.name}: rows of {t.shape[-1]} do not fit {t.wanted.name}, wrote {t.qtype.name}")
    if imatrix is not None:
        print(f"  importance matrix: {len(imatrix.values)} weights from {imatrix.chunks} calibration pair(s)")
    print(f"verified every tensor; {time.perf_counter() - t0:.1f} s")
    return 0


def _load_source(args: argparse.Namespace, need_model: bool):
    """(LanguageSource, TinyGPTV or None): streamed from a single folder unless the model is needed."""
    from tinygptv_edge.export.gguf.source import model_source, single_source
    from tinygptv_edge.runtime.errors import CheckpointError

    official = [args.phi2, args.eva, args.blip2]
    if any(official) or args.stage_ckpt:
        if not all(official):
            raise CheckpointError("official checkpoints need --phi2, --eva and --blip2 (and --stage-ckpt)")
        from tinygptv_edge.export.checkpoints.loaders import load_tinygptv
        from tinygptv_edge.runtime.config import TinyGPTVConfig
        from tinygptv_edge.runtime.tokenizer import Tokenizer

        cfg = TinyGPTVConfig.load(args.config) if args.config else None
        model, _ = load_tinygptv(
            phi2=args.phi2,
            eva=args.eva,
            blip2=args.blip2,
            stage=args.stage_ckpt,
            stage_num=args.stage,
            cfg=cfg,
        )

        files = [Path(p) for p in (args.eva, args.blip2, args.stage_ckpt) if p]
        files += sorted(Path(args.phi2).glob("*.safetensors")) or sorted(Path(args.phi2).glob("*.bin"))
        return model_source(model, Tokenizer.from_file(args.phi2), _hashes(files)), model
    folder = Path(args.model) if args.model else _default_folder()
    if not need_model:
        return single_source(folder), None
    from tinygptv_edge.export.checkpoints.single import load_single

    model, _ = load_single(folder)
    src = single_source(folder)
    return model_source(model, src.tokenizer, src.sha256), model


def _default_folder() -> Path:
    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.runtime.errors import CheckpointError

    folder = default_model_dir()
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"the shipped default model is missing from {folder}; run `make train-default`")
    return folder


def _hashes(files: list[Path]) -> dict[str, str]:
    from tinygptv_edge.export.checkpoints.single import file_sha256

    return {f.name: file_sha256(f) for f in tqdm(files, desc="sha256", unit="file", leave=False)}


def _collect(args: argparse.Namespace, model, tokenizer):
    from tinygptv_edge.export.gguf.imatrix import DEFAULT_QUESTIONS, collect_imatrix
    from tinygptv_edge.runtime.errors import ConfigError
    from tinygptv_edge.runtime.images import load_image
    from tinygptv_edge.runtime.preprocess import preprocess

    folder = Path(args.imatrix_images)
    images = []
    if folder.is_dir():
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"no calibration images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    questions = DEFAULT_QUESTIONS
    if args.prompts:
        questions = tuple(q.strip() for q in Path(args.prompts).read_text().splitlines() if q.strip())
        if not questions:
            raise ConfigError(f"no questions in {args.prompts}")
    cfg = model.cfg.preprocess

    def pairs():
        for i, path in enumerate(images):
            yield preprocess(load_image(path), cfg), questions[i % len(questions)]

    bar = tqdm(total=len(images), desc="imatrix", unit="pair")
    try:
        return collect_imatrix(
            model, tokenizer, pairs(), args.answer_tokens, str(folder), progress=lambda n: bar.update(1)
        )
    finally:
        bar.close()
