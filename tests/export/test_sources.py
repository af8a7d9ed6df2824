"""One way in: the source resolver and its flags on every command, the BOS rule, the prompt template,
and one image loader (an EXIF-rotated photo gives the same pixels to every consumer)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from PIL import Image, ImageOps  # noqa: E402

from tinygptv_edge.export.checkpoints.source import SourceSpec, spec_from_args  # noqa: E402
from tinygptv_edge.runtime.config import STAGE4_PROMPT, PreprocessConfig, PromptConfig, TinyGPTVConfig  # noqa: E402
from tinygptv_edge.runtime.errors import CheckpointError, ConfigError, GGUFModelError  # noqa: E402
from tinygptv_edge.runtime.vision.preprocess import preprocess  # noqa: E402

MODEL_COMMANDS = ("export-onnx", "export-gguf", "reference", "report")


def parse(command: str, *argv: str) -> argparse.Namespace:
    from tinygptv_edge.cli import build_parser

    return build_parser(only=command).parse_args([command, *argv])


def official(tiny) -> list[str]:
    s = tiny.synth
    return ["--phi2", str(s.phi2), "--eva", str(s.eva), "--blip2", str(s.blip2), "--stage-ckpt", str(s.stage)]


# -- flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_the_same_source_flags(command):
    argv = ["--model", "m", "--config", "c.json", "--template", "instruct", "--no-bos"]
    want = SourceSpec(model="m", config="c.json", template="instruct", add_bos=False)
    assert spec_from_args(parse(command, *argv)) == want
    argv = ["--phi2", "p", "--eva", "e", "--blip2", "b", "--stage-ckpt", "s", "--stage-num", "4", "--bos"]
    want = SourceSpec(phi2="p", eva="e", blip2="b", stage_ckpt="s", stage_num=4, add_bos=True)
    assert spec_from_args(parse(command, *argv)) == want


@pytest.mark.parametrize(
    ("command", "old"),
    [
        ("export-onnx", ["--single", "m"]),
        ("export-onnx", ["--stage", "s.pth"]),
        ("export-gguf", ["--stage", "4"]),
        ("reference", ["--question", "why?"]),
        ("export-gguf", ["--prompts", "q.txt"]),
    ],
)
def test_spellings_of_before_0_1_are_refused(command, old, capsys):
    """One flag name per concept: the pre-release spellings (--single, --stage, --question, --prompts)
    are gone, not hidden aliases; argparse refuses them with its usage error."""
    with pytest.raises(SystemExit) as e:
        parse(command, *old)
    assert e.value.code == 2 and old[0] in capsys.readouterr().err


def test_bad_source_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="either --model or the official files"):
        SourceSpec(model="m", phi2="p")
    with pytest.raises(ConfigError, match="missing --eva, --blip2"):
        SourceSpec(phi2="p")
    with pytest.raises(ConfigError, match="missing --phi2, --eva, --blip2"):
        SourceSpec(stage_ckpt="s")
    with pytest.raises(ConfigError, match="--template"):
        SourceSpec(template="alpaca")
    with pytest.raises(CheckpointError, match="--model: expected model.safetensors in"):
        SourceSpec(model="/nonexistent").load()


# -- config: BOS rule, template, --config ------------------------------------------------------------


def test_official_files_load_without_bos_and_with_the_stage_template(tiny, tmp_path):
    import json

    s = tiny.synth
    files = dict(phi2=str(s.phi2), eva=str(s.eva), blip2=str(s.blip2))
    with pytest.raises(ConfigError, match="llama_proj2 output 2560 != language hidden 64.*pass --config"):
        SourceSpec(**files).model_config()  # vision sizes are in no checkpoint: a config must say them
    data = tiny.cfg.to_dict()
    del data["prompt"]
    (tmp_path / "stage4.json").write_text(json.dumps({**data, "stage": 4}))
    cfg = SourceSpec(**files, config=str(tmp_path / "stage4.json"), stage_num=4).model_config()
    assert cfg.prompt == dataclasses.replace(STAGE4_PROMPT, add_bos=False)  # the stage's template, no BOS
    chat = SourceSpec(**files, config=str(tmp_path / "stage4.json"), template="chat").model_config()
    assert chat.prompt == dataclasses.replace(PromptConfig(), add_bos=False)
    tiny.cfg.save(tmp_path / "cfg.json")  # its prompt says add_bos true: official files still get none
    cfg = SourceSpec(**files, config=str(tmp_path / "cfg.json")).model_config()
    assert cfg.prompt.add_bos is False and cfg.language == tiny.cfg.language
    assert SourceSpec(**files, config=str(tmp_path / "cfg.json"), add_bos=True).model_config().prompt.add_bos
    with pytest.raises(ConfigError, match="--stage-num 4 but .* says stage 3"):
        SourceSpec(**files, stage_num=4, config=str(tmp_path / "cfg.json")).model_config()


def test_single_folder_keeps_its_trained_bos_unless_told(tiny_single):
    assert SourceSpec(model=str(tiny_single), stage_num=3).model_config().stage == 3  # old `--stage 3`
    with pytest.raises(ConfigError, match="--stage-num 4 but the model in .* is stage 3"):
        SourceSpec(model=str(tiny_single), stage_num=4).model_config()
    assert SourceSpec(model=str(tiny_single)).model_config().prompt.add_bos is True
    loaded = SourceSpec(model=str(tiny_single), add_bos=False).load()
    assert loaded.model.cfg.prompt.add_bos is False and loaded.summary.add_bos is False
    assert "BOS before the first turn: no" in loaded.summary.format()
    assert list(loaded.sha256) == ["model.safetensors"]


def test_a_config_without_prompt_gets_the_stage_template():
    data = TinyGPTVConfig(stage=4).to_dict()
    del data["prompt"]
    assert TinyGPTVConfig.from_dict(data).prompt == STAGE4_PROMPT
    data["stage"] = 2
    assert TinyGPTVConfig.from_dict(data).prompt == PromptConfig()
    with pytest.raises(ConfigError, match="add_bos"):
        PromptConfig(add_bos="yes")


def test_official_hashes_are_one_set(tiny):
    s = tiny.synth
    spec = SourceSpec(phi2=str(s.phi2), eva=str(s.eva), blip2=str(s.blip2), stage_ckpt=str(s.stage))
    names = [p.name for p in spec.files()]
    assert names == [
        *(p.name for p in sorted(Path(s.phi2).glob("*.safetensors"))),
        s.eva.name,
        s.blip2.name,
        s.stage.name,
    ]


# -- GGUF: add_bos recorded once, read back --------------------------------------------------------


def test_gguf_add_bos_written_from_the_model_and_read_by_the_runtime(tiny_single, tmp_path):
    from tinygptv_edge.export.gguf.export import export_source
    from tinygptv_edge.runtime.language.decoder import Decoder

    for bos in (False, True):
        src, _ = SourceSpec(model=str(tiny_single), add_bos=bos).language()
        path = export_source(src, tmp_path / f"lm.{bos}.gguf", "F32").path
        with Decoder(path, n_ctx=64) as dec:
            assert dec.prompt.add_bos is bos


def test_gguf_add_bos_key_missing_or_of_the_wrong_type():
    from tinygptv_edge.runtime.config import PromptConfig
    from tinygptv_edge.runtime.contract import GGUF_TOKENIZER_KEYS, PROMPT_KEYS, TINYGPTV_KEYS
    from tinygptv_edge.runtime.language import decoder_model as DM
    from tinygptv_edge.runtime.language.gguf_file import STRING, Field

    valid = PromptConfig()  # templates are validated as they are read
    fields = {TINYGPTV_KEYS[k]: Field(STRING, getattr(valid, f)) for f, k in PROMPT_KEYS.items()}
    gf = SimpleNamespace(path=Path("m.gguf"), fields=fields)
    assert DM.read_prompt(gf).add_bos is True  # files from before the key was honoured had a BOS
    fields[GGUF_TOKENIZER_KEYS["add_bos"]] = Field(DM.BOOL, False)
    assert DM.read_prompt(gf).add_bos is False
    fields[GGUF_TOKENIZER_KEYS["add_bos"]] = Field(4, 1)
    with pytest.raises(GGUFModelError, match="add_bos_token.*expected a bool, got uint32"):
        DM.read_prompt(gf)


# -- one image loader ----------------------------------------------------------------------------------


@pytest.fixture()
def rotated(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A JPEG stored sideways with EXIF orientation 6; (folder, upright pixels, sideways pixels)."""
    rng = np.random.default_rng(3)
    x = np.zeros((40, 64, 3), np.uint8)
    x[:, :20] = (250, 10, 10)  # a red band on the stored left: on top once upright
    x += rng.integers(0, 5, x.shape, dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(x).save(folder / "photo.jpg", exif=exif, quality=95)
    cfg = PreprocessConfig(image_size=56)
    with Image.open(folder / "photo.jpg") as im:
        upright = preprocess(ImageOps.exif_transpose(im).convert("RGB"), cfg)
        sideways = preprocess(im.convert("RGB"), cfg)
    assert not np.allclose(upright, sideways)
    return folder, upright, sideways


def test_exif_rotated_image_gives_every_consumer_the_same_upright_pixels(rotated, monkeypatch):
    from tinygptv_edge.calib.evalset import EvalSet
    from tinygptv_edge.export.gguf import cli as gguf_cli
    from tinygptv_edge.export.gguf import imatrix
    from tinygptv_edge.export.onnx.calib_data import load_folder
    from tinygptv_edge.export.reference.answer import image_pixels
    from tinygptv_edge.runtime.vision.images import load_image

    folder, upright, _ = rotated
    cfg = PreprocessConfig(image_size=56)
    path = folder / "photo.jpg"
    model = SimpleNamespace(cfg=SimpleNamespace(preprocess=cfg))
    got = {
        "runtime (run)": preprocess(load_image(path), cfg),
        "calibration": load_folder(folder, cfg)[0],
        "reference": image_pixels(SimpleNamespace(model=model), path)[0].numpy(),
        "report evalset": preprocess(EvalSet(folder, [], "").load_image("photo.jpg"), cfg),
    }
    seen = []

    def capture(model, tokenizer, pairs, *a, **kw):
        seen.extend(p for p, _ in pairs)

    monkeypatch.setattr(imatrix, "collect_imatrix", capture)
    args = SimpleNamespace(imatrix_images=str(folder), imatrix_questions=None, answer_tokens=0)
    gguf_cli._collect(args, model, None)
    got["importance matrix"] = seen[0]
    for who, pixels in got.items():
        np.testing.assert_array_equal(pixels, upright, err_msg=who)
    # the report's example thumbnails show the same upright picture (stored 64 x 40, shown 40 x 64)
    import base64
    import io

    from tinygptv_edge.calib.report_html import _thumb

    png = base64.b64decode(_thumb(folder, "photo.jpg").split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as thumb:
        assert thumb.size == (40, 64)
