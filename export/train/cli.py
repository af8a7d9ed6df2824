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
    p.add_argument("--vision-width", type=int, default=d.vision_width, help="EVA encoder width")
    p.add_argument("--vision-depth", type=int, default=d.vision_depth, help="EVA encoder blocks")
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr, help="vision pretraining peak rate")
    p.add_argument(
        "--pretrain-mirror",
        action=argparse.BooleanOptionalAction,
        default=d.pretrain_mirror,
        help="vision pretraining mirrors half of each batch left-right",
    )
    p.add_argument(
        "--conversations",
        type=float,
        default=d.conversations,
        help="share of training images that also open a multi-turn conversation (0: the shipped recipe)",
    )
    p.add_argument(
        "--exists", default=d.exists, help='exists questions: "one" (shipped) or "pair" (yes and no)'
    )
    p.add_argument("--camera-style", default=d.camera_style, help='camera chain: "v1" (shipped) or "v2"')
    p.add_argument(
        "--camera", type=float, default=d.camera, help="share of camera frames (default: the data's)"
    )
    p.add_argument(
        "--noisy-sigma",
        type=float,
        nargs=2,
        default=d.noisy_sigma,
        metavar=("LOW", "HIGH"),
        help="a noisy background's pixel noise range",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="train nothing: greedy exact match of --model (default: the shipped model) on every split",
    )
    p.add_argument("--model", default=None, help="with --eval-only: a single-checkpoint folder")
    p.set_defaults(func=run)


def evaluate_splits(model, tok, test_images: int, eval_images: int, seed: int) -> dict[str, dict]:
    """Greedy exact-match tables on every evaluation split (vqa.EVAL_SPLITS), with progress bars."""
    from tinygptv_edge.export.train.loop import evaluate_greedy
    from tinygptv_edge.export.train.vqa import EVAL_SPLITS

    tables = {}
    for name in EVAL_SPLITS:
        n = test_images if name == "test" else eval_images
        bar = tqdm(total=n, desc=f"{name} (greedy)", unit="image")
        tables[name] = evaluate_greedy(model, tok, name, n, seed, lambda d, n, bar=bar: bar.update(d - bar.n))
        bar.close()
    return tables


def print_tables(tables: dict[str, dict]) -> None:
    print(f"  {'type':<10} " + " ".join(f"{name:>13}" for name in tables))
    for qtype in tables["test"]:
        cells = [t[qtype]["accuracy"] if qtype in t else float("nan") for t in tables.values()]
        print(f"  {qtype:<10} " + " ".join(f"{v:>13.1%}" for v in cells))
    print(f"  {'questions':<10} " + " ".join(f"{t['all']['total']:>13}" for t in tables.values()))
    print(f"  {'of type':<10} " + " ".join(f"{t['all']['of_type']:>13.1%}" for t in tables.values()))
    for name, t in tables.items():
        extra = [k for k in t if k.startswith(("turn ", "question ", "follow", "second", "alone", "chat"))]
        if extra:
            print(f"  {name}: " + ", ".join(f"{k} {t[k]['accuracy']:.1%} ({t[k]['total']})" for k in extra))


def run_eval_only(args: argparse.Namespace) -> int:
    import torch

    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.checkpoints.single import load_single
    from tinygptv_edge.runtime.text.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    folder = args.model or default_model_dir()
    model = load_single(folder)[0]
    print(f"greedy exact match of {folder} per evaluation split:")
    tok = Tokenizer.from_file(folder)
    print_tables(evaluate_splits(model, tok, args.test_images, args.eval_images, args.seed))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.eval_only:
        return run_eval_only(args)
    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.train.loop import TrainConfig, save_default, train

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
        vision_width=args.vision_width,
        vision_depth=args.vision_depth,
        pretrain_lr=args.pretrain_lr,
        pretrain_mirror=args.pretrain_mirror,
        conversations=args.conversations,
        exists=args.exists,
        camera_style=args.camera_style,
        camera=args.camera,
        noisy_sigma=tuple(args.noisy_sigma),
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
        from tinygptv_edge.runtime.text.tokenizer import Tokenizer

        tok = Tokenizer.from_file(result.tokenizer_dir)
        tables = evaluate_splits(result.model, tok, cfg.test_images, cfg.eval_images, cfg.seed)
        others = {k: v for k, v in tables.items() if k != "test"}
        out = save_default(result, cfg, tables["test"], args.out or default_model_dir(), others)
    print(f"trained in {result.seconds / 60:.1f} min; greedy exact match per evaluation split:")
    print_tables(tables)
    print(f"wrote {out}")
    return 0
