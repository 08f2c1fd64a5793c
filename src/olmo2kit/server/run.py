"""Running the app with uvicorn on a bound socket, with olmo2kit's shutdown.

On SIGINT or SIGTERM, uvicorn stops accepting connections and gives in-flight requests
`SHUTDOWN_GRACE_S` seconds; a second before the end, whatever still runs is ended with an error object
(`ModelRegistry.stop`), so no client is cut off silently and no request is left to be cancelled under
the app. The process then exits with code 0: the signal asked for the shutdown it got (uvicorn would
raise the signal again once done, ending the process by it).
"""

from __future__ import annotations

import contextlib
import socket
import threading

import uvicorn

from olmo2kit.server.app import SHUTDOWN_GRACE_S


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


def run(app, sock: socket.socket) -> None:
    """Serve `app` (from `create_app`) on the listening socket `sock` until SIGINT or SIGTERM."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S, access_log=False)
    _Server(config).run(sockets=[sock])
