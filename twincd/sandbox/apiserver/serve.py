"""Serving the API server: on a daemon thread (tests, the sandbox cluster process) or from the
command line (``python -m twincd.sandbox.apiserver``)."""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette

from twincd.sandbox.apiserver.http_api import create_app
from twincd.sandbox.apiserver.store import Store
from twincd.sandbox.serving import ServedApp, serve_asgi


class RunningServer:
    """A server started by ``serve_in_thread``."""

    def __init__(self, served: ServedApp, store: Store) -> None:
        self.url, self.port = served.url, served.port
        self._served, self._store = served, store

    def stop(self, timeout: float = 10.0) -> None:
        # uvicorn waits for open responses before it exits; watch streams would never end.
        self._served.stop(timeout, before_join=self._store.close_watches)


def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve ``app`` (from ``create_app``) on a daemon thread; port 0 picks a free port."""
    return RunningServer(serve_asgi(app, host=host, port=port, name="sandbox-apiserver"), app.state.store)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an in-memory sandbox Kubernetes API server.")
    parser.add_argument("--name", required=True, help="the cluster's name, e.g. eks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6441)
    parser.add_argument("--event-buffer", type=int, default=10000, help="watch events kept for resuming")
    parser.add_argument("--kubernetes-version", default="1.32.0", help="what /version reports")
    args = parser.parse_args(argv)
    app = create_app(args.name, event_buffer=args.event_buffer, kubernetes_version=args.kubernetes_version)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
