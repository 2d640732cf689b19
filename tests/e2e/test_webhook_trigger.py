"""A GitLab tag push starts a deploy: `twincd webhook` → the `deploy` deployment served by the
stack's runner (`twincd serve`) → the run waits for approval, suspended → approved → verified on
both clusters. Duplicate deliveries make exactly one run."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import approve, final_run, release_app, start_twincd, stop_twincd, wait_for
from tests.e2e.test_gitlab_and_staged import _variant
from twincd.config import Environment
from twincd.sandbox.procs import free_port

HOOK_TOKEN = "e2e-hook-token"


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
    hook = start_twincd(env, "webhook", TWINCD_E2E_HOOK=HOOK_TOKEN)
    try:
        api = env.prefect.api_url.rstrip("/")
        url = f"http://127.0.0.1:{port}/hooks/gitlab"
        wait_for(lambda: _answers(url), "the webhook")
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

        approved = approve(env, "hello", "v5.0.0", "--approver", "erin", timeout=180)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        run = final_run(env, run_id)
        assert run["name"] == "deploy-hello-v5.0.0"
        assert run["state"]["type"] == "COMPLETED", run["state"]
        runs = httpx.post(
            f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": ["deploy-hello-v5.0.0"]}}}
        )
        assert len(runs.json()) == 1
    finally:
        stop_twincd(hook)


def _answers(url: str) -> bool:
    try:
        httpx.post(url, content=b"{}", timeout=2)
        return True
    except httpx.HTTPError:
        return False
