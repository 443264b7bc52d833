"""`ServerThread(app)`: the OpenAI app under uvicorn in a background thread with its own loop, on a free
loopback port (tests, benchmarks, notebooks). `agentserve serve` runs it beside the gRPC server in one event
loop instead, with the HTTP front end's TLS and logging settings (agentserve/service/serve.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional

import uvicorn


class ServerThread:
    """uvicorn in a daemon thread; `url` is http://host:port once `start()` returns."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 root_path: str = "") -> None:
        self.app = app
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                                    access_log=False, timeout_graceful_shutdown=2, root_path=root_path))
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.port: Optional[int] = None
        self._thread = threading.Thread(target=self._run, name="agentserve-http", daemon=True)
        self._error: Optional[BaseException] = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
        finally:
            self.loop.close()

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
