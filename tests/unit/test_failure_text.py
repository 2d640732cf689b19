"""How a failure reads to people (issue 16.2): the system named, and whether a re-run completes it."""

from __future__ import annotations

import httpx
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.landing import failure_text
from twincd.adapters.git import PushRejected
from twincd.errors import PermanentError


def test_a_bare_http_error_is_the_prefect_api_and_says_so() -> None:
    error = httpx.ConnectError("[Errno 111] Connection refused")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4299/api"}):
        text = failure_text(error, "deploy")
    assert text.startswith(
        "an HTTP call (the Prefect API?) at http://127.0.0.1:4299/api failed (ConnectError)"
    )
    assert "re-run the deploy once it answers" in text and "Errno" not in text


def test_transient_and_permanent_errors_say_whether_a_rerun_completes() -> None:
    transient = failure_text(PushRejected("git push main rejected: stale info"), "failover")
    assert transient.startswith("git push main rejected")
    assert "re-running the failover completes it" in transient
    assert failure_text(PermanentError("tag v1 is not a release"), "deploy") == "tag v1 is not a release"


def test_anything_else_quotes_no_sdk_text() -> None:
    text = failure_text(ValueError("Authorization: Bearer s3cr3t"), "deploy")
    assert text == "unexpected ValueError (see the run's logs)"
