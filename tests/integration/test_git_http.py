"""Git remotes over authenticated HTTP: the local stack's git server (git http-backend behind Basic
auth, as GitLab serves a private project) and the git adapter's credentials.

The real git client talks to the real git http-backend; credentials travel only in git's config
environment (``http.<url>.extraHeader``), so no test here ever finds them in a URL, a remote's
config, a message or a log.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from twincd.adapters.git import (
    GitAuth,
    GitDenied,
    GitError,
    GitManifests,
    GitSource,
    basic_header,
)
from twincd.adapters.secrets import Secret
from twincd.domain import ImageChange
from twincd.sandbox.githttp import create_app
from twincd.sandbox.procs import free_port
from twincd.sandbox.seed import seed_app, seed_manifests
from twincd.sandbox.serving import ServedApp, serve_asgi
from twincd.validate import render_overlay

TOKEN = "glpat-git-http-test-token"
OVERLAY = "overlays/eks/hello/kustomization.yaml"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServedApp, Path]]:
    root = tmp_path / "repos"
    seed_manifests(root / "manifests.git", apps=["hello"], clusters=["eks", "aks"])
    seed_app(root / "hello.git")
    served = serve_asgi(create_app(root, TOKEN), name="git-http")
    try:
        yield served, root
    finally:
        served.stop()


def auth_for(url: str, token: str = TOKEN) -> GitAuth:
    return GitAuth(headers=((url, basic_header("twincd", Secret(token))),))


def comment(line: str):  # type: ignore[no-untyped-def]
    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        return {OVERLAY: (work / OVERLAY).read_text() + line + "\n"}, (
            ImageChange(OVERLAY, "hello", "", line),
        )

    return edit


def test_clone_push_and_tags_through_basic_auth(
    server: tuple[ServedApp, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    served, root = server
    base = f"{served.url}/"
    manifests = GitManifests(repo_url=f"{base}manifests.git", branch="main", auth=auth_for(base))
    head = manifests.head()
    branch = manifests.write_branch(branch="twincd/hello/v1", edit=comment("# v1"), message="v1")
    assert branch.committed and branch.base == head and "+# v1" in branch.diff
    pushed = subprocess.run(
        ["git", "-C", str(root / "manifests.git"), "rev-parse", "refs/heads/twincd/hello/v1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert pushed == branch.head  # the push went through http-backend's receive-pack
    with manifests.checkout(branch.head) as work:
        assert (work / OVERLAY).read_text().endswith("# v1\n")
        config = (work / ".git" / "config").read_text()
    assert TOKEN not in config and "extraheader" not in config.lower()  # nothing persisted
    with manifests.ancestry(head) as contains:
        assert contains(branch.head)
    source = GitSource(repo_url=f"{base}hello.git", auth=auth_for(base))
    assert len(source.tag_commit("v1.0.0")) == 40
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_a_wrong_or_missing_token_is_refused_naming_the_repository(
    server: tuple[ServedApp, Path], token: str | None
) -> None:
    served, _ = server
    url = f"{served.url}/manifests.git"
    auth = auth_for(f"{served.url}/", token) if token else GitAuth()
    with pytest.raises(GitDenied) as e:
        GitManifests(repo_url=url, branch="main", auth=auth).head()
    message = str(e.value)
    assert url in message and "git.credentials" in message
    assert TOKEN not in message and "wrong-token" not in message
    with pytest.raises(GitDenied), GitManifests(repo_url=url, branch="main", auth=auth).checkout("main"):
        pass  # the clone path is refused too, not only ls-remote


def test_credentials_go_only_to_their_url_prefix(server: tuple[ServedApp, Path]) -> None:
    served, _ = server
    elsewhere = auth_for("http://gitlab.example.invalid/")  # another host's token is not sent here
    with pytest.raises(GitDenied):
        GitManifests(repo_url=f"{served.url}/manifests.git", branch="main", auth=elsewhere).head()


def test_an_unreachable_git_host_is_a_transient_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/manifests.git"
    with pytest.raises(GitError) as e:
        GitManifests(repo_url=url, branch="main", auth=auth_for(url)).head()
    assert not isinstance(e.value, GitDenied) and "127.0.0.1" in str(e.value)


def test_one_mirror_serves_every_operation_over_authenticated_http(
    server: tuple[ServedApp, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's mirror is a partial clone made once, fetched incrementally; each operation has a
    work tree of its own, removed after; the token is in no file of the mirror."""
    from concurrent.futures import ThreadPoolExecutor

    caplog.set_level(logging.DEBUG)
    served, root = server
    base = f"{served.url}/"
    cache = tmp_path / "git-cache"
    manifests = GitManifests(
        repo_url=f"{base}manifests.git", branch="main", auth=auth_for(base), cache_dir=cache
    )
    head = manifests.head()
    first = manifests.write_branch(branch="twincd/hello/v1", edit=comment("# v1"), message="v1")
    (mirror,) = [p for p in cache.iterdir() if p.suffix == ".git"]
    git = ["git", "--git-dir", str(mirror)]
    assert subprocess.run(
        [*git, "config", "remote.origin.promisor"], capture_output=True, text=True
    ).stdout == ("true\n")  # partial: file contents come when a work tree needs them
    inode = (mirror / "HEAD").stat().st_ino

    # Several tasks of one worker at once: each its own work tree, one fetch at a time.
    with ThreadPoolExecutor(4) as pool:
        branches = list(
            pool.map(
                lambda i: manifests.write_branch(
                    branch=f"twincd/app{i}/v1", edit=comment(f"# {i}"), message=f"{i}"
                ),
                range(4),
            )
        )
    assert all(b.committed and b.base == head for b in branches)
    with manifests.checkout(first.head) as work:
        assert (work / OVERLAY).read_text().endswith("# v1\n")
    # Only the overlay and what it reads (its base, its component), followed level by level.
    with manifests.checkout(first.head, overlays=["overlays/eks/hello"]) as work:
        present = {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and ".git" not in p.parts}
        assert OVERLAY in present and "base/hello/deployment.yaml" in present
        assert "components/active/kustomization.yaml" in present
        assert not any(p.startswith(("overlays/aks/", "components/standby/")) for p in present), present
        assert "kind: Deployment" in render_overlay(work, "overlays/eks/hello")
    with manifests.ancestry(head) as contains:
        assert contains(first.head) and all(contains(b.head) for b in branches)
    assert (mirror / "HEAD").stat().st_ino == inode  # the same mirror all along: never cloned again
    worktrees = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True, check=True).stdout
    assert worktrees.count("\n") == 1  # only the bare mirror itself: every work tree was removed
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert not any(TOKEN.encode() in p.read_bytes() for p in files)
    assert TOKEN not in caplog.text
