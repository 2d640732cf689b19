"""An HTTP-level fake of the GitLab v4 endpoints twincd uses, backed by a real bare git repo.

The real ``python-gitlab`` client talks to it over HTTP (nothing in the SDK is patched). Merging
really merges, in the bare repo, with the project's merge method, so what the deploy flow
verifies afterwards is a real commit on the target branch.

Served endpoints (``:id`` is the numeric id or the URL-encoded path, as on GitLab):

    GET  /api/v4/projects/:id                          merge_method, squash_option, only_allow_...
    GET  /api/v4/projects/:id/merge_requests            ?source_branch= &target_branch= &state=
    POST /api/v4/projects/:id/merge_requests            409 when an open MR has the source branch
    GET  /api/v4/projects/:id/merge_requests/:iid
    PUT  /api/v4/projects/:id/merge_requests/:iid       labels, add_labels, remove_labels, state_event
    PUT  /api/v4/projects/:id/merge_requests/:iid/merge sha, squash, merge_when_pipeline_succeeds
    GET  /api/v4/projects/:id/merge_requests/:iid/approvals
    POST /api/v4/projects/:id/merge_requests/:iid/approve
    GET  /api/v4/projects/:id/merge_requests/:iid/notes
    POST /api/v4/projects/:id/merge_requests/:iid/notes

How it behaves, and where GitLab says so (the GitLab docs are the spec: "Merge requests API",
https://docs.gitlab.com/ee/api/merge_requests.html, and the code of ``lib/api/merge_requests.rb``
and ``app/services/merge_requests/mergeability/detailed_merge_status_service.rb``):

- Mergeability is computed asynchronously. A new MR shows ``detailed_merge_status`` "preparing"
  (its diff is being created), then "checking"; a push to its source branch makes it "checking"
  again ("unchecked" until GitLab starts). Here each state lasts ``check_gets`` GETs of the MR
  (its own GET or a list that shows it), then the MR is evaluated: "mergeable" or the first
  failing check, in DetailedMergeStatusService's order: ``not_open``, ``draft_status``,
  ``conflict``, ``need_rebase`` (merge method ``ff``/``rebase_merge`` and the target moved on),
  ``not_approved``, then CI last (``ci_must_pass`` when "Pipelines must succeed" is on and the
  head pipeline failed or is missing, ``ci_still_running`` while it is pending or running).
  Legacy ``merge_status`` is the git-level part only: preparing/checking/unchecked,
  ``can_be_merged`` or ``cannot_be_merged`` (conflicts).
- ``PUT .../merge`` answers **405** ``{"message": "405 Method Not Allowed"}`` (Grape's
  ``not_allowed!``) while the MR cannot be merged now (still checking, draft, not open,
  conflicts, needs a rebase, approvals missing, pipeline running/failed/missing with "pipelines
  must succeed"); with ``merge_when_pipeline_succeeds`` and an active head pipeline it schedules
  the merge instead (auto-merge: merged by the one who set it once the pipeline succeeds,
  cancelled when it fails), and the MR stays "opened". Conflicts found when auto-merge is asked
  are **422** "Branch cannot be merged", as is a merge that fails in git. After those checks,
  ``sha`` (when given) must be the source head: **409** "SHA does not match HEAD of source
  branch: <head>" (``check_sha_param!``; the sha guard of gitlab-foss#14139).
- Merge methods (project ``merge_method``): ``merge`` makes a merge commit (parents: target,
  source head) reported as ``merge_commit_sha``; ``rebase_merge`` (semi-linear) the same but only
  when the source contains the target (``need_rebase`` otherwise); ``ff`` moves the target to
  the source head, no merge commit: ``merge_commit_sha`` stays null (unblu/ucascade#35,
  akuity/kargo#5454: "there is no merge commit SHA", the head ``sha`` is what landed). Squash
  (``squash`` on the MR or the merge call, or project ``squash_option: always``) first makes one
  commit of the source's changes, reported as ``squash_commit_sha``; with ``merge`` it is the
  merge commit's second parent, with ``ff`` it is what the target is moved to.
- Who merged: ``merged_by`` and ``merge_user`` are the token's user (``users``: token → username;
  a person via ``merge(iid, user=...)``); ``merged_at`` is set.
- Approvals: ``approvals_required`` approvals are needed (GitLab Premium's approval rules);
  ``approve(iid, user)`` approves as a person (``POST .../approve`` as the token's user); a push
  resets the approvals (the project setting "Remove all approvals when commits are added to the
  source branch", on by default: https://docs.gitlab.com/ee/user/project/merge_requests/approvals/settings.html).
- A push to the source branch makes the MR "checking" again, resets approvals, aborts a set
  auto-merge (MergeRequests::RefreshService: "aborted the automatic merge because source branch
  was updated") and starts a new pipeline.
- Pipelines (``pipelines=True``): every new head gets a merge request pipeline, "pending" →
  "running" → ``pipeline_result`` ("success"/"failed"), one step every ``pipeline_gets`` GETs of
  the MR; ``set_pipeline(iid, status)`` moves it by hand. Shown as ``head_pipeline``.
- 409 "Another open merge request already exists for this source branch: !<iid>" on a second
  open MR for a source branch (the body's message is a list, as GitLab's is).

Group hooks (``add_group_hook(url, token=..., group=...)``): ``push_tag(project, tag, sha)`` sends
a Tag Push Hook for any project of the group, known to twincd or not, as GitLab's group webhooks do
(payload and headers: https://docs.gitlab.com/ee/user/project/integrations/webhook_events.html#tag-events).
Project hooks for merge request events (``add_project_hook(url, token=...)``): when an MR is merged
(by a person, by the API or by auto-merge) or closed, a Merge Request Hook is sent with
``object_attributes.action`` ``merge`` or ``close`` and ``user`` the person who did it, after the
change and from a worker of its own, as GitLab sends hooks from Sidekiq after the transaction
(payload: https://docs.gitlab.com/ee/user/project/integrations/webhook_events.html#merge-request-events).
A hook that fails four consecutive times (any non-2xx answer or no answer) is disabled and sends
nothing more ("Project or group webhooks that fail four consecutive times are automatically
disabled", https://docs.gitlab.com/ee/user/project/integrations/webhooks.html#auto-disabled-webhooks).

``detailed_status=False`` serves a GitLab older than 15.6: legacy ``merge_status`` only (it was
added in 15.6, the docs' "Merge status" section).

Knobs kept from before: ``fail_next(status, count, retry_after=...)`` answers the next requests
with 429/5xx; ``complete_merges_after(gets, shown_state=...)`` makes API merges finish later, as
merge trains do; ``hide_from_lists`` leaves an MR out of list answers (a lagging replica);
``requests`` records every request (method, path, status) so tests can count API calls.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tests.fakes import ServedFake

DEFAULT_USER = "twincd-bot"

# GitLab's draft markers (MergeRequest::DRAFT_REGEX: "Draft:", "[Draft]", "(Draft)" at the start).
_DRAFT = re.compile(r"^\s*(\[draft\]|\(draft\)|draft:)", re.IGNORECASE)
_CHECKING = ("preparing", "checking", "unchecked")
_ACTIVE_PIPELINE = ("created", "waiting_for_resource", "preparing", "pending", "running")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _user(username: str) -> dict[str, Any]:
    return {
        "id": 100 + sum(map(ord, username)),
        "username": username,
        "name": username.replace("-", " ").title(),
        "state": "active",
        "web_url": f"https://gitlab.example.test/{username}",
    }


@dataclass
class FakeMergeRequest:
    id: int
    iid: int
    source_branch: str
    target_branch: str
    title: str
    description: str
    labels: list[str]
    state: str = "opened"
    merge_commit_sha: str | None = None
    squash_commit_sha: str | None = None
    sha: str | None = None
    squash: bool = False
    notes: list[dict[str, Any]] = field(default_factory=list)
    # Mergeability: the state shown while GitLab computes it, and for how many more GETs.
    checking_state: str = "preparing"
    checking_gets: int = 0
    approved_by: list[str] = field(default_factory=list)
    pipeline: dict[str, Any] | None = None  # the head pipeline: id, sha, status
    pipeline_gets: int = 0  # GETs until the pipeline's next step
    auto_merge_user: str | None = None  # merge_when_pipeline_succeeds set by this user
    merged_by: str | None = None
    merged_at: str | None = None
    events: list[str] = field(default_factory=list)  # what happened to it, for tests to read
    refresh_wait: int | None = None  # requests left before a push to its branch is noticed
    # An asynchronous merge in progress: how many more GETs show `pending_state` and no merge commit.
    pending_gets: int = 0
    pending_state: str = "opened"
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: str | None


class _MergeFailed(Exception):
    pass


# GitLab disables a hook after this many consecutive failed deliveries (webhooks docs, above).
HOOK_FAILURES_TO_DISABLE = 4


@dataclass
class FakeHook:
    """A webhook: where GitLab sends the events of a group's projects, or of one project."""

    url: str
    token: str
    group: str  # a group's path (its projects' events), or the project's own path
    merge_requests: bool = False  # merge request events (else tag push events only)
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    consecutive_failures: int = 0
    disabled: bool = False
    deliveries: list[tuple[str, int | None]] = field(default_factory=list)  # (project, status)


class FakeGitlab(ServedFake):
    """One GitLab project (``project``, numeric id ``project_id``) whose repository is ``repo``."""

    _name = "fake-gitlab"

    def __init__(
        self,
        *,
        repo: Path,
        token: str,
        project: str = "infra/manifests",
        project_id: int = 42,
        read_only_token: str | None = None,
        users: dict[str, str] | None = None,
        check_gets: int = 1,
        merge_method: str = "merge",
        squash_option: str = "default_off",
        approvals_required: int = 0,
        pipelines: bool = False,
        only_allow_merge_if_pipeline_succeeds: bool = False,
        pipeline_gets: int = 1,
        pipeline_result: str = "success",
        detailed_status: bool = True,
    ) -> None:
        self.repo = repo
        self.project = project
        self.project_id = project_id
        self.token = token
        self.read_only_token = read_only_token
        self.users = {token: DEFAULT_USER, **(users or {})}
        # Project settings and how long GitLab's asynchronous work takes (in GETs of the MR).
        self.check_gets = check_gets
        # Requests about an MR before a push to its source branch shows in it: GitLab refreshes an
        # MR after a push in a background job (MergeRequests::RefreshService via Sidekiq), so a
        # merge with the pushed head right after the push is refused with 409 until then.
        self.refresh_lag = 0
        self.merge_method = merge_method
        self.squash_option = squash_option
        self.approvals_required = approvals_required
        self.pipelines = pipelines
        self.only_allow_merge_if_pipeline_succeeds = only_allow_merge_if_pipeline_succeeds
        self.pipeline_gets = pipeline_gets
        self.pipeline_result = pipeline_result
        # False: a GitLab older than 15.6, whose MRs have the legacy merge_status only.
        self.detailed_status = detailed_status
        self.mrs: dict[int, FakeMergeRequest] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._faults: list[_Fault] = []
        self._hidden: dict[int, int] = {}  # iid -> how many more list answers leave it out
        self._merge_delay: tuple[int, str] = (0, "merged")  # (GETs until a merge shows, state shown before)
        self._pipeline_ids = 7000
        self.hooks: list[FakeHook] = []
        # Re-entrant: handlers hold it while they read the repo and change an MR.
        self._lock = threading.RLock()

    # ---- knobs for tests -------------------------------------------------------------------

    def fail_next(self, status: int, count: int = 1, *, retry_after: str | None = None) -> None:
        """Answer the next ``count`` API requests with ``status`` (429 or 5xx), then behave again."""
        with self._lock:
            self._faults.append(_Fault(status, count, retry_after))

    def hide_from_lists(self, iid: int, count: int = 1) -> None:
        """Leave MR ``iid`` out of the next ``count`` list answers, as a lagging read replica does.

        This is how two attempts race on GitLab: both list, see nothing, and both create; the
        second create gets the 409 "Another open merge request already exists".
        """
        with self._lock:
            self._hidden[iid] = count

    def complete_merges_after(self, gets: int, *, shown_state: str = "opened") -> None:
        """Merges through the API complete asynchronously: the merge PUT and the next GETs of the MR
        show ``shown_state`` ("opened": a merge train; "merged": a merge commit not written yet) with
        ``merge_commit_sha`` null; the ``gets``-th GET of the MR after the PUT is the first to show it
        merged with its merge commit. The merge commit itself is made at once in the bare repo.
        """
        with self._lock:
            self._merge_delay = (gets, shown_state)

    def calls(self, method: str | None = None) -> list[tuple[str, str, int]]:
        with self._lock:
            return [r for r in self.requests if method is None or r[0] == method]

    def merge(self, iid: int, *, user: str = "a-maintainer") -> str:
        """Merge as a person does in the UI (the checks are theirs to judge); returns what landed."""
        with self._lock:
            mr = self.mrs[iid]
            self._refresh(mr)
            return self._merge(mr, user=user)

    def approve(self, iid: int, user: str) -> None:
        """Approve MR ``iid`` as ``user`` (a person's click on Approve)."""
        with self._lock:
            mr = self.mrs[iid]
            self._refresh(mr)
            if user not in mr.approved_by:
                mr.approved_by.append(user)
                mr.events.append(f"approved:{user}")

    def set_pipeline(self, iid: int, status: str) -> None:
        """Move MR ``iid``'s head pipeline to ``status`` (pending, running, success, failed)."""
        with self._lock:
            mr = self.mrs[iid]
            self._refresh(mr)
            if mr.pipeline is None:
                mr.pipeline = self._new_pipeline(mr)
            mr.pipeline["status"] = status
            mr.pipeline_gets = self.pipeline_gets
            self._after_pipeline_step(mr)

    def add_group_hook(self, url: str, *, token: str, group: str) -> FakeHook:
        """A webhook on group ``group`` for tag push events, with secret token ``token``."""
        hook = FakeHook(url=url, token=token, group=group)
        self.hooks.append(hook)
        return hook

    def add_project_hook(self, url: str, *, token: str) -> FakeHook:
        """A webhook on this project for merge request events, with secret token ``token``."""
        hook = FakeHook(url=url, token=token, group=self.project, merge_requests=True)
        self.hooks.append(hook)
        return hook

    def push_tag(self, project: str, tag: str, sha: str) -> list[int | None]:
        """Someone pushed ``tag`` at ``sha`` to ``project``: each enabled hook of its group is called.

        Returns each delivery's status (None: no answer); a disabled hook sends nothing.
        """
        return [
            self.deliver(hook, project, "Tag Push Hook", _tag_push_payload(project, tag, sha))
            for hook in self.hooks
            if not (hook.disabled or hook.merge_requests) and project.startswith(hook.group.rstrip("/") + "/")
        ]

    def deliver(self, hook: FakeHook, project: str, event: str, payload: dict[str, Any]) -> int | None:
        """One delivery of ``payload`` to ``hook``: its status (None: no answer), counted for disabling."""
        status: int | None
        try:
            status = httpx.post(
                hook.url,
                json=payload,
                headers={
                    "X-Gitlab-Event": event,
                    "X-Gitlab-Token": hook.token,
                    "X-Gitlab-Event-UUID": str(uuid.uuid4()),
                    # Kept by GitLab across the retries of one delivery (gitlab-org/gitlab!160952).
                    "Idempotency-Key": str(uuid.uuid4()),
                    "X-Gitlab-Webhook-UUID": hook.uuid,
                    "X-Gitlab-Instance": "https://gitlab.example.test",
                    "User-Agent": "GitLab/17.5.0",
                },
                timeout=10,  # GitLab's webhook timeout
            ).status_code
        except httpx.HTTPError:
            status = None
        hook.deliveries.append((project, status))
        if status is not None and 200 <= status < 300:
            hook.consecutive_failures = 0
        else:
            hook.consecutive_failures += 1
            hook.disabled = hook.consecutive_failures >= HOOK_FAILURES_TO_DISABLE
        return status

    def _mr_event(self, mr: FakeMergeRequest, action: str, user: str) -> None:
        """Send the Merge Request Hook of ``action`` from a thread, after the change (Sidekiq)."""
        payload = _merge_request_payload(self.project, self.project_id, mr, action, user)
        hooks = [h for h in self.hooks if h.merge_requests and not h.disabled]
        for hook in hooks:
            threading.Thread(
                target=self.deliver, args=(hook, self.project, "Merge Request Hook", payload), daemon=True
            ).start()

    def close(self, iid: int, *, user: str = "a-maintainer") -> None:
        """Close without merging, as a reviewer who refuses the release does."""
        with self._lock:
            self.mrs[iid].state = "closed"
            self._mr_event(self.mrs[iid], "close", user)

    def notes(self, iid: int) -> list[str]:
        with self._lock:
            return [n["body"] for n in self.mrs[iid].notes]

    # ---- HTTP ------------------------------------------------------------------------------

    _MR = r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests/(?P<iid>\d+)"
    _ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
        ("GET", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)$"), "_get_project"),
        ("GET", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests$"), "_list_mrs"),
        ("POST", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests$"), "_create_mr"),
        ("GET", re.compile(_MR + "$"), "_get_mr"),
        ("PUT", re.compile(_MR + "$"), "_update_mr"),
        ("PUT", re.compile(_MR + "/merge$"), "_merge_mr"),
        ("GET", re.compile(_MR + "/approvals$"), "_get_approvals"),
        ("POST", re.compile(_MR + "/approve$"), "_approve_mr"),
        ("GET", re.compile(_MR + "/notes$"), "_list_notes"),
        ("POST", re.compile(_MR + "/notes$"), "_create_note"),
        (
            "GET",
            re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/repository/branches/(?P<branch>[^/]+)$"),
            "_get_branch",
        ),
    )

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        # Route on the raw path: a project path is sent URL-encoded (infra%2Fmanifests) and the
        # decoded path would have an extra slash in it.
        raw_path = scope.get("raw_path", scope["path"].encode()).decode().split("?", 1)[0]
        response = await self._dispatch(request, raw_path)
        with self._lock:
            self.requests.append((request.method, raw_path, response.status_code))
        await response(scope, receive, send)

    async def _dispatch(self, request: Request, raw_path: str) -> Response:
        fault = self._take_fault()
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            message = "Retry later" if fault.status == 429 else "500 Internal Server Error"
            return JSONResponse({"message": message}, status_code=fault.status, headers=headers)
        token = request.headers.get("private-token") or request.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        if token not in (self.token, self.read_only_token, *self.users) or not token:
            return _error(401, "401 Unauthorized")
        for method, pattern, handler in self._ROUTES:
            match = pattern.match(raw_path)
            if match is None or method != request.method:
                continue
            if unquote(match["pid"]) not in (self.project, str(self.project_id)):
                return _error(404, "404 Project Not Found")
            if method != "GET" and token == self.read_only_token:
                return _error(403, "403 Forbidden")
            query = {k: v[-1] for k, v in parse_qs(request.url.query).items()}
            body: dict[str, Any] = {}
            if method != "GET":
                raw = await request.body()
                # Grape reads parameters from the query string and the body alike (python-gitlab
                # sends extra keyword arguments such as ``sha`` in the query).
                body = {**query, **(json.loads(raw) if raw else {})}
            args = {k: v for k, v in match.groupdict().items() if k != "pid"}
            with self._lock:
                result: Response = getattr(self, handler)(
                    body=body, query=query, user=self.users.get(token, DEFAULT_USER), **args
                )
            return result
        return _error(404, "404 Not Found")

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            while self._faults and self._faults[0].remaining <= 0:
                self._faults.pop(0)
            if not self._faults:
                return None
            self._faults[0].remaining -= 1
            return self._faults[0]

    # ---- GitLab's asynchronous state ----------------------------------------------------------

    def _refresh(self, mr: FakeMergeRequest) -> None:
        """Notice pushes to the source branch, as GitLab's post-receive does (under the lock)."""
        if mr.state != "opened":
            return
        head = self._head(mr.source_branch)
        if head is None or head == mr.sha:
            return
        if mr.refresh_wait is None:
            mr.refresh_wait = self.refresh_lag
        if mr.refresh_wait > 0:  # GitLab's RefreshService has not run yet: the MR shows the old head
            mr.refresh_wait -= 1
            return
        mr.refresh_wait = None
        mr.sha = head
        mr.checking_state, mr.checking_gets = "checking", self.check_gets
        mr.events.append(f"push:{head[:12]}")
        mr.approved_by.clear()  # approvals are reset on push
        # MergeRequests::RefreshService aborts auto-merge: "aborted the automatic merge because
        # source branch was updated" (the sha it was set for is no longer the head).
        mr.auto_merge_user = None
        mr.pipeline = self._new_pipeline(mr) if self.pipelines else None
        mr.updated_at = _now()

    def _new_pipeline(self, mr: FakeMergeRequest) -> dict[str, Any]:
        self._pipeline_ids += 1
        mr.pipeline_gets = self.pipeline_gets
        return {
            "id": self._pipeline_ids,
            "iid": self._pipeline_ids - 7000,
            "sha": mr.sha,
            "ref": f"refs/merge-requests/{mr.iid}/head",
            "status": "pending",
            "source": "merge_request_event",
            "web_url": f"{self.url}/{self.project}/-/pipelines/{self._pipeline_ids}",
        }

    def _seen(self, mr: FakeMergeRequest) -> None:
        """One GET of the MR: GitLab's background work moves on by one step."""
        self._refresh(mr)
        if mr.checking_gets > 0:
            mr.checking_gets -= 1
            if mr.checking_gets == 0 and mr.checking_state == "preparing" and self.check_gets > 0:
                mr.checking_state, mr.checking_gets = "checking", self.check_gets
        if mr.pipeline is not None and mr.pipeline["status"] in ("pending", "running"):
            mr.pipeline_gets -= 1
            if mr.pipeline_gets <= 0:
                mr.pipeline["status"] = (
                    "running" if mr.pipeline["status"] == "pending" else self.pipeline_result
                )
                mr.pipeline_gets = self.pipeline_gets
                self._after_pipeline_step(mr)
        mr.pending_gets = max(0, mr.pending_gets - 1)

    def _after_pipeline_step(self, mr: FakeMergeRequest) -> None:
        if mr.auto_merge_user is None or mr.pipeline is None or mr.state != "opened":
            return
        status = mr.pipeline["status"]
        if status == "success":
            # Auto-merge: the merge happens as the user who set it (AutoMerge::MergeWhenChecksPass).
            try:
                self._merge(mr, user=mr.auto_merge_user)
            except _MergeFailed:
                mr.auto_merge_user = None
        elif status in ("failed", "canceled"):
            mr.events.append(f"auto-merge-aborted:pipeline-{status}")
            mr.auto_merge_user = None  # GitLab aborts auto-merge when the pipeline fails

    def _git_status(self, mr: FakeMergeRequest) -> str:
        """The git-level checks: "" (fine), "conflict" or "need_rebase"."""
        target = self._head(mr.target_branch)
        if target is None or mr.sha is None:
            return "conflict"
        if self._is_ancestor(target, mr.sha):
            return ""
        if self.merge_method in ("ff", "rebase_merge"):
            return "need_rebase"
        return "" if self._merge_tree(target, mr.sha) is not None else "conflict"

    def _detailed(self, mr: FakeMergeRequest, *, skip_ci: bool = False) -> str:
        """detailed_merge_status, as DetailedMergeStatusService computes it."""
        if mr.state != "opened":
            return "not_open"
        if mr.checking_gets > 0:
            return mr.checking_state
        if _DRAFT.match(mr.title):
            return "draft_status"
        git = self._git_status(mr)
        if git:
            return git
        if len(mr.approved_by) < self.approvals_required:
            return "not_approved"
        if self.only_allow_merge_if_pipeline_succeeds and not skip_ci:
            status = mr.pipeline["status"] if mr.pipeline is not None else None
            if status in _ACTIVE_PIPELINE:
                return "ci_still_running"
            if status != "success":
                return "ci_must_pass"
        return "mergeable"

    def _merge_status(self, mr: FakeMergeRequest) -> str:
        if mr.state == "opened" and mr.checking_gets > 0:
            return mr.checking_state
        if mr.state == "opened" and self._git_status(mr) == "conflict":
            return "cannot_be_merged"
        return "can_be_merged"

    # ---- git, in the bare repo ---------------------------------------------------------------

    def _git(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str | None:
        done = subprocess.run(
            ["git", "--git-dir", str(self.repo), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        if done.returncode != 0:
            if check:
                raise _MergeFailed(done.stderr.strip() or done.stdout.strip())
            return None
        return done.stdout.strip()

    def _head(self, branch: str) -> str | None:
        return self._git("rev-parse", "--verify", "-q", f"refs/heads/{branch}^{{commit}}", check=False)

    def _is_ancestor(self, ancestor: str, commit: str) -> bool:
        return self._git("merge-base", "--is-ancestor", ancestor, commit, check=False) is not None

    def _merge_tree(self, target: str, source: str) -> str | None:
        """The tree of merging ``source`` into ``target``, None on conflicts (git ≥ 2.38)."""
        out = self._git("merge-tree", "--write-tree", target, source, check=False)
        return out.splitlines()[0] if out else None

    def _commit(self, tree: str, parents: list[str], message: str, user: str) -> str:
        who = _user(user)
        env = {
            "GIT_AUTHOR_NAME": who["name"],
            "GIT_AUTHOR_EMAIL": f"{user}@example.test",
            "GIT_COMMITTER_NAME": who["name"],
            "GIT_COMMITTER_EMAIL": f"{user}@example.test",
        }
        args = ["commit-tree", tree, "-m", message]
        for parent in parents:
            args += ["-p", parent]
        out = self._git(*args, env=env)
        assert out is not None
        return out

    def _merge(
        self, mr: FakeMergeRequest, *, user: str, message: str | None = None, squash: bool | None = None
    ) -> str:
        """Merge with the project's merge method; returns the commit the target now points at."""
        target = self._head(mr.target_branch)
        source = mr.sha or self._head(mr.source_branch)
        if target is None or source is None:
            raise _MergeFailed("a branch is missing")
        squash = mr.squash if squash is None else squash
        squash = (squash or self.squash_option == "always") and self.squash_option != "never"
        ff_able = self._is_ancestor(target, source)
        if self.merge_method in ("ff", "rebase_merge") and not ff_able:
            raise _MergeFailed("the source branch must be rebased onto the target first")
        squash_sha: str | None = None
        landed_source = source
        if squash and source != target:
            tree = self._merge_tree(target, source)
            if tree is None:
                raise _MergeFailed("conflicts")
            squash_sha = self._commit(tree, [target], mr.title, user)  # default squash message: the title
            landed_source = squash_sha
        merge_sha: str | None = None
        if self.merge_method == "ff":
            new = landed_source
        else:
            tree = self._merge_tree(target, landed_source)
            if tree is None:
                raise _MergeFailed("conflicts")
            default = (
                f"Merge branch '{mr.source_branch}' into '{mr.target_branch}'\n\n{mr.title}\n\n"
                f"See merge request {self.project}!{mr.iid}"
            )
            merge_sha = self._commit(tree, [target, landed_source], message or default, user)
            new = merge_sha
        # Compare-and-swap: a push racing the merge makes it fail rather than be lost.
        self._git("update-ref", f"refs/heads/{mr.target_branch}", new, target)
        mr.state, mr.merge_commit_sha, mr.squash_commit_sha = "merged", merge_sha, squash_sha
        mr.merged_by, mr.merged_at, mr.updated_at = user, _now(), _now()
        mr.auto_merge_user = None
        mr.events.append(f"merged:{user}:{self.merge_method}{'+squash' if squash_sha else ''}")
        self._mr_event(mr, "merge", user)
        return new

    # ---- handlers --------------------------------------------------------------------------

    def _project_json(self) -> dict[str, Any]:
        return {
            "id": self.project_id,
            "path_with_namespace": self.project,
            "default_branch": "main",
            "web_url": f"{self.url}/{self.project}",
            "merge_method": self.merge_method,
            "squash_option": self.squash_option,
            "only_allow_merge_if_pipeline_succeeds": self.only_allow_merge_if_pipeline_succeeds,
            "allow_merge_on_skipped_pipeline": False,
            "approvals_before_merge": self.approvals_required,  # deprecated project-level rule
        }

    def _mr_json(self, mr: FakeMergeRequest) -> dict[str, Any]:
        pending = mr.pending_gets > 0
        merged = mr.state == "merged" and not pending
        detailed = self._detailed(mr)
        shown = {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": self.project_id,
            "title": mr.title,
            "description": mr.description,
            "state": mr.pending_state if pending else mr.state,
            "source_branch": mr.source_branch,
            "target_branch": mr.target_branch,
            "labels": list(mr.labels),
            "draft": bool(_DRAFT.match(mr.title)),
            "work_in_progress": bool(_DRAFT.match(mr.title)),
            "sha": mr.sha,
            "merge_commit_sha": mr.merge_commit_sha if merged else None,
            "squash_commit_sha": mr.squash_commit_sha if merged else None,
            "squash": mr.squash,
            "squash_on_merge": mr.squash or self.squash_option == "always",
            "merge_status": self._merge_status(mr),
            "detailed_merge_status": detailed,
            "has_conflicts": detailed == "conflict",
            "merge_when_pipeline_succeeds": mr.auto_merge_user is not None,
            "merge_user": _user(mr.merged_by or mr.auto_merge_user)
            if (mr.merged_by or mr.auto_merge_user)
            else None,
            "merged_by": _user(mr.merged_by) if merged and mr.merged_by else None,
            "merged_at": mr.merged_at if merged else None,
            "head_pipeline": dict(mr.pipeline) if mr.pipeline is not None else None,
            "web_url": f"{self.url}/{self.project}/-/merge_requests/{mr.iid}",
            "references": {"short": f"!{mr.iid}", "full": f"{self.project}!{mr.iid}"},
            "created_at": mr.created_at,
            "updated_at": mr.updated_at,
        }
        if not self.detailed_status:
            del shown["detailed_merge_status"]
        return shown

    def _find(self, iid: str) -> FakeMergeRequest | None:
        return self.mrs.get(int(iid))

    def _get_project(self, **_: Any) -> Response:
        return JSONResponse(self._project_json())

    def _get_branch(self, *, branch: str, **_: Any) -> Response:
        """``GET /projects/:id/repository/branches/:branch`` (the name URL-encoded): the repository's head."""
        name = unquote(branch)
        head = self._head(name)
        if head is None:
            return JSONResponse({"message": "404 Branch Not Found"}, status_code=404)
        return JSONResponse({"name": name, "commit": {"id": head, "short_id": head[:8]}, "merged": False})

    def _list_mrs(self, *, query: dict[str, str], **_: Any) -> Response:
        mrs = sorted(self.mrs.values(), key=lambda m: m.iid, reverse=True)  # GitLab: newest first
        hidden = {iid for iid, n in self._hidden.items() if n > 0}
        self._hidden = {iid: n - 1 for iid, n in self._hidden.items() if n > 1}
        mrs = [m for m in mrs if m.iid not in hidden]
        for key in ("source_branch", "target_branch"):
            if key in query:
                mrs = [m for m in mrs if getattr(m, key) == query[key]]
        for m in mrs:
            self._seen(m)
        if query.get("state", "all") != "all":
            mrs = [m for m in mrs if m.state == query["state"]]
        return JSONResponse([self._mr_json(m) for m in mrs])

    def _create_mr(self, *, body: dict[str, Any], **_: Any) -> Response:
        missing = [k for k in ("source_branch", "target_branch", "title") if not body.get(k)]
        if missing:
            return _error(400, f"{missing[0]} is missing")
        source, target = str(body["source_branch"]), str(body["target_branch"])
        head = self._head(source)
        if head is None:
            return _error(404, f"404 Source branch {source!r} Not Found")
        if self._head(target) is None:
            return _error(404, f"404 Target branch {target!r} Not Found")
        clash = next(
            (m for m in self.mrs.values() if m.source_branch == source and m.state == "opened"), None
        )
        if clash is not None:
            # GitLab's body for this 409 is a list of messages.
            return JSONResponse(
                {
                    "message": [
                        f"Another open merge request already exists for this source branch: !{clash.iid}"
                    ]
                },
                status_code=409,
            )
        iid = len(self.mrs) + 1
        mr = FakeMergeRequest(
            id=1000 + iid,
            iid=iid,
            source_branch=source,
            target_branch=target,
            title=str(body["title"]),
            description=str(body.get("description") or ""),
            labels=_labels(body.get("labels")),
            sha=head,
            squash=_bool(body.get("squash")),
            checking_state="preparing",
            checking_gets=self.check_gets,
        )
        if self.pipelines:
            mr.pipeline = self._new_pipeline(mr)
        self.mrs[iid] = mr
        return JSONResponse(self._mr_json(mr), status_code=201)

    def _get_mr(self, *, iid: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        self._seen(mr)
        return JSONResponse(self._mr_json(mr))

    def _update_mr(self, *, iid: str, body: dict[str, Any], user: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        if "labels" in body:
            mr.labels = _labels(body["labels"])
        for label in _labels(body.get("add_labels")):
            if label not in mr.labels:
                mr.labels.append(label)
        removed = set(_labels(body.get("remove_labels")))
        mr.labels = [label for label in mr.labels if label not in removed]
        for key in ("title", "description"):
            if key in body:
                setattr(mr, key, str(body[key]))
        if "squash" in body:
            mr.squash = _bool(body["squash"])
        event = body.get("state_event")
        if event == "close" and mr.state == "opened":
            mr.state = "closed"
            self._mr_event(mr, "close", user)
        elif event == "reopen" and mr.state == "closed":
            mr.state = "opened"
        mr.updated_at = _now()
        return JSONResponse(self._mr_json(mr))

    def _merge_mr(self, *, iid: str, body: dict[str, Any], user: str, **_: Any) -> Response:
        """``PUT .../merge`` in lib/api/merge_requests.rb's order: 405, 422, 409, then merge."""
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        self._refresh(mr)
        auto = _bool(body.get("merge_when_pipeline_succeeds")) or _bool(body.get("auto_merge"))
        detailed = self._detailed(mr)
        pipeline = mr.pipeline["status"] if mr.pipeline is not None else None
        if auto:
            # immediately_mergeable?: the head pipeline already succeeded; automatically_mergeable?:
            # mergeable but for CI, and the head pipeline is active.
            immediately = pipeline == "success" and detailed == "mergeable"
            automatically = (
                not immediately
                and pipeline in _ACTIVE_PIPELINE
                and self._detailed(mr, skip_ci=True) == "mergeable"
            )
        else:
            immediately, automatically = detailed == "mergeable", False
        if not immediately and not automatically:
            if auto and detailed == "conflict":
                return _error(422, "Branch cannot be merged")
            return _error(405, "405 Method Not Allowed")
        if body.get("sha") and str(body["sha"]) != mr.sha:
            return _error(409, f"SHA does not match HEAD of source branch: {mr.sha}")
        if "squash" in body:
            mr.squash = _bool(body["squash"])
        if automatically:
            mr.events.append(f"auto-merge:{user}")
            mr.auto_merge_user = user
            mr.updated_at = _now()
            return JSONResponse(self._mr_json(mr))
        try:
            self._merge(mr, user=user, message=body.get("merge_commit_message"))
        except _MergeFailed:
            return _error(422, "Branch cannot be merged")
        mr.pending_gets, mr.pending_state = self._merge_delay
        return JSONResponse(self._mr_json(mr))

    def _approvals_json(self, mr: FakeMergeRequest) -> dict[str, Any]:
        left = max(0, self.approvals_required - len(mr.approved_by))
        return {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": self.project_id,
            "state": mr.state,
            "approvals_required": self.approvals_required,
            "approvals_left": left,
            "approved": left == 0,
            "approved_by": [{"user": _user(u)} for u in mr.approved_by],
        }

    def _get_approvals(self, *, iid: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        self._refresh(mr)
        return JSONResponse(self._approvals_json(mr))

    def _approve_mr(self, *, iid: str, body: dict[str, Any], user: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        self._refresh(mr)
        if body.get("sha") and str(body["sha"]) != mr.sha:
            return _error(409, "SHA does not match HEAD of source branch")
        if user in mr.approved_by:
            return _error(401, "401 Unauthorized")  # GitLab: a user approves once
        mr.approved_by.append(user)
        mr.events.append(f"approved:{user}")
        return JSONResponse(self._approvals_json(mr), status_code=201)

    def _list_notes(self, *, iid: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        return JSONResponse(list(reversed(mr.notes)))  # GitLab: newest first

    def _create_note(self, *, iid: str, body: dict[str, Any], **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        if not body.get("body"):
            return _error(400, "body is missing")
        note = {
            "id": 5000 + sum(len(m.notes) for m in self.mrs.values()),
            "body": str(body["body"]),
            "system": False,
            "created_at": _now(),
            "noteable_iid": mr.iid,
        }
        mr.notes.append(note)
        return JSONResponse(note, status_code=201)


def _tag_push_payload(project: str, tag: str, sha: str) -> dict[str, Any]:
    """A Tag Push Hook body, in the shape of GitLab's documented example (tag events)."""
    name = project.rsplit("/", 1)[-1]
    web_url = f"https://gitlab.example.test/{project}"
    return {
        "object_kind": "tag_push",
        "event_name": "tag_push",
        "before": "0" * 40,
        "after": sha,
        "ref": f"refs/tags/{tag}",
        "ref_protected": True,
        "checkout_sha": sha,
        "user_id": 1,
        "user_name": "A Developer",
        "user_avatar": None,
        "project_id": 100 + sum(map(ord, project)),
        "project": {
            "id": 100 + sum(map(ord, project)),
            "name": name,
            "description": "",
            "web_url": web_url,
            "git_ssh_url": f"git@gitlab.example.test:{project}.git",
            "git_http_url": f"{web_url}.git",
            "namespace": project.rsplit("/", 1)[0],
            "visibility_level": 0,
            "path_with_namespace": project,
            "default_branch": "main",
        },
        "commits": [],
        "total_commits_count": 0,
        "repository": {"name": name, "url": f"git@gitlab.example.test:{project}.git", "homepage": web_url},
    }


def _merge_request_payload(
    project: str, project_id: int, mr: FakeMergeRequest, action: str, user: str
) -> dict[str, Any]:
    """A Merge Request Hook body, in the shape of GitLab's documented example (merge request events)."""
    web_url = f"https://gitlab.example.test/{project}"
    return {
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 1000 + sum(map(ord, user)), "name": user.title(), "username": user},
        "project": {
            "id": project_id,
            "name": project.rsplit("/", 1)[-1],
            "web_url": web_url,
            "namespace": project.rsplit("/", 1)[0],
            "path_with_namespace": project,
            "default_branch": "main",
        },
        "object_attributes": {
            "id": mr.id,
            "iid": mr.iid,
            "title": mr.title,
            "source_branch": mr.source_branch,
            "target_branch": mr.target_branch,
            "merge_commit_sha": mr.merge_commit_sha,
            "state": mr.state,
            "action": action,
            "url": f"{web_url}/-/merge_requests/{mr.iid}",
        },
        "labels": [],
        "changes": {},
        "repository": {"name": project.rsplit("/", 1)[-1], "homepage": web_url},
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


def _bool(value: object) -> bool:
    return value is True or str(value).lower() in ("true", "1")


def _labels(value: object) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(i).strip() for i in items if str(i).strip()]
