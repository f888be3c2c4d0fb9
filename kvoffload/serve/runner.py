"""Running the app on uvicorn: in the foreground (the CLI) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Self

import uvicorn

from kvoffload.errors import KvoffloadError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port taken, address not here)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise KvoffloadError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise KvoffloadError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, shutdown_timeout: float, log_level: str = "info") -> uvicorn.Server:
    # uvicorn's graceful shutdown (SIGTERM, Ctrl-C): stop accepting, let in-flight requests finish
    # for up to shutdown_timeout s, then run the app's lifespan shutdown (the engine loop stops)
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                                         timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
                                         timeout_keep_alive=5))


class ServerThread:
    """The app on a loopback port in a daemon thread: ``with ServerThread(app) as s: s.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5.0) -> None:
        self.app = app
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn_server(app, shutdown_timeout, log_level=os.environ.get("KVOFFLOAD_SERVE_LOG", "warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="uvicorn")

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
