"""The Slack notifier with the real slack_sdk WebClient against an HTTP fake of the Slack Web API.

Each test publishes timelines the way flows/deploy.py notifies: when the run waits for approval,
after the merge, after each cluster's verification, and with the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from tests.fakes.slack import FakeSlack, RunningFake, start_fake_slack
from twincd.adapters.slack import (
    MemoryThreadStore,
    PrefectVariableThreadStore,
    SlackNotifier,
    ThreadStore,
    thread_key,
)
from twincd.domain import Event, Timeline

pytestmark = pytest.mark.integration

TOKEN = "xoxb-1234-5678-SeCrEtToKeN"
MENTION = "<!subteam^S0DEPLOY>"
DIGEST = "sha256:" + "0123456789ab" + "c" * 52
CLUSTERS = ("eks", "aks")


@pytest.fixture(scope="module")
def running() -> Iterator[RunningFake]:
    server = start_fake_slack(TOKEN)
    yield server
    server.stop()


@pytest.fixture
def slack(running: RunningFake) -> FakeSlack:
    running.fake.reset()
    return running.fake


def notifier(
    fake: FakeSlack,
    store: ThreadStore,
    *,
    token: str = TOKEN,
    channel: str = "#deploys",
    timeout: int = 5,
    budget: float = 10.0,
) -> SlackNotifier:
    return SlackNotifier(
        token,
        channel,
        mention_on_failure=MENTION,
        store=store,
        base_url=fake.api_url,
        timeout=timeout,
        budget=budget,
    )


class Run:
    """Timelines as one run of the deploy flow builds them, each event stamped a second apart."""

    def __init__(self, start: int = 0, app: str = "hello", tag: str = "1.2.0") -> None:
        self.t = Timeline(app, tag)
        self.n = start

    def add(self, step: str, status: str, text: str, cluster: str = "", **extra: str) -> Timeline:
        self.n += 1
        self.t = self.t.add(
            Event(
                step,
                status,
                text,
                f"2025-06-01T12:{self.n // 60:02d}:{self.n % 60:02d}+00:00",
                cluster,
                **extra,
            )
        )
        return self.t

    def until_validation(self) -> None:
        self.add("release", "ok", "tag 1.2.0 is commit 1111111111aa")
        self.add("push", "ok", f"pushed: 127.0.0.1:5000/hello@{DIGEST}", digest=DIGEST)
        self.add("set-image", "ok", "committed: twincd/hello/1.2.0 at 2222222222bb")
        self.add(
            "merge-request",
            "ok",
            "opened !7 (opened): hello: release 1.2.0 (0123456789ab)",
            url="https://gitlab.example/infra/manifests/-/merge_requests/7",
        )

    def until_merged(self) -> list[Timeline]:
        self.until_validation()
        self.add("validate", "ok", "12 resources valid in overlays/eks, overlays/aks")
        waiting = self.add("merge", "waiting", "waiting for approval of !7")
        return [waiting, self.add("merge", "ok", "!7 merged as 3333333333cc", actor="alice")]


def successful_release(run: Run) -> list[Timeline]:
    timelines = run.until_merged()
    timelines.append(run.add("verify", "ok", "deployment hello/hello rolled out (2/2 ready)", "eks"))
    timelines.append(run.add("verify", "ok", "deployment hello/hello rolled out (2/2 ready)", "aks"))
    timelines.append(run.add("result", "ok", "hello 1.2.0 runs on eks, aks"))
    return timelines


def publish_all(n: SlackNotifier, timelines: list[Timeline]) -> None:
    for t in timelines:
        result = n.publish(t, CLUSTERS)
        assert result.ok, result.error


def test_successful_release(slack: FakeSlack) -> None:
    store = MemoryThreadStore()
    publish_all(notifier(slack, store), successful_release(Run()))

    assert (slack.count("chat.postMessage"), slack.count("chat.update")) == (6, 4)
    parents = [m for m in slack.messages.values() if not m.thread_ts]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.channel == "C0DEPLOYS" and parent.edits == 4
    assert parent.text == (
        "✅ Release hello 1.2.0: succeeded · image 0123456789ab · eks ✅ rolled out · aks ✅ rolled out"
    )
    assert [m.text for m in slack.thread(parent.ts)] == [
        (
            "✅ *<https://gitlab.example/infra/manifests/-/merge_requests/7|Merge request>*: "
            "opened !7 (opened): hello: release 1.2.0 (0123456789ab)"
        ),
        "✅ *Merged*: !7 merged as 3333333333cc (by alice)",
        "✅ *eks: rolled out*: deployment hello/hello rolled out (2/2 ready)",
        "✅ *aks: rolled out*: deployment hello/hello rolled out (2/2 ready)",
        "✅ *Release succeeded*: hello 1.2.0 runs on eks, aks",
    ]
    assert not any(MENTION in c.text for c in slack.calls)
    # Every update went to the same message, by channel ID, as chat.update requires.
    assert {(c.channel, c.ts) for c in slack.calls if c.method == "chat.update"} == {("C0DEPLOYS", parent.ts)}


def test_validation_failure(slack: FakeSlack) -> None:
    run = Run()
    run.until_validation()
    n = notifier(slack, MemoryThreadStore())
    publish_all(
        n,
        [
            run.add(
                "validate",
                "failed",
                "overlays/eks: Deployment/hello/hello at spec.replicas: 'two' is not of type 'integer'",
            )
        ],
    )
    publish_all(
        n,
        [run.add("result", "failed", "validation of overlays/eks, overlays/aks failed; nothing was merged")],
    )

    assert (slack.count("chat.postMessage"), slack.count("chat.update")) == (4, 1)
    (parent,) = [m for m in slack.messages.values() if not m.thread_ts]
    assert parent.text.startswith("❌ Release hello 1.2.0: failed · image 0123456789ab · eks ⏭️ not deployed")
    thread = slack.thread(parent.ts)
    assert thread[1].text.startswith("❌ *Validation failed*\n```overlays/eks: Deployment/hello/hello")
    assert [m.text.startswith(MENTION) for m in thread] == [False, False, True]


def test_rollout_failure_on_one_cluster(slack: FakeSlack) -> None:
    run = Run()
    timelines = run.until_merged()
    timelines.append(run.add("verify", "ok", "deployment hello/hello rolled out (2/2 ready)", "eks"))
    timelines.append(run.add("verify", "failed", "deployment hello/hello: ImagePullBackOff", "aks"))
    timelines.append(run.add("result", "failed", "rollout failed on aks: ImagePullBackOff; verified on eks"))
    publish_all(notifier(slack, MemoryThreadStore()), timelines)

    assert (slack.count("chat.postMessage"), slack.count("chat.update")) == (6, 4)
    (parent,) = [m for m in slack.messages.values() if not m.thread_ts]
    assert "eks ✅ rolled out · aks ❌ rollout failed" in parent.text
    assert (
        parent.blocks[1]["fields"][1]["text"]
        == "*aks*\n❌ rollout failed\ndeployment hello/hello: ImagePullBackOff"
    )
    thread = slack.thread(parent.ts)
    assert thread[3].text == "❌ *aks: rollout failed*: deployment hello/hello: ImagePullBackOff"
    assert [m.text.startswith(MENTION) for m in thread] == [False] * 4 + [True]


def test_republishing_the_same_timeline_sends_nothing(slack: FakeSlack) -> None:
    n = notifier(slack, MemoryThreadStore())
    timelines = Run().until_merged()
    publish_all(n, timelines)
    before = len(slack.calls)
    result = n.publish(timelines[-1], CLUSTERS)  # e.g. the notify task retried
    assert result.ok and not result.updated_parent and result.replies == 0
    assert len(slack.calls) == before


def test_rerun_continues_the_same_thread(slack: FakeSlack) -> None:
    store = MemoryThreadStore()
    first = notifier(slack, store).publish(Run().until_merged()[0], CLUSTERS)
    # A new process (fresh notifier and client) re-runs the same release: new events, same thread.
    rerun = successful_release(Run(start=100))
    publish_all(notifier(slack, store), rerun)

    parents = [m for m in slack.messages.values() if not m.thread_ts]
    assert [p.ts for p in parents] == [first.ts]
    assert parents[0].text.startswith("✅ Release hello 1.2.0: succeeded")
    assert len(slack.thread(first.ts)) == 1 + 5
    assert all(c.thread_ts == first.ts for c in slack.calls if c.method == "chat.postMessage" and c.thread_ts)


def test_deleted_parent_starts_a_new_thread(slack: FakeSlack) -> None:
    n = notifier(slack, MemoryThreadStore())
    timelines = Run().until_merged()
    first = n.publish(timelines[0], CLUSTERS)
    del slack.messages[("C0DEPLOYS", first.ts)]
    second = n.publish(timelines[1], CLUSTERS)
    assert second.ok and second.posted_parent and second.ts != first.ts
    assert len(slack.thread(second.ts)) == 2  # the MR reply again, then the merge


def test_rate_limited_then_success(slack: FakeSlack) -> None:
    slack.rate_limit(1, retry_after=1)
    started = time.monotonic()
    result = notifier(slack, MemoryThreadStore()).publish(Run().until_merged()[0], CLUSTERS)
    elapsed = time.monotonic() - started
    assert result.ok, result.error
    assert 1.0 <= elapsed < 6  # waited the Retry-After, and not much more (the budget is 10 s)
    assert [(c.method, c.status) for c in slack.calls][:2] == [
        ("chat.postMessage", 429),
        ("chat.postMessage", 200),
    ]


def test_retry_after_beyond_the_budget_is_not_waited(slack: FakeSlack) -> None:
    slack.rate_limit(1, retry_after=30)
    started = time.monotonic()
    result = notifier(slack, MemoryThreadStore()).publish(Run().until_merged()[0], CLUSTERS)
    assert time.monotonic() - started < 5  # neither the 30 s Retry-After nor the 10 s budget was waited
    assert not result.ok and "rate limited (Retry-After 30 s exceeds the 10 s budget)" in result.error


def test_server_error_never_raises_and_the_next_publish_catches_up(slack: FakeSlack) -> None:
    n = notifier(slack, MemoryThreadStore())
    timelines = Run().until_merged()
    slack.fail(1, status=500)
    result = n.publish(timelines[0], CLUSTERS)
    assert not result.ok and result.error == "chat.postMessage: HTTP 500"
    result = n.publish(timelines[1], CLUSTERS)
    assert result.ok and result.posted_parent and result.replies == 2


def test_failure_midway_keeps_the_unposted_replies_for_later(slack: FakeSlack) -> None:
    n = notifier(slack, MemoryThreadStore())
    timelines = Run().until_merged()
    n.publish(timelines[0], CLUSTERS)
    slack.fail(1, status=503)  # the update of the parent
    assert n.publish(timelines[1], CLUSTERS).error == "chat.update: HTTP 503"
    result = n.publish(timelines[1], CLUSTERS)
    assert result.ok and result.updated_parent and result.replies == 1
    (parent,) = [m for m in slack.messages.values() if not m.thread_ts]
    assert [m.text.split("*")[1] for m in slack.thread(parent.ts)][1] == "Merged"


def test_timeouts_never_raise_and_stay_within_the_budget(slack: FakeSlack) -> None:
    slack.delay(10)  # far beyond timeout and budget, so that waiting for an answer cannot pass unseen
    started = time.monotonic()
    result = notifier(slack, MemoryThreadStore(), timeout=1, budget=2).publish(
        Run().until_merged()[1], CLUSTERS
    )
    elapsed = time.monotonic() - started
    assert not result.ok and "chat.postMessage: TimeoutError" in result.error
    assert elapsed < 5  # within the budget give or take a loaded machine; the server answers after 10 s


def test_slow_server_is_cut_off_at_the_budget(slack: FakeSlack) -> None:
    # Each call answers in time (0.7 s), but the budget runs out before the last one: the error says
    # it was cut off; the clock only checks that nothing waited far beyond the 2 s budget.
    slack.delay(0.7)
    started = time.monotonic()
    result = notifier(slack, MemoryThreadStore(), timeout=5, budget=2).publish(
        Run().until_merged()[1], CLUSTERS
    )
    elapsed = time.monotonic() - started
    assert not result.ok and "budget is spent" in result.error
    assert elapsed < 6


def test_unreachable_slack_never_raises(slack: FakeSlack) -> None:
    n = SlackNotifier(
        TOKEN, "#deploys", store=MemoryThreadStore(), base_url="http://127.0.0.1:9/api/", timeout=1
    )
    result = n.publish(Run().until_merged()[0], CLUSTERS)
    assert not result.ok and "URLError" in result.error


@pytest.mark.parametrize(
    ("token", "channel", "error"),
    [
        ("xoxb-wrong-SeCrEtToKeN", "#deploys", "chat.postMessage: invalid_auth"),
        (TOKEN, "#nowhere", "chat.postMessage: channel_not_found"),
    ],
)
def test_api_errors_are_reported_without_the_token(
    slack: FakeSlack, caplog: pytest.LogCaptureFixture, token: str, channel: str, error: str
) -> None:
    caplog.set_level(logging.DEBUG)
    result = notifier(slack, MemoryThreadStore(), token=token, channel=channel).publish(
        Run().until_merged()[1], CLUSTERS
    )
    assert not result.ok and result.error == error
    assert error in caplog.text
    assert token not in caplog.text and "SeCrEtToKeN" not in caplog.text
    assert all("SeCrEtToKeN" not in f"{c.error} {c.text} {c.blocks}" for c in slack.calls)


def test_token_absent_from_logs_of_a_whole_release(
    slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    slack.rate_limit(1, retry_after=0)
    publish_all(notifier(slack, MemoryThreadStore()), successful_release(Run()))
    assert "Sending a request" in caplog.text  # the SDK's debug log was captured, redacted
    assert "SeCrEtToKeN" not in caplog.text
    assert all(c.authorization == f"Bearer {TOKEN}" for c in slack.calls)  # it did reach Slack


def test_thread_key_is_a_prefect_variable_name() -> None:
    assert thread_key("hello", "1.2.0").startswith("slack-thread-hello-1-2-0-")
    assert thread_key("hello", "1.2.0") != thread_key("hello", "1-2-0")
    assert thread_key("Web_App", "v2+build.7") == thread_key("Web_App", "v2+build.7")


def test_prefect_variable_store_continues_the_thread(slack: FakeSlack, prefect_harness: None) -> None:
    run = Run(app="varapp")
    timelines = run.until_merged()
    first = notifier(slack, PrefectVariableThreadStore()).publish(timelines[0], CLUSTERS)
    assert first.ok, first.error
    stored = PrefectVariableThreadStore().get(thread_key("varapp", "1.2.0"))
    assert stored is not None and stored.ts == first.ts and len(stored.posted) == 1

    second = notifier(slack, PrefectVariableThreadStore()).publish(timelines[1], CLUSTERS)
    assert second.ok and second.ts == first.ts and not second.posted_parent and second.replies == 1
    assert len([m for m in slack.messages.values() if not m.thread_ts]) == 1


def test_announce_posts_one_standalone_message_and_never_raises(slack: FakeSlack) -> None:
    result = notifier(slack, MemoryThreadStore()).announce("*Drift changed*: 1 appeared")
    assert result.ok and result.ts
    assert [(c.method, c.thread_ts) for c in slack.calls] == [("chat.postMessage", "")]
    slack.fail(1, status=500)
    failed = notifier(slack, MemoryThreadStore()).announce("again")
    assert not failed.ok and "HTTP 500" in failed.error
