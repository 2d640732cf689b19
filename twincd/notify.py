"""What people read about a release: a release's timeline → one parent summary and thread replies.

Pure: no SDK, no Prefect. Every notifier tells the same story from this model (issue 5): the
Slack adapter posts the parent once and updates it in place, with replies in its thread; the
console notifier can log the same ``plain`` strings.

Each object carries two renderings: ``plain`` (no markup, for logs and consoles) and ``text`` /
``blocks`` (Slack mrkdwn and Block Kit, escaped as Slack requires).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twincd.domain import Event, Timeline

Block = dict[str, Any]

# Slack limits (docs.slack.dev, Block Kit reference): a section's text holds 3,000 characters and
# its fields 2,000 each, at most 10 fields per section. Longer findings are cut, never rejected.
_SECTION_LIMIT = 3000
_FIELDS_PER_SECTION = 10
_REPLY_LIMIT = 3000
_CLUSTER_LINE_LIMIT = 150

_ICONS = {"ok": "✅", "failed": "❌", "waiting": "⏳", "skipped": "⏭️", "cancelled": "🚫"}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class State(str, Enum):
    """The overall state of a release, as the parent message shows it."""

    IN_PROGRESS = "in progress"
    WAITING = "waiting for approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


_STATE_ICONS = {
    State.IN_PROGRESS: "🔄",
    State.WAITING: "⏳",
    State.SUCCEEDED: "✅",
    State.FAILED: "❌",
    State.CANCELLED: "🚫",
}


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    status: str  # pending | rolling out | rolled out | rollout failed | not deployed
    detail: str = ""  # the verify event's message, when there is one


@dataclass(frozen=True)
class ParentMessage:
    """The one message per release, rebuilt from the whole timeline on every publish."""

    app: str
    tag: str
    digest: str  # short form (12 hex digits), "" until the image is pushed
    state: State
    clusters: tuple[ClusterStatus, ...]
    merge_request_url: str
    plain: str  # for logs
    text: str  # Slack notification / fallback text (mrkdwn, escaped)
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Reply:
    """One thread reply: an event people act on."""

    key: str  # stable for the same event across publishes; differs between runs (uses `at`)
    event: Event
    mention: bool  # True for the one reply that ends a failed release
    plain: str
    text: str  # mrkdwn, escaped; a notifier prepends its mention when `mention` is set


def escape(text: str) -> str:
    """Slack's three control characters; everything else is sent as is (Slack formatting docs)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _link(url: str, label: str) -> str:
    # A URL with "|" or ">" would break Slack's <url|label> syntax: show the label alone then.
    if not url or "|" in url or ">" in url:
        return escape(label)
    return f"<{url}|{escape(label)}>"


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at a line end when there is one, saying how much was left."""
    if len(text) <= limit:
        return text
    head = text[: limit - 60]  # room for the note below
    kept = head.rsplit("\n", 1)[0] if "\n" in head else head
    rest = text.count("\n") - kept.count("\n")
    return kept + (f"\n… {rest} more line(s) in the Prefect run" if rest > 0 else "…")


def short_digest(timeline: Timeline) -> str:
    """The image digest's first 12 hex digits: the push event's ``digest``, else found in its text."""
    for e in timeline.events:
        found = e.digest or (m.group(0) if e.step == "push" and (m := _DIGEST.search(e.text)) else "")
        if found:
            return found.removeprefix("sha256:")[:12]
    return ""


def overall_state(timeline: Timeline) -> State:
    events = timeline.events
    results = [e for e in events if e.step == "result"]
    if results:
        return {"ok": State.SUCCEEDED, "cancelled": State.CANCELLED}.get(results[-1].status, State.FAILED)
    # A failure (e.g. validation) ends the release even before the flow reports its result.
    if any(e.status == "failed" for e in events):
        return State.FAILED
    if any(e.status == "cancelled" for e in events):
        return State.CANCELLED
    if events and events[-1].status == "waiting":
        return State.WAITING
    return State.IN_PROGRESS


def _merged(timeline: Timeline) -> bool:
    # set-image "skipped" means the target branch already pins the digest: nothing to merge.
    return any(
        (e.step == "merge" and e.status == "ok") or (e.step == "set-image" and e.status == "skipped")
        for e in timeline.events
    )


def cluster_statuses(timeline: Timeline, clusters: Sequence[str]) -> tuple[ClusterStatus, ...]:
    verdicts = {e.cluster: e for e in timeline.events if e.step == "verify" and e.cluster}
    names = list(clusters) + [c for c in verdicts if c not in clusters]
    state = overall_state(timeline)
    out = []
    for name in names:
        e = verdicts.get(name)
        if e is not None:
            status = "rolled out" if e.status == "ok" else "rollout failed"
            out.append(ClusterStatus(name, status, e.text))
        elif state in (State.FAILED, State.CANCELLED, State.SUCCEEDED):
            out.append(ClusterStatus(name, "not deployed"))
        elif _merged(timeline):
            out.append(ClusterStatus(name, "rolling out"))
        else:
            out.append(ClusterStatus(name, "pending"))
    return tuple(out)


_CLUSTER_ICONS = {
    "pending": "⚪",
    "rolling out": "🔄",
    "rolled out": "✅",
    "rollout failed": "❌",
    "not deployed": "⏭️",
}


def parent_summary(timeline: Timeline, clusters: Sequence[str]) -> ParentMessage:
    """The release's parent message; ``clusters`` lists every cluster the release goes to, in order."""
    state = overall_state(timeline)
    digest = short_digest(timeline)
    statuses = cluster_statuses(timeline, clusters)
    mr_url = next((e.url for e in reversed(timeline.events) if e.step == "merge-request" and e.url), "")
    icon = _STATE_ICONS[state]
    name = f"{timeline.app} {timeline.tag}"
    image = f" · image {digest}" if digest else ""
    per_cluster = " · ".join(f"{c.name} {_CLUSTER_ICONS[c.status]} {c.status}" for c in statuses)
    plain = f"{icon} {name} {state.value}{image}" + (f" · {per_cluster}" if per_cluster else "")

    head = f"{icon} *Release {escape(name)}*: {state.value}"
    details = []
    if digest:
        details.append(f"image `{digest}`")
    if mr_url:
        details.append(_link(mr_url, "merge request"))
    merge = next((e for e in reversed(timeline.events) if e.step == "merge" and e.status == "ok"), None)
    if merge is not None:
        details.append(escape(merge.text) + (f" by {escape(merge.actor)}" if merge.actor else ""))
    blocks: list[Block] = [_section(head + ("\n" + " · ".join(details) if details else ""))]
    fields = [
        f"*{escape(c.name)}*\n{_CLUSTER_ICONS[c.status]} {c.status}"
        + (
            f"\n{escape(_cut(c.detail.splitlines()[0], _CLUSTER_LINE_LIMIT))}"
            if c.detail and c.status == "rollout failed"
            else ""
        )
        for c in statuses
    ]
    for i in range(0, len(fields), _FIELDS_PER_SECTION):
        blocks.append(
            {
                "type": "section",
                "fields": [{"type": "mrkdwn", "text": f} for f in fields[i : i + _FIELDS_PER_SECTION]],
            }
        )
    if timeline.events:
        last = timeline.events[-1]
        where = f" ({last.cluster})" if last.cluster else ""
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": (
                            f"last step: {escape(last.step)}{escape(where)} {last.status} "
                            f"at {last.at[11:19]} UTC"
                        ),
                    }
                ],
            }
        )
    text = f"{icon} Release {escape(name)}: {state.value}{escape(image)}" + (
        f" · {escape(per_cluster)}" if per_cluster else ""
    )
    return ParentMessage(
        timeline.app, timeline.tag, digest, state, statuses, mr_url, plain, text, tuple(blocks)
    )


def _section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _cut(text, _SECTION_LIMIT)}}


# The steps whose every outcome is a reply; other steps get one only when they fail, are
# cancelled or skipped (e.g. "validate failed", "set-image skipped": nothing to merge).
_REPLY_STEPS = frozenset({"merge-request", "merge", "verify", "result"})

_HEADLINES = {
    ("merge-request", "ok"): "Merge request",
    ("validate", "failed"): "Validation failed",
    ("set-image", "skipped"): "Nothing to merge",
    ("merge", "ok"): "Merged",
    ("merge", "cancelled"): "Merge refused",
    ("verify", "ok"): "{cluster}: rolled out",
    ("verify", "failed"): "{cluster}: rollout failed",
    ("result", "ok"): "Release succeeded",
    ("result", "failed"): "Release failed",
    ("result", "cancelled"): "Release cancelled",
}


def is_reply(event: Event) -> bool:
    if event.status == "waiting":
        return False  # the parent shows "waiting for approval"; the MR reply already has the link
    return event.step in _REPLY_STEPS or event.status in ("failed", "cancelled", "skipped")


def reply_key(event: Event, *, run: str = "", nth: int = 1) -> str:
    """Same event, same key: a re-published timeline posts nothing twice, a re-run posts anew.

    Within a flow run (``run``), the ``nth`` event of its step, cluster and status: a run that was
    suspended while waiting for a person starts again from the top when resumed and tells its
    first steps again with new times, and those are replies already posted. Outside a run, the
    event's time tells events apart.
    """
    raw = f"{event.step}\x00{event.cluster}\x00{event.status}\x00{run or event.at}\x00{nth}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def reply(event: Event, key: str = "") -> Reply:
    headline = _HEADLINES.get((event.step, event.status), f"{event.step} {event.status}")
    headline = headline.format(cluster=event.cluster)
    icon = _ICONS.get(event.status, "•")
    body = _cut(event.text.strip(), _REPLY_LIMIT)
    actor = f" (by {event.actor})" if event.actor else ""
    plain = f"{icon} {headline}: {body}{actor}"

    title = f"*{escape(headline)}*"
    if event.url:
        title = f"*{_link(event.url, headline)}*"
    if event.step == "validate" or "\n" in body:
        # Findings and multi-line errors read best verbatim; "```" inside would end the block early.
        text = f"{icon} {title}{escape(actor)}\n```{escape(body).replace('```', 'ˋˋˋ')}```"
    else:
        text = f"{icon} {title}: {escape(body)}{escape(actor)}"
    mention = event.step == "result" and event.status == "failed"
    return Reply(key or reply_key(event), event, mention, plain, text)


def thread_replies(timeline: Timeline, *, posted: Collection[str] = ()) -> list[Reply]:
    """The replies of the timeline not yet posted (``posted``: keys of replies already in the thread).

    Keys rather than a count, because the flow's timelines are not one growing list: a re-run
    starts a new timeline, and the failure path notifies a shorter one.
    """
    seen: Counter[tuple[str, str, str]] = Counter()
    replies = []
    for e in timeline.events:
        seen[e.step, e.cluster, e.status] += 1
        if is_reply(e):
            r = reply(e, reply_key(e, run=timeline.run, nth=seen[e.step, e.cluster, e.status]))
            if r.key not in posted:
                replies.append(r)
    return replies
