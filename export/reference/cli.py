"""`tinygptv-edge reference`: answer a question about an image with the PyTorch reference model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="answer a question about an image with the torch reference model")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--question", required=True)
    p.add_argument("--model", default=None, help="single-checkpoint folder (default: the shipped model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinygptv_edge.export.reference.answer import answer_image

    print(answer_image(args.image, args.question, args.model, args.max_new_tokens))
    return 0
