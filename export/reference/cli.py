"""`tinygptv-edge reference`: answer a question about an image with the PyTorch reference model.

Source flags as on every command (export/checkpoints/source.py): `--model DIR` or the official files,
`--config`, `--template`, `--bos/--no-bos`.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from tinygptv_edge.export.checkpoints.source import add_source_args

    p = sub.add_parser("reference", help="answer a question about an image with the torch reference model")
    p.add_argument("--image", help="image file (JPEG, PNG, ...); omit for a text-only question")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print JSON: answer and token ids")
    add_source_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tinygptv_edge.export.checkpoints.source import spec_from_args
    from tinygptv_edge.export.reference.answer import image_pixels
    from tinygptv_edge.runtime.checks import check_threads
    from tinygptv_edge.runtime.errors import ConfigError

    if args.prompt is None:
        raise ConfigError("reference: expected --prompt (the question)")
    spec = spec_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads, "--threads"))
    loaded = spec.load()
    print(loaded.summary.format(), file=sys.stderr)
    model, tok = loaded.model, loaded.tokenizer
    ids = model.answer_ids(args.prompt, tok, image_pixels(loaded, args.image), args.max_new_tokens)
    text = model.answer_text(ids, tok)
    print(json.dumps({"answer": text, "token_ids": ids}) if args.json else text)
    return 0
