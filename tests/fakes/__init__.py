"""HTTP-level fakes of the systems that cannot run here (GitLab, Slack, Azure DNS)."""

from __future__ import annotations

from typing import Any, Self

from twincd.sandbox.serving import ServedApp, serve_asgi


class ServedFake:
    """A fake served on a free port of 127.0.0.1 (``url``) while started; a context manager."""

    _name = "fake"
    url = ""
    _served: ServedApp | None = None

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._served = serve_asgi(self._asgi, name=self._name, graceful_seconds=1)
        self.url = self._served.url
        return self

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
