"""uvicorn's Server as `serve` runs it: a bounded shutdown that exits 0, and no idle connection kept.

Shutdown (SIGTERM, SIGINT, or `should_exit`): uvicorn stops accepting and closes idle connections;
in-flight requests (running or queued) get `shutdown_timeout` seconds to finish; then the Engine
cancels what is left (a running answer ends at its next token): a plain request gets 503
`shutting_down`, a stream its error event and its end, so every client gets a whole answer or a clean
error. uvicorn's own deadline comes `GRACE` s later (it only cancels handler tasks, which would cut
answers short). The lifespan then closes the Engine (models freed after the running turn), and the
process exits 0: uvicorn would re-raise the signal after a graceful stop (exit status -15).
A second SIGINT forces the exit (uvicorn's Ctrl+C twice).

Connections: one that has had no request in progress for a whole `idle_timeout` period (it connected
and sent nothing, or a partial request head, or nothing after its last answer) is closed, so idle or
slow-header clients cannot pile up until the process runs out of file descriptors; a client that does
not read what it is sent for `idle_timeout` s (the server's write buffer stays full) is disconnected,
which cancels its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import threading
from collections.abc import Iterator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .engine import Engine

GRACE = 5.0  # seconds between cancelling the jobs and uvicorn cancelling the handlers
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float):
        config.timeout_graceful_shutdown = math.ceil(shutdown_timeout + GRACE)  # uvicorn's is whole seconds
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.engine.cancel_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal afterwards: a graceful stop exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def config(app, host: str, port: int, idle_timeout: float, **kw) -> uvicorn.Config:
    """uvicorn's Config with the h11 protocol below."""
    return uvicorn.Config(app, host=host, port=port, http=idle_closing_h11(idle_timeout), **kw)


def idle_closing_h11(idle_timeout: float) -> type[H11Protocol]:
    class IdleClosingH11(H11Protocol):
        """h11, closing a connection idle for a whole `idle_timeout` period or not read from for as long."""

        _timer: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._seen = self.cycle
            self._timer = self.loop.call_later(idle_timeout, self._check)

        def _check(self) -> None:
            if self.transport.is_closing():
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.cycle is self._seen:  # no request began in the whole period
                self.transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            for t in (self._timer, self._stall):
                if t is not None:
                    t.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall is None:
                self._stall = self.loop.call_later(idle_timeout, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _stalled(self) -> None:
            self._stall = None
            if not self.transport.is_closing():
                self.transport.abort()  # its buffered bytes will never be read: drop them

    return IdleClosingH11
