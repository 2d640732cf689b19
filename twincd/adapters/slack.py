"""The Slack notifier: one parent message per release, updated in place, with replies in its thread.

The first publish of a release posts the parent (``chat.postMessage``) and keeps its ``ts`` in a
``ThreadStore`` keyed by app and tag, so a re-run of the same release continues the same thread;
later publishes ``chat.update`` the parent and post only the replies not yet in the thread.

A failing notifier never fails a deploy and never delays it beyond ``budget`` seconds: every
Slack failure becomes ``PublishResult(ok=False, error=...)``; nothing is raised. Replies that could
not be posted stay unposted in the store, so the next publish posts them. The token is handed to
the SDK only (which redacts it in its own debug logs) and scrubbed from every error text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from prefect.variables import Variable
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.web import SlackResponse

from twincd.domain import Timeline
from twincd.notify import ParentMessage, parent_summary, thread_replies

_log = logging.getLogger(__name__)

# Keys of posted replies kept per thread: a Prefect Variable holds at most 5,000 characters of
# JSON (prefect.types.MAX_VARIABLE_VALUE_LENGTH); 100 keys of 12 hex digits take ~1,600. A run
# adds ~10, so only keys of old runs, whose events are no longer in any timeline, are dropped.
_MAX_POSTED = 100


@dataclass(frozen=True)
class ThreadState:
    """Where a release's thread lives and what it already holds."""

    channel: str  # as configured, e.g. "#deploys": a changed channel starts a new thread
    channel_id: str  # as Slack answered; chat.update needs the ID, not the name
    ts: str  # the parent message's timestamp, which is also the thread's id
    posted: tuple[str, ...] = ()  # twincd.notify.Reply keys already in the thread
    parent_hash: str = ""  # of the parent as last sent: an unchanged parent is not updated again


class ThreadStore(Protocol):
    def get(self, key: str) -> ThreadState | None: ...

    def put(self, key: str, state: ThreadState) -> None: ...


class MemoryThreadStore:
    """For tests and one-process use: threads are forgotten when the process ends."""

    def __init__(self) -> None:
        self._states: dict[str, ThreadState] = {}

    def get(self, key: str) -> ThreadState | None:
        return self._states.get(key)

    def put(self, key: str, state: ThreadState) -> None:
        self._states[key] = state


class PrefectVariableThreadStore:
    """Threads kept in Prefect Variables named by ``thread_key``: they survive re-runs and workers."""

    def get(self, key: str) -> ThreadState | None:
        value = Variable.get(key)
        if not isinstance(value, dict):
            return None
        return ThreadState(
            channel=str(value["channel"]),
            channel_id=str(value["channel_id"]),
            ts=str(value["ts"]),
            posted=tuple(str(k) for k in value.get("posted", ())),
            parent_hash=str(value.get("parent_hash", "")),
        )

    def put(self, key: str, state: ThreadState) -> None:
        value = asdict(state)
        value["posted"] = list(state.posted)
        Variable.set(key, value, overwrite=True)


def thread_key(app: str, tag: str) -> str:
    """A Prefect Variable name (lowercase letters, digits, dashes) unique per app and tag.

    The readable part folds case and punctuation ("1.2.0" and "1-2-0" look alike); the hash of the
    exact app and tag keeps two such releases in separate threads.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", f"{app}-{tag}".lower()).strip("-")[:200]
    exact = hashlib.sha256(f"{app}\0{tag}".encode()).hexdigest()[:8]
    return f"slack-thread-{slug}-{exact}"


@dataclass(frozen=True)
class PublishResult:
    ok: bool
    error: str = ""  # what failed, token-free; "" when ok
    ts: str = ""  # the parent's ts ("" if it could not be posted)
    channel_id: str = ""
    posted_parent: bool = False  # a new parent (and so a new thread) was posted
    updated_parent: bool = False
    replies: int = 0  # thread replies posted by this publish


class _Failed(Exception):
    """A Slack call failed; the message is already token-free. Never leaves this module."""


class SlackNotifier:
    """Publish a release timeline to one Slack channel; see the module docstring."""

    def __init__(
        self,
        token: str,
        channel: str,
        *,
        mention_on_failure: str = "",
        store: ThreadStore,
        base_url: str | None = None,
        timeout: int = 5,
        budget: float = 10.0,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self._token = token
        self._channel = channel
        self._mention = mention_on_failure
        self._store = store
        self._timeout = timeout
        self._budget = budget
        self._log = logger or _log
        # No SDK retry handlers: the default ConnectionErrorRetryHandler retries without regard to
        # our budget, and RateLimitErrorRetryHandler sleeps the whole Retry-After however long it is
        # (and fails on a non-integer header). 429 is handled below, within the budget.
        kwargs: dict[str, Any] = {"base_url": base_url} if base_url else {}
        self._client = WebClient(token=token, timeout=timeout, retry_handlers=[], **kwargs)

    @property
    def name(self) -> str:
        return "slack"

    def publish(self, timeline: Timeline, clusters: Sequence[str]) -> PublishResult:
        """Bring the release's thread up to date with ``timeline``; never raises."""
        deadline = time.monotonic() + self._budget
        key = thread_key(timeline.app, timeline.tag)
        try:
            state = self._store.get(key)
        except Exception as e:  # noqa: BLE001 - a store failure must not fail the deploy
            return self._failed(f"thread store: cannot read {key}: {type(e).__name__}: {e}")
        if state is not None and state.channel != self._channel:
            state = None
        parent = parent_summary(timeline, clusters)
        parent_hash = _hash(parent)
        posted_parent = updated_parent = False
        replies = 0
        error = ""
        try:
            new_thread = state is None
            state, posted_parent, updated_parent = self._sync_parent(state, parent, parent_hash, deadline)
            if new_thread:
                self._store.put(key, state)  # at once: a later failure must not orphan the thread
            for r in thread_replies(timeline, posted=state.posted):
                text = f"{self._mention} {r.text}" if r.mention and self._mention else r.text
                self._call(
                    "chat.postMessage",
                    deadline,
                    channel=state.channel_id,
                    thread_ts=state.ts,
                    text=text,
                    unfurl_links=False,
                )
                state = replace(state, posted=(*state.posted, r.key)[-_MAX_POSTED:])
                replies += 1
        except _Failed as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - a bug here must not fail the deploy either
            error = f"unexpected {type(e).__name__}: {e}"
        if state is not None and (updated_parent or replies or posted_parent):
            try:
                self._store.put(key, state)
            except Exception as e:  # noqa: BLE001 - a store failure must not fail the deploy
                error = error or f"thread store: cannot write {key}: {type(e).__name__}: {e}"
        if error:
            return self._failed(
                error,
                state=state,
                posted_parent=posted_parent,
                updated_parent=updated_parent,
                replies=replies,
            )
        assert state is not None
        return PublishResult(True, "", state.ts, state.channel_id, posted_parent, updated_parent, replies)

    def announce(self, text: str) -> PublishResult:
        """One standalone message (e.g. drift that appeared or cleared); never raises."""
        try:
            response = self._call(
                "chat.postMessage",
                time.monotonic() + self._budget,
                channel=self._channel,
                text=text,
                unfurl_links=False,
            )
        except _Failed as e:
            return self._failed(str(e))
        except Exception as e:  # noqa: BLE001 - a bug here must not fail the run either
            return self._failed(f"unexpected {type(e).__name__}: {e}")
        return PublishResult(True, "", str(response["ts"]), str(response["channel"]), posted_parent=True)

    def _sync_parent(
        self, state: ThreadState | None, parent: ParentMessage, parent_hash: str, deadline: float
    ) -> tuple[ThreadState, bool, bool]:
        """Post the thread's parent, or update it if it changed: (state, posted it, updated it)."""
        if state is None:
            return self._post_parent(parent, parent_hash, deadline), True, False
        if state.parent_hash == parent_hash:
            return state, False, False
        try:
            self._call(
                "chat.update",
                deadline,
                channel=state.channel_id,
                ts=state.ts,
                text=parent.text,
                blocks=list(parent.blocks),
            )
        except _Failed as e:
            if "message_not_found" not in str(e):
                raise
            # Someone deleted the parent: start a new thread rather than go silent.
            return self._post_parent(parent, parent_hash, deadline), True, False
        return replace(state, parent_hash=parent_hash), False, True

    def _post_parent(self, parent: ParentMessage, parent_hash: str, deadline: float) -> ThreadState:
        response = self._call(
            "chat.postMessage",
            deadline,
            channel=self._channel,
            text=parent.text,
            blocks=list(parent.blocks),
            unfurl_links=False,
        )
        return ThreadState(self._channel, str(response["channel"]), str(response["ts"]), (), parent_hash)

    def _call(self, method: str, deadline: float, **params: Any) -> SlackResponse:
        """One Slack call within the deadline, waiting out 429s when Retry-After fits in it."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining < 1:
                raise _Failed(f"{method}: not attempted, the {self._budget:g} s budget is spent")
            # The SDK reads its timeout per request; lowering it keeps the last call within the deadline.
            self._client.timeout = min(self._timeout, int(remaining))
            try:
                return self._client.api_call(method, json=params)
            except SlackApiError as e:
                status = e.response.status_code
                if status == 429:
                    wait = _retry_after(e.response.headers)
                    if time.monotonic() + wait + 1 > deadline:
                        raise _Failed(
                            f"{method}: rate limited (Retry-After {wait:g} s exceeds the "
                            f"{self._budget:g} s budget)"
                        ) from None
                    self._log.info("slack %s rate limited; retrying in %g s", method, wait)
                    time.sleep(wait)
                    continue
                data = e.response.data
                code = data.get("error") if isinstance(data, dict) else None
                detail = f"HTTP {status}" if status != 200 else code or "unknown error"
                raise _Failed(self._scrub(f"{method}: {detail}")) from None
            except Exception as e:  # noqa: BLE001 - timeouts, refused connections, bad bodies alike
                raise _Failed(self._scrub(f"{method}: {type(e).__name__}: {e}")) from None

    def _scrub(self, text: str) -> str:
        # Slack never echoes the token, but a proxy or a future SDK message might: be sure.
        return text.replace(self._token, "[token]") if self._token else text

    def _failed(
        self,
        error: str,
        *,
        state: ThreadState | None = None,
        posted_parent: bool = False,
        updated_parent: bool = False,
        replies: int = 0,
    ) -> PublishResult:
        error = self._scrub(error)
        self._log.warning("slack notifier failed (the deploy goes on): %s", error)
        return PublishResult(
            False,
            error,
            state.ts if state else "",
            state.channel_id if state else "",
            posted_parent,
            updated_parent,
            replies,
        )


def _retry_after(headers: Any) -> float:
    """Seconds from a Retry-After header (the SDK gives a dict of str or of one-item lists)."""
    for name, value in dict(headers or {}).items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) else value
            try:
                return max(0.0, float(raw))
            except ValueError:
                break
    return 1.0


def _hash(parent: ParentMessage) -> str:
    return hashlib.sha256(json.dumps([parent.text, parent.blocks], sort_keys=True).encode()).hexdigest()[:16]
