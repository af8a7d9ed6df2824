"""`tinygptv-edge train`: train the shipped default model from scratch and write export/default_model/."""

from __future__ import annotations

import argparse
import tempfile

from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.train.loop import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train the small default TinyGPT-V on the synthetic VQA set")
    p.add_argument("--out", default=None, help="output folder (default: the shipped export/default_model/)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=d.data, help="scene settings to train on (export/train/vqa.py DATASETS)")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="vision pretraining steps")
    p.add_argument("--steps", type=int, default=d.steps, help="VQA training steps")
    p.add_argument("--train-images", type=int, default=d.train_images)
    p.add_argument("--test-images", type=int, default=d.test_images)
    p.add_argument("--eval-images", type=int, default=d.eval_images, help="images per other evaluation split")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validation every this many steps")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--image-size", type=int, default=d.image_size, help="the model's square input, pixels")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="vision patch size, pixels")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.train.loop import TrainConfig, evaluate_greedy, save_default, train
    from tinygptv_edge.export.train.vqa import EVAL_SPLITS

    cfg = TrainConfig(
        seed=args.seed,
        data=args.data,
        steps=args.steps,
        pretrain_steps=args.pretrain_steps,
        train_images=args.train_images,
        test_images=args.test_images,
        eval_images=args.eval_images,
        eval_every=args.eval_every,
        threads=args.threads,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "data":
            if done == 0:
                print(f"generating {cfg.train_images} training images ...")
            return
        if stage == "scene":
            read = ", ".join(f"{k} {v:.3f}" for k, v in info.items())
            tqdm.write(f"scene heads on validation images: {read}")
            return
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="step")
        bar = bars[stage]
        post = {"loss": f"{info['loss']:.3f}"}
        if "exact" in info:
            post["batch_exact"] = f"{info['exact']:.2f}"
        if "val" in info:
            post["val_exact"] = f"{info['val']:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(done - bar.n)

    with tempfile.TemporaryDirectory(prefix="tinygptv-train-") as work:
        result = train(cfg, work, progress)
        for bar in bars.values():
            bar.close()
        from tinygptv_edge.runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_file(result.tokenizer_dir)
        tables = {}
        for name in EVAL_SPLITS:
            n = cfg.test_images if name == "test" else cfg.eval_images
            bar = tqdm(total=n, desc=f"{name} (greedy)", unit="image")
            tables[name] = evaluate_greedy(
                result.model, tok, name, n, cfg.seed, lambda d, n, bar=bar: bar.update(d - bar.n)
            )
            bar.close()
        test = tables.pop("test")
        out = save_default(result, cfg, test, args.out or default_model_dir(), tables)
    print(f"trained in {result.seconds / 60:.1f} min; greedy exact match per evaluation split:")
    print(f"  {'type':<10} " + " ".join(f"{name:>13}" for name in EVAL_SPLITS))
    for qtype in test:
        cells = [t[qtype]["accuracy"] if qtype in t else float("nan") for t in (test, *tables.values())]
        print(f"  {qtype:<10} " + " ".join(f"{v:>13.1%}" for v in cells))
    print(f"wrote {out}")
    return 0
