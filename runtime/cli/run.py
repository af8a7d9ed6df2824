"""`tinygptv-edge run`: answer a question about an image (or chat), no torch involved.

tinygptv-edge run --image cat.jpg --prompt "What is this?"            # models from dist/
tinygptv-edge run --vision V.onnx --language L.gguf --image cat.jpg --prompt "..." --stream
tinygptv-edge run --image cat.jpg --prompt "..." --json                 # answer + timings as JSON
tinygptv-edge run --chat [--image first.jpg]                            # interactive; /help inside
"""

from __future__ import annotations

import argparse
import json
import sys

from .args import add_kv_type_arg, add_model_args, add_runtime_args

CHAT_HELP = """commands: /image PATH  attach an image to your next question
          /reset       start a new conversation
          /quit        leave (or Ctrl-D)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer a question about an image with the exported models (no torch)")
    add_model_args(p)
    p.add_argument(
        "--image", help="image file (JPEG, PNG, WEBP, GIF, BMP, TIFF); omit for a text-only question"
    )
    p.add_argument("--prompt", help="the question; omit (or give --chat) for an interactive chat")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON (answer, stop reason, timings); with --stream, JSON lines",
    )
    g = p.add_argument_group(
        "sampling (default: greedy; --sample or --temperature T > 0 samples, --temperature 0 is greedy)"
    )
    g.add_argument("--sample", action="store_true", help="sample with TinyGPT-V's defaults (top_p 0.9, ...)")
    g.add_argument("--max-new-tokens", type=int, default=300)
    g.add_argument(
        "--temperature", type=float, help="> 0: sample at this temperature (implies --sample); 0: greedy"
    )
    g.add_argument("--top-k", type=int, help="when sampling: keep the K likeliest tokens")
    g.add_argument("--top-p", type=float, help="when sampling: keep the smallest set of mass P")
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="when sampling: the random seed (repeatable answers)")
    runtime = p.add_argument_group("runtime")
    add_runtime_args(runtime)
    add_kv_type_arg(runtime)
    p.set_defaults(func=run)


def sampling_from_args(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..sampling import GREEDY, TINYGPTV

    base = TINYGPTV if args.sample else GREEDY
    changes: dict = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:  # llama.cpp's habit: a temperature > 0 samples, 0 is greedy
        if args.temperature < 0:
            raise ConfigError(f"--temperature: expected a number >= 0 (0: greedy), got {args.temperature}")
        changes["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            changes["temperature"] = args.temperature
    sampling = changes.get("do_sample", base.do_sample)
    for name in ("top_k", "top_p", "seed"):
        value = getattr(args, name)
        if value is not None:
            if not sampling:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} applies only when sampling: add --sample or --temperature T > 0 "
                    "(greedy decoding has no randomness to shape)"
                )
            changes[name] = value
    if args.repetition_penalty is not None:
        changes["repetition_penalty"] = args.repetition_penalty
    return base.replace(**changes)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..memory_plan import plan_memory
    from ..pipeline import Pipeline, default_model_paths

    sampling = sampling_from_args(args)  # bad values fail before any model loads
    vision, language = default_model_paths(args.dist, args.vision, args.language)
    plan = plan_memory(args.low_memory, vision, language, args.n_ctx, kv_type=args.kv_type)
    if (plan.low_memory and plan.mode == "auto") or plan.tight:
        print(f"note: {plan.reason}", file=sys.stderr)
    with tqdm(
        total=1, desc="loading models", disable=args.json or not sys.stderr.isatty(), leave=False
    ) as bar:
        pipe = Pipeline(
            vision,
            language,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            kv_type=args.kv_type,
            low_memory=plan.low_memory,
        )
        bar.update(1)
    with pipe:
        if args.chat or args.prompt is None:
            return chat_loop(pipe, sampling, args)
        turn = pipe.chat(sampling).stream(args.prompt, args.image)
        show(turn, args)
    return 0


def show(turn, args: argparse.Namespace) -> None:
    """Print one turn: streamed or whole, as text or JSON. The turn is closed even when printing
    fails (a closed stdout), so the pipeline is free again."""
    with turn:
        _show(turn, args)


def _show(turn, args: argparse.Namespace) -> None:
    if args.stream:
        for piece in turn:
            if args.json:
                print(json.dumps({"piece": piece}), flush=True)
            else:
                print(piece, end="", flush=True)
        if not args.json:
            print()
    else:
        for _ in turn:
            pass
    answer = turn.answer
    if args.json:
        t = answer.timings
        print(
            json.dumps(
                {
                    "answer": answer.text,
                    "stop": answer.stop,
                    "tokens": len(answer.token_ids),
                    "timings": {
                        "image_ms": round(t.image_ms, 2),
                        "prefill_tokens": t.prefill_tokens,
                        "prefill_tok_s": round(t.prefill_tok_s, 2),
                        "decode_tokens": t.decode_tokens,
                        "decode_tok_s": round(t.decode_tok_s, 2),
                        "first_token_ms": round(t.first_token_ms, 2),
                    },
                }
            ),
            flush=True,
        )
    elif not args.stream:
        print(answer.text)


def read_line(stream) -> str | None:
    """One line of stdin as text, None at its end. Bytes that are not UTF-8 are kept as lone
    surrogates (the question check then names them) instead of ending the session."""
    raw = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline()
    if not raw:
        return None
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw


def chat_loop(pipe, sampling, args: argparse.Namespace) -> int:
    from ..errors import TinyGPTVError
    from ..vision.images import load_image

    chat = pipe.chat(sampling)
    image = args.image
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = read_line(sys.stdin)
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif line == "/reset":
            chat, image = pipe.chat(sampling), None
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                load_image(path, pipe.image_limits)  # checked now, so a bad file is refused here
                image = path
            except TinyGPTVError as e:
                print(f"error: {e} (no image attached)", file=sys.stderr)
        else:
            try:
                show(chat.stream(line, image), args)
            except TinyGPTVError as e:  # a bad image or an over-long question: the chat goes on
                print(f"error: {e}", file=sys.stderr)
            finally:
                image = None  # an image goes with one question, answered or not
