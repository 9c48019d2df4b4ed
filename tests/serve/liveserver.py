"""A real uvicorn server in a thread, for the serving tests (imported by conftest.py and tests)."""

from __future__ import annotations

import socket
import threading
import time

import httpx

MODEL_NAME = "tiny-fused"


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)

    @property
    def engine(self):
        return self.app.state.engine

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float) -> float:
        """Seconds until the engine has nothing waiting or running (fails after `timeout`)."""
        t0 = time.monotonic()
        while True:
            h = self.health()
            if h["waiting"] == 0 and h["running"] == 0:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"engine still busy after {timeout} s: {h}"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the test server did not stop"
