"""The manifests git adapter and the local forge against real bare repositories."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from twincd.adapters import git as gitrepo
from twincd.adapters.forge_local import LocalForge
from twincd.domain import ImageChange
from twincd.errors import PermanentError, TargetMoved
from twincd.sandbox.seed import seed_app, seed_manifests

OVERLAY = "overlays/eks/hello/kustomization.yaml"


def run_git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=dev", "-c", "user.email=dev@example.test", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def manifests(tmp_path: Path) -> str:
    bare = tmp_path / "manifests.git"
    seed_manifests(bare, apps=["hello"], clusters=["eks", "aks"])
    return str(bare)


def append_line(line: str) -> gitrepo.Edit:
    """An edit that appends ``line`` to the eks overlay unless it is already there."""

    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        text = (work / OVERLAY).read_text()
        if line in text:
            return {}, ()
        return {OVERLAY: text + line + "\n"}, (ImageChange(OVERLAY, "hello", "", line),)

    return edit


def refs(bare: str) -> str:
    return run_git("-C", bare, "for-each-ref")


def test_release_branch_is_written_once(manifests: str) -> None:
    first = gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="twincd/hello/v1", edit=append_line("# v1"), message="v1"
    )
    assert first.committed and "+# v1" in first.diff
    before = refs(manifests)
    again = gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="twincd/hello/v1", edit=append_line("# v1"), message="v1"
    )
    assert not again.committed and again.head == first.head and again.diff == first.diff
    assert refs(manifests) == before  # no second commit, no second branch


def test_push_rejected_once_is_redone_on_the_new_remote_state(manifests: str, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_git("clone", "-q", manifests, str(other))
    calls: list[int] = []

    def racing_edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        if not calls:  # someone else pushes to main while our first attempt edits its clone
            (other / "README.md").write_text("changed by someone else\n")
            run_git("commit", "-qam", "concurrent", cwd=other)
            run_git("push", "-q", "origin", "HEAD:main", cwd=other)
        calls.append(1)
        files = {"README.md": (work / "README.md").read_text() + "ours\n"}
        return files, (ImageChange("README.md", "x", "", "ours"),)

    merged = gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="main", edit=racing_edit, message="ours"
    )
    assert len(calls) == 2  # rejected once, redone from the new head
    assert run_git("-C", manifests, "show", "main:README.md") == "changed by someone else\nours"
    assert merged.head == run_git("-C", manifests, "rev-parse", "main")


def test_merge_is_idempotent_and_revert_restores(manifests: str) -> None:
    base = run_git("-C", manifests, "rev-parse", "main")
    gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="rel", edit=append_line("# rel"), message="rel"
    )
    merge = gitrepo.merge_branch(repo_url=manifests, source="rel", target="main", message="merge rel")
    assert gitrepo.merge_branch(repo_url=manifests, source="rel", target="main", message="merge rel") == merge
    revert = gitrepo.write_revert_branch(
        repo_url=manifests, target="main", branch="rel-revert", merge_commits=[merge]
    )
    assert revert.committed and "-# rel" in revert.diff
    gitrepo.merge_branch(repo_url=manifests, source="rel-revert", target="main", message="revert rel")
    assert run_git("-C", manifests, "diff", base, "main", "--", OVERLAY) == ""


def test_tag_commit_and_missing_refs(tmp_path: Path, manifests: str) -> None:
    app = tmp_path / "hello.git"
    seed_app(app, tag="v1.0.0")
    assert gitrepo.tag_commit(repo_url=str(app), tag="v1.0.0") == run_git(
        "-C", str(app), "rev-parse", "v1.0.0^{}"
    )
    with pytest.raises(gitrepo.GitRefNotFound, match="tag 'v9' does not exist"):
        gitrepo.tag_commit(repo_url=str(app), tag="v9")
    with pytest.raises(gitrepo.GitRefNotFound, match="target branch 'nope'"):
        gitrepo.write_release_branch(
            repo_url=manifests, target="nope", branch="b", edit=append_line("x"), message="x"
        )


def test_credentials_in_a_repo_url_never_reach_a_message() -> None:
    url = "http://deploy:glpat-SECRET@127.0.0.1:9/infra/manifests.git"
    assert gitrepo.redact_url(url) == "http://127.0.0.1:9/infra/manifests.git"
    with pytest.raises(gitrepo.GitError) as error:
        gitrepo.tag_commit(repo_url=url, tag="v1")
    assert "SECRET" not in str(error.value) and error.value.__cause__ is None


def test_local_forge_reuses_merges_and_refuses(manifests: str, tmp_path: Path) -> None:
    forge = LocalForge(repo_url=manifests, records_dir=tmp_path / "forge")
    gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="twincd/hello/v2", edit=append_line("# v2"), message="v2"
    )
    mr = forge.open(source_branch="twincd/hello/v2", target_branch="main", title="v2", description="d")
    assert mr.state == "opened" and not mr.reused
    assert forge.open(
        source_branch="twincd/hello/v2", target_branch="main", title="v2", description="d"
    ).reused
    merged = forge.merge(mr, approved_by="alice")
    assert merged.state == "merged" and merged.merge_commit == run_git("-C", manifests, "rev-parse", "main")
    assert "Approved-by: alice" in run_git("-C", manifests, "log", "-1", "--format=%B", "main")
    assert forge.merge(mr, approved_by="alice") == merged  # already merged: same commit
    with pytest.raises(PermanentError, match="already merged"):
        forge.close(merged, reason="too late")


def _push_to_main(manifests: str, tmp_path: Path, text: str) -> str:
    work = tmp_path / "main-work"
    if not work.exists():
        run_git("clone", "-q", manifests, str(work))
    run_git("pull", "-q", cwd=work)
    (work / "README.md").write_text(text)
    run_git("commit", "-qam", "main moves on", cwd=work)
    run_git("push", "-q", "origin", "HEAD:main", cwd=work)
    return run_git("rev-parse", "HEAD", cwd=work)


def test_a_release_branch_follows_main_and_comes_back_after_a_revert(manifests: str, tmp_path: Path) -> None:
    forge = LocalForge(repo_url=manifests, records_dir=tmp_path / "forge")

    def write() -> gitrepo.ReleaseBranch:
        return gitrepo.write_release_branch(
            repo_url=manifests,
            target="main",
            branch="twincd/hello/v3",
            edit=append_line("# v3"),
            message="v3",
        )

    first = write()
    mr = forge.open(source_branch="twincd/hello/v3", target_branch="main", title="v3", description="d")
    # main moves on (a fix): the branch is rebuilt on it, and the open MR follows the branch
    moved = _push_to_main(manifests, tmp_path, "a fix on main\n")
    rebuilt = write()
    assert rebuilt.committed and rebuilt.base == moved and rebuilt.head != first.head
    assert run_git("-C", manifests, "rev-parse", "twincd/hello/v3^") == moved
    followed = forge.open(source_branch="twincd/hello/v3", target_branch="main", title="v3", description="d")
    assert followed.ref == mr.ref and followed.sha == rebuilt.head
    merged = forge.merge(followed, approved_by="alice")
    assert write().diff == ""  # main holds the release now: nothing to do
    # the release is reverted; deploying it again must make a new commit and a new MR
    revert = gitrepo.write_revert_branch(
        repo_url=manifests,
        target="main",
        branch="twincd/hello/v3-revert",
        merge_commits=[str(merged.merge_commit)],
    )
    gitrepo.merge_branch(repo_url=manifests, source=revert.branch, target="main", message="revert")
    again = write()
    assert again.committed and "+# v3" in again.diff
    reopened = forge.open(source_branch="twincd/hello/v3", target_branch="main", title="v3", description="d")
    assert reopened.state == "opened" and not reopened.reused and reopened.ref != mr.ref


def test_contains_checker_sees_later_commits(manifests: str, tmp_path: Path) -> None:
    base = run_git("-C", manifests, "rev-parse", "main")
    with gitrepo.contains_checker(manifests, base) as contains:
        later = _push_to_main(manifests, tmp_path, "later\n")  # pushed after the checker cloned
        assert contains(later) and contains(base)
    with gitrepo.contains_checker(manifests, later) as contains:
        assert not contains(base)


def test_merged_into_finds_the_merge_commit_or_none(manifests: str) -> None:
    gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="switch", edit=append_line("# s"), message="s"
    )
    assert gitrepo.merged_into(repo_url=manifests, source="switch", target="main") is None
    merge = gitrepo.merge_branch(repo_url=manifests, source="switch", target="main", message="merge switch")
    assert gitrepo.merged_into(repo_url=manifests, source="switch", target="main") == merge


def test_local_forge_keeps_the_validation_note_and_sees_a_merge_or_a_close(
    manifests: str, tmp_path: Path
) -> None:
    import json

    from twincd.domain import Finding, ValidationReport

    records = tmp_path / "forge"
    forge = LocalForge(repo_url=manifests, records_dir=records)
    for n in ("v4", "v5"):
        gitrepo.write_release_branch(
            repo_url=manifests,
            target="main",
            branch=f"twincd/hello/{n}",
            edit=append_line(f"# {n}"),
            message=n,
        )
    mr = forge.open(source_branch="twincd/hello/v4", target_branch="main", title="v4", description="d")
    failing = ValidationReport(
        ("overlays/eks/hello",), 3, (Finding("overlays/eks/hello", "Deployment/h/h", "bad"),)
    )
    forge.post_validation(mr, failing)
    record = json.loads(next(records.glob("*v4.json")).read_text())
    assert "validation failed" in record["validation"] and record["description"] == "d"

    # Another run's approval merged it: reading it shows the merge.
    forge.merge(mr, approved_by="bob")
    merged = forge.get(mr)
    assert merged.state == "merged" and merged.merge_commit == run_git("-C", manifests, "rev-parse", "main")

    other = forge.open(source_branch="twincd/hello/v5", target_branch="main", title="v5", description="d")
    forge.close(other, reason="not this one")
    assert forge.get(other).state == "closed"
    again = forge.open(source_branch="twincd/hello/v5", target_branch="main", title="v5", description="e")
    assert again.ref != other.ref  # a closed MR is never reopened: a new one, with a record of its own
    record = json.loads(next(records.glob("*v5.json")).read_text())
    assert "closed_reason" not in record and record["description"] == "e"


def _new_file(path: str) -> gitrepo.Edit:
    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        return {path: f"{path}\n"}, (ImageChange(path, "hello", "", path),)

    return edit


def test_twenty_merges_at_once_all_land_once(manifests: str, tmp_path: Path) -> None:
    """Twenty releases approved at the same moment (each its own forge and mirror user, as twenty
    flow runs are): every merge lands, one merge commit each, none lost, none twice."""
    from concurrent.futures import ThreadPoolExecutor

    n = 20
    for i in range(n):
        gitrepo.write_release_branch(
            repo_url=manifests,
            target="main",
            branch=f"twincd/app{i}/v1",
            edit=_new_file(f"app{i}.txt"),
            message=f"{i}",
        )
    base = run_git("-C", manifests, "rev-parse", "main")

    def merge(i: int) -> str:
        forge = LocalForge(repo_url=manifests, records_dir=tmp_path / "forge", cache_dir=tmp_path / "cache")
        mr = forge.open(
            source_branch=f"twincd/app{i}/v1", target_branch="main", title=f"app{i}", description=""
        )
        merged = forge.merge(mr, approved_by=f"p{i}")
        assert merged.merge_commit is not None
        return merged.merge_commit

    with ThreadPoolExecutor(n) as pool:
        commits = list(pool.map(merge, range(n)))
    merges = run_git("-C", manifests, "rev-list", "--merges", f"{base}..main").split()
    assert sorted(merges) == sorted(commits) and len(set(commits)) == n  # one merge commit per release
    tree = run_git("-C", manifests, "ls-tree", "--name-only", "main").split()
    assert all(f"app{i}.txt" in tree for i in range(n))  # no merge lost another's change
    assert run_git("-C", manifests, "rev-list", "--count", f"{base}..main") == str(2 * n)


def test_catch_up_then_merge_lands_exactly_the_validated_tree(manifests: str, tmp_path: Path) -> None:
    """Issue 16.1: what merges is the branch's head brought up to the target, as a compare-and-swap."""
    forge = LocalForge(repo_url=manifests, records_dir=tmp_path / "forge")
    branch = gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="twincd/hello/v5", edit=append_line("# v5"), message="v5"
    )
    mr = forge.open(source_branch=branch.branch, target_branch="main", title="v5", description="d")
    same = gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=branch)
    assert same.branch == branch and not same.moved  # the target did not move: nothing to do

    moved_to = _push_to_main(manifests, tmp_path, "a colleague's change\n")
    caught = gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=branch)
    assert caught.moved and caught.paths == ("README.md",) and caught.commits[0].startswith(moved_to[:12])
    assert caught.branch.base == moved_to and caught.branch.head != branch.head
    assert run_git("-C", manifests, "rev-parse", branch.branch) == caught.branch.head  # pushed
    # Again from the branch as validated before: an earlier attempt's catch-up is taken, not redone,
    # with what came in since the validated head.
    again = gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=branch)
    assert again.branch.head == caught.branch.head and again.branch.base == moved_to
    assert again.paths == caught.paths and again.commits == caught.commits

    # The old head is refused, as GitLab's sha guard refuses it; so is a merge onto a target that moved.
    with pytest.raises(PermanentError, match="moved to .* since it was validated"):
        forge.merge(mr, approved_by="alice", onto=moved_to)
    validated = replace(mr, sha=caught.branch.head)
    again = _push_to_main(manifests, tmp_path, "another change\n")
    with pytest.raises(TargetMoved, match="nothing was merged"):
        forge.merge(validated, approved_by="alice", onto=moved_to)
    assert run_git("-C", manifests, "rev-parse", "main") == again  # nothing landed

    caught = gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=caught.branch)
    merged = forge.merge(replace(mr, sha=caught.branch.head), approved_by="alice", onto=caught.branch.base)
    tree = run_git("-C", manifests, "rev-parse", f"{merged.merge_commit}^{{tree}}")
    assert tree == run_git("-C", manifests, "rev-parse", f"{caught.branch.head}^{{tree}}")
    # Merged: a catch-up (a retried run) pushes nothing more.
    before = refs(manifests)
    assert (
        gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=caught.branch).branch
        == caught.branch
    )
    assert refs(manifests) == before


def test_someone_elses_push_to_the_branch_is_refused(manifests: str, tmp_path: Path) -> None:
    branch = gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="twincd/hello/v6", edit=append_line("# v6"), message="v6"
    )
    work = tmp_path / "branch-work"
    run_git("clone", "-q", "-b", branch.branch, manifests, str(work))
    (work / "README.md").write_text("pushed by hand\n")
    run_git("commit", "-qam", "by hand", cwd=work)
    run_git("push", "-q", "origin", f"HEAD:{branch.branch}", cwd=work)
    _push_to_main(manifests, tmp_path, "main moves\n")
    with pytest.raises(PermanentError, match="by someone else; nothing was merged"):
        gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=branch)


def test_a_conflict_with_the_target_is_permanent_and_pushes_nothing(manifests: str, tmp_path: Path) -> None:
    branch = gitrepo.write_release_branch(
        repo_url=manifests, target="main", branch="twincd/hello/v7", edit=append_line("# v7"), message="v7"
    )
    work = tmp_path / "main-edit"
    run_git("clone", "-q", manifests, str(work))
    with (work / OVERLAY).open("a") as f:
        f.write("# conflicting line\n")
    run_git("commit", "-qam", "edit the same line", cwd=work)
    run_git("push", "-q", "origin", "HEAD:main", cwd=work)
    with pytest.raises(PermanentError, match="conflicts with twincd/hello/v7"):
        gitrepo.catch_up_branch(repo_url=manifests, target="main", branch=branch)
    assert run_git("-C", manifests, "rev-parse", branch.branch) == branch.head
