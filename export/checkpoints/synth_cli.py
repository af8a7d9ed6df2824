"""`tinygptv-edge synth`: write random-weight checkpoints in the official formats."""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic checkpoints in the official TinyGPT-V formats")
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument(
        "--config", help="TinyGPTVConfig JSON instead of --size (any sizes; the LoRA rank is lora.r)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--stage", type=int, default=3, choices=[1, 2, 3, 4], help="with --size (a config has its own)"
    )
    p.add_argument("--phi-layout", default="hf", choices=["hf", "tinygptv", "msft"])
    p.add_argument("--peft-style", default="0.2.0", choices=["0.2.0", "new"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tinygptv_edge.export.checkpoints.synth import synth_preset, synthesize
    from tinygptv_edge.runtime.config import TinyGPTVConfig

    if args.config:
        cfg, dtype = TinyGPTVConfig.load(args.config), torch.float32
    else:
        cfg, dtype = synth_preset(args.size, args.stage)
    steps = tqdm(total=5, desc=f"synth {args.config or args.size}", unit="file")
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        steps.set_postfix_str(msg)
        steps.update(1)

    res = synthesize(
        args.out,
        cfg,
        seed=args.seed,
        phi_layout=args.phi_layout,
        peft_style=args.peft_style,
        dtype=dtype,
        progress=progress,
    )
    steps.close()
    print(
        f"wrote {res.phi2}, {res.eva.name}, {res.blip2.name}, {res.stage.name} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
