"""A GitLab tag push starts a deploy: `twincd webhook` → the `deploy` deployment served by
`twincd serve` → the run waits for approval → verified on both clusters. Duplicate deliveries make
exactly one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import release_app, twincd
from tests.e2e.test_gitlab_and_staged import _variant, _wait_for
from twincd.config import Environment
from twincd.sandbox.procs import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
HOOK_TOKEN = "e2e-hook-token"


def _start(env: Environment, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "twincd.cli", "--env", env.source, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "TWINCD_E2E_HOOK": HOOK_TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the runner's flow-run subprocesses go with it
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_tag_push_hook_starts_exactly_one_deploy(stack_env: Environment) -> None:
    port = free_port()
    env = _variant(
        stack_env,
        "webhook",
        # The longest wait GitLab allows: the answers here must name the run on a loaded machine.
        webhook={"secret": "env:TWINCD_E2E_HOOK", "port": port, "answer_seconds": 9},
        apps={
            "hello": {
                **stack_env.apps["hello"].model_dump(exclude_none=True),
                "project": "apps/hello",
                "repo": stack_env.apps["hello"].repo,
            }
        },
    )
    sha = release_app(env, "v5.0.0", page="<h1>hello 5.0.0</h1>\n")
    served, hook = _start(env, "serve"), _start(env, "webhook")
    try:
        api = env.prefect.api_url.rstrip("/")

        def served_deployment() -> bool:
            return httpx.get(f"{api}/deployments/name/deploy/deploy").status_code == 200

        _wait_for(served_deployment, "the served deploy deployment")
        url = f"http://127.0.0.1:{port}/hooks/gitlab"
        _wait_for(lambda: _answers(url), "the webhook")
        payload = {
            "object_kind": "tag_push",
            "ref": "refs/tags/v5.0.0",
            "checkout_sha": sha,
            "project": {"path_with_namespace": "apps/hello"},
        }
        assert httpx.post(url, json=payload, headers={"X-Gitlab-Token": "wrong"}).status_code == 401
        first = httpx.post(url, json=payload, headers={"X-Gitlab-Token": HOOK_TOKEN})
        again = httpx.post(url, json=payload, headers={"X-Gitlab-Token": HOOK_TOKEN})
        assert first.status_code == again.status_code == 202, first.text
        run_id = first.json()["flow_run_id"]
        assert again.json()["flow_run_id"] == run_id  # GitLab's retries make no second run

        _wait_for(
            lambda: twincd(env, "approve", "hello", "v5.0.0", "--approver", "erin").returncode == 0,
            "the run to wait for approval",
            timeout=180,
        )

        def finished() -> bool:
            state = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]
            return state["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")

        _wait_for(finished, "the run to finish", timeout=180)
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        assert run["name"] == "deploy-hello-v5.0.0"
        assert run["state"]["type"] == "COMPLETED", run["state"]
        runs = httpx.post(
            f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": ["deploy-hello-v5.0.0"]}}}
        )
        assert len(runs.json()) == 1
    finally:
        _stop(hook)
        _stop(served)


def _answers(url: str) -> bool:
    try:
        httpx.post(url, content=b"{}", timeout=2)
        return True
    except httpx.HTTPError:
        return False
