"""Readers of the paper's data sets on small files in each release's exact layout, and each metric by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinygptv_edge.calib.paper_sets import PAPER_SETS, load_paper_set, parse_paper_args
from tinygptv_edge.calib.paper_sets import scoring as S
from tinygptv_edge.calib.paper_sets import vqa_eval as V
from tinygptv_edge.runtime.errors import EvalSetError


def png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path, format="PNG")


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the official layouts, written small ----------------------------------------------------------------
def make_gqa(root: Path) -> Path:
    for i in ("n1", "n2"):
        png(root / "images" / f"{i}.jpg")  # PNG bytes under the release's .jpg name: the loader sniffs
    return write(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes",
                "types": {"structural": "verify"}, "fullAnswer": "Yes, it is."},
        "202": {"imageId": "n2", "question": "What is on the table?", "answer": "cup",
                "types": {"structural": "query"}},
    })  # fmt: skip


def make_vsr(root: Path) -> Path:
    png(root / "images" / "train2017" / "000000000001.jpg")
    png(root / "images" / "val2017" / "000000000002.jpg")
    return write_jsonl(root / "test.jsonl", [
        {"image": "000000000001.jpg", "caption": "The cat is on the bed.", "label": 1, "relation": "on"},
        {"image": "000000000002.jpg", "caption": "The dog is under the car.", "label": 0,
         "relation": "under"},
    ])  # fmt: skip


def make_iconqa(root: Path) -> Path:
    split = root / "test"
    problems = {
        "12": ("How many dots?", ["3", "5"], 1),
        "7": ("Which shape?", ["circle", "square", "star"], 0),
    }
    for pid, (q, choices, ans) in problems.items():
        png(split / "choose_txt" / pid / "image.png")
        data = {"question": q, "choices": choices, "answer": ans, "ques_type": "choose_txt", "grade": "prek"}
        write(split / "choose_txt" / pid / "data.json", data)
    return split


def vizwiz_answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes"} for t in texts]


def make_vizwiz(root: Path) -> Path:
    png(root / "val" / "VizWiz_val_00000000.jpg")
    png(root / "val" / "VizWiz_val_00000001.jpg")
    return write(root / "Annotations" / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
         "answers": vizwiz_answers(*["soup"] * 4, *["tomato soup"] * 6), "answer_type": "other",
         "answerable": 1},
        {"image": "VizWiz_val_00000001.jpg", "question": "What colour?",
         "answers": vizwiz_answers(*["unanswerable"] * 10), "answer_type": "unanswerable", "answerable": 0},
    ])  # fmt: skip


def make_hateful_memes(root: Path) -> Path:
    for i in ("01235", "01236"):
        png(root / "img" / f"{i}.png")
    return write_jsonl(root / "dev_seen.jsonl", [
        {"id": 1235, "img": "img/01235.png", "label": 1, "text": "a mean caption"},
        {"id": 1236, "img": "img/01236.png", "label": 0, "text": "a kind caption"},
    ])  # fmt: skip


def make_vqav2(root: Path) -> Path:
    png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    write(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 420, "image_id": 42, "question": "How many people?"}]})  # fmt: skip
    write(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "number",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i}
                     for i in range(10)]}]})  # fmt: skip
    return root


def make_textvqa(root: Path) -> Path:
    png(root / "train_images" / "abc123.jpg")
    return write(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "abc123", "question": "what brand?",
         "answers": ["nokia"] * 7 + ["nokia phone"] * 3}]})  # fmt: skip


MAKERS = {"gqa": make_gqa, "vsr": make_vsr, "iconqa": make_iconqa, "vizwiz": make_vizwiz,
          "hateful_memes": make_hateful_memes, "vqav2": make_vqav2, "textvqa": make_textvqa}  # fmt: skip


def test_every_reader_reads_its_release_layout(tmp_path):
    assert set(MAKERS) == set(PAPER_SETS)
    got = {name: load_paper_set(name, make(tmp_path / name)) for name, make in MAKERS.items()}
    gqa = got["gqa"]
    assert [it.qid for it in gqa.items] == ["201", "202"] and gqa.items[1].answers == ("cup",)
    assert [it.qtype for it in gqa.items] == ["verify", "query"]
    vsr = got["vsr"]
    assert [it.label for it in vsr.items] == [1, 0] and "val2017" in vsr.items[1].image
    assert vsr.items[0].question == "The cat is on the bed."
    icon = got["iconqa"]  # problem folders in numeric order; the answer index picks the choice
    assert [it.qid for it in icon.items] == ["7", "12"]
    assert (
        icon.items[1].choices == ("3", "5") and icon.items[1].label == 1 and icon.items[1].answers == ("5",)
    )
    viz = got["vizwiz"]
    assert len(viz.items[0].answers) == 10 and viz.items[1].qtype == "unanswerable"
    assert viz.images == tmp_path / "vizwiz" / "Annotations" / ".." / "val"
    hm = got["hateful_memes"]
    assert [(it.qid, it.label) for it in hm.items] == [("1235", 1), ("1236", 0)]
    v2 = got["vqav2"].items[0]
    assert v2.image.endswith("val2014/COCO_val2014_000000000042.jpg") and v2.qtype == "number"
    assert got["textvqa"].items[0].answers[-1] == "nokia phone"
    for b in got.values():
        assert all(Path(it.image).is_file() for it in b.items) and len(b.sha256) == 64
        assert "{question}" in b.task.prompt
    # the VQA layout also serves TextVQA when it ships in that form
    assert load_paper_set("textvqa", tmp_path / "vqav2").name == "textvqa"


def test_select_limit_and_sample(tmp_path):
    b = load_paper_set("gqa", make_gqa(tmp_path))
    assert [it.qid for it in b.select(limit=1).items] == ["201"]
    s1, s2 = b.select(sample=1, seed=3), b.select(sample=1, seed=3)
    assert s1.items == s2.items and len(s1.items) == 1
    assert len(b.select(sample=10).items) == 2  # larger than the set: all of it
    with pytest.raises(EvalSetError, match="both"):
        b.select(limit=1, sample=1)


def test_readers_name_file_field_expected_found(tmp_path):
    q = make_gqa(tmp_path / "g")
    doc = json.loads(q.read_text())
    del doc["202"]["answer"]
    write(q, doc)
    with pytest.raises(
        EvalSetError, match=r"testdev_balanced_questions.json: question 202: expected field 'answer'"
    ):
        load_paper_set("gqa", q)
    (tmp_path / "g" / "images" / "n1.jpg").unlink()
    doc["202"]["answer"] = "cup"
    write(q, doc)
    with pytest.raises(EvalSetError, match="item 201 names image .*n1.jpg, found no such file"):
        load_paper_set("gqa", q)

    v = make_vsr(tmp_path / "v")
    v.write_text(v.read_text().replace('"label": 0', '"label": "maybe"'))
    with pytest.raises(EvalSetError, match=r"test.jsonl:2: field 'label': expected 0 or 1, found 'maybe'"):
        load_paper_set("vsr", v)

    i = make_iconqa(tmp_path / "i")
    write(i / "choose_txt" / "7" / "data.json", {"question": "q", "choices": ["a", "b"], "answer": 5})
    with pytest.raises(
        EvalSetError, match=r"7/data.json: field 'answer': expected a choice index 0..1, found 5"
    ):
        load_paper_set("iconqa", i)

    z = make_vizwiz(tmp_path / "z")
    write(z, [{"image": "VizWiz_val_00000000.jpg", "question": "What?"}])  # the test split: no answers
    with pytest.raises(EvalSetError, match=r"val.json: item 0: expected field 'answers'"):
        load_paper_set("vizwiz", z)

    h = make_hateful_memes(tmp_path / "h")
    h.write_text(h.read_text().replace('"img/01236.png"', '"../../etc/passwd"'))
    with pytest.raises(EvalSetError, match=r"dev_seen.jsonl:2: field 'img': expected a path inside"):
        load_paper_set("hateful_memes", h)

    q2 = make_vqav2(tmp_path / "q2")
    write(q2 / "v2_mscoco_val2014_annotations.json", {"annotations": []})
    with pytest.raises(EvalSetError, match="question_id 420: expected an annotation"):
        load_paper_set("vqav2", q2)
    with pytest.raises(EvalSetError, match="expected one file matching"):
        load_paper_set("vqav2", tmp_path)
    with pytest.raises(EvalSetError, match="expected the file"):
        load_paper_set("vsr", tmp_path / "nope.jsonl")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EvalSetError, match="expected JSON, found invalid JSON"):
        load_paper_set("gqa", tmp_path / "bad.json")


def test_paper_flag_parsing():
    assert parse_paper_args(["gqa=/d/q.json", "hateful-memes=x.jsonl"]) == {
        "gqa": "/d/q.json",
        "hateful_memes": "x.jsonl",
    }
    for bad, msg in (("gqa", "NAME=PATH"), ("okvqa=x", "NAME one of"), ("gqa=", "NAME=PATH")):
        with pytest.raises(EvalSetError, match=msg):
            parse_paper_args([bad])
    with pytest.raises(EvalSetError, match="once"):
        parse_paper_args(["gqa=a", "gqa=b"])


# -- metrics by hand ----------------------------------------------------------------------------------------
def test_vqa_normalization_edge_cases():
    # punctuation next to a space is deleted, else it becomes a space (so "is!" -> "is "); a period goes
    # unless a digit follows
    assert V.process_punctuation("yes, it is!") == "yes it is "
    assert V.process_punctuation("t-shirt") == "t shirt"
    assert V.process_punctuation("1,000") == "1000"  # a digit,digit group: commas deleted
    assert V.process_punctuation("3.5 cm.") == "3.5 cm"
    # number words, articles, contractions; lower case
    assert V.normalize_prediction("Two") == "2"
    assert V.normalize_prediction("The Red Car.") == "red car"
    assert V.normalize_prediction("an apple") == "apple"
    assert V.normalize_prediction("dont know") == "don't know"
    assert V.normalize_prediction("None") == "0"
    assert V.normalize_prediction("  It's\tan\nox ") == "it's ox"


def test_vqa_accuracy_by_hand():
    other = ["x"] * 10
    # k of 10 humans agree: mean over the 10 leave-one-out sets of min(1, matches / 3)
    assert V.vqa_accuracy("2", ["2"] + other[:9]) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert V.vqa_accuracy("2", ["2"] * 2 + other[:8]) == pytest.approx(
        (2 * (1 / 3) + 8 * (2 / 3)) / 10
    )  # 0.6
    assert V.vqa_accuracy("2", ["2"] * 3 + other[:7]) == pytest.approx((3 * (2 / 3) + 7) / 10)  # 0.9
    assert V.vqa_accuracy("2", ["2"] * 4 + other[:6]) == 1.0
    assert V.vqa_accuracy("3", ["2"] * 10) == 0.0
    # the prediction is normalized: number word, article, punctuation, case
    assert V.vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert V.vqa_accuracy("the dog!", ["dog"] * 3 + other[:7]) == pytest.approx(0.9)
    # references get the punctuation step only when annotators disagree ...
    assert V.vqa_accuracy("t shirt", ["t-shirt"] * 4 + other[:6]) == 1.0
    # ... and never the number-word step: a reference "two" does not match (as in the official script)
    assert V.vqa_accuracy("two", ["two"] * 10) == 0.0
    with pytest.raises(Exception, match="at least 2"):
        V.vqa_accuracy("a", ["a"])


def test_auroc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert S.auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == 0.75
    assert S.auroc([1, 0], [0.3, 0.3]) == 0.5  # a tie counts half
    assert S.auroc([1, 0, 1], [0.2, 0.7, 0.7]) == 0.25  # one pair lost (0.2 < 0.7), one tied
    assert math.isnan(S.auroc([1, 1], [0.2, 0.3]))  # one class only
    assert S.average_ranks(np.array([5.0, 1.0, 5.0])).tolist() == [2.5, 1.0, 2.5]


def test_item_scores_per_metric(tmp_path):
    P = S.Prediction
    gqa = load_paper_set("gqa", make_gqa(tmp_path / "g"))
    assert S.item_scores(gqa, [P("Yes."), P("a cup")]).tolist() == [1.0, 0.0]  # exact match, no article rule
    vsr = load_paper_set("vsr", make_vsr(tmp_path / "v"))
    assert S.item_scores(vsr, [P("True, it is"), P("yes")]).tolist() == [1.0, 0.0]
    assert S.item_scores(vsr, [P("maybe"), P("No.")]).tolist() == [0.0, 1.0]
    icon = load_paper_set("iconqa", make_iconqa(tmp_path / "i"))
    assert S.item_scores(icon, [P("circle", 0), P("3", 0)]).tolist() == [1.0, 0.0]
    viz = load_paper_set("vizwiz", make_vizwiz(tmp_path / "z"))
    assert S.item_scores(viz, [P("Tomato soup"), P("Unanswerable.")]).tolist() == [1.0, 1.0]
    assert S.item_scores(viz, [P("soup"), P("red")]).tolist() == [1.0, 0.0]  # 4 of 10 said soup
    hm = load_paper_set("hateful_memes", make_hateful_memes(tmp_path / "h"))
    preds = [P("no", -1, 0.4), P("no", -1, 0.2)]
    assert S.item_scores(hm, preds).tolist() == [0.0, 1.0]  # accuracy of P(yes) > 0.5
    sc = S.Scorer(hm, n_boot=50, seed=0)
    assert sc.stat(sc.values(preds)) == 1.0  # AUROC: the hateful one ranked above
    with pytest.raises(Exception, match="expected 2 predictions"):
        S.item_scores(hm, preds[:1])


def test_scorer_intervals_and_paired_change(tmp_path):
    gqa = load_paper_set("gqa", make_gqa(tmp_path / "g"))
    sc = S.Scorer(gqa, n_boot=400, seed=0)
    ref = sc.values([S.Prediction("yes"), S.Prediction("cup")])
    got = sc.values([S.Prediction("yes"), S.Prediction("plate")])
    ci = sc.interval(got)
    assert ci.value == 0.5 and ci.low == 0.0 and ci.high == 1.0  # resampled means of {1, 0}: 0, .5, 1
    ch = sc.change(ref, got)
    assert ch.value == -0.5 and ch.high == 0.0 and ch.low == -1.0
    assert sc.change(ref, ref).to_dict()["low"] == 0.0  # paired: identical answers never differ
