"""Benchmark (not a test): the stage-1 probe, vision pretraining alone, for comparing vision recipes.

    scene settings (vqa.DATASETS[--data], optional --min-radius)
        --> N training + M validation images, preprocessed at --image-size, scene labels at the patch grid
    TrainConfig(image_size, patch_size, vision_width, vision_depth, pretrain_*) --> small TinyGPT-V
        --> init_weights --> pretrain_vision (the recipe's stage 1: the scene heads of scene.py)
    scene heads on the validation images (and on the first training images, for the gap): present, kind,
        centre within 0.05, count, background; per-patch kind on foreground patches; kind per shape
        size in the model's input (radius x the frame's squeeze, a fraction of the side)
    wall time, process CPU time, load average before and after (the machine may be shared)

Run from the repository root, one probe per process (threads 1):

    .venv/bin/python bench/vision_probe.py --image-size 128 --patch-size 16 --steps 1500 --json /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# shape radius in the model's input, as a fraction of its side (x 64: pixels of the 64 px input)
RADIUS_BUCKETS = (0.0, 0.047, 0.07, 0.094, 0.14, 1.0)


def make_split(split: str, n: int, seed: int, scene_cfg, model_cfg, cache: str | None = None):
    """(pixels, SceneTargets, per-slot radius in the input (N, colours; fraction of its side), per-image
    camera flag),
    kept in `cache` (a folder) by the settings that make them."""
    import hashlib

    import torch

    from tinygptv_edge.export.train.scene import SceneTargets

    key = repr((split, n, seed, scene_cfg, model_cfg.vision.image_size, model_cfg.vision.patch_size))
    path = Path(cache, hashlib.sha256(key.encode()).hexdigest()[:16] + ".pt") if cache else None
    if path and path.exists():
        d = torch.load(path, weights_only=True)
        t = SceneTargets(*(d[f] for f in SceneTargets.__dataclass_fields__))
        return d["pixels"], t, d["radius"].numpy(), d["camera"].numpy()
    out = _make_split(split, n, seed, scene_cfg, model_cfg)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        d = {f: getattr(out[1], f) for f in SceneTargets.__dataclass_fields__}
        d.update(pixels=out[0], radius=torch.from_numpy(out[2]), camera=torch.from_numpy(out[3]))
        torch.save(d, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return out


def _make_split(split: str, n: int, seed: int, scene_cfg, model_cfg):
    import torch

    from tinygptv_edge.export.train.scene import scene_targets
    from tinygptv_edge.export.train.vqa import COLOURS, iter_samples
    from tinygptv_edge.runtime.vision.preprocess import preprocess

    colours = list(COLOURS)
    pixels, scenes = [], []
    radius = np.zeros((n, len(colours)), np.float32)
    camera = np.zeros(n, bool)
    for i, s in enumerate(iter_samples(split, n, seed, scene_cfg)):
        pixels.append(preprocess(s.image, model_cfg.preprocess))
        scenes.append(s.scene)
        camera[i] = s.image.size != (scene_cfg.image_size, scene_cfg.image_size)
        squeeze = min(s.scene.frame.sx, s.scene.frame.sy)
        for sh in s.scene.shapes:
            radius[i, colours.index(sh.colour)] = sh.r * squeeze
    return torch.from_numpy(np.stack(pixels)), scene_targets(scenes, model_cfg), radius, camera


def evaluate(heads, model, pixels, targets, radius, camera) -> dict:
    import torch

    from tinygptv_edge.export.train.scene import IGNORE, scene_accuracy

    model.eval()
    acc = scene_accuracy(heads, model, pixels, targets)
    with torch.no_grad():
        out = heads(model, pixels)
    shown = targets.kind != IGNORE
    hit = (out["kind"].argmax(-1) == targets.kind)[shown].numpy()
    r = radius[shown.numpy()]
    cam = np.broadcast_to(camera[:, None], radius.shape)[shown.numpy()]
    fg = targets.patch_kind > 0
    acc["patch_kind"] = float((out["patch_kind"].argmax(-1) == targets.patch_kind)[fg].float().mean())
    by_size = {}
    for lo, hi in zip(RADIUS_BUCKETS, RADIUS_BUCKETS[1:], strict=False):
        sel = (r >= lo) & (r < hi)
        if sel.any():
            by_size[f"r {lo:g}-{hi:g}"] = {"kind": float(hit[sel].mean()), "shapes": int(sel.sum())}
    acc["kind_by_radius"] = by_size
    acc["kind_camera"] = float(hit[cam].mean()) if cam.any() else None
    acc["kind_square_images"] = float(hit[~cam].mean()) if (~cam).any() else None
    model.train()
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="varied")
    ap.add_argument("--min-radius", type=float, default=None, help="override the scene settings' min radius")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--vision-width", type=int, default=128)
    ap.add_argument("--vision-depth", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--val-images", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--mirror", action="store_true", help="mirror half of each batch left-right")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--cache", default=None, help="keep the generated images in this folder")
    args = ap.parse_args(argv)

    import torch

    from tinygptv_edge.export.model.tinygptv import TinyGPTV
    from tinygptv_edge.export.train.loop import TrainConfig, init_weights, model_config, pretrain_vision
    from tinygptv_edge.export.train.scene import SceneHeads
    from tinygptv_edge.export.train.vqa import DATASETS

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = TrainConfig(
        seed=args.seed,
        data=args.data,
        train_images=args.train_images,
        image_size=args.image_size,
        patch_size=args.patch_size,
        vision_width=args.vision_width,
        vision_depth=args.vision_depth,
        pretrain_steps=args.steps,
        pretrain_images_per_step=args.batch,
        pretrain_lr=args.lr,
        pretrain_mirror=args.mirror,
        warmup=args.warmup,
        threads=args.threads,
    )
    scene_cfg = DATASETS[args.data]
    if args.min_radius is not None:
        scene_cfg = replace(scene_cfg, min_radius=args.min_radius)
    model_cfg = model_config(cfg, 512)
    load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    train = make_split("train", args.train_images, args.seed, scene_cfg, model_cfg, args.cache)
    val = make_split("validation", args.val_images, args.seed, scene_cfg, model_cfg, args.cache)
    data_s = time.perf_counter() - wall0
    print(f"data: {args.train_images} + {args.val_images} images in {data_s:.0f} s", flush=True)

    model = TinyGPTV(model_cfg)
    init_weights(model)
    heads = SceneHeads(model_cfg)
    curve = []
    seen = min(args.val_images, args.train_images)
    t_train = time.perf_counter()

    def progress(stage, done, total, info):
        if done % 100 == 0:
            took = time.perf_counter() - t_train
            print(f"step {done}/{total} loss {info['loss']:.3f} {took:.0f} s", flush=True)
        if done % args.eval_every == 0 and done < total:
            a = evaluate(heads, model, *val)
            curve.append({"step": done, "kind": a["kind"], "present": a["present"], "count": a["count"]})
            print(f"  val at {done}: kind {a['kind']:.3f} present {a['present']:.3f}", flush=True)

    pretrain_vision(model, heads, train[0], train[1], cfg, progress)
    train_s = time.perf_counter() - t_train
    result = {
        "args": vars(args),
        "min_radius": scene_cfg.min_radius,
        "vision_parameters": sum(p.numel() for p in model.vision.parameters()),
        "val": evaluate(heads, model, *val),
        "train_first": evaluate(
            heads, model, train[0][:seen], train[1][torch.arange(seen)], train[2][:seen], train[3][:seen]
        ),
        "curve": curve,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
