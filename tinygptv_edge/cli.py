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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygptv-edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see `tinygptv-edge {name} --help`)")
            continue
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # import only the chosen command's module (keeps `run` free of torch)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
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
