"""Scene supervision of the vision tower (export/train/scene.py) and the position table init."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from tinygptv_edge.export.train import scene as ts  # noqa: E402
from tinygptv_edge.export.train import vqa  # noqa: E402
from tinygptv_edge.export.train.loop import sincos_2d  # noqa: E402
from tinygptv_edge.runtime.config import small_config  # noqa: E402


def test_shape_mask_follows_drawing_order():
    a = vqa.Shape("square", "red", 0.5, 0.5, 0.2)
    b = vqa.Shape("circle", "blue", 0.55, 0.5, 0.1)  # drawn later, on top of a
    mask = vqa.shape_mask(vqa.Scene((a, b), "plain"), 100)
    assert mask[50, 55] == 2 and mask[50, 36] == 1 and mask[5, 5] == 0
    assert set(mask.flatten().tolist()) == {0, 1, 2}


def test_patch_labels_name_the_shape_under_each_patch():
    s = vqa.Shape("triangle", "green", 0.375, 0.625, 0.12)  # centre of cell (col 1, row 2) of 4 x 4
    colour, kind, offset = ts.patch_labels(vqa.Scene((s,), "plain"), grid=4)
    p = 2 * 4 + 1  # row-major, as the encoder flattens its patch grid
    assert colour[p] == 1 + list(vqa.COLOURS).index("green") and kind[p] == 1 + vqa.SHAPES.index("triangle")
    assert offset[p] == pytest.approx((0.0, 0.0), abs=1e-6)
    assert (colour > 0).sum() == 1 and (kind[colour == 0] == 0).all()


def test_scene_targets_and_loss_on_the_generator():
    cfg = small_config(64)
    scenes = [vqa.sample("train", i).scene for i in range(6)]
    t = ts.scene_targets(scenes, cfg)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    assert t.patch_colour.shape == (6, grid * grid) and t.xy.shape == (6, len(vqa.COLOURS), 2)
    assert t.count.tolist() == [len(s.shapes) for s in scenes]
    assert (t.present.sum(1).long() == t.count).all()
    assert ((t.kind != ts.IGNORE) == t.present.bool()).all()
    from tinygptv_edge.export.model.tinygptv import TinyGPTV

    torch.manual_seed(0)
    model, heads = TinyGPTV(cfg), ts.SceneHeads(cfg)
    pixels = torch.randn(6, 3, cfg.vision.image_size, cfg.vision.image_size)
    loss = ts.scene_loss(heads(model, pixels), t)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.vision.encoder.patch_embed.weight.grad.abs().sum() > 0
    acc = ts.scene_accuracy(heads, model, pixels, t)
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_sincos_2d_is_smooth_and_distinct():
    table = sincos_2d(4, 128)
    assert table.shape == (16, 128)
    d = torch.cdist(table, table)
    assert (d + torch.eye(16) * 1e9).min() > 0.1  # every position distinct
    # neighbours are closer than far cells: (0,0)-(0,1) vs (0,0)-(0,3)
    assert d[0, 1] < d[0, 3] and d[0, 4] < d[0, 12]


def test_word_anchors_find_the_named_shape():
    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    tok = Tokenizer.from_file(default_model_dir())
    red, circle = tok.encode(" red")[0], tok.encode(" circle")[0]
    suffixes = [tok.encode("Is the red circle on the left?"), tok.encode("How many shapes are there?")]
    anchors = ts.find_anchors(suffixes, tok)
    assert anchors.colour == [(0, suffixes[0].index(red), list(vqa.COLOURS).index("red"))]
    assert anchors.kind == [(0, suffixes[0].index(circle), vqa.SHAPES.index("circle"))]

    shapes = (vqa.Shape("circle", "red", 0.2, 0.7, 0.1), vqa.Shape("square", "blue", 0.7, 0.2, 0.1))
    scenes = ts.scene_targets([vqa.Scene(shapes, "plain")], small_config(64))
    heads = ts.AnchorHeads(8)
    hidden = torch.zeros(2, 3 + len(suffixes[0]), 8, requires_grad=True)
    loss = ts.anchor_loss(heads, hidden, [0, 1], torch.tensor([0, 0]), anchors, scenes, offset=3)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    touched = hidden.grad.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert touched == sorted(3 + p for _, p, _ in anchors.colour + anchors.kind)  # only the named words


def test_a_small_shape_labels_the_patch_under_its_centre():
    s = vqa.Shape("cross", "blue", 0.6, 0.4, 0.05)  # far less than MIN_COVER of a 16 px patch
    colour, kind, offset = ts.patch_labels(vqa.Scene((s,), "plain"), grid=4)
    p = 1 * 4 + 2  # row 1, column 2
    assert colour[p] == 1 + list(vqa.COLOURS).index("blue") and kind[p] == 1 + vqa.SHAPES.index("cross")
    assert np.allclose(offset[p], (0.6 - 0.625, 0.4 - 0.375))
    assert (colour > 0).sum() == 1


def test_mirror_matches_the_mirrored_scene():
    cfg = small_config(64)
    shapes = (vqa.Shape("triangle", "red", 0.375, 0.625, 0.1), vqa.Shape("cross", "blue", 0.875, 0.125, 0.1))
    scene = vqa.Scene(shapes, "plain")
    mirrored = vqa.Scene(tuple(vqa.Shape(s.kind, s.colour, 1 - s.x, s.y, s.r) for s in shapes), "plain")
    t = ts.scene_targets([scene, scene], cfg)
    want = ts.scene_targets([scene, mirrored], cfg)
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    x, got = ts.mirror(pixels, t, torch.tensor([False, True]))
    assert torch.equal(x[0], pixels[0]) and torch.equal(x[1], pixels[1].flip(-1))
    for f in ts.SceneTargets.__dataclass_fields__:
        assert torch.allclose(getattr(got, f).float(), getattr(want, f).float(), atol=1e-6), f
