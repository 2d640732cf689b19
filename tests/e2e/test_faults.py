"""Faults on the local stack (issue 16.8): each test asserts the final state of git, registry,
forge and clusters, and what the team was told.

The Prefect server restarted during a wait, the invalid main and the kill during verification are
in test_deploy.py; GitLab's 5xx/429 bursts in test_gitlab_and_staged.py (they need its GitLab).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.e2e.conftest import approve, git_refs, release_app, run_id_of, run_logs, twincd
from tests.e2e.test_deploy import main_file, main_head, registry_digest
from tests.e2e.test_gitlab_and_staged import _variant
from twincd.config import Environment
from twincd.sandbox import procs, registry, stack
from twincd.sandbox.procs import free_port
from twincd.sandbox.stack import local_repo_path


def test_registry_down_during_push_changes_nothing_and_a_rerun_completes(stack_env: Environment) -> None:
    env = stack_env
    release_app(env, "v10.0.0", page="<h1>hello 10.0.0</h1>\n")
    head = main_head(env)
    assert procs.stop_daemon(registry.NAME, state_dir=env.state_path)
    try:
        failed = twincd(env, "deploy", "hello", "v10.0.0", "--auto-approve")
    finally:
        stack.up(env, say=lambda line: None)
    out = failed.stdout + failed.stderr
    assert failed.returncode == 1, out
    assert env.registries["local"].url in out and "re-running the deploy completes it" in out, out
    assert "Traceback" not in failed.stdout
    assert main_head(env) == head  # nothing merged
    assert "refs/heads/twincd/hello/v10.0.0" not in git_refs(local_repo_path(env, env.manifests.repo))
    again = twincd(env, "deploy", "hello", "v10.0.0", "--auto-approve")
    assert again.returncode == 0 and "Release succeeded" in again.stdout + again.stderr
    assert registry_digest(env, "v10.0.0") in main_file(env, "overlays/eks/hello/kustomization.yaml")


def test_slack_down_for_the_whole_release_does_not_stop_it(stack_env: Environment) -> None:
    down = f"http://127.0.0.1:{free_port()}/api/"  # nothing listens: every call is refused
    env = _variant(
        stack_env,
        "slack-down",
        notifier={"type": "slack", "channel": "#deploys", "token": "env:TWINCD_E2E_SLACK", "api_url": down},
    )
    release_app(env, "v10.1.0", page="<h1>hello 10.1.0</h1>\n")
    result = twincd(
        env, "deploy", "hello", "v10.1.0", "--auto-approve", TWINCD_E2E_SLACK="xoxb-e2e-slack-down"
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Release succeeded" in out, out  # the console told it
    assert "slack notifier failed (the deploy goes on)" in out, out  # and said Slack could not be told
    assert registry_digest(env, "v10.1.0") in main_file(env, "overlays/aks/hello/kustomization.yaml")


def test_a_push_race_on_main_merges_the_validated_merge_result(stack_env: Environment) -> None:
    """A colleague's valid change lands on main while a release waits: the approved release is
    brought up to it, validated again, and merged as exactly that tree."""
    env = stack_env
    release_app(env, "v10.2.0", page="<h1>hello 10.2.0</h1>\n")
    started = twincd(env, "deploy", "hello", "v10.2.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    theirs = _push_readme(env, "a colleague's note\n")
    approved = approve(env, "hello", "v10.2.0", "--approver", "erin")
    out = approved.stdout + approved.stderr
    assert approved.returncode == 0 and "Release succeeded" in out, out
    assert f"main moved to {theirs[:12]} since validation" in run_logs(env, run_id)
    repo = local_repo_path(env, env.manifests.repo)
    merge = main_head(env)
    parents = _git(repo, "rev-list", "--parents", "-n1", merge).split()[1:]
    assert parents[0] == theirs  # merged onto the colleague's commit, as validated
    assert _git(repo, "rev-parse", f"{merge}^{{tree}}") == _git(repo, "rev-parse", f"{parents[1]}^{{tree}}")
    assert main_file(env, "README.md") == "a colleague's note\n"
    assert registry_digest(env, "v10.2.0") in main_file(env, "overlays/eks/hello/kustomization.yaml")


def _push_readme(env: Environment, text: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", tmp, "-c", "user.name=colleague", "-c", "user.email=dev@example.test"]
        subprocess.run(["git", "clone", "-q", str(local_repo_path(env, env.manifests.repo)), tmp], check=True)
        Path(tmp, "README.md").write_text(text)
        subprocess.run([*git, "add", "README.md"], check=True)
        subprocess.run([*git, "commit", "-qm", "a colleague's note"], check=True)
        subprocess.run([*git, "push", "-q", "origin", "main"], check=True)
        return subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()
