"""Two releases of one app at once: the later one waits for its turn (suspended, queued behind the
earlier one) or, configured so, supersedes the earlier one still waiting for approval. Never a
revert of the winner, never two MRs editing the same lines at once."""

from __future__ import annotations

import subprocess

from tests.e2e.conftest import (
    approve,
    final_run,
    flow_run,
    release_app,
    run_id_of,
    twincd,
    wait_for,
)
from tests.e2e.test_deploy import main_file, main_head, registry_digest
from tests.e2e.test_gitlab_and_staged import _variant
from twincd.config import Environment
from twincd.sandbox.procs import flow_run_processes
from twincd.sandbox.stack import local_repo_path

OVERLAY = "overlays/eks/hello/kustomization.yaml"


def _start(env: Environment, tag: str) -> tuple[str, str]:
    started = twincd(env, "deploy", "hello", tag)
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    return run_id_of(started.stdout), started.stdout


def _pause_key(env: Environment, run_id: str) -> str:
    return str(flow_run(env, run_id)["state"]["state_details"]["pause_key"])


def _reverts(env: Environment, since: str) -> str:
    """The reverts that reached main after ``since`` (earlier tests of the session made others)."""
    repo = str(local_repo_path(env, env.manifests.repo))
    log = ["git", "-C", repo, "log", "--oneline", "--grep=Revert", f"{since}..main"]
    return subprocess.run(log, capture_output=True, text=True, check=True).stdout


def test_a_later_release_of_the_same_app_waits_for_its_turn(stack_env: Environment) -> None:
    env = stack_env
    base = main_head(env)
    release_app(env, "v6.0.0", page="<h1>hello 6.0.0</h1>\n")
    release_app(env, "v6.1.0", page="<h1>hello 6.1.0</h1>\n")
    first, _ = _start(env, "v6.0.0")
    assert _pause_key(env, first).startswith("approve-")
    second, out = _start(env, "v6.1.0")  # while the first waits for approval
    assert "waits for its turn" in out and _pause_key(env, second).startswith("turn-"), out
    assert flow_run_processes(first) == flow_run_processes(second) == []
    refused = twincd(env, "approve", "hello", "v6.1.0")
    assert refused.returncode == 2 and "waits for its turn" in refused.stderr  # nothing to approve yet

    done = approve(env, "hello", "v6.0.0", "--approver", "bob")
    assert done.returncode == 0 and "Release succeeded" in done.stdout, done.stdout + done.stderr
    assert registry_digest(env, "v6.0.0") in main_file(env, OVERLAY)
    # Its end resumed the second, which now waits for its own approval, its branch on the new main.
    wait_for(lambda: _pause_key(env, second).startswith("approve-"), "the second one's approval wait")
    again = approve(env, "hello", "v6.1.0", "--approver", "bob")
    assert again.returncode == 0 and "Release succeeded" in again.stdout, again.stdout + again.stderr
    assert registry_digest(env, "v6.1.0") in main_file(env, OVERLAY)
    assert _reverts(env, base) == ""  # neither release reverted the other


def test_a_later_release_can_supersede_one_that_waits_for_approval(stack_env: Environment) -> None:
    env = _variant(stack_env, "supersede", rollout={"later_release": "supersede"})
    base = main_head(env)
    release_app(env, "v7.0.0", page="<h1>hello 7.0.0</h1>\n")
    release_app(env, "v7.1.0", page="<h1>hello 7.1.0</h1>\n")
    before = main_file(env, OVERLAY)
    first, _ = _start(env, "v7.0.0")
    second, _ = _start(env, "v7.1.0")
    assert _pause_key(env, second).startswith("approve-")  # no queue: it asks for approval at once
    superseded = final_run(env, first)
    assert superseded["state"]["type"] == "CANCELLED", superseded["state"]
    assert "superseded by deploy-hello-v7.1.0" in superseded["state"]["message"]
    assert main_file(env, OVERLAY) == before  # the superseded release merged nothing
    done = approve(env, "hello", "v7.1.0", "--approver", "bob")
    assert done.returncode == 0, done.stdout + done.stderr
    assert registry_digest(env, "v7.1.0") in main_file(env, OVERLAY)
    assert _reverts(env, base) == ""
