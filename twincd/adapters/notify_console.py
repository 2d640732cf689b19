"""The console notifier: log lines plus a markdown "release timeline" artifact in the Prefect UI.

It tells the same story as the Slack notifier, from the same model (twincd.notify): the replies
people act on become log lines, and the artifact opens with the parent message's summary. The
artifact keeps one key per release, so each publish adds a version and the UI shows the latest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from prefect.artifacts import create_markdown_artifact

from twincd.domain import Timeline
from twincd.notify import is_reply, parent_summary, reply


@dataclass(frozen=True)
class Told:
    ok: bool
    error: str = ""


class ConsoleNotifier:
    """Always on: the run's log and the timeline artifact are where the Prefect UI shows the story."""

    def __init__(self, *, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
        self._log = logger

    @property
    def name(self) -> str:
        return "console"

    def publish(self, timeline: Timeline, clusters: Sequence[str]) -> Told:
        try:
            publish(timeline, clusters, logger=self._log)
        except Exception as e:  # noqa: BLE001 - a notifier never fails a deploy (the port's rule)
            self._log.warning("console notifier failed (the deploy goes on): %s", type(e).__name__)
            return Told(False, f"{type(e).__name__}")
        return Told(True)

    def announce(self, text: str) -> Told:
        """One record in the run's log (the caller keeps the text as an artifact too)."""
        self._log.info("%s", text)
        return Told(True)


def publish(
    timeline: Timeline,
    clusters: Sequence[str],
    *,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    if timeline.events:
        e = timeline.events[-1]
        where = f" [{e.cluster}]" if e.cluster else ""
        text = reply(e).plain if is_reply(e) else f"{e.step}{where}: {e.status}: {e.text}"
        logger.log(
            logging.ERROR if e.status == "failed" else logging.INFO,
            "%s %s: %s",
            timeline.app,
            timeline.tag,
            text,
        )
    summary = parent_summary(timeline, clusters).plain
    create_markdown_artifact(
        markdown=f"**{summary}**\n\n{timeline.markdown()}",
        key=timeline.key,
        description=f"Release timeline of {timeline.app} {timeline.tag}",
    )
