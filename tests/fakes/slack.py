"""An HTTP-level fake of the Slack Web API methods twincd uses, for the real ``slack_sdk`` client.

``chat.postMessage``, ``chat.update`` and ``auth.test`` on Starlette + uvicorn in a thread on a
free port. Point ``slack_sdk.WebClient(token=..., base_url=fake.api_url)`` at it (the trailing
slash of ``/api/`` matters). Like Slack, it answers HTTP 200 with ``{"ok": false, "error": ...}``
for API errors, resolves channel names (``#deploys``) on ``chat.postMessage`` only, and wants the
channel ID on ``chat.update``.

Knobs: ``rate_limit(n, retry_after)``, ``fail(n, status)``, ``delay(seconds, n)``: the next n calls
answer 429 with Retry-After, answer an HTTP error, or wait before answering (client timeouts).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from twincd.sandbox.serving import ServedApp, serve_asgi


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it; ``error`` is what it answered ("" when ok)."""

    method: str
    channel: str = ""
    ts: str = ""  # chat.update: the message updated; chat.postMessage: the new message's ts
    thread_ts: str = ""
    text: str = ""
    blocks: tuple[dict[str, Any], ...] = ()
    error: str = ""
    status: int = 200
    authorization: str = ""  # the Authorization header as received, to check the token never leaks


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str = ""
    edits: int = 0


@dataclass
class _Knob:
    remaining: int = 0
    value: float = 0.0


@dataclass
class FakeSlack:
    token: str
    channels: dict[str, str] = field(default_factory=lambda: {"#deploys": "C0DEPLOYS"})  # name → ID
    calls: list[Call] = field(default_factory=list)
    messages: dict[tuple[str, str], Message] = field(default_factory=dict)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _rate: _Knob = field(default_factory=_Knob)
    _fail: _Knob = field(default_factory=_Knob)
    _delay: _Knob = field(default_factory=_Knob)
    _generation: int = 0  # bumped by reset(): a delayed request of an earlier test is dropped

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    # -- knobs -------------------------------------------------------------------------------
    def rate_limit(self, n: int, retry_after: float = 1) -> None:
        with self._lock:
            self._rate = _Knob(n, retry_after)

    def fail(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._fail = _Knob(n, status)

    def delay(self, seconds: float, n: int = 1_000_000) -> None:
        with self._lock:
            self._delay = _Knob(n, seconds)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.messages.clear()
            self._rate, self._fail, self._delay = _Knob(), _Knob(), _Knob()
            self._generation += 1

    # -- what tests read -----------------------------------------------------------------------
    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c.method == method and not c.error)

    def thread(self, ts: str) -> list[Message]:
        """The replies of the thread whose parent is ``ts``, oldest first."""
        return sorted((m for m in self.messages.values() if m.thread_ts == ts), key=lambda m: m.ts)

    # -- the server ----------------------------------------------------------------------------
    def _take(self, knob: _Knob) -> float | None:
        with self._lock:
            if knob.remaining > 0:
                knob.remaining -= 1
                return knob.value
            return None

    async def _handle(self, request: Request) -> Response:
        method = request.path_params["method"]
        raw = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            params: dict[str, Any] = json.loads(raw or b"{}")
        else:
            params = dict(parse_qsl(raw.decode()))
        blocks = params.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        auth = request.headers.get("authorization", "")

        def record(status: int = 200, error: str = "", ts: str = "") -> None:
            with self._lock:
                self.calls.append(
                    Call(
                        method,
                        str(params.get("channel", "")),
                        ts or str(params.get("ts", "")),
                        str(params.get("thread_ts", "")),
                        str(params.get("text", "")),
                        tuple(blocks),
                        error,
                        status,
                        auth,
                    )
                )

        generation = self._generation
        seconds = self._take(self._delay)
        if seconds is not None:
            await asyncio.sleep(seconds)
            if generation != self._generation:
                # The client gave up long ago and the fake was reset: this must not leak into a later test.
                return JSONResponse({"ok": False, "error": "fake_reset"}, status_code=503)
        retry_after = self._take(self._rate)
        if retry_after is not None:
            record(429, "ratelimited")
            return JSONResponse(
                {"ok": False, "error": "ratelimited"},
                status_code=429,
                headers={"Retry-After": f"{retry_after:g}"},
            )
        status = self._take(self._fail)
        if status is not None:
            record(int(status), "internal_error")
            return Response("upstream trouble", status_code=int(status), media_type="text/plain")
        if auth != f"Bearer {self.token}":
            return self._error(record, "not_authed" if not auth else "invalid_auth")
        if method == "auth.test":
            record()
            return JSONResponse({"ok": True, "user_id": "UBOT", "team_id": "T0", "bot_id": "BBOT"})
        if method == "chat.postMessage":
            return self._post(params, blocks, record)
        if method == "chat.update":
            return self._update(params, blocks, record)
        return self._error(record, "unknown_method")

    def _error(self, record: Any, error: str) -> Response:
        record(200, error)
        return JSONResponse({"ok": False, "error": error})

    def _post(self, params: dict[str, Any], blocks: list[dict[str, Any]], record: Any) -> Response:
        name = str(params.get("channel", ""))
        channel = self.channels.get(name, name if name in self.channels.values() else "")
        if not channel:
            return self._error(record, "channel_not_found")
        if not params.get("text") and not blocks:
            return self._error(record, "no_text")
        thread_ts = str(params.get("thread_ts", ""))
        if thread_ts and (channel, thread_ts) not in self.messages:
            return self._error(record, "thread_not_found")
        ts = f"{int(time.time())}.{next(self._ts):06d}"
        with self._lock:
            self.messages[(channel, ts)] = Message(
                channel, ts, str(params.get("text", "")), blocks, thread_ts
            )
        record(ts=ts)
        return JSONResponse(
            {"ok": True, "channel": channel, "ts": ts, "message": {"text": params.get("text", ""), "ts": ts}}
        )

    def _update(self, params: dict[str, Any], blocks: list[dict[str, Any]], record: Any) -> Response:
        channel, ts = str(params.get("channel", "")), str(params.get("ts", ""))
        if channel not in self.channels.values():
            return self._error(record, "channel_not_found")  # names are not accepted here
        message = self.messages.get((channel, ts))
        if message is None:
            return self._error(record, "message_not_found")
        with self._lock:
            message.text, message.blocks, message.edits = (
                str(params.get("text", "")),
                blocks,
                message.edits + 1,
            )
        record()
        return JSONResponse({"ok": True, "channel": channel, "ts": ts, "text": message.text})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/api/{method}", self._handle, methods=["POST", "GET"])])


@dataclass
class RunningFake:
    fake: FakeSlack
    _served: ServedApp

    def stop(self, timeout: float = 10.0) -> None:
        self._served.stop(timeout)


def start_fake_slack(token: str) -> RunningFake:
    """Serve a FakeSlack on a free port of 127.0.0.1 in a daemon thread; returns once it listens."""
    fake = FakeSlack(token=token)
    served = serve_asgi(fake.app(), name="fake-slack", graceful_seconds=1)
    fake.url = served.url
    return RunningFake(fake, served)
