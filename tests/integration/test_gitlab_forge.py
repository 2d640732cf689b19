"""The GitLab forge adapter with the real python-gitlab client, over HTTP, against the fake GitLab.

The fake's project is backed by a real bare repo: merging makes a real merge commit there.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gitlab
import pytest

from tests.fakes.gitlab import FakeGitlab
from twincd.adapters.gitlab import (
    FAILED_LABEL,
    GitlabAuthError,
    GitlabForge,
    GitlabNotFound,
    GitlabUnavailable,
    HeadMoved,
    MergeBlocked,
)
from twincd.adapters.secrets import Secret, resolve_secret
from twincd.config import GitlabForge as GitlabForgeConfig
from twincd.domain import Finding, MergeRequest, ValidationReport
from twincd.errors import PermanentError, TransientError
from twincd.wiring import gitlab_forge

pytestmark = pytest.mark.integration

TOKEN = "glpat-TOPSECRET-0123456789"
READ_ONLY = "glpat-READONLY-9876543210"
PROJECT = "infra/manifests"
BRANCH = "twincd/hello/v1.0.0"


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=dev", "-c", "user.email=dev@example.test", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A manifests repo with `main` and a release branch that changes one file."""
    bare, work = tmp_path / "manifests.git", tmp_path / "work"
    _git("init", "-q", "--bare", "-b", "main", str(bare))
    _git("clone", "-q", str(bare), str(work))
    (work / "kustomization.yaml").write_text("images: []\n")
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "initial", cwd=work)
    _git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    _git("checkout", "-qb", BRANCH, cwd=work)
    (work / "kustomization.yaml").write_text("images:\n- name: hello\n  digest: sha256:" + "a" * 64 + "\n")
    _git("commit", "-qam", "hello: release v1.0.0", cwd=work)
    _git("push", "-q", "origin", BRANCH, cwd=work)
    return bare


@pytest.fixture
def fake(bare: Path) -> Iterator[FakeGitlab]:
    with FakeGitlab(repo=bare, token=TOKEN, project=PROJECT, read_only_token=READ_ONLY) as server:
        yield server


def forge(
    fake: FakeGitlab, *, token: str = TOKEN, project: str = PROJECT, max_retries: int = 5
) -> GitlabForge:
    return GitlabForge(
        url=fake.url,
        project=project,
        token=Secret(token),
        labels=("twincd", "release"),
        timeout=5,
        max_retries=max_retries,
    )


def open_release(f: GitlabForge) -> MergeRequest:
    return f.open(
        source_branch=BRANCH,
        target_branch="main",
        title="hello: release v1.0.0",
        description="Pin hello to sha256:aaaa in overlays/eks/hello.",
    )


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and READ_ONLY not in text


def failing_report() -> ValidationReport:
    return ValidationReport(
        ("overlays/eks/hello",),
        3,
        (
            Finding(
                "overlays/eks/hello",
                "Deployment/hello/hello",
                "replicas: 'two' is not of type 'integer'",
                path="spec.replicas",
            ),
        ),
    )


# ---- merge requests ---------------------------------------------------------------------------


def test_open_creates_with_labels_then_reuses(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    assert (mr.ref, mr.state, mr.reused, mr.source_branch, mr.target_branch) == (
        "!1",
        "opened",
        False,
        BRANCH,
        "main",
    )
    assert mr.web_url.endswith(f"/{PROJECT}/-/merge_requests/1")
    assert fake.mrs[1].labels == ["twincd", "release"]
    # One list (nothing there) and one create: the project itself is never fetched (lazy).
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _ in fake.calls()] == [
        ("GET", "merge_requests"),
        ("POST", "merge_requests"),
    ]
    again = open_release(f)
    assert again.reused and again.ref == mr.ref and len(fake.mrs) == 1


def test_409_from_a_racing_attempt_is_reuse(fake: FakeGitlab) -> None:
    first = open_release(forge(fake))
    fake.hide_from_lists(1)  # the second attempt's lookup misses it, so its create gets the 409
    second = open_release(forge(fake))
    assert second.reused and second.ref == first.ref
    assert ("POST", f"/api/v4/projects/{PROJECT.replace('/', '%2F')}/merge_requests", 409) in fake.calls()
    assert len(fake.mrs) == 1


def test_open_mr_into_another_target_is_a_permanent_conflict(fake: FakeGitlab) -> None:
    f = forge(fake)
    f.open(source_branch=BRANCH, target_branch="main", title="t", description="d")
    _git("push", "-q", str(fake.repo), "main:refs/heads/staging", cwd=fake.repo)
    with pytest.raises(PermanentError, match="other than 'staging'"):
        f.open(source_branch=BRANCH, target_branch="staging", title="t", description="d")


def test_missing_source_branch_is_not_found(fake: FakeGitlab) -> None:
    with pytest.raises(GitlabNotFound, match="twincd/hello/v9.9.9") as e:
        forge(fake).open(
            source_branch="twincd/hello/v9.9.9", target_branch="main", title="t", description="d"
        )
    assert_no_token(str(e.value))


def test_closed_mr_is_not_reused(fake: FakeGitlab) -> None:
    f = forge(fake)
    first = open_release(f)
    fake.close(1)
    second = open_release(f)
    assert second.ref != first.ref and not second.reused and second.state == "opened"


# ---- validation notes and labels --------------------------------------------------------------


def test_failed_validation_posts_one_note_and_labels(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    f.post_validation(mr, failing_report())
    f.post_validation(mr, failing_report())  # a retried task posts nothing twice
    notes = fake.notes(1)
    assert len(notes) == 1
    assert "validation failed" in notes[0] and "spec.replicas" in notes[0]
    assert FAILED_LABEL in fake.mrs[1].labels and "twincd" in fake.mrs[1].labels
    # Fixed and validated again: a new note, and the failure label goes away.
    f.post_validation(mr, ValidationReport(("overlays/eks/hello",), 3))
    assert "validation passed" in fake.notes(1)[-1]
    assert fake.mrs[1].labels == ["twincd", "release"]


# ---- waiting for a person ---------------------------------------------------------------------


def test_a_persons_merge_is_read_with_the_real_merge_commit(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    assert f.get(mr).state == "opened"
    fake.merge(1)  # a maintainer merges in GitLab
    merged = f.get(mr)
    assert merged.state == "merged"
    assert merged.merge_commit == _git("rev-parse", "main", cwd=fake.repo)
    parents = _git("rev-list", "--parents", "-n1", "main", cwd=fake.repo).split()
    assert len(parents) == 3  # a real --no-ff merge: the commit and its two parents


def test_a_closed_mr_reads_closed(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    fake.close(1)
    closed = f.get(mr)
    assert (closed.state, closed.merge_commit) == ("closed", None)


def test_close_comments_and_closes(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    closed = f.close(mr, reason="refused by ops: wrong digest")
    assert closed.state == "closed" and fake.mrs[1].state == "closed"
    assert fake.notes(1) == ["Closed by twincd: refused by ops: wrong digest"]
    assert f.close(mr, reason="again").state == "closed"  # already done


# ---- retries and errors -----------------------------------------------------------------------


def test_429_waits_retry_after_then_succeeds(fake: FakeGitlab) -> None:
    fake.fail_next(429, count=1, retry_after="1")
    t0 = time.monotonic()
    mr = open_release(forge(fake))
    assert mr.ref == "!1"
    assert time.monotonic() - t0 >= 1.0  # python-gitlab slept Retry-After, not its 0.1 s backoff
    assert [s for _, _, s in fake.calls()] == [429, 200, 201]


def test_500s_are_retried(fake: FakeGitlab) -> None:
    fake.fail_next(500, count=2)
    assert open_release(forge(fake)).ref == "!1"
    assert [s for _, _, s in fake.calls()] == [500, 500, 200, 201]


def test_persistent_500_is_transient_after_the_retries(fake: FakeGitlab) -> None:
    fake.fail_next(502, count=100)
    with pytest.raises(GitlabUnavailable, match="502") as e:
        open_release(forge(fake, max_retries=2))
    assert isinstance(e.value, TransientError)
    assert len(fake.calls()) == 3  # the first try and python-gitlab's two retries


def test_unreachable_gitlab_is_transient(fake: FakeGitlab) -> None:
    url = fake.url.replace("http://", "http://deploy:url-s3cret@")  # credentials in the URL: never shown
    fake.stop()
    f = GitlabForge(url=url, project=PROJECT, token=Secret(TOKEN), timeout=2, max_retries=1)
    with pytest.raises(GitlabUnavailable, match="could not be reached") as e:
        open_release(f)
    assert_no_token(str(e.value), repr(e.value.__cause__))
    assert fake.url in str(e.value) and "url-s3cret" not in str(e.value) + repr(f)


def test_wrong_token_is_permanent_and_says_what_to_fix(
    fake: FakeGitlab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GitlabAuthError) as e:
        open_release(forge(fake, token="glpat-wrong"))
    message = str(e.value)
    assert "401" in message and PROJECT in message and "`api` scope" in message
    assert "glpat-wrong" not in message
    # A URL with credentials in it is shown without them.
    with_credentials = GitlabForge(
        url=fake.url.replace("http://", "http://deploy:url-s3cret@"),
        project=PROJECT,
        token=Secret("glpat-wrong"),
        timeout=5,
    )
    with pytest.raises(GitlabAuthError) as e:
        open_release(with_credentials)
    assert f"GitLab at {fake.url}," in str(e.value) and "url-s3cret" not in str(e.value)


def test_read_only_token_gets_403_naming_the_permission(
    fake: FakeGitlab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GitlabAuthError) as e:
        open_release(forge(fake, token=READ_ONLY))
    message = str(e.value)
    assert "403" in message and PROJECT in message and "Developer role" in message
    assert_no_token(message, caplog.text)


def test_unknown_project_is_not_found(fake: FakeGitlab) -> None:
    with pytest.raises(GitlabNotFound, match="infra/nope") as e:
        open_release(forge(fake, project="infra/nope"))
    assert "Reporter role" in str(e.value)


def test_token_is_in_no_message_log_or_repr(
    fake: FakeGitlab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 and python-gitlab at their most verbose
    monkeypatch.setenv("TWINCD_TEST_GITLAB_TOKEN", TOKEN)
    cfg = GitlabForgeConfig(
        type="gitlab", url=fake.url, project=PROJECT, token="env:TWINCD_TEST_GITLAB_TOKEN"
    )
    f = gitlab_forge(cfg)
    texts = [repr(f), repr(resolve_secret(cfg.token)), str(resolve_secret(cfg.token))]
    # A description that quotes the token by mistake is masked before it reaches GitLab.
    mr = f.open(source_branch=BRANCH, target_branch="main", title="t", description=f"oops {TOKEN}")
    texts.append(fake.mrs[1].description)
    f.post_validation(mr, failing_report())
    texts += fake.notes(1)
    impatient = GitlabForge(url=fake.url, project=PROJECT, token=Secret(TOKEN), max_retries=0)
    fake.fail_next(500, count=2)
    for call in (lambda: impatient.get(mr), lambda: impatient.post_validation(mr, failing_report())):
        with pytest.raises(TransientError) as e:
            call()
        texts += [str(e.value), repr(e.value), str(e.value.__cause__), repr(e.value.__cause__)]
    assert "oops ***" in fake.mrs[1].description
    assert_no_token(*texts, caplog.text)


def test_merge_through_the_api_for_auto_approve(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    merged = f.merge(mr, approved_by="auto-approve")
    assert merged.state == "merged" and merged.merge_commit == _git("rev-parse", "main", cwd=fake.repo)
    assert "Approved-by: auto-approve" in _git("log", "-1", "--format=%B", "main", cwd=fake.repo)
    assert f.merge(mr, approved_by="again") == merged  # already done


@pytest.mark.parametrize("shown_state", ["opened", "merged"])  # a merge train; a merge commit not written yet
def test_merge_waits_until_gitlab_shows_the_merge_commit(fake: FakeGitlab, shown_state: str) -> None:
    f = forge(fake)
    mr = open_release(f)
    fake.complete_merges_after(3, shown_state=shown_state)
    merged = f.merge(mr, approved_by="auto-approve")
    assert merged.state == "merged" and merged.merge_commit == _git("rev-parse", "main", cwd=fake.repo)
    mr_path = f"/api/v4/projects/{PROJECT.replace('/', '%2F')}/merge_requests/1"
    after = fake.calls()[fake.calls().index(("PUT", f"{mr_path}/merge", 200)) + 1 :]
    assert [c for c in after if c[1] == mr_path] == [
        ("GET", mr_path, 200)
    ] * 3  # the third GET shows it merged
    # "merged" without a merge commit is final only where the project fast-forwards: asked once.
    assert len(after) == 3 + (shown_state == "merged")


def test_merge_that_does_not_complete_is_transient(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    fake.complete_merges_after(1_000_000)
    with pytest.raises(
        GitlabUnavailable, match=r"!1 .* accepted for merging but is still 'opened' after 1 s"
    ) as e:
        f.merge(mr, approved_by="auto-approve", settle_timeout=1)
    assert isinstance(e.value, TransientError)


def test_context_manager_closes_the_http_session(fake: FakeGitlab) -> None:
    with forge(fake) as f:
        open_release(f)
        pools = f._gl.session.get_adapter(fake.url).poolmanager.pools  # read only: python-gitlab's session
        assert len(pools) == 1
    assert len(pools) == 0  # its pooled connection is closed


def test_merge_conflict_is_permanent(fake: FakeGitlab, tmp_path: Path) -> None:
    work = tmp_path / "other"
    _git("clone", "-q", str(fake.repo), str(work))
    (work / "kustomization.yaml").write_text("images: [conflict]\n")
    _git("commit", "-qam", "someone else", cwd=work)
    _git("push", "-q", "origin", "main", cwd=work)
    main = _git("rev-parse", "main", cwd=fake.repo)
    f = forge(fake)
    # GitLab: detailed_merge_status "conflict", and the merge call would answer 405.
    with pytest.raises(MergeBlocked, match=r"!1 .* has conflicts with the target branch.*nothing was merged"):
        f.merge(open_release(f), approved_by="auto-approve")
    assert _git("rev-parse", "main", cwd=fake.repo) == main


def test_api_calls_of_one_release(fake: FakeGitlab) -> None:
    """The GitLab requests of one deploy a person merges: open 2, validation 3, and reading it once
    resumed: the MR and its approvals (who approved, for the timeline)."""
    f = forge(fake)
    mr = open_release(f)
    assert len(fake.calls()) == 2  # list, create
    f.post_validation(mr, ValidationReport(("overlays/eks/hello", "overlays/aks/hello"), 6))
    assert len(fake.calls()) == 5  # list notes, create note, label
    fake.merge(1)
    f.get(mr)
    print(f"GitLab API calls of one release a person merges: {len(fake.calls())}")
    assert [p.rsplit("/", 1)[-1] for _, p, _ in fake.calls()[5:]] == ["1", "approvals"]


def test_merged_mr_is_reused_only_at_the_same_head(fake: FakeGitlab) -> None:
    f = forge(fake)
    merged = f.merge(open_release(f), approved_by="alice")
    head = _git("rev-parse", BRANCH, cwd=fake.repo)
    assert merged.sha == head
    same = f.open(source_branch=BRANCH, target_branch="main", title="t", description="d", head=head)
    assert same.reused and same.ref == merged.ref
    # The release was reverted and its branch rebuilt: deploying it again needs a new MR.
    rebuilt = f.open(source_branch=BRANCH, target_branch="main", title="t", description="d", head="b" * 40)
    assert not rebuilt.reused and rebuilt.state == "opened" and rebuilt.ref != merged.ref


# ---- the fake behaves as GitLab does (python-gitlab straight at it) ---------------------------


def _sdk_mr(fake: FakeGitlab, token: str = TOKEN) -> Any:
    gl = gitlab.Gitlab(fake.url, private_token=token)
    project = gl.projects.get(PROJECT, lazy=True)
    project.mergerequests.create({"source_branch": BRANCH, "target_branch": "main", "title": "t"})
    return project.mergerequests.get(1, lazy=True)


def _push_to_release_branch(fake: FakeGitlab, tmp_path: Path, text: str = "more\n") -> str:
    work = tmp_path / f"push-{len(list(tmp_path.iterdir()))}"
    _git("clone", "-q", "-b", BRANCH, str(fake.repo), str(work))
    (work / "extra.yaml").write_text(text)
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "a later push", cwd=work)
    _git("push", "-q", "origin", BRANCH, cwd=work)
    return _git("rev-parse", "HEAD", cwd=work)


def test_fake_computes_mergeability_asynchronously(fake: FakeGitlab, tmp_path: Path) -> None:
    main = _git("rev-parse", "main", cwd=fake.repo)
    lazy = _sdk_mr(fake)
    assert fake.mrs[1].checking_state == "preparing"
    with pytest.raises(gitlab.exceptions.GitlabMRClosedError) as e:
        lazy.merge()
    assert (e.value.response_code, e.value.error_message) == (405, "405 Method Not Allowed")
    assert _git("rev-parse", "main", cwd=fake.repo) == main  # nothing merged
    seen = [lazy.manager.get(1).attributes for _ in range(2)]
    assert [(a["detailed_merge_status"], a["merge_status"]) for a in seen] == [
        ("checking", "checking"),
        ("mergeable", "can_be_merged"),
    ]
    # A push makes GitLab check again.
    head = _push_to_release_branch(fake, tmp_path)
    again = lazy.manager.get(1).attributes
    assert again["sha"] == head and again["detailed_merge_status"] in ("checking", "mergeable")
    assert fake.mrs[1].checking_state == "checking"


def test_fake_sha_guard_is_409_and_merges_nothing(fake: FakeGitlab) -> None:
    fake.check_gets = 0
    main = _git("rev-parse", "main", cwd=fake.repo)
    lazy = _sdk_mr(fake)
    with pytest.raises(gitlab.exceptions.GitlabMRClosedError) as e:
        lazy.merge(sha="f" * 40)
    head = _git("rev-parse", BRANCH, cwd=fake.repo)
    assert e.value.response_code == 409
    assert e.value.error_message == f"SHA does not match HEAD of source branch: {head}"
    assert _git("rev-parse", "main", cwd=fake.repo) == main
    assert lazy.merge(sha=head)["state"] == "merged"


def test_fake_approval_rules_block_until_approved_and_reset_on_push(fake: FakeGitlab, tmp_path: Path) -> None:
    fake.check_gets, fake.approvals_required = 0, 2
    lazy = _sdk_mr(fake)
    assert lazy.manager.get(1).detailed_merge_status == "not_approved"
    approvals = lazy.approvals.get()
    assert (approvals.approvals_required, approvals.approvals_left) == (2, 2)
    fake.approve(1, "alice")
    with pytest.raises(gitlab.exceptions.GitlabMRClosedError) as e:
        lazy.merge()
    assert e.value.response_code == 405
    fake.approve(1, "bob")
    assert [a["user"]["username"] for a in lazy.approvals.get().approved_by] == ["alice", "bob"]
    _push_to_release_branch(fake, tmp_path)
    assert lazy.approvals.get().approvals_left == 2  # approvals reset on push


def test_fake_pipeline_must_succeed_and_auto_merge(fake: FakeGitlab) -> None:
    fake.check_gets, fake.pipelines, fake.only_allow_merge_if_pipeline_succeeds = 0, True, True
    fake.pipeline_gets = 2
    lazy = _sdk_mr(fake)
    assert lazy.manager.get(1).detailed_merge_status == "ci_still_running"
    with pytest.raises(gitlab.exceptions.GitlabMRClosedError) as e:
        lazy.merge()
    assert e.value.response_code == 405
    scheduled = lazy.merge(merge_when_pipeline_succeeds=True)
    assert scheduled["state"] == "opened" and scheduled["merge_when_pipeline_succeeds"] is True
    states = [lazy.manager.get(1).attributes for _ in range(4)]
    # one step every 2 GETs (the first GET above was one): merged as the pipeline succeeds
    assert [(s["head_pipeline"]["status"], s["state"]) for s in states] == [
        ("running", "opened"),
        ("running", "opened"),
        ("success", "merged"),
        ("success", "merged"),
    ]
    assert states[-1]["state"] == "merged" and states[-1]["merged_by"]["username"] == "twincd-bot"
    assert states[-1]["merge_commit_sha"] == _git("rev-parse", "main", cwd=fake.repo)


def test_fake_failed_pipeline_aborts_auto_merge(fake: FakeGitlab) -> None:
    fake.check_gets, fake.pipelines, fake.only_allow_merge_if_pipeline_succeeds = 0, True, True
    main = _git("rev-parse", "main", cwd=fake.repo)
    lazy = _sdk_mr(fake)
    lazy.merge(merge_when_pipeline_succeeds=True)
    fake.set_pipeline(1, "failed")
    attrs = lazy.manager.get(1).attributes
    assert (attrs["state"], attrs["merge_when_pipeline_succeeds"], attrs["detailed_merge_status"]) == (
        "opened",
        False,
        "ci_must_pass",
    )
    assert _git("rev-parse", "main", cwd=fake.repo) == main


# ---- the adapter's merge against GitLab's rules -----------------------------------------------


def _merge_calls(fake: FakeGitlab) -> list[int]:
    return [status for method, path, status in fake.calls("PUT") if path.endswith("/merge")]


def test_merge_waits_while_gitlab_checks_then_merges(fake: FakeGitlab) -> None:
    fake.check_gets = 3  # "preparing" for 3 GETs, then "checking" for 3 more
    f = forge(fake)
    mr = open_release(f)
    merged = f.merge(mr, approved_by="auto-approve")
    assert merged.state == "merged" and merged.merge_commit == _git("rev-parse", "main", cwd=fake.repo)
    gets = [c for c in fake.calls("GET") if c[1].endswith("/merge_requests/1")]
    assert len(gets) >= 6  # read until GitLab had finished checking
    assert _merge_calls(fake) == [200]  # and only then asked to merge: never a 405


def test_merge_still_checking_at_the_deadline_is_transient(fake: FakeGitlab) -> None:
    fake.check_gets = 1_000_000
    f = GitlabForge(url=fake.url, project=PROJECT, token=Secret(TOKEN), poll_seconds=0.05, check_seconds=0.5)
    mr = open_release(f)
    with pytest.raises(GitlabUnavailable, match=r"!1 .* still 'preparing' after 0 s") as e:
        f.merge(mr, approved_by="auto-approve")
    assert isinstance(e.value, TransientError) and _merge_calls(fake) == []


def test_required_pipeline_pending_uses_auto_merge(fake: FakeGitlab) -> None:
    fake.pipelines, fake.only_allow_merge_if_pipeline_succeeds, fake.pipeline_gets = True, True, 2
    main = _git("rev-parse", "main", cwd=fake.repo)
    f = GitlabForge(url=fake.url, project=PROJECT, token=Secret(TOKEN), poll_seconds=0.05)
    mr = open_release(f)
    merged = f.merge(mr, approved_by="auto-approve")
    assert fake.mrs[1].events == ["auto-merge:twincd-bot", "merged:twincd-bot:merge"]
    assert fake.mrs[1].pipeline is not None and fake.mrs[1].pipeline["status"] == "success"
    assert merged.state == "merged" and merged.merged_by == "twincd-bot"
    assert merged.merge_commit == _git("rev-parse", "main", cwd=fake.repo) != main
    assert _merge_calls(fake) == [200]


def test_failed_pipeline_aborts_the_auto_merge_and_nothing_lands(fake: FakeGitlab) -> None:
    fake.pipelines, fake.only_allow_merge_if_pipeline_succeeds = True, True
    fake.pipeline_gets, fake.pipeline_result = 2, "failed"
    main = _git("rev-parse", "main", cwd=fake.repo)
    f = GitlabForge(url=fake.url, project=PROJECT, token=Secret(TOKEN), poll_seconds=0.05)
    with pytest.raises(MergeBlocked, match=r"auto-merge of !1 .* aborted .*head pipeline failed"):
        f.merge(open_release(f), approved_by="auto-approve")
    assert _git("rev-parse", "main", cwd=fake.repo) == main


def test_missing_approvals_say_how_many_and_merge_nothing(fake: FakeGitlab) -> None:
    fake.approvals_required = 2
    main = _git("rev-parse", "main", cwd=fake.repo)
    f = forge(fake)
    mr = open_release(f)
    fake.approve(1, "alice")
    with pytest.raises(MergeBlocked) as e:
        f.merge(mr, approved_by="carol")
    message = str(e.value)
    assert "!1" in message and "needs 1 more approval (2 required" in message
    assert "approved by alice" in message and "Approve it in GitLab" in message
    assert "lower the rule's required approvals" in message and "nothing was merged" in message
    assert not isinstance(e.value, TransientError)
    assert _git("rev-parse", "main", cwd=fake.repo) == main and _merge_calls(fake) == []
    fake.approve(1, "bob")  # the operator's way out: approve, and the same merge goes through
    assert f.merge(mr, approved_by="carol").state == "merged"


@pytest.mark.parametrize(
    ("method", "squash"),
    [("merge", False), ("rebase_merge", False), ("ff", False), ("merge", True), ("ff", True)],
)
def test_each_merge_method_lands_and_reports_the_commit_on_the_target(
    fake: FakeGitlab, method: str, squash: bool
) -> None:
    fake.merge_method, fake.squash_option = method, "always" if squash else "default_off"
    before = _git("rev-parse", "main", cwd=fake.repo)
    head = _git("rev-parse", BRANCH, cwd=fake.repo)
    f = forge(fake)
    merged = f.merge(open_release(f), approved_by="auto-approve")
    main = _git("rev-parse", "main", cwd=fake.repo)
    assert merged.merge_commit == main  # what the clusters must run is the target's new head
    parents = _git("rev-list", "--parents", "-n1", "main", cwd=fake.repo).split()[1:]
    # The release's content is on the target whatever the method.
    assert _git("show", "main:kustomization.yaml", cwd=fake.repo) == _git(
        "show", f"{BRANCH}:kustomization.yaml", cwd=fake.repo
    )
    if method == "ff" and not squash:
        assert main == head and fake.mrs[1].merge_commit_sha is None  # no merge commit on GitLab
    elif method == "ff":
        assert parents == [before] and fake.mrs[1].squash_commit_sha == main
    elif squash:
        squashed = fake.mrs[1].squash_commit_sha
        assert parents == [before, squashed] and squashed != head
    else:
        assert parents == [before, head] and fake.mrs[1].merge_commit_sha == main


def test_ff_project_with_a_moved_target_needs_a_rebase(fake: FakeGitlab, tmp_path: Path) -> None:
    fake.merge_method = "ff"
    work = tmp_path / "other"
    _git("clone", "-q", str(fake.repo), str(work))
    (work / "README").write_text("someone else's change\n")
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "someone else", cwd=work)
    _git("push", "-q", "origin", "main", cwd=work)
    main = _git("rev-parse", "main", cwd=fake.repo)
    f = forge(fake)
    with pytest.raises(MergeBlocked, match=r"must be rebased onto the target branch"):
        f.merge(open_release(f), approved_by="auto-approve")
    assert _git("rev-parse", "main", cwd=fake.repo) == main


def test_branch_moved_after_validation_is_refused_by_the_sha_guard(fake: FakeGitlab, tmp_path: Path) -> None:
    f = forge(fake)
    validated = _git("rev-parse", BRANCH, cwd=fake.repo)
    mr = f.open(source_branch=BRANCH, target_branch="main", title="t", description="d", head=validated)
    assert mr.sha == validated
    main = _git("rev-parse", "main", cwd=fake.repo)
    moved = _push_to_release_branch(fake, tmp_path, "not validated\n")  # after validation
    with pytest.raises(HeadMoved) as e:
        f.merge(mr, approved_by="auto-approve")
    assert f"validated {validated[:12]}" in str(e.value) and moved in str(e.value)
    assert "nothing was merged" in str(e.value)
    assert _git("rev-parse", "main", cwd=fake.repo) == main  # nothing unvalidated landed
    assert _merge_calls(fake) == [409]


def test_a_head_twincd_pushed_is_merged_once_gitlab_refreshed_the_mr(
    fake: FakeGitlab, tmp_path: Path
) -> None:
    """After twincd's own push (a catch-up), GitLab answers 409 until its background refresh shows
    the new head; the branch in the repository is at the validated head, so the merge waits."""
    f = forge(fake)
    mr = f.open(source_branch=BRANCH, target_branch="main", title="t", description="d")
    fake.refresh_lag = 4
    pushed = _push_to_release_branch(fake, tmp_path, "caught up\n")
    merged = f.merge(replace(mr, sha=pushed), approved_by="auto-approve")
    assert merged.state == "merged"
    assert _merge_calls(fake)[0] == 409 and _merge_calls(fake)[-1] == 200


def test_the_real_merger_is_recorded(fake: FakeGitlab) -> None:
    f = forge(fake)
    mr = open_release(f)
    fake.merge(1, user="alice")
    assert f.get(mr).merged_by == "alice"


def test_api_calls_of_one_auto_approved_release(fake: FakeGitlab) -> None:
    """open 2, validation 3, merge: reads until GitLab has checked, one PUT (printed for the issue note)."""
    f = GitlabForge(url=fake.url, project=PROJECT, token=Secret(TOKEN), poll_seconds=0.05)
    mr = open_release(f)
    f.post_validation(mr, ValidationReport(("overlays/eks/hello", "overlays/aks/hello"), 6))
    f.merge(mr, approved_by="auto-approve")
    calls = [(m, p.split("merge_requests", 1)[-1] or "/", s) for m, p, s in fake.calls()]
    print(f"GitLab API calls of one auto-approved release: {len(calls)}: {calls}")
    # list, create; notes list, note, label; GET (checking), GET (mergeable), PUT merge
    assert [m for m, _, _ in calls] == ["GET", "POST", "GET", "POST", "PUT", "GET", "GET", "PUT"]
    assert _merge_calls(fake) == [200]


def test_the_approvers_of_a_persons_merge_are_recorded(fake: FakeGitlab) -> None:
    fake.approvals_required = 1
    f = forge(fake)
    mr = open_release(f)
    fake.approve(1, "bob")
    fake.approve(1, "dana")
    fake.merge(1, user="alice")
    merged = f.get(mr)
    assert (merged.merged_by, merged.approved_by) == ("alice", ("bob", "dana"))


def test_legacy_merge_status_only_and_a_rule_it_does_not_show(fake: FakeGitlab) -> None:
    """A GitLab before 15.6 shows can_be_merged although an approval rule blocks the merge."""
    fake.detailed_status, fake.approvals_required = False, 1
    main = _git("rev-parse", "main", cwd=fake.repo)
    f = GitlabForge(url=fake.url, project=PROJECT, token=Secret(TOKEN), poll_seconds=0.05)
    mr = open_release(f)
    with pytest.raises(MergeBlocked, match=r"shows 'mergeable' but GitLab refuses to merge it \(405"):
        f.merge(mr, approved_by="auto-approve")
    assert _merge_calls(fake) == [405, 405, 405] and _git("rev-parse", "main", cwd=fake.repo) == main
    fake.approve(1, "bob")
    assert f.merge(mr, approved_by="auto-approve").state == "merged"
