"""The GitLab forge: release merge requests on a GitLab project, through ``python-gitlab``.

Same shape as :class:`twincd.adapters.forge_local.LocalForge` (open, get, close) plus the two
things a real forge adds: validation results posted on the MR, and waiting for a person to merge.

Retries. python-gitlab retries inside each call (``retry_transient_errors=True``): 429 and
500/502/503/504/52x and connection errors, sleeping ``Retry-After`` seconds when the server sends
the header (GitLab sends whole seconds) and ``0.1 * 2**n`` s otherwise, up to ``max_retries``
times (client.py ``http_request`` / utils.py ``Retry``). The header is only visible inside the SDK,
so it is the SDK that honours it; once its retries are spent the error surfaces here as a
:class:`GitlabUnavailable` (transient) and the Prefect task's own retries take over.

Merging (``merge``) follows GitLab's own rules, read from the MR before the merge call
(https://docs.gitlab.com/ee/api/merge_requests.html, "Merge a merge request" and "Merge status"):
mergeability is computed asynchronously, so while ``detailed_merge_status`` is ``preparing``,
``checking``, ``unchecked`` or ``approvals_syncing`` twincd waits (bounded: ``check_seconds``,
then a transient error); the merge call always carries ``sha=<the validated head>``, so a branch
moved after validation is refused by GitLab itself (409 "SHA does not match HEAD of source
branch") and nothing unvalidated lands; ``ci_still_running`` (the project's "Pipelines must
succeed" and a pipeline still going) sets auto-merge (``merge_when_pipeline_succeeds``) and
waits for GitLab to merge (``pipeline_seconds``); ``not_approved`` is a permanent error saying
how many approvals are missing and what to do; other blocking states (draft, conflict,
need_rebase, a failed pipeline) are permanent errors naming the state. A 405 after a mergeable
read (a push or a pipeline in between) reads the MR again; three of them are a MergeBlocked (a
GitLab before 15.6 shows only the git-level ``merge_status``, blind to approvals and pipelines).
Auto-merge is GitLab's ``merge_when_pipeline_succeeds`` (``auto_merge`` since 17.11; the old
name is still accepted); GitLab aborts it when the pipeline fails or the branch gets new commits,
and twincd then stops with a MergeBlocked. The merged MR records who merged
(``merged_by``, else ``merge_user``), who approved (after a person's merge: the approvals API)
and the commit the target now runs: ``merge_commit_sha``, else ``squash_commit_sha`` (squash +
fast-forward), else the head ``sha`` (fast-forward: GitLab reports no merge commit; unblu/ucascade#35).
Merge trains are not modelled: the commit a fast-forward train lands is not the MR's head.

Errors. SDK and ``requests`` errors never leave this module: they become the small hierarchy
below, with messages that name the project and the permission that is missing. The token is in
no message: python-gitlab sends it only as the ``PRIVATE-TOKEN`` header, its exceptions carry the
server's message and status, and every foreign text is masked with the token anyway.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import gitlab
import gitlab.exceptions
import requests

from twincd.adapters.git import redact_url
from twincd.adapters.secrets import Secret
from twincd.domain import MergeRequest, ValidationReport
from twincd.errors import PermanentError, TransientError
from twincd.validate import report_markdown

if TYPE_CHECKING:
    from gitlab.v4.objects import Project, ProjectMergeRequest


log = logging.getLogger(__name__)

T = TypeVar("T")

FAILED_LABEL = "twincd::validation-failed"
# GitLab may answer 409 for reasons other than a duplicate MR; only this one means "already done".
_DUPLICATE_MR = "Another open merge request already exists"

# What each operation needs on the project, for the messages of 403s (GitLab's roles/permissions).
_READ = "Reporter role (read merge requests)"
_WRITE_MR = "Developer role (create and update merge requests)"
_COMMENT = "Reporter role (comment on merge requests)"


class GitlabForgeError(PermanentError):
    """A GitLab request that retrying cannot fix (bad token, missing permission, missing object)."""


class GitlabAuthError(GitlabForgeError):
    """401 (the token is refused) or 403 (the token's user lacks a permission on the project)."""


class GitlabNotFound(GitlabForgeError):
    """404: the project, a branch or the merge request does not exist, or the token cannot see it."""


class GitlabUnavailable(TransientError):
    """429, 5xx, or GitLab could not be reached, after python-gitlab's own retries."""


class MergeBlocked(GitlabForgeError):
    """GitLab will not merge the MR as it is (approvals missing, draft, conflicts, failed pipeline)."""


# What ``_accept`` answers when GitLab has not yet seen the head twincd pushed: read again.
_LAGGING: dict[str, Any] = {}


class HeadMoved(GitlabForgeError):
    """The source branch moved after validation: GitLab's sha guard refused the merge (409)."""


# detailed_merge_status values while GitLab is still working the answer out (docs, "Merge status";
# approvals_syncing: gitlab-org/gitlab!150946). Legacy merge_status has preparing/unchecked/checking.
_STILL_CHECKING = frozenset(
    {
        "preparing",
        "checking",
        "unchecked",
        "approvals_syncing",
        "cannot_be_merged_recheck",
        "cannot_be_merged_rechecking",
    }
)
# What each blocking state means for the operator, and what they can do (the docs' descriptions).
_BLOCKED: dict[str, str] = {
    "not_open": "is not open",
    "draft_status": "is a draft: mark it ready in GitLab",
    "conflict": "has conflicts with the target branch: resolve them, or re-run the release on a fresh branch",
    "need_rebase": "must be rebased onto the target branch (the project fast-forwards): rebase it in GitLab",
    "broken_status": "cannot be merged because its source branch is broken (a missing or unreadable commit)",
    "discussions_not_resolved": "has unresolved threads: resolve them in GitLab",
    "blocked_status": "is blocked by another merge request",
    "ci_must_pass": "needs a successful pipeline and its pipeline failed or did not run: fix and re-run it",
    "external_status_checks": "waits for external status checks",
    "jira_association_missing": "needs a Jira issue in its title or description",
    "requested_changes": "has changes requested by a reviewer",
    "merge_request_blocked": "is blocked by another merge request",
    "security_policy_violations": "violates a security policy",
    "locked_paths": "touches locked paths",
    "locked_lfs_files": "touches locked LFS files",
    "title_regex": "does not match the project's required title pattern",
    "commits_status": "has commits that are not allowed (e.g. unsigned)",
}


class GitlabForge:
    name: ClassVar[str] = "GitLab"  # who merged, when people merge there
    merged_by_people: ClassVar[bool] = True  # people review and merge on GitLab; twincd waits

    def __init__(
        self,
        *,
        url: str,
        project: str,
        token: Secret,
        labels: Sequence[str] = ("twincd",),
        failed_label: str = FAILED_LABEL,
        timeout: float = 30,
        max_retries: int = 5,
        poll_seconds: float = 5,
        max_poll_seconds: float = 60,
        check_seconds: float = 120,
        pipeline_seconds: float = 3600,
    ) -> None:
        self.url = url.rstrip("/")
        self.project = project
        self.labels = tuple(labels)
        self.failed_label = failed_label
        self._token = token
        # max_retries bounds python-gitlab's in-call retries (its default of 10 is ~100 s of backoff
        # per call on a down server); the task's retries come on top of it.
        self._max_retries = max_retries
        self._gl = gitlab.Gitlab(
            self.url, private_token=token.reveal(), timeout=timeout, retry_transient_errors=True
        )
        # lazy: no request until the first real call, so opening an MR costs no extra GET.
        self._project: Project = self._gl.projects.get(project, lazy=True)
        self._merge_method_cache: str | None = None
        self._poll = poll_seconds
        self._max_poll = max_poll_seconds
        self._check_seconds = check_seconds
        self._pipeline_seconds = pipeline_seconds

    def close_session(self) -> None:
        """Close python-gitlab's HTTP session (its pooled connections). ``close`` closes an MR."""
        self._gl.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_session()

    def __repr__(self) -> str:
        return f"GitlabForge(url={redact_url(self.url)!r}, project={self.project!r})"

    # ---- the forge port --------------------------------------------------------------------

    def find(self, *, source_branch: str, target_branch: str) -> MergeRequest | None:
        """The open MR for ``source_branch`` or, when there is none, the latest merged one."""
        what = f"listing merge requests of {source_branch!r}"

        def list_mrs() -> list[ProjectMergeRequest]:
            return self._project.mergerequests.list(
                source_branch=source_branch,
                target_branch=target_branch,
                state="all",
                per_page=20,
                get_all=False,
                max_retries=self._max_retries,
            )

        found = self._call(what, list_mrs, needs=_READ)
        for state in ("opened", "merged"):
            match = next((m for m in found if m.attributes.get("state") == state), None)  # newest first
            if match is not None:
                return self._to_mr(match.attributes)
        return None

    def open(
        self, *, source_branch: str, target_branch: str, title: str, description: str, head: str = ""
    ) -> MergeRequest:
        """Open the release MR; an open one for the branch, or one merged at ``head`` (the branch's
        current head, when known), is reused ("already done")."""
        existing = self.find(source_branch=source_branch, target_branch=target_branch)
        if existing is not None and existing.state == "opened":
            # The head twincd wrote (and validates) is what a merge may land: ``merge`` sends it as
            # ``sha``, so GitLab refuses the merge if the branch moved since.
            return replace(existing, reused=True, sha=head or existing.sha)
        if existing is not None and (not head or existing.sha == head):
            return replace(existing, reused=True)
        # Otherwise the merged MR is of an older build of the branch (the release was reverted and
        # is deployed again): GitLab takes a new MR for the same source branch.
        data = {
            "source_branch": source_branch,
            "target_branch": target_branch,
            "title": self._token.mask(title),
            "description": self._token.mask(description),
            "labels": ",".join(self.labels),
            "remove_source_branch": False,
        }

        def create() -> dict[str, Any] | None:
            try:
                return self._project.mergerequests.create(data, max_retries=self._max_retries).attributes
            except gitlab.exceptions.GitlabCreateError as e:
                if e.response_code == 409 and _DUPLICATE_MR in str(e.error_message):
                    return None  # someone (an earlier attempt of this task) opened it meanwhile
                raise

        created = self._call(
            f"opening a merge request from {source_branch!r} into {target_branch!r}", create, needs=_WRITE_MR
        )
        if created is not None:
            opened = self._to_mr(created)
            return replace(opened, sha=head or opened.sha)
        again = self.find(source_branch=source_branch, target_branch=target_branch)
        if again is not None:
            return replace(again, reused=True, sha=head or again.sha)
        # GitLab allows one open MR per source branch whatever its target: an MR from this branch
        # into another branch is a person's doing, and reusing it would release to the wrong place.
        raise GitlabForgeError(
            f"GitLab project {self.project}: an open merge request from {source_branch!r} into a branch "
            f"other than {target_branch!r} already exists; close it and re-run the deploy"
        )

    def get(self, mr: MergeRequest) -> MergeRequest:
        """The MR now; once merged, with who approved it (one more GET: GitLab's MR approvals API)."""
        current = self._to_mr(self._read(_iid(mr)))
        if current.state == "merged":
            return replace(current, approved_by=self._approvers(_iid(mr)))
        return current

    def post_validation(self, mr: MergeRequest, report: ValidationReport) -> None:
        """Post the validation result as an MR note (once) and set or clear the failure label."""
        iid = _iid(mr)
        body = self._token.mask(report_markdown(report))
        # A retried task must not post the same note twice: the note carries a digest of itself.
        marker = f"<!-- twincd:validation:{hashlib.sha256(body.encode()).hexdigest()[:16]} -->"
        lazy_mr = self._project.mergerequests.get(iid, lazy=True)

        def recent_bodies() -> list[str]:
            notes = lazy_mr.notes.list(
                sort="desc", order_by="created_at", per_page=50, get_all=False, max_retries=self._max_retries
            )
            return [str(n.attributes.get("body", "")) for n in notes]

        if not any(marker in b for b in self._call(f"reading notes of !{iid}", recent_bodies, needs=_READ)):
            self._call(
                f"posting the validation note on !{iid}",
                lambda: lazy_mr.notes.create({"body": f"{body}\n\n{marker}"}, max_retries=self._max_retries),
                needs=_COMMENT,
            )
        change = {"add_labels": self.failed_label} if not report.ok else {"remove_labels": self.failed_label}
        self._call(
            f"labelling !{iid}",
            lambda: self._project.mergerequests.update(iid, change, max_retries=self._max_retries),
            needs=_WRITE_MR,
        )

    def merge(
        self, mr: MergeRequest, *, approved_by: str, onto: str | None = None, settle_timeout: float = 30
    ) -> MergeRequest:
        """Merge through the API at ``mr.sha`` (the validated head); an already merged MR is returned.

        ``onto`` is not sent: GitLab's merge API guards the source only (``sha``, gitlab-foss#14139),
        never the target. twincd brings the branch up to the target before validating it, so a
        merge commit made now holds the validated tree; a push to the target in the seconds between
        is merged unvalidated unless the project's merge method is ``ff`` or ``rebase_merge``, where
        GitLab itself refuses a source that is not up to date (merge status ``need_rebase``).

        Waits while GitLab checks mergeability; sets auto-merge when a required pipeline is still
        running and waits for GitLab's merge; raises MergeBlocked (permanent, nothing merged) for
        approvals missing and other blocking states, HeadMoved when the branch moved after
        validation. Returns once GitLab reports the MR merged with the commit the target runs; if
        that takes longer than ``settle_timeout`` seconds, GitlabUnavailable (a retry finds it merged).
        """
        iid = _iid(mr)
        attrs = self._read(iid)
        if attrs.get("state") == "merged":  # already done (possibly by an earlier attempt still settling)
            return self._settled_merge(mr, attrs, settle_timeout)
        message = self._token.mask(
            f"Merge branch '{mr.source_branch}'\n\n{mr.title}\n\nApproved-by: {approved_by}"
        )
        sha = mr.sha or str(attrs.get("sha") or "")
        deadline = time.monotonic() + self._check_seconds
        delay = min(self._poll, 1.0)
        refused = 0  # 405s to a merge GitLab showed as possible
        while True:
            state, status = str(attrs.get("state")), _merge_status(attrs)
            if state == "merged":
                return self._settled_merge(mr, attrs, settle_timeout)
            if state != "opened":
                url = attrs.get("web_url") or mr.web_url
                raise GitlabForgeError(f"merge request {mr.ref} ({url}) is {state}; re-run the release")
            if status in _STILL_CHECKING:
                pass  # GitLab is still computing mergeability: read again after a pause
            elif status in ("mergeable", "ci_still_running", ""):  # "": no status shown; GitLab decides
                auto = status == "ci_still_running"
                accepted = self._accept(mr, iid, message=message, sha=sha, auto=auto)
                if accepted is _LAGGING:
                    pass  # GitLab has not refreshed the MR after twincd's push yet: read again
                elif accepted is not None:
                    if auto:
                        return self._auto_merged(mr, accepted, settle_timeout)
                    return self._settled_merge(mr, accepted, settle_timeout)
                else:
                    # 405 although it read mergeable: a push or a pipeline came in between; read
                    # again. Repeated, it is a rule the status does not show (legacy merge_status
                    # only knows git mergeability; approvals and pipelines are not in it): say so.
                    refused += 1
                if refused >= 3:
                    raise MergeBlocked(
                        f"GitLab project {self.project}: merge request {mr.ref} ({mr.web_url}) shows "
                        f"{status or 'no merge status'!r} but GitLab refuses to merge it (405 Method Not "
                        "Allowed, 3 times): approvals, a required pipeline, a draft or unresolved threads "
                        "may block it. Nothing was merged; check the MR in GitLab and re-run the deploy."
                    )
            else:
                raise self._blocked(mr, iid, status, attrs)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GitlabUnavailable(
                    f"GitLab at {redact_url(self.url)}, project {self.project}: merge request {mr.ref} "
                    f"({attrs.get('web_url') or mr.web_url}) is still {status or 'unchecked'!r} after "
                    f"{self._check_seconds:.0f} s (GitLab computes mergeability in the background); "
                    "retry once GitLab shows it mergeable"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, self._max_poll)
            attrs = self._read(iid)

    def _accept(
        self, mr: MergeRequest, iid: int, *, message: str, sha: str, auto: bool
    ) -> dict[str, Any] | None:
        """``PUT .../merge``; None on a 405 (not mergeable at this moment), errors on the rest."""
        extra: dict[str, Any] = {"sha": sha} if sha else {}

        def accept() -> dict[str, Any] | None:
            try:
                return self._project.mergerequests.get(iid, lazy=True).merge(
                    merge_commit_message=message,
                    should_remove_source_branch=False,
                    merge_when_pipeline_succeeds=True if auto else None,
                    max_retries=self._max_retries,
                    **extra,
                )
            except gitlab.exceptions.GitlabMRClosedError as e:
                reason = self._token.mask(str(e.error_message))[:200]
                where = f"GitLab project {self.project}: merge request {mr.ref} ({mr.web_url})"
                if e.response_code == 405:
                    return None
                if e.response_code == 409 and "SHA does not match" in reason:
                    if self._branch_head(mr.source_branch) == sha:
                        # The branch is at the validated head (twincd's own catch-up push): GitLab
                        # refreshes an MR after a push in the background (MergeRequests::
                        # RefreshService, a Sidekiq job) and compares with the head it knew.
                        return _LAGGING
                    raise HeadMoved(
                        f"{where}: its source branch {mr.source_branch} moved after validation "
                        f"(validated {sha[:12]}; GitLab: {reason}); nothing was merged. Re-run the "
                        "deploy to validate and merge the branch as it is now."
                    ) from None
                if e.response_code in (406, 409, 422):
                    raise MergeBlocked(
                        f"{where} cannot be merged ({e.response_code}: {reason}); nothing was merged. "
                        "Resolve it in GitLab and re-run the deploy."
                    ) from None
                raise

        result: dict[str, Any] | None = self._call(
            f"merging !{iid}",
            accept,
            needs=f"Developer role allowed to merge into {mr.target_branch} (protected branch settings)",
        )
        return result

    def _branch_head(self, branch: str) -> str:
        """The commit ``branch`` points at in the repository (not as an MR last saw it)."""
        found = self._call(
            f"reading branch {branch}", lambda: self._project.branches.get(branch), needs="Reporter role"
        )
        return str(found.commit["id"])

    def _auto_merged(self, mr: MergeRequest, attrs: dict[str, Any], settle_timeout: float) -> MergeRequest:
        """After ``merge_when_pipeline_succeeds``: wait for GitLab's merge (or its abort)."""
        iid = _iid(mr)
        deadline = time.monotonic() + self._pipeline_seconds
        delay = min(self._poll, 1.0)
        while attrs.get("state") == "opened":
            if not attrs.get("merge_when_pipeline_succeeds"):
                # GitLab aborts auto-merge when the pipeline fails or the branch gets new commits.
                pipeline = (attrs.get("head_pipeline") or {}).get("status") or "unknown"
                raise MergeBlocked(
                    f"GitLab project {self.project}: auto-merge of {mr.ref} ({mr.web_url}) was aborted by "
                    f"GitLab (head pipeline {pipeline}, merge status {_merge_status(attrs)!r}); nothing was "
                    "merged. Fix the pipeline (or the branch) and re-run the deploy."
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GitlabUnavailable(
                    f"GitLab project {self.project}: {mr.ref} ({mr.web_url}) is set to merge when its "
                    f"pipeline succeeds, and is still open after {self._pipeline_seconds:.0f} s; "
                    "a retry keeps waiting (the auto-merge stays set in GitLab)"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, self._max_poll)
            attrs = self._read(iid)
        return self._settled_merge(mr, attrs, settle_timeout)

    def _approvers(self, iid: int) -> tuple[str, ...]:
        """Who approved the MR (the approvals API; GitLab Free has it too), for the timeline.

        Best effort: the merge is done, so a failure to read its approvals is logged, not raised.
        """
        try:
            approvals = self._call(
                f"reading the approvals of !{iid}",
                lambda: (
                    self._project.mergerequests.get(iid, lazy=True)
                    .approvals.get(max_retries=self._max_retries)
                    .attributes
                ),
                needs=_READ,
            )
        except (GitlabForgeError, TransientError) as e:
            log.warning("could not read who approved !%s: %s", iid, e)
            return ()
        return tuple(_approver_names(approvals))

    def _blocked(self, mr: MergeRequest, iid: int, status: str, attrs: dict[str, Any]) -> MergeBlocked:
        where = (
            f"GitLab project {self.project}: merge request {mr.ref} ({attrs.get('web_url') or mr.web_url})"
        )
        if status == "not_approved":
            approvals = self._call(
                f"reading the approvals of !{iid}",
                lambda: (
                    self._project.mergerequests.get(iid, lazy=True)
                    .approvals.get(max_retries=self._max_retries)
                    .attributes
                ),
                needs=_READ,
            )
            left, required = approvals.get("approvals_left"), approvals.get("approvals_required")
            who = _approver_names(approvals)
            return MergeBlocked(
                f"{where} needs {left} more approval{'s' if left != 1 else ''} "
                f"({required} required by the project's approval rules; approved by "
                f"{', '.join(who) or 'nobody yet'}); nothing was merged. Approve it in GitLab (people "
                "eligible under the rule), or lower the rule's required approvals, then re-run the deploy."
            )
        explained = _BLOCKED.get(status, f"cannot be merged now (detailed_merge_status {status!r})")
        return MergeBlocked(f"{where} {explained}; nothing was merged. Re-run the deploy once it is fixed.")

    def _settled_merge(self, mr: MergeRequest, attrs: dict[str, Any], settle_timeout: float) -> MergeRequest:
        """Poll from ``attrs`` until the MR is merged with a known merge commit."""
        # The merge PUT may answer before the merge is done (merge trains, merges GitLab runs in
        # the background): still "opened", or "merged" with merge_commit_sha null for a moment.
        # The flow needs the merge commit, so wait for it, briefly, with a short backoff.
        deadline = time.monotonic() + settle_timeout
        delay = 0.1
        while not self._merge_settled(attrs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = attrs.get("state")
                raise GitlabUnavailable(
                    f"GitLab at {redact_url(self.url)}, project {self.project}: merge request {mr.ref} "
                    f"({attrs.get('web_url') or mr.web_url}) was accepted for merging but is still {state!r}"
                    f"{' without a merge commit' if state == 'merged' else ''} after {settle_timeout:.0f} s "
                    "(a merge train or a slow merge); retry once GitLab shows it merged"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)
            attrs = self._read(_iid(mr))
        return self._to_mr(attrs)

    def _read(self, iid: int) -> dict[str, Any]:
        attrs: dict[str, Any] = self._call(
            f"reading merge request !{iid}",
            lambda: self._project.mergerequests.get(iid, max_retries=self._max_retries).attributes,
            needs=_READ,
        )
        return attrs

    def _merge_settled(self, attrs: dict[str, Any]) -> bool:
        """Merged, and the commit the target branch now runs is known."""
        if attrs.get("state") != "merged":
            return False
        if attrs.get("merge_commit_sha") or attrs.get("squash_commit_sha"):
            return True
        # No merge commit is normal only where the project fast-forwards (merge_method "ff");
        # elsewhere the merge commit is still being written.
        return bool(attrs.get("sha")) and self._merge_method() == "ff"

    def _merge_method(self) -> str:
        if self._merge_method_cache is None:
            project = self._call(
                "reading the project's merge method",
                lambda: self._gl.projects.get(self.project, max_retries=self._max_retries).attributes,
                needs=_READ,
            )
            self._merge_method_cache = str(project.get("merge_method") or "merge")
        return self._merge_method_cache

    def close(self, mr: MergeRequest, *, reason: str) -> MergeRequest:
        """Close without merging, saying why in a note; the branch stays for inspection."""
        current = self.get(mr)
        if current.state == "merged":
            raise GitlabForgeError(
                f"merge request {current.ref} ({current.web_url}) is already merged and cannot be closed"
            )
        if current.state == "closed":
            return current
        iid = _iid(mr)
        lazy_mr = self._project.mergerequests.get(iid, lazy=True)
        if reason:
            self._call(
                f"commenting on !{iid}",
                lambda: lazy_mr.notes.create(
                    {"body": self._token.mask(f"Closed by twincd: {reason}")}, max_retries=self._max_retries
                ),
                needs=_COMMENT,
            )
        attrs = self._call(
            f"closing !{iid}",
            lambda: self._project.mergerequests.update(
                iid, {"state_event": "close"}, max_retries=self._max_retries
            ),
            needs=_WRITE_MR,
        )
        return self._to_mr(attrs)

    # ---- translation -----------------------------------------------------------------------

    def _to_mr(self, attrs: dict[str, Any]) -> MergeRequest:
        state = str(attrs["state"])
        commit = None
        if state == "merged":
            # merge_commit_sha is null when the project fast-forwards; then the squash commit (squash
            # + fast-forward) or the source head itself (plain fast-forward) is what the target runs.
            commit = attrs.get("merge_commit_sha") or attrs.get("squash_commit_sha") or attrs.get("sha")
        return MergeRequest(
            ref=f"!{attrs['iid']}",
            source_branch=str(attrs["source_branch"]),
            target_branch=str(attrs["target_branch"]),
            title=str(attrs["title"]),
            state=state,
            web_url=str(attrs.get("web_url") or ""),
            merge_commit=commit,
            sha=str(attrs.get("sha") or ""),
            merged_by=_username(attrs.get("merged_by")) or _username(attrs.get("merge_user"))
            if state == "merged"
            else "",
        )

    def _call(self, what: str, fn: Callable[[], T], *, needs: str) -> T:
        try:
            return fn()
        except gitlab.exceptions.GitlabError as e:
            raise self._translate(what, e, needs) from None
        except requests.RequestException as e:
            # Connection refused, DNS, TLS, timeouts: python-gitlab already retried them.
            raise GitlabUnavailable(
                f"GitLab at {redact_url(self.url)} could not be reached while {what} "
                f"(project {self.project}): {self._token.mask(type(e).__name__)}"
            ) from None

    def _translate(self, what: str, e: gitlab.exceptions.GitlabError, needs: str) -> Exception:
        code = e.response_code
        detail = self._token.mask(str(e.error_message))[:300]
        where = f"GitLab at {redact_url(self.url)}, project {self.project}"
        if code == 401:
            return GitlabAuthError(
                f"{where}: the token was refused (401) while {what}: it is invalid, expired or revoked. "
                "Use a project or personal access token with the `api` scope "
                "(forge.token in the environment file)."
            )
        if code == 403:
            return GitlabAuthError(
                f"{where}: permission denied (403) while {what}: the token needs the `api` scope "
                f"and at least the {needs} on {self.project}."
            )
        if code == 404:
            return GitlabNotFound(
                f"{where}: not found (404) while {what}: {detail}. Check forge.project and the branch names; "
                f"a private project looks missing to a token without at least the {_READ} on it."
            )
        if code is None or code == 429 or code >= 500 or (code == 409 and "Resource lock" in detail):
            return GitlabUnavailable(
                f"{where}: GitLab is unavailable or rate-limiting ({code}) while {what}: {detail}"
            )
        return GitlabForgeError(f"{where}: GitLab refused {what} ({code}): {detail}")


def _merge_status(attrs: dict[str, Any]) -> str:
    """detailed_merge_status (GitLab 15.6+), else the legacy merge_status in its terms."""
    detailed = attrs.get("detailed_merge_status")
    if detailed:
        return str(detailed)
    legacy = str(attrs.get("merge_status") or "")
    return {"can_be_merged": "mergeable", "cannot_be_merged": "conflict"}.get(legacy, legacy)


def _approver_names(approvals: dict[str, Any]) -> list[str]:
    return [name for a in approvals.get("approved_by") or [] if (name := _username(a.get("user")))]


def _username(user: object) -> str:
    return str(user.get("username") or "") if isinstance(user, dict) else ""


def _iid(mr: MergeRequest) -> int:
    try:
        return int(mr.ref.removeprefix("!"))
    except ValueError:
        raise GitlabForgeError(f"{mr.ref!r} is not a GitLab merge request reference (!<iid>)") from None
