"""Manifests repository adapter (GitPython).

Every operation works in a fresh temporary clone, so nothing depends on a long-lived work tree
and a re-run after a crash starts clean. Pushes that are rejected because someone else pushed
first are retried after a fetch and a re-applied edit (rebase-and-retry without a real rebase:
our edits are pure functions of the files, so re-applying them on the new head is exact).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import git

from twincd.domain import ImageChange
from twincd.errors import PermanentError, TransientError

AUTHOR = git.Actor("twincd", "twincd@localhost")
PUSH_ATTEMPTS = 4


class GitError(TransientError):
    """The repository could not be reached or a push kept being rejected."""


class GitRefNotFound(PermanentError):
    """A branch, tag or commit that the caller named does not exist."""


@dataclass(frozen=True)
class ReleaseBranch:
    branch: str
    head: str  # the branch's head commit after this call
    base: str  # the target branch's head the diff was computed against
    changes: tuple[ImageChange, ...]  # everything the branch changes (also when made by an earlier run)
    committed: bool  # False when the branch already held the edit ("already done")
    diff: str  # `git diff base...head`, for the MR description and the approval form


# An edit reads the files of a work tree and returns {relative path: new text} plus its record.
Edit = Callable[[Path], tuple[dict[str, str], tuple[ImageChange, ...]]]


def _git_call(what: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except git.GitCommandError as e:
        raise GitError(f"git {what} failed: {(e.stderr or '').strip()[:500]}") from e


@contextlib.contextmanager
def clone(repo_url: str, *, ref: str | None = None) -> Iterator[git.Repo]:
    """A temporary clone of ``repo_url``, checked out at ``ref`` (branch, tag or commit) if given."""
    with tempfile.TemporaryDirectory(prefix="twincd-git-") as tmp:
        repo = _git_call("clone", lambda: git.Repo.clone_from(repo_url, tmp, no_checkout=ref is not None))
        assert isinstance(repo, git.Repo)
        if ref is not None:
            try:
                repo.git.checkout(ref)
            except git.GitCommandError:
                raise GitRefNotFound(f"{repo_url}: no branch, tag or commit named {ref!r}") from None
        yield repo


def _remote_branch(repo: git.Repo, branch: str) -> git.RemoteReference | None:
    ref = f"origin/{branch}"
    return next((r for r in repo.remote().refs if r.name == ref), None)


def _diff(repo: git.Repo, base: str, head: str) -> str:
    return str(repo.git.diff(f"{base}...{head}"))


def write_release_branch(*, repo_url: str, target: str, branch: str, edit: Edit, message: str) -> ReleaseBranch:
    """Make ``branch`` (created from ``target`` when missing) hold ``edit``; push it.

    Idempotent: when the branch already holds the edit no commit is made and nothing is pushed.
    """
    for attempt in range(PUSH_ATTEMPTS):
        with clone(repo_url) as repo:
            target_ref = _remote_branch(repo, target)
            if target_ref is None:
                raise GitRefNotFound(f"{repo_url}: target branch {target!r} does not exist")
            existing = _remote_branch(repo, branch)
            start = existing if existing is not None else target_ref
            repo.git.checkout("-B", branch, start.name)
            work = Path(str(repo.working_tree_dir))
            files, changes = edit(work)
            base = target_ref.commit.hexsha
            if not changes:
                # Already done: either the branch holds the edit (an earlier run) or, when there is
                # no branch, the target already does (released before): no branch is made then and
                # the empty diff tells the caller so.
                head = repo.head.commit.hexsha
                return ReleaseBranch(branch, head, base, (), False, _diff(repo, base, head))
            for rel, text in files.items():
                (work / rel).write_text(text)
            repo.index.add(list(files))
            commit = repo.index.commit(message, author=AUTHOR, committer=AUTHOR)
            try:
                _push(repo, branch)
            except GitError:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
                continue  # someone pushed first: start again from the new remote state
            return ReleaseBranch(branch, commit.hexsha, base, changes, True, _diff(repo, base, commit.hexsha))
    raise AssertionError("unreachable")


def _push(repo: git.Repo, branch: str) -> None:
    _git_call(f"push {branch}", lambda: repo.git.push("origin", f"HEAD:refs/heads/{branch}"))


def branch_head(*, repo_url: str, branch: str) -> str | None:
    """The commit a remote branch points at, or None when it does not exist (one ls-remote)."""
    out = _git_call("ls-remote", lambda: git.cmd.Git().ls_remote(repo_url, f"refs/heads/{branch}"))
    line = str(out).strip()
    return line.split()[0] if line else None


def merge_branch(*, repo_url: str, source: str, target: str, message: str) -> str:
    """Merge ``source`` into ``target`` with a merge commit and push; return the merge commit.

    "Already merged" is success: the existing merge commit (the first commit on ``target`` whose
    parents include the source head) is returned and nothing is pushed.
    """
    for attempt in range(PUSH_ATTEMPTS):
        with clone(repo_url) as repo:
            src = _remote_branch(repo, source)
            if src is None:
                raise GitRefNotFound(f"{repo_url}: source branch {source!r} does not exist")
            tgt = _remote_branch(repo, target)
            if tgt is None:
                raise GitRefNotFound(f"{repo_url}: target branch {target!r} does not exist")
            src_sha = src.commit.hexsha
            if repo.is_ancestor(src.commit, tgt.commit):
                return _merge_commit_of(repo, src_sha, tgt.name)
            repo.git.checkout("-B", target, tgt.name)
            try:
                repo.git.merge("--no-ff", "-m", message, src.name,
                               env={"GIT_AUTHOR_NAME": AUTHOR.name, "GIT_AUTHOR_EMAIL": AUTHOR.email,
                                    "GIT_COMMITTER_NAME": AUTHOR.name, "GIT_COMMITTER_EMAIL": AUTHOR.email})
            except git.GitCommandError as e:
                raise PermanentError(
                    f"{repo_url}: {source} does not merge cleanly into {target}: {(e.stdout or '').strip()[:300]}"
                ) from e
            try:
                _push(repo, target)
            except GitError:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
                continue
            return repo.head.commit.hexsha
    raise AssertionError("unreachable")


def _merge_commit_of(repo: git.Repo, source_sha: str, target_ref: str) -> str:
    for commit in repo.iter_commits(target_ref, ancestry_path=False, max_count=1000):
        if any(p.hexsha == source_sha for p in commit.parents[1:]):
            return commit.hexsha
    # Fast-forwarded by someone else: the source head itself is what the target runs.
    return source_sha


def tag_commit(*, repo_url: str, tag: str) -> str:
    """The commit a tag points at (annotated tags peeled); GitRefNotFound when there is no such tag."""
    out = str(_git_call("ls-remote", lambda: git.cmd.Git().ls_remote(
        repo_url, f"refs/tags/{tag}", f"refs/tags/{tag}^{{}}"))).strip()
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    found = refs.get(f"refs/tags/{tag}^{{}}") or refs.get(f"refs/tags/{tag}")
    if found is None:
        raise GitRefNotFound(f"tag {tag!r} does not exist in {repo_url}")
    return found


def write_revert_branch(*, repo_url: str, target: str, branch: str, merge_commits: list[str]) -> ReleaseBranch:
    """Make ``branch`` (from ``target``) hold a `git revert -m 1` of each merge commit, newest first.

    Idempotent: an existing branch is taken as it is (it holds the reverts of an earlier run).
    Rollback is a new commit on top, never a force-push: what ran stays in history and Argo CD
    syncs the revert like any other change (argo-cd#2441).
    """
    for attempt in range(PUSH_ATTEMPTS):
        with clone(repo_url) as repo:
            target_ref = _remote_branch(repo, target)
            if target_ref is None:
                raise GitRefNotFound(f"{repo_url}: target branch {target!r} does not exist")
            base = target_ref.commit.hexsha
            existing = _remote_branch(repo, branch)
            if existing is not None:
                head = existing.commit.hexsha
                return ReleaseBranch(branch, head, base, (), False, _diff(repo, base, head))
            repo.git.checkout("-B", branch, target_ref.name)
            env = {"GIT_AUTHOR_NAME": AUTHOR.name, "GIT_AUTHOR_EMAIL": AUTHOR.email,
                   "GIT_COMMITTER_NAME": AUTHOR.name, "GIT_COMMITTER_EMAIL": AUTHOR.email}
            for sha in merge_commits:
                try:
                    repo.git.revert("--no-edit", "-m", "1", sha, env=env)
                except git.GitCommandError as e:
                    raise PermanentError(f"{repo_url}: cannot revert {sha[:12]} on {target}: "
                                         f"{(e.stderr or e.stdout or '').strip()[:300]}") from e
            try:
                _push(repo, branch)
            except GitError:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
                continue
            head = repo.head.commit.hexsha
            return ReleaseBranch(branch, head, base, (), True, _diff(repo, base, head))
    raise AssertionError("unreachable")
