"""The local forge: a merge request is a branch of the manifests repo plus a JSON record.

It lets people try twincd without GitLab. Approval happens in the Prefect UI (the deploy flow
waits with a form); approving merges the branch into the target with a merge commit.
Records live under ``<state_dir>/forge/`` and are written atomically, so a crash never leaves a
half-written record behind.

Merges into the target branch are made one at a time, as a forge does (GitLab merges an MR under
a lock on its target and rejects a stale one): a file lock under the records dir orders the
merges of every process sharing the state dir, so fifty releases approved at once do not race
each other's pushes ("cannot lock ref 'refs/heads/main'"). A push from elsewhere in between is
still met by the rebuild-and-push-again of ``git.merge_branch``; the merge gives up (transient)
only after ``merge_seconds``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self

from twincd.adapters import git as gitrepo
from twincd.domain import MergeRequest, ValidationReport
from twincd.errors import PermanentError, TransientError
from twincd.validate import report_markdown


class MergeRequestNotFound(PermanentError):
    pass


class LocalForge:
    name: ClassVar[str] = "the local forge"  # who merged, when people merge there
    # Nobody merges here by hand: a person approves in the Prefect UI and twincd merges.
    merged_by_people: ClassVar[bool] = False

    def __init__(
        self,
        *,
        repo_url: str,
        records_dir: Path,
        auth: gitrepo.GitAuth = gitrepo.NO_AUTH,
        cache_dir: Path | None = None,
        merge_seconds: float = 300,
    ) -> None:
        self.repo_url = repo_url
        self.merge_seconds = merge_seconds
        self._auth = auth
        # Merges work in the manifests port's mirror when there is one: no clone per merge.
        self._mirror = gitrepo.Mirror(repo_url, cache_dir, auth) if cache_dir is not None else None
        self.records_dir = records_dir

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _record_path(self, source_branch: str) -> Path:
        return self.records_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", source_branch) + ".json")

    def find(self, *, source_branch: str) -> MergeRequest | None:
        path = self._record_path(source_branch)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        fields = {k: v for k, v in data.items() if k in MergeRequest.__dataclass_fields__}
        # JSON has no tuples: read back what asdict wrote as the dataclass holds it.
        return MergeRequest(**{**fields, "approved_by": tuple(fields.get("approved_by", ()))})

    def _save(self, mr: MergeRequest, **extra: str) -> MergeRequest:
        path = self._record_path(mr.source_branch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        kept: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        # What an earlier save of the same MR added (description, validation note) stays unless
        # replaced; a new MR for the branch starts a record of its own.
        same = kept.get("ref") == mr.ref
        extras = {k: v for k, v in kept.items() if same and k not in MergeRequest.__dataclass_fields__}
        record = {
            **extras,
            **asdict(mr),
            "reused": False,
            **extra,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        return mr

    def open(
        self, *, source_branch: str, target_branch: str, title: str, description: str, head: str = ""
    ) -> MergeRequest:
        """Open the MR for ``source_branch``; an open one, or one merged at the branch's current
        head, is reused ("already done")."""
        head = (
            head or gitrepo.branch_head(repo_url=self.repo_url, branch=source_branch, auth=self._auth) or ""
        )
        existing = self.find(source_branch=source_branch)
        if existing is not None and existing.state == "opened":
            # Like a GitLab MR, an open one follows its branch: it now shows the branch's head.
            return (
                self._save(replace(existing, sha=head, title=title), description=description)
                if existing.sha != head
                else replace(existing, reused=True)
            )
        if existing is not None and existing.state == "merged" and existing.sha == head:
            return replace(existing, reused=True)
        # No record; a closed one (a person refused an earlier attempt and re-ran the release on
        # purpose); or a merged one whose branch was rebuilt since (the release was reverted):
        # open a fresh request for the branch as it is now.
        mr = MergeRequest(
            ref=self._next_ref(),
            source_branch=source_branch,
            target_branch=target_branch,
            title=title,
            state="opened",
            web_url=f"file://{self._record_path(source_branch)}",
            sha=head,
        )
        return self._save(mr, description=description)

    def get(self, mr: MergeRequest) -> MergeRequest:
        current = self.find(source_branch=mr.source_branch)
        if current is None:
            raise MergeRequestNotFound(f"no merge request for branch {mr.source_branch!r}")
        return current

    def post_validation(self, mr: MergeRequest, report: ValidationReport) -> None:
        """The result goes into the MR's record (the approval form in the Prefect UI shows it too)."""
        self._save(self.get(mr), validation=report_markdown(report))

    def _next_ref(self) -> str:
        """``!N`` reserved with an exclusive create, so two runs at once never share a number."""
        numbers = self.records_dir / "numbers"
        numbers.mkdir(parents=True, exist_ok=True)
        n = len(list(numbers.iterdir())) + 1
        while True:
            try:
                os.close(os.open(numbers / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return f"!{n}"
            except FileExistsError:
                n += 1

    def merge(self, mr: MergeRequest, *, approved_by: str, onto: str | None = None) -> MergeRequest:
        """Merge the branch into the target; an already merged MR returns its merge commit.

        Like GitLab's ``sha`` guard, a branch that moved since ``mr.sha`` (its validated head) is
        refused; ``onto`` makes the merge a compare-and-swap on the target (TargetMoved).
        """
        current = self.find(source_branch=mr.source_branch)
        if current is None:
            raise MergeRequestNotFound(f"no merge request for branch {mr.source_branch!r}")
        if current.state == "merged":
            return current
        if current.state == "closed":
            raise PermanentError(
                f"merge request {current.ref} ({current.source_branch}) is closed; re-run the release"
            )
        deadline = time.monotonic() + self.merge_seconds
        message = f"Merge branch '{mr.source_branch}'\n\n{mr.title}\n\nApproved-by: {approved_by}"
        with self._merging(mr.target_branch, deadline):
            head = gitrepo.branch_head(repo_url=self.repo_url, branch=mr.source_branch, auth=self._auth) or ""
            if mr.sha and head != mr.sha:
                raise PermanentError(
                    f"merge request {current.ref}: {mr.source_branch} moved to {head[:12]} since it was "
                    f"validated at {mr.sha[:12]}; nothing was merged. Re-run the release"
                )
            sha = self._merge_until(mr, message, deadline, onto)
            return self._save(
                replace(current, state="merged", merge_commit=sha, sha=head, merged_by=approved_by)
            )

    def _merge_until(self, mr: MergeRequest, message: str, deadline: float, onto: str | None) -> str:
        """The merge commit, built again while pushes from elsewhere keep moving the target (with
        ``onto``, a moved target is the caller's to validate again: TargetMoved)."""
        while True:
            try:
                return gitrepo.merge_branch(
                    repo_url=self.repo_url,
                    source=mr.source_branch,
                    target=mr.target_branch,
                    message=message,
                    auth=self._auth,
                    mirror=self._mirror,
                    onto=onto,
                )
            except gitrepo.PushRejected:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    @contextmanager
    def _merging(self, target: str, deadline: float) -> Iterator[None]:
        """Hold the target branch's merge lock (waiting until ``deadline`` for the merges before)."""
        self.records_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", target)
        with open(self.records_dir / f".merge-{name}.lock", "w") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TransientError(
                            f"merging into {target}: other merges held it for {self.merge_seconds:.0f} s; "
                            "a retry goes on"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self, mr: MergeRequest, *, reason: str) -> MergeRequest:
        """Close without merging; the branch stays for inspection."""
        current = self.find(source_branch=mr.source_branch) or mr
        if current.state == "merged":
            raise PermanentError(f"merge request {current.ref} is already merged and cannot be closed")
        return self._save(replace(current, state="closed"), closed_reason=reason)
