"""A live `serve` app on 127.0.0.1 (uvicorn in a thread) over the tiny exports, for tests/test_serve*.py."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image


def export_files(tiny, out):
    """The tiny model as the server loads it: FP32 ONNX vision graph + F32 GGUF."""
    from tinygptv_edge.export.gguf.export import export_gguf
    from tinygptv_edge.export.onnx.export import export_vision

    onnx_path = export_vision(tiny.model, out).path
    gguf_path = out / "language.f32.gguf"
    export_gguf(tiny.model, tiny.tokenizer, gguf_path, "F32")
    return onnx_path, gguf_path


def loader(files, delay: float = 0.0, **kw):
    """A Pipeline factory for Engine; `delay` > 0 puts a SlowDecoder under it."""
    from tinygptv_edge.runtime.pipeline import Pipeline

    def load():
        if delay:
            from tinygptv_edge.runtime.language.decoder import Decoder
            from tinygptv_edge.runtime.pipeline import trained_context

            n_ctx = trained_context(files[1])
            return Pipeline(files[0], lambda: SlowDecoder(Decoder(files[1], n_ctx, 1), delay), **kw)
        return Pipeline(files[0], files[1], n_threads=1, **kw)

    return load


def png(seed: int, size=(80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(text: str, image: bytes | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts}


class SlowDecoder:
    """A decoder that sleeps `delay` s per evaluation and counts them (to watch generation stop)."""

    def __init__(self, decoder, delay: float):
        self._dec, self.delay, self.evals = decoder, delay, 0

    def __getattr__(self, name):
        return getattr(self._dec, name)

    def eval_tokens(self, ids, all_logits=False):
        self.evals += 1
        time.sleep(self.delay)
        return self._dec.eval_tokens(ids, all_logits)

    def eval_embeddings(self, embeds, all_logits=False):
        self.evals += 1
        time.sleep(self.delay)
        return self._dec.eval_embeddings(embeds, all_logits)


class LiveServer:
    """`create_app(Engine(load, cfg))` served by uvicorn on an ephemeral loopback port."""

    def __init__(
        self,
        load,
        cfg=None,
        shutdown_timeout: float = 5.0,
        wait_ready: bool = True,
        idle_timeout: float = 15.0,
    ):
        from tinygptv_edge.runtime.serve.app import create_app
        from tinygptv_edge.runtime.serve.engine import Engine
        from tinygptv_edge.runtime.serve.server import Server, config

        self.engine = Engine(load, cfg)
        app = create_app(self.engine)
        self.server = Server(
            config(app, "127.0.0.1", 0, idle_timeout, log_level="warning"), self.engine, shutdown_timeout
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.state == "loading":
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load")
            time.sleep(0.02)
        if self.engine.state != "ready":
            raise RuntimeError(f"the model failed to load: {self.engine.error}")

    def client(self, **kw):
        import openai

        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def require_serve_stack() -> None:
    """Skip the calling test module unless torch (the fixtures export the tiny model), the decoder and the
    serve extra are installed. Call it at module level, before importing the server."""
    pytest.importorskip("torch")
    pytest.importorskip("tinygptv_edge.runtime.language.decoder")
    for mod in ("starlette", "uvicorn", "pydantic", "llguidance"):
        pytest.importorskip(mod, reason="the serve extra is not installed (pip install -e '.[serve]')")


def serve_argv(vision, language, *more: str) -> list[str]:
    """The `tinygptv-edge serve` command line on these two files, as a subprocess runs it."""
    import sys

    return [sys.executable, "-m", "tinygptv_edge.cli", "serve", "--vision", str(vision), "--language",
            str(language), *more]  # fmt: skip
