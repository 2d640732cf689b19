"""The release story people read: parent summary and thread replies from a timeline (pure)."""

from __future__ import annotations

from twincd.domain import Event, Timeline
from twincd.notify import State, parent_summary, reply_key, thread_replies

DIGEST = "sha256:" + "0123456789ab" + "c" * 52
CLUSTERS = ["eks", "aks"]


def _at(n: int) -> str:
    return f"2025-06-01T12:00:{n:02d}+00:00"


def until_waiting() -> Timeline:
    t = Timeline("hello", "1.2.0")
    for i, e in enumerate(
        [
            Event("release", "ok", "tag 1.2.0 is commit 1111111111aa", ""),
            Event("push", "ok", f"pushed: 127.0.0.1:5000/hello@{DIGEST}", "", digest=DIGEST),
            Event("set-image", "ok", "committed: twincd/hello/1.2.0 at 2222222222bb", ""),
            Event(
                "merge-request",
                "ok",
                "opened !7 (opened): hello: release 1.2.0 (0123456789ab)",
                "",
                url="https://gitlab.example/infra/manifests/-/merge_requests/7",
            ),
            Event("validate", "ok", "12 resources valid in overlays/eks, overlays/aks", ""),
            Event("merge", "waiting", "waiting for approval of !7", ""),
        ]
    ):
        t = t.add(Event(e.step, e.status, e.text, _at(i), e.cluster, e.url, e.digest, e.actor))
    return t


def merged(t: Timeline) -> Timeline:
    return t.add(Event("merge", "ok", "!7 merged as 3333333333cc", _at(10), actor="alice"))


def succeeded() -> Timeline:
    t = merged(until_waiting())
    t = t.add(Event("verify", "ok", "deployment hello/hello rolled out (2/2 ready)", _at(20), "eks"))
    t = t.add(Event("verify", "ok", "deployment hello/hello rolled out (2/2 ready)", _at(21), "aks"))
    return t.add(Event("result", "ok", "hello 1.2.0 runs on eks, aks", _at(22)))


def test_parent_of_a_successful_release() -> None:
    p = parent_summary(succeeded(), CLUSTERS)
    assert p.state is State.SUCCEEDED
    assert p.digest == "0123456789ab"
    assert [(c.name, c.status) for c in p.clusters] == [("eks", "rolled out"), ("aks", "rolled out")]
    assert p.plain == "✅ hello 1.2.0 succeeded · image 0123456789ab · eks ✅ rolled out · aks ✅ rolled out"
    assert (
        p.text
        == "✅ Release hello 1.2.0: succeeded · image 0123456789ab · eks ✅ rolled out · aks ✅ rolled out"
    )
    head = p.blocks[0]["text"]["text"]
    assert "<https://gitlab.example/infra/manifests/-/merge_requests/7|merge request>" in head
    assert "!7 merged as 3333333333cc by alice" in head
    assert [f["text"] for f in p.blocks[1]["fields"]] == ["*eks*\n✅ rolled out", "*aks*\n✅ rolled out"]


def test_parent_while_waiting_then_rolling_out() -> None:
    waiting = parent_summary(until_waiting(), CLUSTERS)
    assert waiting.state is State.WAITING
    assert {c.status for c in waiting.clusters} == {"pending"}
    rolling = parent_summary(merged(until_waiting()), CLUSTERS)
    assert rolling.state is State.IN_PROGRESS
    assert {c.status for c in rolling.clusters} == {"rolling out"}


def test_digest_found_in_the_push_text_when_the_event_has_none() -> None:
    t = Timeline("hello", "1.2.0").add(Event("push", "ok", f"pushed: r/hello@{DIGEST}", _at(0)))
    assert parent_summary(t, CLUSTERS).digest == "0123456789ab"
    assert parent_summary(Timeline("hello", "1.2.0"), CLUSTERS).digest == ""


def test_parent_of_a_validation_failure() -> None:
    t = until_waiting()
    t = Timeline(t.app, t.tag, t.events[:4]).add(
        Event(
            "validate",
            "failed",
            "overlays/eks: Deployment/hello/hello at spec.replicas: 'x' is not <int>",
            _at(5),
        )
    )
    p = parent_summary(t, CLUSTERS)
    assert p.state is State.FAILED
    assert [c.status for c in p.clusters] == ["not deployed", "not deployed"]
    assert p.text.startswith("❌ Release hello 1.2.0: failed")


def test_parent_of_a_rollout_failure_on_one_cluster() -> None:
    t = merged(until_waiting())
    t = t.add(Event("verify", "ok", "rolled out", _at(20), "eks"))
    t = t.add(
        Event("verify", "failed", "deployment hello/hello: ImagePullBackOff\nmore detail", _at(21), "aks")
    )
    p = parent_summary(t, CLUSTERS)
    assert p.state is State.FAILED
    assert [(c.name, c.status) for c in p.clusters] == [("eks", "rolled out"), ("aks", "rollout failed")]
    assert (
        p.blocks[1]["fields"][1]["text"]
        == "*aks*\n❌ rollout failed\ndeployment hello/hello: ImagePullBackOff"
    )
    assert "eks ✅ rolled out · aks ❌ rollout failed" in p.text


def test_slack_control_characters_are_escaped_but_links_are_kept() -> None:
    t = Timeline("a<b>", "1&2").add(
        Event("merge-request", "ok", "opened <!channel>", _at(0), url="https://x/1")
    )
    p = parent_summary(t, [])
    assert "a&lt;b&gt; 1&amp;2" in p.text and "<!channel>" not in p.text
    (r,) = thread_replies(t)
    assert r.text == "✅ *<https://x/1|Merge request>*: opened &lt;!channel&gt;"
    assert r.plain == "✅ Merge request: opened <!channel>"


def test_replies_of_a_successful_release_in_order() -> None:
    replies = thread_replies(succeeded())
    assert [(r.event.step, r.event.cluster) for r in replies] == [
        ("merge-request", ""),
        ("merge", ""),
        ("verify", "eks"),
        ("verify", "aks"),
        ("result", ""),
    ]
    assert replies[1].plain == "✅ Merged: !7 merged as 3333333333cc (by alice)"
    assert not any(r.mention for r in replies)


def test_only_new_replies_are_returned() -> None:
    first = thread_replies(until_waiting())
    later = thread_replies(succeeded(), posted={r.key for r in first})
    assert [r.event.step for r in later] == ["merge", "verify", "verify", "result"]
    assert thread_replies(succeeded(), posted={r.key for r in first + later}) == []


def test_a_rerun_of_the_same_release_gets_new_keys() -> None:
    e = Event("merge-request", "ok", "reused !7", _at(0))
    again = Event("merge-request", "ok", "reused !7", _at(30))
    assert reply_key(e) == reply_key(Event(**e.__dict__))
    assert reply_key(e) != reply_key(again)


def test_a_resumed_run_telling_its_first_steps_again_posts_nothing_twice() -> None:
    """A run suspended while waiting for a person starts from the top when resumed: the same
    events of the same run come again with new times, and are the replies already posted."""
    events = [
        Event("push", "ok", f"pushed: r/hello@{DIGEST}", _at(0)),
        Event("merge-request", "ok", "opened !7", _at(1)),
        Event("verify", "failed", "eks: timed out", _at(2), "eks"),
        Event("verify", "failed", "eks: timed out", _at(3), "eks"),  # told twice in one run: two replies
    ]
    first = Timeline("hello", "1.2.0", tuple(events[:2]), run="run-1")
    posted = {r.key for r in thread_replies(first)}
    replayed = Timeline("hello", "1.2.0", run="run-1")
    for n, e in enumerate(events):
        replayed = replayed.add(Event(e.step, e.status, e.text, _at(30 + n), e.cluster))
    new = thread_replies(replayed, posted=posted)
    assert [(r.event.step, r.event.at) for r in new] == [("verify", _at(32)), ("verify", _at(33))]
    # Another run of the same release tells its own story.
    other = Timeline("hello", "1.2.0", tuple(events[:2]), run="run-2")
    assert len(thread_replies(other, posted=posted)) == len(posted) == 1


def test_validation_failure_reply_has_the_findings_and_the_result_the_mention() -> None:
    findings = "overlays/eks: Deployment/hello/hello: bad\noverlays/aks: Deployment/hello/hello: bad"
    t = Timeline("hello", "1.2.0").add(Event("validate", "failed", findings, _at(0)))
    t = t.add(Event("result", "failed", "validation of overlays/eks failed; nothing was merged", _at(1)))
    validate, result = thread_replies(t)
    assert validate.text == f"❌ *Validation failed*\n```{findings}```"
    assert not validate.mention
    assert result.mention
    assert result.plain == "❌ Release failed: validation of overlays/eks failed; nothing was merged"


def test_rollout_failure_replies_mention_once() -> None:
    t = merged(until_waiting())
    t = t.add(Event("verify", "ok", "rolled out", _at(20), "eks"))
    t = t.add(Event("verify", "failed", "ImagePullBackOff", _at(21), "aks"))
    t = t.add(Event("result", "failed", "rollout failed on aks: ImagePullBackOff; verified on eks", _at(22)))
    replies = thread_replies(t)
    assert [r.plain for r in replies[-3:]] == [
        "✅ eks: rolled out: rolled out",
        "❌ aks: rollout failed: ImagePullBackOff",
        "❌ Release failed: rollout failed on aks: ImagePullBackOff; verified on eks",
    ]
    assert [r.mention for r in replies] == [False, False, False, False, True]


def test_long_findings_are_cut_at_a_line_with_a_note() -> None:
    findings = "\n".join(f"overlays/eks: Deployment/hello/app{i}: bad" for i in range(500))
    (r,) = thread_replies(Timeline("hello", "1").add(Event("validate", "failed", findings, _at(0))))
    assert len(r.text) < 3100
    assert r.text.endswith("more line(s) in the Prefect run```")


def test_waiting_and_plain_ok_steps_are_not_replies() -> None:
    assert [r.event.step for r in thread_replies(until_waiting())] == ["merge-request"]


def test_nothing_to_merge_and_refusal_are_replies() -> None:
    t = Timeline("hello", "1").add(Event("set-image", "skipped", "main already pins sha256:x", _at(0)))
    t = t.add(Event("merge", "cancelled", "!7 refused by bob", _at(1)))
    assert [r.plain for r in thread_replies(t)] == [
        "⏭️ Nothing to merge: main already pins sha256:x",
        "🚫 Merge refused: !7 refused by bob",
    ]
    assert parent_summary(t, CLUSTERS).state is State.CANCELLED
