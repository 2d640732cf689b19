"""Tasks retry transient failures (network, 5xx, 429) and never permanent ones."""

from __future__ import annotations

import pytest
from prefect import flow, task

from tasks.common import IO_RETRIES
from twincd.errors import PermanentError, TransientError

attempts: list[str] = []


@task(**{**IO_RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None})
def flaky(kind: str) -> str:
    attempts.append(kind)
    if kind == "transient" and len(attempts) < 3:
        raise TransientError("registry answered 503")
    if kind == "permanent":
        raise PermanentError("tag does not match the pattern")
    return "done"


@flow
def run(kind: str) -> str:
    return flaky(kind)


def test_transient_failures_are_retried(prefect_harness: None) -> None:
    attempts.clear()
    assert run("transient") == "done"
    assert attempts == ["transient"] * 3


def test_permanent_failures_fail_at_once(prefect_harness: None) -> None:
    attempts.clear()
    with pytest.raises(PermanentError, match="does not match"):
        run("permanent")
    assert attempts == ["permanent"]
