"""Prefect as the distributed engine: the server on PostgreSQL, a `process` work pool, two
`prefect worker` processes, the deployments made by `prefect deploy` from prefect.yaml (its pull
step clones this repository at HEAD), a release started through the API that waits suspended with
no flow process alive, a worker killed while it waits, and the merge on GitLab (a Merge Request
Hook to `twincd webhook`) resuming it on the other worker until it completes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import (
    REPO_ROOT,
    final_run,
    flow_run,
    release_app,
    run_logs,
    start_twincd,
    stop_twincd,
    wait_for,
    write_env,
)
from tests.e2e.test_deploy import main_file, registry_digest
from tests.fakes.gitlab import FakeGitlab
from twincd.config import Environment, load_environment
from twincd.sandbox import postgres, stack
from twincd.sandbox.procs import flow_run_processes, free_port
from twincd.sandbox.stack import local_repo_path

TOKEN = "glpat-workers-e2e-token"
HOOK_TOKEN = "workers-e2e-hook-token"
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(scope="module")
def pg_stack() -> Iterator[Environment]:
    """A stack of its own whose Prefect server keeps its state in PostgreSQL, with no runner."""
    root = Path(tempfile.mkdtemp(prefix="twincd-workers-"))
    path = write_env(root)
    raw = yaml.safe_load(path.read_text())
    raw["prefect"]["database"] = "postgresql"
    raw["sandbox"] |= {"postgres_port": free_port(), "runner": False}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = load_environment(path)
    try:
        stack.up(env, say=lambda line: None)
        yield env
    finally:
        stack.down(env, say=lambda line: None)
        shutil.rmtree(postgres.data_dir(env.state_path), ignore_errors=True)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _prefect(env: Environment, *args: str, cwd: Path | None = None, **extra: str) -> str:
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url, **extra},
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _worker(env: Environment, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "twincd", "--name", name],
        env={
            **os.environ,
            "PREFECT_API_URL": env.prefect.api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            **stack.sandbox_secrets(env),  # what the environment file's env: references name
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_a_release_waits_suspended_and_survives_a_worker_on_postgres(pg_stack: Environment) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.variables import Variable

    port = free_port()
    with FakeGitlab(repo=local_repo_path(pg_stack, pg_stack.manifests.repo), token=TOKEN) as fake:
        raw = yaml.safe_load(Path(pg_stack.source).read_text())
        raw["forge"] = {
            "type": "gitlab",
            "url": fake.url,
            "project": "infra/manifests",
            "token": "secret:gitlab-token",
        }
        raw["webhook"] = {"secret": "env:TWINCD_E2E_HOOK", "port": port}
        env_file = Path(pg_stack.source).with_name("gitlab-workers.yaml")
        env_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        env = load_environment(env_file)
        with temporary_settings({PREFECT_API_URL: env.prefect.api_url}):
            Secret(value=TOKEN).save("gitlab-token", overwrite=True)
            Secret(value="unused: a path needs no token").save("twincd-repository-token", overwrite=True)
            Variable.set("twincd_env", str(env_file), overwrite=True)
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        _prefect(env, "work-pool", "create", "twincd", "--type", "process")
        _prefect(env, "deploy", "--all", cwd=REPO_ROOT, TWINCD_REPOSITORY=str(REPO_ROOT), TWINCD_REF=head)
        fake.add_project_hook(f"http://127.0.0.1:{port}/hooks/gitlab", token=HOOK_TOKEN)
        hook = start_twincd(env, "webhook", TWINCD_E2E_HOOK=HOOK_TOKEN)
        workers = [_worker(env, "w1"), _worker(env, "w2")]
        try:
            release_app(env, "v8.0.0", page="<h1>hello 8.0.0</h1>\n")
            api = env.prefect.api_url.rstrip("/")
            deployment = httpx.get(f"{api}/deployments/name/deploy/deploy").json()
            assert deployment["work_pool_name"] == "twincd" and deployment["parameters"]["env"] == str(
                env_file
            )
            run_id = httpx.post(
                f"{api}/deployments/{deployment['id']}/create_flow_run",
                json={"parameters": {"app": "hello", "tag": "v8.0.0"}},
            ).json()["id"]
            wait_for(lambda: flow_run(env, run_id)["state"]["name"] == "Suspended", "the wait", timeout=300)
            # Nothing runs while it waits: its process exits once the suspension is recorded.
            wait_for(
                lambda: flow_run_processes(run_id) == [], "the suspended run's process to exit", timeout=60
            )
            os.killpg(workers[0].pid, signal.SIGKILL)  # a worker dies while the release waits
            workers[0].wait(timeout=10)

            iid = next(m.iid for m in fake.mrs.values() if m.source_branch == "twincd/hello/v8.0.0")
            fake.merge(iid, user="alice")  # the Merge Request Hook resumes it; w2 takes it up
            run = final_run(env, run_id, timeout=300)
            assert run["state"]["type"] == "COMPLETED", run["state"]
            assert "(by alice)" in run_logs(env, run_id)
            assert registry_digest(env, "v8.0.0") in main_file(env, "overlays/aks/hello/kustomization.yaml")
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGTERM)
                    worker.wait(timeout=30)
            stop_twincd(hook)
