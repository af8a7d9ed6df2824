"""`tinygptv-edge serve`: the OpenAI-compatible server on the exported models (needs the serve extra).

tinygptv-edge serve                                   # models from dist/, http://127.0.0.1:8080
tinygptv-edge serve --vision V.onnx --language L.gguf --port 9000 --api-key KEY --cache-dir ~/.cache/tg

The model loads after the port is bound (/health says 503 "loading" meanwhile). When it does not load,
the server stops: the typed error on stderr, exit status 2. Once loaded, one line on stderr says what
was chosen: files and their levels, context, threads, memory mode, cache budgets.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli.args import add_kv_type_arg, add_model_args, add_runtime_args

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .engine import ServeConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with images, streaming and JSON schemas")
    m = p.add_argument_group("models")
    add_model_args(m)
    m.add_argument("--model-name", default="tinygptv-edge", help="the model id /v1/models reports")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument(
        "--api-key",
        default=os.environ.get("TINYGPTV_API_KEY"),
        help="require Bearer KEY on /v1/* (env TINYGPTV_API_KEY)",
    )
    h.add_argument(
        "--max-queue", type=int, default=8, help="requests that may wait behind the running one; more get 503"
    )
    h.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a request may take, queue wait included"
    )
    h.add_argument(
        "--shutdown-timeout", type=float, default=10.0, help="seconds in-flight requests get on shutdown"
    )
    h.add_argument(
        "--idle-timeout",
        type=float,
        default=15.0,
        help="seconds a connection may stay open with no request in progress, or not read what it is "
        "sent, before the server closes it",
    )
    h.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: data: URIs only)"
    )
    h.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API from a "
        "browser; repeat for more origins (default: none, same-origin only)",
    )
    h.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("runtime")
    add_runtime_args(r)
    add_kv_type_arg(r)
    r.add_argument("--cache-dir", help="keep image embeddings on disk here too (reused across restarts)")
    r.add_argument("--image-cache-size", type=int, default=64, help="image embeddings kept in memory")
    r.add_argument(
        "--cache-ram",
        type=int,
        metavar="MIB",
        help="host memory for KV snapshots of earlier prompts, so a repeated image or prompt is not "
        "evaluated again (default: 256, 0 in low-memory mode; 0 turns them off)",
    )
    r.add_argument("--max-tokens", type=int, default=300, help="answer length when a request gives none")
    r.add_argument(
        "--sample",
        action="store_true",
        help="sample with TinyGPT-V's defaults when a request gives no temperature",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..memory_plan import plan_memory
    from ..pipeline import Pipeline, default_model_paths
    from ..sampling import GREEDY, TINYGPTV

    try:
        from .app import create_app
        from .engine import Engine, ServeConfig
        from .server import Server, config
    except ImportError as e:
        raise ConfigError(
            f"serve needs the serve extra: pip install 'tinygptv-edge[serve]' (missing {e.name})"
        ) from e

    sampling = (TINYGPTV if args.sample else GREEDY).replace(max_new_tokens=args.max_tokens)
    cfg = ServeConfig(
        model_name=args.model_name,
        max_queue=args.max_queue,
        timeout=args.timeout,
        api_key=args.api_key,
        allow_remote_images=args.allow_remote_images,
        sampling=sampling,
    )
    vision, language = default_model_paths(args.dist, args.vision, args.language)  # fail before binding
    plan = plan_memory(args.low_memory, vision, language, args.n_ctx, kv_type=args.kv_type)
    if (plan.low_memory and plan.mode == "auto") or plan.tight:
        print(f"note: {plan.reason}", file=sys.stderr)

    def load() -> Pipeline:
        return Pipeline(
            vision,
            language,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            kv_type=args.kv_type,
            low_memory=plan.low_memory,
            image_cache_size=args.image_cache_size,
            image_cache_dir=args.cache_dir,
            cache_ram_mib=args.cache_ram,
        )

    if not _loopback(args.host) and cfg.api_key is None:
        print(
            f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    engine = Engine(load, cfg)
    engine.info = {
        "files": [str(vision), str(language)],
        "language": str(language),
        "quantization_level": _level(language),
    }
    for name in ("shutdown_timeout", "idle_timeout"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected seconds > 0, got {getattr(args, name)}")
    app = create_app(engine, cors_origins=args.cors)
    server = Server(
        config(app, args.host, args.port, args.idle_timeout, log_level=args.log_level),
        engine,
        args.shutdown_timeout,
    )

    def failed(e: BaseException) -> None:  # in the engine's worker thread
        print(f"error: the model did not load: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        server.should_exit = True  # uvicorn's loop polls it

    def ready(pipe: Pipeline) -> None:
        print(f"ready: {startup_summary(pipe, vision, language, args, cfg)}", file=sys.stderr, flush=True)

    engine.on_failed, engine.on_ready = failed, ready
    server.run()
    if engine.state == "failed" or engine.exception is not None:
        return 2
    return 0


def startup_summary(
    pipe: Pipeline, vision: Path, language: Path, args: argparse.Namespace, cfg: ServeConfig
) -> str:
    """What was chosen, in one line: files and levels, context, threads, memory mode, cache budgets."""
    from ..checks import cpu_count
    from ..memory_plan import vision_file_bytes

    mib = 1 << 20
    snapshots = pipe.prefix.snapshot_bytes // mib
    disk = f", on disk in {args.cache_dir}" if args.cache_dir else ""
    s = cfg.sampling
    sampling = f"sampled (temperature {s.temperature}, top_p {s.top_p})" if s.do_sample else "greedy"
    return (
        f"vision {vision} ({_level(vision)}, {vision_file_bytes(vision) // mib} MiB), "
        f"language {language} ({_level(language)}, {language.stat().st_size // mib} MiB); "
        f"context {pipe.n_ctx} positions; threads {args.threads or cpu_count()}; "
        f"memory mode {'low-memory (one model resident)' if pipe.low_memory else 'resident'}; "
        f"KV snapshot cache {snapshots} MiB; image cache {pipe.image_cache_size} embeddings{disk}; "
        f"default answer {s.max_new_tokens} tokens, {sampling}; queue {cfg.max_queue}"
    )


def _level(path: Path) -> str:
    """The quantization level a model file's name says (int8, fp32, q4_0, q8_0, f16, ...), else '?'."""
    parts = path.name.split(".")
    return parts[-2] if len(parts) >= 3 else "?"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
