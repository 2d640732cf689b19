"""Serve an ASGI app on a daemon thread: the sandbox API server, and the HTTP fakes of the tests."""

from __future__ import annotations

import base64
import binascii
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn


@dataclass
class ServedApp:
    url: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    def stop(self, timeout: float = 10.0, *, before_join: Callable[[], None] | None = None) -> None:
        """Stop serving; ``before_join`` ends what would keep uvicorn waiting (e.g. watch streams)."""
        self.server.should_exit = True
        if before_join is not None:
            before_join()
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the server at {self.url} did not stop within {timeout}s")


def serve_asgi(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, name: str = "asgi", graceful_seconds: int = 2
) -> ServedApp:
    """Serve ``app`` on a daemon thread; port 0 picks a free port. Returns once it accepts connections.

    Binding the socket here, before uvicorn starts, is what makes the chosen port known without a race.
    """
    # IPPROTO_TCP must be explicit: asyncio sets TCP_NODELAY on accepted connections only when the
    # listener's proto is IPPROTO_TCP, and socket.socket() leaves it 0. Without it, Nagle plus
    # delayed ACKs cost ~40 ms per request (45 ms vs 1 ms per create, measured on the API server).
    sock = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        interface="asgi3",
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=graceful_seconds,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"{name}-{bound}"
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"{name} did not start on {host}:{bound}")
        time.sleep(0.01)
    url_host = f"[{host}]" if ":" in host else host
    return ServedApp(f"http://{url_host}:{bound}", bound, server, thread, sock)


def basic_credentials(header: str) -> tuple[str, str] | None:
    """``Authorization: Basic base64(user:password)`` → (user, password); None for anything else."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password
