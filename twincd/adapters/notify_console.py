"""The console notifier: log lines plus a markdown "release timeline" artifact in the Prefect UI.

The artifact keeps one key per release, so each publish adds a version and the UI shows the
latest timeline under the same name.
"""

from __future__ import annotations

import logging

from prefect.artifacts import create_markdown_artifact

from twincd.domain import Timeline


def publish(timeline: Timeline, *, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
    if timeline.events:
        e = timeline.events[-1]
        where = f" [{e.cluster}]" if e.cluster else ""
        level = logging.ERROR if e.status == "failed" else logging.INFO
        logger.log(level, "%s %s %s%s: %s: %s", timeline.app, timeline.tag, e.step, where, e.status, e.text)
    create_markdown_artifact(markdown=timeline.markdown(), key=timeline.key,
                             description=f"Release timeline of {timeline.app} {timeline.tag}")
