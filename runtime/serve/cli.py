"""`tinygptv-edge serve`: the OpenAI-compatible server on the exported models (needs the serve extra).

tinygptv-edge serve                                   # models from dist/, http://127.0.0.1:8080
tinygptv-edge serve --vision V.onnx --language L.gguf --port 9000 --api-key KEY --cache-dir ~/.cache/tg
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..cli.args import add_model_args, add_runtime_args


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
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: data: URIs only)"
    )
    h.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("runtime")
    add_runtime_args(r)
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
        import uvicorn

        from .app import create_app
        from .engine import Engine, ServeConfig
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
    plan = plan_memory(args.low_memory, vision, language, args.n_ctx)
    if (plan.low_memory and plan.mode == "auto") or plan.tight:
        print(f"note: {plan.reason}", file=sys.stderr)

    def load() -> Pipeline:
        return Pipeline(
            vision,
            language,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
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
    uvicorn.run(
        create_app(Engine(load, cfg)),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
