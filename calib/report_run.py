"""`make report` end to end: source model -> exports -> cross matrix -> cost probes -> JSON, Markdown, HTML.

model (SourceSpec: single folder or official files) ---------------+-- sha256 (provenance)
evaluation set (folder, or the VQA test split written to OUT/evalset)
calibration (VQA calibration split, or --calib-images) --Builder--> OUT/artifacts/* (cached)
    --run_matrix--> cells --probe (child process per level)--> speed, peak RSS
    --build_document--> OUT/report.json, report.md, report.html (each written, read back, renamed)
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tinygptv_edge.export.checkpoints.source import SourceSpec
from tinygptv_edge.runtime.checks import check_threads
from tinygptv_edge.runtime.errors import OutputPathError, ReportError

from .artifacts import REPORT_GATE, Builder, Calibration
from .evalset import load_evalset, write_vqa_evalset, write_vqa_splits
from .levels import LANGUAGE_LEVELS, REFERENCE_LANGUAGE, REFERENCE_VISION, VISION_LEVELS, pick
from .report import Budget, build_document

Progress = Callable[[str, int, int], None]
FILES = ("report.json", "report.md", "report.html")
PACKAGES = ("tinygptv-edge", "numpy", "onnxruntime", "onnx", "ggml-python", "gguf", "torch", "matplotlib")


@dataclass(frozen=True)
class ReportConfig:
    out: str = "dist/report"
    source: SourceSpec = field(default_factory=SourceSpec)  # default: the shipped model
    eval_dir: str | None = None  # evaluation folder (evalset.py format); None: the VQA test split
    n_images: int = 40  # VQA images per split when no eval_dir (every question of each)
    splits: str = "test,test-phrasing,test-layout,test-camera"  # VQA evaluation splits when no eval_dir
    limit: int | None = None  # keep the first questions only
    vision: str | None = None  # comma-separated vision levels; None: all
    language: str | None = None  # comma-separated language levels; None: all
    cells: str = "full"  # "full" cross matrix or "axes" (fp32 row + F32 column)
    calib_images: str | None = None
    n_calib: int = 32
    preset: str = "x86-vnni"
    threads: int = 1  # evaluation threads (1 ran faster than 2 on a shared 2-core CPU; docs/benchmarks.md)
    probe_threads: int = 2  # threads of the speed probes
    probe_runs: int = 3  # fresh-process runs per level: speeds are rendered as median [min-max]
    max_new_tokens: int = 16
    n_boot: int = 2000
    seed: int = 0
    noise_floor: bool = True
    probe: bool = True
    n_examples: int = 8
    budget: Budget = field(default_factory=Budget)

    def __post_init__(self) -> None:
        for name in (
            "n_images",
            "n_calib",
            "threads",
            "probe_threads",
            "probe_runs",
            "max_new_tokens",
            "n_boot",
            "n_examples",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ReportError(f"{name}: expected a positive integer, got {v!r}")
        if not [s for s in self.splits.split(",") if s.strip()]:
            raise ReportError(f"splits: expected comma-separated VQA split names, got {self.splits!r}")
        if self.cells not in ("full", "axes"):
            raise ReportError(f"cells: expected 'full' or 'axes', got {self.cells!r}")
        for name in ("threads", "probe_threads"):
            check_threads(getattr(self, name), name)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).parent, check=False)  # fmt: skip
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def calibration(cfg: ReportConfig, preprocess_cfg) -> Calibration:
    """Calibration images (+ questions for the imatrix): a folder, or the VQA calibration split."""
    from tinygptv_edge.export.onnx.calib_data import load_folder

    if cfg.calib_images:
        from tinygptv_edge.export.gguf.imatrix import DEFAULT_QUESTIONS

        pixels = load_folder(cfg.calib_images, preprocess_cfg, cfg.n_calib)
        return Calibration(pixels, list(DEFAULT_QUESTIONS), f"folder {cfg.calib_images}")
    try:
        from tinygptv_edge.export.train import vqa
    except ImportError as e:
        raise ReportError("no --calib-images and no synthetic VQA generator (export/train/vqa.py)") from e
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    samples = list(vqa.iter_samples("calibration", cfg.n_calib, cfg.seed))
    pixels = np.stack([preprocess(s.image, preprocess_cfg) for s in samples])
    questions = [s.qas[i % len(s.qas)].question for i, s in enumerate(samples)]
    return Calibration(pixels, questions, f"VQA calibration split, {cfg.n_calib} images, seed {cfg.seed}")


def _write_atomic(path: Path, text: str, check: Callable[[str], object]) -> None:
    """`text` to a temporary name, read back and checked, then renamed over `path`. On any failure (a full
    disk, a failed check) the temporary file is removed and an earlier `path` stays as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        check(tmp.read_text(encoding="utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        full = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        raise OutputPathError(f"{path}: expected to write the report, failed{full}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _check_html(text: str) -> None:
    from html.parser import HTMLParser

    HTMLParser().feed(text)
    if "</html>" not in text or "data:image/png;base64," not in text:
        raise ReportError("report.html: expected a complete page with inlined plots")


def make_report(cfg: ReportConfig, progress: Progress | None = None) -> dict[str, Path]:
    """Build, measure and write the report; returns {file name: path}."""
    from tinygptv_edge.export.onnx.presets import get_preset

    from . import probe as P
    from .matrix import choose_cells, prepare, run_matrix

    say = progress or (lambda *_: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vision_levels = pick(cfg.vision, VISION_LEVELS, REFERENCE_VISION, "vision")
    language_levels = pick(cfg.language, LANGUAGE_LEVELS, REFERENCE_LANGUAGE, "language")
    preset = get_preset(cfg.preset)

    loaded = cfg.source.load()
    model, tokenizer, sources = loaded.model, loaded.tokenizer, loaded.sha256
    say("setup", 1, 3)

    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    # the generated set is cached per split list (a test-only set keeps its old folder name)
    eval_dir = Path(cfg.eval_dir) if cfg.eval_dir else out / "evalset"
    if not cfg.eval_dir and splits != ["test"]:
        eval_dir = out / f"evalset-{'+'.join(splits)}-{cfg.n_images}"
    if not cfg.eval_dir and not (eval_dir / "questions.jsonl").is_file():
        if splits == ["test"]:
            write_vqa_evalset(eval_dir, cfg.n_images, "test", cfg.seed)
        else:
            write_vqa_splits(eval_dir, cfg.n_images, splits, cfg.seed)
    evalset = load_evalset(eval_dir, cfg.limit)
    calib = calibration(cfg, model.cfg.preprocess)
    say("setup", 2, 3)

    builder = Builder(model, tokenizer, sources, out / "artifacts", calib, preset)
    arts = {"vision": {}, "language": {}}
    todo = [("vision", lv) for lv in vision_levels] + [("language", lv) for lv in language_levels]
    for i, (half, lv) in enumerate(todo):
        a = builder.vision(lv) if half == "vision" else builder.language(lv)
        arts[half][lv.name] = a
        say("exports", i + 1, len(todo))
    for half, ref in (("vision", REFERENCE_VISION), ("language", REFERENCE_LANGUAGE)):
        if arts[half][ref].error:
            raise ReportError(f"the reference {half} level {ref} failed to build: {arts[half][ref].error}")
    del model  # the torch model is not needed past the exports

    from tinygptv_edge.runtime.language.decoder import Decoder

    with Decoder(arts["language"][REFERENCE_LANGUAGE].path, n_ctx=256) as dec:
        tok, prompt = dec.tokenizer, dec.prompt
    from tinygptv_edge.runtime.vision.encoder import VisionEncoder

    with VisionEncoder(arts["vision"][REFERENCE_VISION].path) as enc:
        pre_cfg = enc.preprocess_cfg
    prep = prepare(evalset, tok, prompt, pre_cfg)
    say("setup", 3, 3)

    ok_v = [lv.name for lv in vision_levels if not arts["vision"][lv.name].error]
    ok_l = [lv.name for lv in language_levels if not arts["language"][lv.name].error]
    cells = choose_cells(ok_v, ok_l, cfg.cells)
    result = run_matrix(
        prep,
        {v: arts["vision"][v].path for v in ok_v},
        {lang: arts["language"][lang].path for lang in ok_l},
        cells,
        cfg.threads,
        cfg.max_new_tokens,
        cfg.noise_floor,
        progress=say,
    )

    art_docs = {h: {k: a.to_dict() for k, a in d.items()} for h, d in arts.items()}
    for (half, level), why in result.failed.items():
        art_docs[half][level]["error"] = why
    if cfg.probe:
        todo = [(h, k) for h in ("vision", "language") for k in art_docs[h] if not art_docs[h][k]["error"]]
        for i, (h, k) in enumerate(todo):
            path = art_docs[h][k]["path"]
            art_docs[h][k]["probe"] = P.run_probes(h, path, cfg.probe_threads, cfg.probe_runs)
            say("cost probes", i + 1, len(todo))

    settings = {k: v for k, v in asdict(cfg).items() if k != "budget"}
    settings["cells_evaluated"] = len(result.cells)
    provenance = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "source_model": loaded.label,
        "source_checkpoint_sha256": (
            next(iter(sources.values())) if len(sources) == 1 else json.dumps(sources, sort_keys=True)
        ),
        "calibration_set": calib.source,
        "calibration_set_sha256": calib.sha256,
        "evalset_sha256": evalset.sha256,
        "int8_preset": json.dumps(preset.to_dict(), sort_keys=True) + " (method per level; the report "
        f"builds with min_cosine {REPORT_GATE} so refused levels are measured too)",
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **{f"version {k}": v for k, v in _versions().items()},
    }
    doc = build_document(result, evalset, art_docs, cfg.budget, settings, provenance, cfg.n_boot, cfg.seed,
                         cfg.n_examples)  # fmt: skip
    return write_outputs(doc, out)


def strict_json(x):
    """The document with NaN/infinity as null (JSON has neither) and numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_outputs(doc: dict, out: str | Path) -> dict[str, Path]:
    """report.json, report.md, report.html from the document, each verified before it replaces the old."""
    from .report_html import render_html
    from .report_md import render_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in FILES}
    doc = strict_json(doc)
    _write_atomic(paths["report.json"], json.dumps(doc, indent=1, allow_nan=False), json.loads)
    _write_atomic(paths["report.md"], render_markdown(doc), lambda t: t.startswith("# "))
    _write_atomic(paths["report.html"], render_html(doc), _check_html)
    return paths
