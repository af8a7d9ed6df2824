"""`report --paper-set`: the tiny model over every paper-set layout, serial and on a local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_paper_sets import MAKERS

from tinygptv_edge.calib.paper_sets import load_paper_set
from tinygptv_edge.calib.paper_sets import scoring as S
from tinygptv_edge.runtime.errors import ReportError


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sets")
    return {name: str(make(root / name)) for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"c{i}.png")
    return folder


def argv(out: Path, model: Path, calib: Path, files: dict[str, str], *extra: str) -> list[str]:
    a = ["report", "--out", str(out), "--model", str(model), "--calib-images", str(calib), "--vision", "fp32",
         "--language", "Q8_0", "--n-boot", "200", "--no-probe", "--no-noise-floor",
         "--max-new-tokens", "4"]  # fmt: skip
    for name, path in files.items():
        a += ["--paper-set", f"{name}={path}"]
    return a + list(extra)


@pytest.fixture(scope="module")
def serial_run(tiny_single, paper_files, calib_dir, tmp_path_factory):
    from tinygptv_edge.cli import main

    out = tmp_path_factory.mktemp("paper") / "report"
    assert main(argv(out, tiny_single, calib_dir, paper_files, "--shard-size", "1")) == 0
    return out


def test_paper_report_serial(serial_run, paper_files):
    doc = json.loads((serial_run / "paper-sets.json").read_text())
    assert [r["name"] for r in doc["cells"]] == ["fp32 + F32", "fp32 + Q8_0"]
    assert set(doc["paper_sets"]) == set(MAKERS)
    ref, q8 = doc["cells"]
    for name, b in doc["paper_sets"].items():
        assert b["items"] == b["items_in_file"] == len(load_paper_set(name, paper_files[name]).items)
        r = ref["scores"][name]
        assert r["change"] == 0.0 and r["change_ci"] == [0.0, 0.0]  # the reference against itself
        for cell in doc["cells"]:
            s = cell["scores"][name]
            if s["value"] is not None:  # AUROC of one class only is undefined
                assert 0.0 <= s["ci"][0] <= s["value"] <= s["ci"][1] <= 100.0, (name, s)
    # the numbers follow from the stored predictions by the official rules
    for name in MAKERS:
        pset = load_paper_set(name, paper_files[name])
        for cell in doc["cells"]:
            preds = [S.Prediction.from_list(x) for x in doc["predictions"][name][cell["name"]]]
            sc = S.Scorer(pset, 10, 0)
            want = sc.stat(sc.values(preds))
            got = cell["scores"][name]["value"]
            assert (got is None and np.isnan(want)) or got == pytest.approx(100 * want), (name, cell["name"])
    hm = doc["predictions"]["hateful_memes"]["fp32 + F32"]
    assert all(0.0 < p[2] < 1.0 for p in hm) and "accuracy" in ref["scores"]["hateful_memes"]
    icon = doc["predictions"]["iconqa"]["fp32 + F32"]
    assert [p[0] for p in icon] == [load_paper_set("iconqa", paper_files["iconqa"]).items[i].choices[p[1]]
                                    for i, p in enumerate(icon)]  # fmt: skip
    md = (serial_run / "paper-sets.md").read_text()
    assert (
        md.startswith("# The paper's data sets")
        and md.count("| fp32 |") == 2
        and "VizWiz (vqa_accuracy)" in md
    )
    assert "### GQA by type (%)" in md and "| fp32 + Q8_0 |" in md  # breakdown by the release's types
    acc = ref["scores"]["hateful_memes"]
    assert acc["accuracy_ci"][0] <= acc["accuracy"] <= acc["accuracy_ci"][1]
    run = json.loads((serial_run / "paper-sets.run.json").read_text())
    assert run["executor"] == "serial" and run["shards"] == 2 * sum(
        b["items"] for b in doc["paper_sets"].values()
    )


def test_paper_results_do_not_depend_on_sharding(serial_run, tiny_single, paper_files, calib_dir):
    from tinygptv_edge.cli import main

    out = serial_run.parent / "report64"
    # reuse the built levels (the manifest vouches for them)
    (out).mkdir()
    (out / "artifacts").symlink_to(serial_run / "artifacts")
    assert main(argv(out, tiny_single, calib_dir, paper_files)) == 0
    a = json.loads((serial_run / "paper-sets.json").read_text())
    b = json.loads((out / "paper-sets.json").read_text())
    assert a["settings"].pop("shards") != b["settings"].pop("shards")
    a["settings"].pop("shard_size"), b["settings"].pop("shard_size")
    assert a == b


def test_paper_sample_and_errors(tiny_single, paper_files, calib_dir, tmp_path, serial_run, capsys):
    from tinygptv_edge.cli import main

    out = tmp_path / "r"
    out.mkdir()
    (out / "artifacts").symlink_to(serial_run / "artifacts")
    files = {k: paper_files[k] for k in ("gqa", "vizwiz")}
    assert main(argv(out, tiny_single, calib_dir, files, "--sample", "1", "--seed", "4")) == 0
    doc = json.loads((out / "paper-sets.json").read_text())
    assert doc["paper_sets"]["gqa"]["items"] == 1 and doc["paper_sets"]["gqa"]["items_in_file"] == 2
    assert "random sample of 1" in (out / "paper-sets.md").read_text()
    assert main(argv(out, tiny_single, calib_dir, files, "--sample", "1", "--limit", "1")) != 0
    assert "expected --limit or --sample, got both" in capsys.readouterr().err
    from tinygptv_edge.calib.paper_report import PaperReportConfig

    with pytest.raises(ReportError, match="names from"):
        PaperReportConfig({"okvqa": "x"})


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    yield ray
    ray.shutdown()


def test_paper_report_on_ray_equals_serial(ray_cluster, serial_run, tiny_single, paper_files, calib_dir):
    from tinygptv_edge.cli import main

    out = serial_run.parent / "ray"
    out.mkdir()
    (out / "artifacts").symlink_to(serial_run / "artifacts")
    assert main(argv(out, tiny_single, calib_dir, paper_files, "--shard-size", "1", "--ray")) == 0
    assert (out / "paper-sets.json").read_text() == (
        serial_run / "paper-sets.json"
    ).read_text()  # byte for byte
    assert json.loads((out / "paper-sets.run.json").read_text())["executor"] == "ray (local)"
    # the model files through the object store instead of a shared path: the same file again
    files = {k: paper_files[k] for k in ("gqa", "hateful_memes")}
    assert main(argv(out, tiny_single, calib_dir, files, "--ray", "--ray-ship-models")) == 0
    got, want = (
        json.loads((out / "paper-sets.json").read_text()),
        json.loads((serial_run / "paper-sets.json").read_text()),
    )
    for name in files:
        assert got["predictions"][name] == want["predictions"][name]
        assert [c["scores"][name] for c in got["cells"]] == [c["scores"][name] for c in want["cells"]]


def test_ray_retries_a_failed_task(ray_cluster, serial_run, paper_files, tmp_path):
    from tinygptv_edge.calib.paper_sets.executor import run_ray
    from tinygptv_edge.calib.paper_sets.runner import RunSpec, make_shards

    arts = serial_run / "artifacts"
    spec = RunSpec({"fp32": str(arts / "vision.fp32.onnx")}, {"F32": str(arts / "language.f32.gguf")}, 1, 4)
    sets = {"gqa": load_paper_set("gqa", paper_files["gqa"])}
    shards = make_shards({"gqa": 2}, [("fp32", "F32")], 1)
    marker = str(tmp_path / "failed_once")

    def flaky(shard, items, task, spec):  # the first attempt of the first shard fails
        import os

        from tinygptv_edge.calib.paper_sets.runner import run_shard

        if shard.start == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("injected failure")
        return run_shard(shard, items, task, spec)

    seen = []
    got = run_ray(shards, sets, spec, progress=lambda *a: seen.append(a[1:]), retries=1, fn=flaky)
    want = json.loads((serial_run / "paper-sets.json").read_text())["predictions"]["gqa"]["fp32 + F32"]
    assert [p for sh in shards for p in got[sh]] == want and Path(marker).exists()
    assert seen[-1] == (2, 2)
    Path(marker).unlink()
    with pytest.raises(ReportError, match=r"(?s)failed after 0 retries.*injected failure"):
        run_ray(shards, sets, spec, retries=0, fn=flaky)
    # the model files through the object store: each node writes its copy once, the numbers stay
    ship = tmp_path / "shipped"
    got = run_ray(shards, sets, spec, ship_models=True, ship_dir=str(ship))
    assert [p for sh in shards for p in got[sh]] == want
    copies = {p.name: p for p in ship.rglob("*") if p.is_file()}
    assert {"language.f32.gguf", "vision.fp32.onnx"} <= set(copies)
    assert all(p.read_bytes() == (arts / name).read_bytes() for name, p in copies.items())


@pytest.mark.slow
def test_shipped_model_answers_its_questions_in_gqa_layout(tmp_path):
    """The shipped default model through the GQA reader: its own synthetic questions, asked plainly
    (--paper-prompt), are mostly answered right, so reader, prompt, greedy decoding and exact match fit."""
    pytest.importorskip("tinygptv_edge.export.train.vqa")
    import importlib.util

    from tinygptv_edge.cli import main
    from tinygptv_edge.export.checkpoints.default import default_model_dir

    if not (default_model_dir() / "model.safetensors").is_file():
        pytest.skip("the shipped default model is not there (make train-default)")
    spec = importlib.util.spec_from_file_location(
        "ray_scaleout", Path(__file__).parents[2] / "bench" / "ray_scaleout.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    questions = mod.write_gqa(tmp_path / "gqa", n_images=6)
    out = tmp_path / "r"
    assert main(["report", "--out", str(out), "--vision", "fp32", "--language", "F32", "--n-calib", "4",
                 "--no-probe", "--no-noise-floor", "--n-boot", "200", "--paper-set", f"gqa={questions}",
                 "--paper-prompt", "gqa={question}"]) == 0  # fmt: skip
    doc = json.loads((out / "paper-sets.json").read_text())
    row = doc["cells"][0]["scores"]["gqa"]
    assert doc["paper_sets"]["gqa"]["prompt_source"] == "--paper-prompt"
    assert row["value"] > 80.0, row  # the model is above 95% on held-out questions of its own set
    assert set(row["by_type"]) >= {"colour", "count"}


def test_unreadable_image_is_a_typed_error_and_the_next_shard_still_runs(serial_run, paper_files, tmp_path):
    import shutil

    from tinygptv_edge.calib.paper_sets.executor import run_serial
    from tinygptv_edge.calib.paper_sets.runner import RunSpec, make_shards
    from tinygptv_edge.runtime.errors import ImageError

    root = tmp_path / "gqa"
    shutil.copytree(Path(paper_files["gqa"]).parent, root)
    (root / "images" / "n1.jpg").write_bytes(b"not an image at all")
    pset = load_paper_set("gqa", root / "testdev_balanced_questions.json")
    arts = serial_run / "artifacts"
    spec = RunSpec({"fp32": str(arts / "vision.fp32.onnx")}, {"F32": str(arts / "language.f32.gguf")}, 1, 4)
    shards = make_shards({"gqa": 2}, [("fp32", "F32")], 1)
    with pytest.raises(ImageError):
        run_serial(shards, {"gqa": pset}, spec)
    got = run_serial(shards[1:], {"gqa": pset}, spec)  # the models kept open still give the same answer
    want = json.loads((serial_run / "paper-sets.json").read_text())["predictions"]["gqa"]["fp32 + F32"]
    assert got[shards[1]] == want[1:]
