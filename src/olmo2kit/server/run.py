"""Running the app with uvicorn on a bound socket, with olmo2kit's shutdown and connection timeouts.

On SIGINT or SIGTERM, uvicorn stops accepting connections and gives in-flight requests
`SHUTDOWN_GRACE_S` seconds; a second before the end, whatever still runs is ended with an error object
(`ModelRegistry.stop`), so no client is cut off silently and no request is left to be cancelled under
the app. The process then exits with code 0: the signal asked for the shutdown it got (uvicorn would
raise the signal again once done, ending the process by it).

A connection must send a whole request head within `header_timeout` seconds of opening (or of starting its next
request), and may not fall silent for `idle_timeout` seconds between requests or in the middle of a body; past
either it is closed (`timed_protocol`). uvicorn's keep-alive timeout covers only the silence after a response, so a
client that sends half a request line would otherwise hold its connection for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from olmo2kit.server.app import SHUTDOWN_GRACE_S
from olmo2kit.server.observability import configure_logging


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop_requests = config.app.state.registry.stop

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(max(SHUTDOWN_GRACE_S - 1, 0), self.stop_requests)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


class _Timeouts:
    """The header and body deadlines, over uvicorn's HTTP/1.1 protocol (h11 or httptools, whichever uvicorn picks).

    Both protocols keep the request being answered in `self.cycle`, replaced when a new request head is complete,
    with `more_body` true until its body is, and `response_complete` once answered: the state is read after each
    read of the socket, so no parser callback is needed."""

    header_timeout: float
    idle_timeout: float
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._expire)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return self._cancel()
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # bytes of the next request head: its deadline starts now
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout, self._expire)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            self._body_timer = self.loop.call_later(self.idle_timeout, self._body_stalled)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The silence before the next request is uvicorn's keep-alive timeout (`idle_timeout`); a pipelined
        # request already read has its head complete.
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _body_stalled(self) -> None:
        self._body_timer = None
        if self.flow.read_paused:  # the app has not read what came: the silence is ours, not the client's
            self._body_timer = self.loop.call_later(self.idle_timeout, self._body_stalled)
            return
        self._expire()

    def _expire(self) -> None:
        self._cancel()
        if not self.transport.is_closing():
            self.transport.close()  # an app reading the body gets http.disconnect (a ClientDisconnect)

    def _cancel(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


def timed_protocol(header_timeout: float, idle_timeout: float) -> type:
    """uvicorn's HTTP protocol class (its `http=` option) with the two deadlines, in seconds."""
    return type("TimedHTTPProtocol", (_Timeouts, AutoHTTPProtocol),
                {"header_timeout": header_timeout, "idle_timeout": idle_timeout})


def run(app, sock: socket.socket, *, header_timeout: float, idle_timeout: float) -> None:
    """Serve `app` (from `create_app`) on the listening socket `sock` until SIGINT or SIGTERM, closing connections
    past the timeouts, in seconds (`olmo2kit serve` holds their defaults)."""
    # uvicorn's access log stays off: olmo2kit's, one JSON line a request with its id, replaces it
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S, access_log=False,
                            http=timed_protocol(header_timeout, idle_timeout), timeout_keep_alive=idle_timeout)
    configure_logging()  # after uvicorn's Config, which configures uvicorn's loggers
    _Server(config).run(sockets=[sock])
