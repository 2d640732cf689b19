"""Manifests repository adapter (GitPython).

Every operation works in a fresh work tree, so nothing depends on a long-lived one and a re-run
after a crash starts clean: a work tree of the worker's long-lived mirror (``Mirror``) when the
manifests port has one, else a temporary partial clone. Pushes that are rejected because someone else pushed
first are retried after a fetch and a re-applied edit (rebase-and-retry without a real rebase:
our edits are pure functions of the files, so re-applying them on the new head is exact).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import posixpath
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import git

from twincd.adapters.secrets import Secret
from twincd.domain import CaughtUp
from twincd.domain import ReleaseBranch as ReleaseBranch  # re-exported: the type git writes
from twincd.errors import PermanentError, TargetMoved, TransientError
from twincd.kustomize import UNKNOWN, kustomize_inputs
from twincd.ports import Edit

AUTHOR = git.Actor("twincd", "twincd@localhost")
T = TypeVar("T")
PUSH_ATTEMPTS = 4


class GitError(TransientError):
    """The repository could not be reached or a push kept being rejected."""


class GitDenied(PermanentError):
    """Bad credentials, a protected branch, a declined hook: retrying cannot help."""


class PushRejected(GitError):
    """The remote refused a push (usually: someone pushed first). Retried from a fresh clone."""


class GitRefNotFound(PermanentError):
    """A branch, tag or commit that the caller named does not exist."""


def redact_url(url: str) -> str:
    """A repository URL without any ``user:token@`` part, fit for messages, logs and labels."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # not a port after all: keep no part of what followed the host
        port = None
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _scrub(text: str) -> str:
    """git's own output may echo a URL with credentials: redact every URL in it."""
    # git quotes URLs ('http://host/repo.git/'): a quote ends the URL.
    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)), text)


@dataclass(frozen=True)
class GitAuth:
    """How git authenticates to remotes, handed to every git command through its environment.

    HTTPS: ``headers`` are ``(URL prefix, header value)`` pairs, given to git as
    ``http.<prefix>.extraHeader`` through ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n``
    (git-config(1), "ENVIRONMENT"): git sends the header only to URLs under the prefix
    (``http.<url>.*`` matching), and the value is never in a URL, an argument list (``ps`` shows
    argv), a remote's config, a log or an error. SSH: ``ssh_key`` is a private key file for
    ``GIT_SSH_COMMAND``; without one ssh uses its agent. ``GIT_TERMINAL_PROMPT=0`` always: a
    missing credential must fail, not wait for a password on a terminal nobody watches.
    """

    headers: tuple[tuple[str, Secret], ...] = ()
    ssh_key: str = ""

    def env(self) -> dict[str, str]:
        out = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        for i, (prefix, value) in enumerate(self.headers):
            out[f"GIT_CONFIG_KEY_{i}"] = f"http.{prefix}.extraHeader"
            out[f"GIT_CONFIG_VALUE_{i}"] = value.reveal()
        if self.headers:
            out["GIT_CONFIG_COUNT"] = str(len(self.headers))
        if self.ssh_key:
            # BatchMode: no passphrase or host-key prompt; a key that needs one fails clearly.
            out["GIT_SSH_COMMAND"] = (
                f"ssh -i {shlex.quote(self.ssh_key)} -o IdentitiesOnly=yes -o BatchMode=yes"
            )
        return out

    def mask(self, text: str) -> str:
        for _, value in self.headers:
            text = value.mask(text)
        return text


NO_AUTH = GitAuth()


def basic_header(username: str, token: Secret) -> Secret:
    """``Authorization: Basic base64(username:token)``, what GitLab takes for a deploy, project or
    personal access token over HTTPS (any username for a project or personal token)."""
    pair = base64.b64encode(f"{username}:{token.reveal()}".encode()).decode()
    return Secret(f"Authorization: Basic {pair}")


def is_url(value: str) -> bool:
    """A git URL (``scheme://...`` or scp-style ``user@host:path``) rather than a local path."""
    return "://" in value or bool(re.match(r"^[\w.+-]+@[\w.-]+:", value))


DENIED = re.compile(
    # git 2.39 says "The requested URL returned error: 403"; GitLab answers a token without access
    # to a project as "repository '…' not found"; ssh in BatchMode fails on an unknown host key.
    r"Authentication failed|could not read Username|Permission denied|HTTP 40[13]|returned error: 40[13]|"
    r"repository '[^']*' not found|Host key verification failed|"
    r"protected branch|pre-receive hook declined|hook declined",
    re.IGNORECASE,
)
_REJECTED = re.compile(
    r"\[rejected\]|fetch first|non-fast-forward|stale info|failed to update ref", re.IGNORECASE
)


def _git_call(what: str, fn: Callable[[], object], auth: GitAuth = NO_AUTH) -> object:
    try:
        return fn()
    except git.GitCommandError as e:
        # Not `from e`: the SDK error's text carries the command line, URL credentials included.
        detail = auth.mask(_scrub(str(e.stderr or ""))).strip()[:500]
        if DENIED.search(detail):
            raise GitDenied(
                f"git {what} refused: {detail}; check the repository's entry under git.credentials in the "
                "environment file (the token, its scope: read and write repository) and the branch's "
                "protection for twincd"
            ) from None
        if _REJECTED.search(detail):
            raise PushRejected(f"git {what} rejected: {detail}") from None
        raise GitError(f"git {what} failed: {detail}") from None


class Mirror:
    """One long-lived mirror of a repository under the state dir, shared by every task of a worker.

    Partial (``--filter=blob:none``, a promisor remote) from a remote: commits and trees only; the
    file contents a checkout or a diff needs are fetched on demand, with the same credentials. It
    is fetched incrementally (``fetch --prune`` into ``refs/remotes/origin/*``) under an exclusive
    lock on ``<mirror>.lock`` (flock: concurrent tasks on one worker, and workers sharing a state
    dir), and each operation gets a work tree of its own (``git worktree add --detach``, removed
    after), so no task clones the repository again: its cost grows with what changed since the
    last fetch, not with the repository's history. The remote's URL in the mirror's config holds
    no credentials (the environment file refuses them); they go through ``GitAuth.env`` only.
    """

    def __init__(self, repo_url: str, root: Path, auth: GitAuth = NO_AUTH) -> None:
        self.url = repo_url
        self.auth = auth
        self.path = root / f"{hashlib.sha256(repo_url.encode()).hexdigest()[:16]}.git"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _git(self, what: str, *args: str) -> str:
        env = self.auth.env()
        argv = ["git", "--git-dir", str(self.path), *args]
        return str(_git_call(what, lambda: git.cmd.Git().execute(argv, env=env), self.auth))

    def _init_git(self, name: str, *args: str) -> None:
        argv = ["git", *args]
        _git_call(f"make a mirror of {name}", lambda: git.cmd.Git().execute(argv))

    def _fetch(self) -> None:
        """Create the mirror if needed and bring it up to date (the caller holds the lock)."""
        name = redact_url(self.url)
        if not (self.path / "HEAD").exists():
            tmp = self.path.with_name(self.path.name + ".new")
            shutil.rmtree(tmp, ignore_errors=True)
            self._init_git(name, "init", "-q", "--bare", str(tmp))
            config = {
                "remote.origin.url": self.url,
                "remote.origin.fetch": "+refs/heads/*:refs/remotes/origin/*",
            }
            if is_url(self.url):
                config |= {"remote.origin.promisor": "true", "remote.origin.partialclonefilter": "blob:none"}
            for key, value in config.items():
                self._init_git(name, "--git-dir", str(tmp), "config", key, value)
            tmp.rename(self.path)
        partial = ["--filter=blob:none"] if is_url(self.url) else []
        self._git(f"fetch {name}", "fetch", "-q", "--prune", *partial, "origin")

    def refresh(self) -> None:
        with self._locked():
            self._fetch()

    def _resolve(self, ref: str) -> str:
        for candidate in (f"refs/remotes/origin/{ref}", ref):
            with contextlib.suppress(GitError, GitDenied):
                return self._git(f"rev-parse {ref}", "rev-parse", "--verify", "-q", f"{candidate}^{{commit}}")
        raise GitRefNotFound(f"{redact_url(self.url)}: no branch, tag or commit named {ref!r}")

    def _any_commit(self) -> str:
        out = self._git(
            "list branches", "for-each-ref", "--count=1", "--format=%(objectname)", "refs/remotes/origin"
        )
        if not out.strip():
            raise GitRefNotFound(f"{redact_url(self.url)} has no branch yet")
        return out.strip()

    @contextlib.contextmanager
    def worktree(self, ref: str | None = None, *, sparse: Sequence[str] | None = None) -> Iterator[git.Repo]:
        """A work tree of its own, fresh from the remote, at ``ref`` (else no files checked out yet).

        ``sparse``: only these overlays and what they read (:func:`twincd.kustomize.kustomize_inputs`,
        followed until nothing new turns up) are checked out, as a non-cone sparse checkout; git
        keeps every other path in the index, so commits, merges and reverts made here carry the
        whole tree. A monorepo of hundreds of apps then costs a task the files of one.
        """
        with tempfile.TemporaryDirectory(prefix="twincd-git-") as tmp:
            work = str(Path(tmp) / "work")
            with self._locked():
                self._fetch()
                self._git("prune work trees", "worktree", "prune")
                start = self._resolve(ref) if ref is not None else self._any_commit()
                no_checkout = [] if ref is not None and sparse is None else ["--no-checkout"]
                self._git("worktree add", "worktree", "add", "-q", "--detach", *no_checkout, work, start)
            try:
                repo = git.Repo(work)
                with repo:  # ends git's persistent cat-file processes before the directory goes
                    repo.git.update_environment(**self.auth.env())
                    if sparse is not None:
                        _sparse_checkout(repo, sparse, start if ref is not None else None)
                    yield repo
            finally:
                with self._locked(), contextlib.suppress(GitError, GitDenied):
                    self._git("worktree remove", "worktree", "remove", "--force", work)

    def contains(self, commit: str, rev: str) -> bool | None:
        """Whether ``rev`` contains ``commit``; None when the mirror does not know one of them."""
        argv = ["git", "--git-dir", str(self.path), "merge-base", "--is-ancestor", commit, rev]
        try:
            git.cmd.Git().execute(argv)
            return True
        except git.GitCommandError as e:
            return False if e.status == 1 else None  # 1: both known, not an ancestor


def _sparse_checkout(repo: git.Repo, overlays: Sequence[str], start: str | None) -> None:
    """Check out ``overlays`` and, at ``start``, everything they read (none yet: the caller checks
    out the commit it works on, and the overlays are what it edits)."""
    work = Path(str(repo.working_tree_dir))
    wanted = {posixpath.normpath(o) for o in overlays}

    def sparse(*args: str) -> None:  # a checkout may fetch file contents: the remote's errors map
        _git_call("sparse checkout", lambda: repo.git.sparse_checkout(*args))

    # A pattern that matches nothing keeps an empty set empty (merges and reverts need no files).
    sparse("set", "--no-cone", "/.twincd-nothing", *(f"/{p}/" for p in sorted(wanted)))
    if start is None:
        return
    _git_call(f"checkout {start[:12]}", lambda: repo.git.checkout("-q", "--detach", start))
    for _ in range(16):  # each round reaches one more level of bases and components
        named = set().union(*(kustomize_inputs(work, o, missing=True) for o in overlays))
        found = named - wanted - {UNKNOWN}
        if not found:
            return
        wanted |= found
        # "/p" matches a file or a directory p (gitignore rules): names not in the commit match nothing.
        sparse("add", *(f"/{p}" for p in sorted(found)))


@contextlib.contextmanager
def _clone(
    repo_url: str,
    *,
    ref: str | None = None,
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
    sparse: Sequence[str] | None = None,
) -> Iterator[git.Repo]:
    """A temporary clone of ``repo_url``, checked out at ``ref`` (branch, tag or commit) if given;
    a work tree of ``mirror`` when there is one (no clone at all), sparse when ``sparse`` names the
    overlays the caller needs (:meth:`Mirror.worktree`).

    Partial (``--filter=blob:none``) from a remote: history comes without old file contents, and the
    blobs a checkout or a diff needs are fetched on demand (with the same credentials).
    """
    if mirror is not None:
        with mirror.worktree(ref, sparse=sparse) as work:
            yield work
        return
    env = auth.env()
    partial = ["--filter=blob:none"] if is_url(repo_url) else None
    with tempfile.TemporaryDirectory(prefix="twincd-git-") as tmp:
        repo = _git_call(
            f"clone {redact_url(repo_url)}",
            lambda: git.Repo.clone_from(
                repo_url, tmp, multi_options=partial, no_checkout=ref is not None, env=env
            ),
            auth,
        )
        assert isinstance(repo, git.Repo)
        with repo:  # ends git's persistent cat-file processes before the directory goes
            repo.git.update_environment(**env)
            if ref is not None:
                try:
                    repo.git.checkout(ref)
                except git.GitCommandError:
                    raise GitRefNotFound(
                        f"{redact_url(repo_url)}: no branch, tag or commit named {ref!r}"
                    ) from None
            yield repo


def _remote_branch(repo: git.Repo, branch: str) -> git.RemoteReference | None:
    ref = f"origin/{branch}"
    return next((r for r in repo.remote().refs if r.name == ref), None)


def _diff(repo: git.Repo, base: str, head: str) -> str:
    return str(repo.git.diff(f"{base}...{head}"))


def _in_fresh_clone(
    repo_url: str,
    body: Callable[[git.Repo], T],
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
    sparse: Sequence[str] | None = None,
) -> T:
    """Run ``body`` in a fresh clone; when its push is rejected (someone pushed first), start over.

    Rebase-and-retry without a real rebase: our edits are pure functions of the files, so doing
    them again on the new remote state is exact.
    """
    for attempt in range(PUSH_ATTEMPTS):
        with _clone(repo_url, auth=auth, mirror=mirror, sparse=sparse) as repo:
            try:
                return body(repo)
            except PushRejected:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
    raise AssertionError("unreachable")


def _push(repo: git.Repo, branch: str, *, replacing: str | None = None) -> None:
    """Push HEAD to ``branch``; ``replacing``: the branch's commit we rebuild it over (twincd's own
    branches only), refused if someone else moved it meanwhile."""
    lease = [f"--force-with-lease=refs/heads/{branch}:{replacing}"] if replacing else []
    # To the URL, not to "origin": a push to a named remote also updates its remote-tracking ref,
    # and in a work tree of the shared mirror that write would race another task's fetch under the
    # mirror's lock ("cannot lock ref 'refs/remotes/origin/main'"). The next fetch brings it.
    url = repo.remote().url
    _git_call(f"push {branch}", lambda: repo.git.push(*lease, url, f"HEAD:refs/heads/{branch}"))


def _branches(
    repo: git.Repo, repo_url: str, target: str, branch: str
) -> tuple[git.RemoteReference, git.RemoteReference | None]:
    target_ref = _remote_branch(repo, target)
    if target_ref is None:
        raise GitRefNotFound(f"{redact_url(repo_url)}: target branch {target!r} does not exist")
    return target_ref, _remote_branch(repo, branch)


_AS_TWINCD = {
    "GIT_AUTHOR_NAME": AUTHOR.name,
    "GIT_AUTHOR_EMAIL": AUTHOR.email,
    "GIT_COMMITTER_NAME": AUTHOR.name,
    "GIT_COMMITTER_EMAIL": AUTHOR.email,
}


def write_release_branch(
    *,
    repo_url: str,
    target: str,
    branch: str,
    edit: Edit,
    message: str,
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
    overlays: Sequence[str] | None = None,
) -> ReleaseBranch:
    """Make ``branch`` hold ``target`` plus ``edit``, push it, and return its diff against ``target``.

    The branch is twincd's own: it is always (re)built on the target's head, so it validates and
    merges what the target is now (after a fix on main, or after the release was reverted).
    Idempotent: when the branch already is exactly target + edit, nothing is committed or pushed;
    when the target itself already holds the edit, the diff is empty and no branch is made.
    """

    def body(repo: git.Repo) -> ReleaseBranch:
        target_ref, existing = _branches(repo, repo_url, target, branch)
        base = target_ref.commit.hexsha
        # Detached: work trees of one mirror share its branches, and twincd pushes HEAD anyway.
        repo.git.checkout("--detach", target_ref.name)
        work = Path(str(repo.working_tree_dir))
        files, changes = edit(work)
        if not changes:
            return ReleaseBranch(branch, base, base, (), False, "")
        for rel, text in files.items():
            (work / rel).write_text(text)
        # git itself, not GitPython's index: it reads and writes the whole index in Python, which
        # costs a monorepo of thousands of files about half a second per release.
        repo.git.add("--", *files)
        tree = str(repo.git.write_tree())
        if (
            existing is not None
            and existing.commit.tree.hexsha == tree
            and [p.hexsha for p in existing.commit.parents] == [base]
        ):
            head = existing.commit.hexsha  # an earlier run made exactly this commit
            return ReleaseBranch(branch, head, base, changes, False, _diff(repo, base, head))
        repo.git.commit("-q", "--no-verify", "--cleanup=verbatim", "-m", message, env=_AS_TWINCD)
        commit = str(repo.git.rev_parse("HEAD"))
        _push(repo, branch, replacing=existing.commit.hexsha if existing is not None else None)
        return ReleaseBranch(branch, commit, base, changes, True, _diff(repo, base, commit))

    return _in_fresh_clone(repo_url, body, auth, mirror, overlays)


def branch_head(*, repo_url: str, branch: str, auth: GitAuth = NO_AUTH) -> str | None:
    """The commit a remote branch points at, or None when it does not exist (one ls-remote)."""
    out = _git_call(
        f"ls-remote {redact_url(repo_url)}",
        lambda: git.cmd.Git().ls_remote("--", repo_url, f"refs/heads/{branch}", env=auth.env()),
        auth,
    )
    line = str(out).strip()
    return line.split()[0] if line else None


def merge_branch(
    *,
    repo_url: str,
    source: str,
    target: str,
    message: str,
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
    onto: str | None = None,
) -> str:
    """Merge ``source`` into ``target`` with a merge commit and push; return the merge commit.

    "Already merged" is success: the existing merge commit (the first commit on ``target`` whose
    parents include the source head) is returned and nothing is pushed.
    ``onto``: the target commit the merge must be made on, a compare-and-swap (the push carries it
    as the expected old value, so a push from elsewhere in between is refused by the remote
    itself); TargetMoved when the target is elsewhere, nothing pushed.
    """

    def body(repo: git.Repo) -> str:
        tgt, src = _branches(repo, repo_url, target, source)
        if src is None:
            raise GitRefNotFound(f"{redact_url(repo_url)}: source branch {source!r} does not exist")
        if repo.is_ancestor(src.commit, tgt.commit):
            return _merge_commit_of(repo, src.commit.hexsha, tgt.name)
        if onto is not None and tgt.commit.hexsha != onto:
            raise TargetMoved(
                f"{redact_url(repo_url)}: {target} moved to {tgt.commit.hexsha[:12]} (the merge was to "
                f"be made on {onto[:12]}); nothing was merged"
            )
        repo.git.checkout("--detach", tgt.name)
        try:
            repo.git.merge("--no-ff", "-m", message, src.name, env=_AS_TWINCD)
        except git.GitCommandError as e:
            raise PermanentError(
                f"{redact_url(repo_url)}: {source} does not merge cleanly into {target}: "
                f"{_scrub(str(e.stdout or '')).strip()[:300]}"
            ) from None
        _push(repo, target, replacing=onto)
        return str(repo.head.commit.hexsha)

    return _in_fresh_clone(repo_url, body, auth, mirror, ())  # a merge needs no files checked out


def catch_up_branch(
    *,
    repo_url: str,
    target: str,
    branch: ReleaseBranch,
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
) -> CaughtUp:
    """Bring ``branch`` up to ``target``'s head: merge the target into it (GitLab's "update branch")
    so that its head is exactly what merging it would land, and push it.

    Nothing changes when the branch already holds the target's head. The branch must be where it
    was validated (``branch.head``), or ahead of it only by twincd's own catch-ups: anyone else's
    push to it is refused, as GitLab's ``sha`` guard refuses it. A conflict is permanent.
    """

    def body(repo: git.Repo) -> CaughtUp:
        tgt, src = _branches(repo, repo_url, target, branch.branch)
        if src is None:
            raise GitRefNotFound(f"{redact_url(repo_url)}: branch {branch.branch!r} does not exist")
        own = _own_catch_ups(repo, branch.head, src.commit.hexsha)
        if own is None:
            raise PermanentError(
                f"{redact_url(repo_url)}: {branch.branch} moved to {src.commit.hexsha[:12]} since it was "
                f"validated at {branch.head[:12]}, by someone else; nothing was merged. Re-run the release"
            )
        if repo.is_ancestor(src.commit, tgt.commit):
            return CaughtUp(branch)  # merged already: nothing to bring up to date (the forge says so)
        base = tgt.commit.hexsha
        # What came in since the head that was validated, however many catch-ups ago.
        log = str(repo.git.log("--abbrev=12", "--format=%h %s (%an)", f"{branch.head}..{base}"))
        paths = str(repo.git.diff("--name-only", f"{branch.head}...{base}"))
        came = (tuple(log.splitlines()), tuple(paths.splitlines()))
        if repo.is_ancestor(tgt.commit, src.commit):
            # An earlier attempt's catch-up already holds the target (its push landed, its answer was
            # lost): that head is the one to validate, with what came in since ``branch.head``.
            head = src.commit.hexsha
            caught = replace(branch, head=head, base=base, committed=bool(own), diff=_diff(repo, base, head))
            return CaughtUp(caught, *came) if own else CaughtUp(replace(branch, base=base))
        repo.git.checkout("--detach", src.commit.hexsha)
        try:
            repo.git.merge(
                "--no-ff",
                "-m",
                f"Merge branch '{target}' into {branch.branch}",
                tgt.commit.hexsha,
                env=_AS_TWINCD,
            )
        except git.GitCommandError as e:
            raise PermanentError(
                f"{redact_url(repo_url)}: {target} (now {tgt.commit.hexsha[:12]}) conflicts with "
                f"{branch.branch}: {_scrub(str(e.stdout or '')).strip()[:300]}; nothing was merged. "
                f"Re-run the release: it rebuilds the branch on {target}"
            ) from None
        _push(repo, branch.branch, replacing=src.commit.hexsha)
        head = repo.head.commit.hexsha
        return CaughtUp(
            replace(branch, head=head, base=base, committed=True, diff=_diff(repo, base, head)), *came
        )

    return _in_fresh_clone(repo_url, body, auth, mirror, ())  # a merge needs no files checked out


def _own_catch_ups(repo: git.Repo, validated: str, head: str) -> bool | None:
    """False: ``head`` is ``validated``; True: ahead of it only by twincd's catch-up merges (an earlier
    attempt's); None: anything else (someone else pushed)."""
    if head == validated:
        return False
    commit = repo.commit(head)
    while commit.hexsha != validated:
        if len(commit.parents) != 2 or commit.author.email != AUTHOR.email:
            return None
        commit = commit.parents[0]
    return True


def merged_into(
    *, repo_url: str, source: str, target: str, auth: GitAuth = NO_AUTH, mirror: Mirror | None = None
) -> str | None:
    """The merge commit that brought ``source``'s head into ``target``, or None when it is not merged."""
    with _clone(repo_url, auth=auth, mirror=mirror) as repo:
        tgt, src = _branches(repo, repo_url, target, source)
        if src is None or not repo.is_ancestor(src.commit, tgt.commit):
            return None
        return _merge_commit_of(repo, src.commit.hexsha, tgt.name)


def _merge_commit_of(repo: git.Repo, source_sha: str, target_ref: str) -> str:
    for commit in repo.iter_commits(target_ref, ancestry_path=False, max_count=1000):
        if any(p.hexsha == source_sha for p in commit.parents[1:]):
            return commit.hexsha
    # Fast-forwarded by someone else: the source head itself is what the target runs.
    return source_sha


def tag_commit(*, repo_url: str, tag: str, auth: GitAuth = NO_AUTH) -> str:
    """The commit a tag points at (annotated tags peeled); GitRefNotFound when there is no such tag."""
    # `--` so that a URL can never be read as an option; no prompt for a missing credential.
    out = str(
        _git_call(
            f"ls-remote {redact_url(repo_url)}",
            lambda: git.cmd.Git().ls_remote(
                "--tags",
                "--",
                repo_url,
                f"refs/tags/{tag}",
                f"refs/tags/{tag}^{{}}",
                env=auth.env(),
            ),
            auth,
        )
    ).strip()
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    found = refs.get(f"refs/tags/{tag}^{{}}") or refs.get(f"refs/tags/{tag}")
    if found is None:
        raise GitRefNotFound(f"tag {tag!r} does not exist in {redact_url(repo_url)}")
    return found


def write_revert_branch(
    *,
    repo_url: str,
    target: str,
    branch: str,
    merge_commits: list[str],
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
) -> ReleaseBranch:
    """Make ``branch`` (from ``target``) hold a `git revert -m 1` of each merge commit, in the order given.

    Idempotent: an unmerged branch from an earlier run is taken as it is; a merged one (an older
    revert of the same release) is rebuilt on the target.
    Rollback is a new commit on top, never a force-push: what ran stays in history and Argo CD
    syncs the revert like any other change (argo-cd#2441).
    """

    def body(repo: git.Repo) -> ReleaseBranch:
        target_ref, existing = _branches(repo, repo_url, target, branch)
        base = target_ref.commit.hexsha
        if existing is not None and not repo.is_ancestor(existing.commit, target_ref.commit):
            head = existing.commit.hexsha  # not merged yet: an earlier run's revert, reused
            return ReleaseBranch(branch, head, base, (), False, _diff(repo, base, head))
        repo.git.checkout("--detach", target_ref.name)
        for sha in merge_commits:
            try:
                repo.git.revert("--no-edit", "-m", "1", sha, env=_AS_TWINCD)
            except git.GitCommandError as e:
                raise PermanentError(
                    f"{redact_url(repo_url)}: cannot revert {sha[:12]} on {target}: "
                    f"{_scrub(str(e.stderr or e.stdout or '')).strip()[:300]}"
                ) from None
        _push(repo, branch, replacing=existing.commit.hexsha if existing is not None else None)
        head = repo.head.commit.hexsha
        return ReleaseBranch(branch, head, base, (), True, _diff(repo, base, head))

    return _in_fresh_clone(repo_url, body, auth, mirror, ())  # a revert needs no files checked out


@contextlib.contextmanager
def contains_checker(
    repo_url: str, commit: str, *, auth: GitAuth = NO_AUTH, mirror: Mirror | None = None
) -> Iterator[Callable[[str], bool]]:
    """A test "does revision ``rev`` contain ``commit``?", answered from a local bare clone (the
    mirror, when there is one).

    Revisions the clone does not know yet (pushed after it was made) trigger one fetch; answers
    are cached. Safe to call from several threads.
    """
    if mirror is not None:
        mirror.refresh()
        known: dict[str, bool] = {}

        def in_mirror(rev: str) -> bool:
            if rev not in known:
                answer = mirror.contains(commit, rev)
                if answer is None:
                    mirror.refresh()
                    answer = mirror.contains(commit, rev)
                if answer is None:
                    return False  # still unknown: not ours to judge
                known[rev] = answer
            return known[rev]

        yield in_mirror
        return
    with tempfile.TemporaryDirectory(prefix="twincd-ancestry-") as tmp:
        # Commits only: ancestry needs no file contents (a local path ignores the filter).
        env = auth.env()
        repo = _git_call(
            f"clone {redact_url(repo_url)}",
            lambda: git.Repo.clone_from(repo_url, tmp, bare=True, filter="blob:none", env=env),
            auth,
        )
        assert isinstance(repo, git.Repo)
        repo.git.update_environment(**env)
        answers: dict[str, bool] = {}

        def contains(rev: str) -> bool:
            if rev not in answers:
                for attempt in range(2):
                    try:
                        repo.git.merge_base("--is-ancestor", commit, rev)
                        answers[rev] = True
                        break
                    except git.GitCommandError as e:
                        if e.status == 1:  # a known revision that does not contain the commit
                            answers[rev] = False
                            break
                        if attempt:
                            return False  # still unknown: not ours to judge
                        _git_call(
                            f"fetch {redact_url(repo_url)}",
                            lambda: repo.git.fetch("origin", "+refs/heads/*:refs/heads/*"),
                            auth,
                        )
            return answers[rev]

        with repo:
            yield contains


@contextlib.contextmanager
def checkout(
    repo_url: str,
    *,
    ref: str,
    auth: GitAuth = NO_AUTH,
    mirror: Mirror | None = None,
    overlays: Sequence[str] | None = None,
) -> Iterator[Path]:
    """A temporary work tree of ``repo_url`` at ``ref``, as a plain directory (no GitPython outside);
    with a mirror and ``overlays``, only they and what they read are checked out."""
    with _clone(repo_url, ref=ref, auth=auth, mirror=mirror, sparse=overlays) as repo:
        yield Path(str(repo.working_tree_dir))


class GitManifests:
    """The manifests monorepo (the ``Manifests`` port): every operation in a fresh clone."""

    def __init__(
        self, *, repo_url: str, branch: str, auth: GitAuth = NO_AUTH, cache_dir: Path | None = None
    ) -> None:
        self._url = repo_url
        self._branch = branch
        self._auth = auth
        # One mirror per worker's state dir: no operation clones the monorepo again.
        self._mirror = Mirror(repo_url, cache_dir, auth) if cache_dir is not None else None

    @property
    def name(self) -> str:
        return redact_url(self._url)

    @property
    def branch(self) -> str:
        return self._branch

    def head(self) -> str:
        head = branch_head(repo_url=self._url, branch=self._branch, auth=self._auth)
        if head is None:
            raise GitRefNotFound(f"{self.name}: branch {self._branch!r} does not exist")
        return head

    def checkout(
        self, revision: str, *, overlays: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[Path]:
        return checkout(self._url, ref=revision, auth=self._auth, mirror=self._mirror, overlays=overlays)

    def write_branch(
        self, *, branch: str, edit: Edit, message: str, overlays: Sequence[str] | None = None
    ) -> ReleaseBranch:
        return write_release_branch(
            repo_url=self._url,
            target=self._branch,
            branch=branch,
            edit=edit,
            message=message,
            auth=self._auth,
            mirror=self._mirror,
            overlays=overlays,
        )

    def write_revert(self, *, branch: str, merge_commits: Sequence[str]) -> ReleaseBranch:
        return write_revert_branch(
            repo_url=self._url,
            target=self._branch,
            branch=branch,
            merge_commits=list(merge_commits),
            auth=self._auth,
            mirror=self._mirror,
        )

    def catch_up(self, branch: ReleaseBranch) -> CaughtUp:
        return catch_up_branch(
            repo_url=self._url, target=self._branch, branch=branch, auth=self._auth, mirror=self._mirror
        )

    def merged_into(self, source: str) -> str | None:
        return merged_into(
            repo_url=self._url, source=source, target=self._branch, auth=self._auth, mirror=self._mirror
        )

    def ancestry(self, commit: str) -> contextlib.AbstractContextManager[Callable[[str], bool]]:
        return contains_checker(self._url, commit, auth=self._auth, mirror=self._mirror)


class GitSource:
    """An app repository (the ``AppSource`` port): releases are its tags."""

    def __init__(self, *, repo_url: str, auth: GitAuth = NO_AUTH) -> None:
        self._url = repo_url
        self._auth = auth

    def tag_commit(self, tag: str) -> str:
        return tag_commit(repo_url=self._url, tag=tag, auth=self._auth)


def pull_project(repository: str, ref: str, token: str = "", username: str = "twincd") -> dict[str, str]:
    """A Prefect pull step (prefect.yaml ``pull:``): the project's code at ``ref``, cloned into the
    working directory; returns ``{"directory": ...}`` for the steps after it.

    Prefect's own ``git_clone`` step puts an access token into the URL of a ``git -c
    url.<url with token>.insteadOf=…`` argument, where ``ps`` shows it; here the token (a Prefect
    Secret block, resolved by the worker) goes to git as an ``extraHeader`` through its config
    environment (``GitAuth``), as every other git call of twincd does.
    """
    headers = ((repository, basic_header(username, Secret(token))),) if token and is_url(repository) else ()
    auth = GitAuth(headers=headers)
    name = redact_url(repository)
    # A branch or tag is resolved to its commit first: a clone is kept per commit, so a branch
    # that moved is cloned again, and a commit is never fetched twice.
    listed = str(
        _git_call(
            f"ls-remote {name}",
            lambda: git.cmd.Git().execute(
                ["git", "ls-remote", "--", repository, ref, f"{ref}^{{}}"], env=auth.env()
            ),
            auth,
        )
    ).split()
    commit = listed[-2] if listed else ref  # an annotated tag's peeled commit is listed last
    directory = Path.cwd() / f"twincd-{hashlib.sha256(f'{repository}@{commit}'.encode()).hexdigest()[:12]}"
    if not (directory / ".git").exists():
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _git_call(
            f"clone {name}",
            lambda: git.cmd.Git().execute(
                ["git", "clone", "-q", "--no-checkout", "--", repository, str(tmp)], env=auth.env()
            ),
            auth,
        )
        _git_call(
            f"checkout {ref}",
            lambda: git.cmd.Git().execute(
                ["git", "-C", str(tmp), "checkout", "-q", "--detach", commit], env=auth.env()
            ),
            auth,
        )
        tmp.rename(directory)
    return {"directory": str(directory.relative_to(Path.cwd()))}
