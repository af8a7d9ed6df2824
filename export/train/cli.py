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
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="vision pretraining steps")
    p.add_argument("--steps", type=int, default=d.steps, help="VQA training steps")
    p.add_argument("--train-images", type=int, default=d.train_images)
    p.add_argument("--test-images", type=int, default=d.test_images)
    p.add_argument("--threads", type=int, default=d.threads)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.checkpoints.default import default_model_dir
    from tinygptv_edge.export.train.loop import TrainConfig, evaluate_greedy, save_default, train

    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        pretrain_steps=args.pretrain_steps,
        train_images=args.train_images,
        test_images=args.test_images,
        threads=args.threads,
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
        test_bar = tqdm(total=cfg.test_images, desc="test (greedy)", unit="image")
        from tinygptv_edge.runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_file(result.tokenizer_dir)
        test = evaluate_greedy(
            result.model, tok, "test", cfg.test_images, cfg.seed, lambda d, n: test_bar.update(d - test_bar.n)
        )
        test_bar.close()
        out = save_default(result, cfg, test, args.out or default_model_dir())
    print(f"trained in {result.seconds / 60:.1f} min; greedy exact match on the test split:")
    print(f"  {'type':<10} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for qtype, row in test.items():
        print(f"  {qtype:<10} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>9.1%}")
    print(f"wrote {out}")
    return 0
