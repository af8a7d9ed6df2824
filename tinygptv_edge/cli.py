"""`tinygptv-edge` command line: a thin dispatcher over the library.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds
its parser and sets `func`. Modules are imported only when listed here, and the runtime's commands
never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from tinygptv_edge.runtime.errors import TinyGPTVError

# subcommand -> module with `register(subparsers)`
COMMANDS = {
    "synth": "tinygptv_edge.export.checkpoints.synth_cli",
    "export-onnx": "tinygptv_edge.export.onnx.cli",
    "export-gguf": "tinygptv_edge.export.gguf.cli",
    "train": "tinygptv_edge.export.train.cli",
    "reference": "tinygptv_edge.export.reference.cli",
    "run": "tinygptv_edge.runtime.cli.run",
    "serve": "tinygptv_edge.runtime.serve.cli",
    "bench": "tinygptv_edge.runtime.cli.device_bench",
    "report": "tinygptv_edge.calib.cli",
}


# llama.cpp's flags (llama-cli, llama-server, llama-mtmd-cli) -> what this CLI calls them
LLAMA_CPP_FLAGS = {
    "-m": "--language L.gguf (and --vision V.onnx), or --dist DIR with both",
    "--model": "--language L.gguf (and --vision V.onnx), or --dist DIR with both",
    "--mmproj": "--vision V.onnx (the vision graph)",
    "-p": "--prompt (tinygptv-edge run)",
    "-c": "--n-ctx",
    "--ctx-size": "--n-ctx",
    "-t": "--threads",
    "-n": "--max-new-tokens (run) or --max-tokens (serve)",
    "--n-predict": "--max-new-tokens (run) or --max-tokens (serve)",
    "--temp": "--temperature (tinygptv-edge run)",
    "-ngl": "nothing: this runtime runs on the CPU",
    "--n-gpu-layers": "nothing: this runtime runs on the CPU",
    "--image": "--image (tinygptv-edge run)",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygptv-edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see `tinygptv-edge {name} --help`)")
            continue
        importlib.import_module(module).register(sub)
    parser.set_defaults(_subparsers=sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argv parsed; an unknown flag is reported with the subcommand's usage (not the top level's), and
    a llama.cpp habit (-m, -p, --mmproj, ...) with a hint naming this CLI's flag."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    command = args._subparsers.choices[args.command]
    hints = [
        f"{flag}: llama.cpp's flag; here use {LLAMA_CPP_FLAGS[flag.split('=', 1)[0]]}"
        for flag in extra
        if flag.split("=", 1)[0] in LLAMA_CPP_FLAGS
    ]
    command.error(f"unrecognized arguments: {' '.join(extra)}" + "".join(f"\n  hint: {h}" for h in hints))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # import only the chosen command's module (keeps `run` free of torch)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parse(parser, argv)
    try:
        return int(args.func(args) or 0)
    except TinyGPTVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`... | head`): stop quietly, as a SIGPIPE'd tool would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit flush must not fail again
        return 128 + getattr(signal, "SIGPIPE", 13)


if __name__ == "__main__":
    sys.exit(main())
