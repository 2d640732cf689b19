"""A whole second local stack for end-to-end tests: free ports, its own temp state dir.

It runs beside a developer's `twincd up` (which uses the default ports) and is stopped at the end
of the session. Flows run through the real CLI in subprocesses, exactly as a user runs them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from twincd.config import DEFAULT_ENV, Environment, load_environment
from twincd.sandbox import registry_auth, stack
from twincd.sandbox.procs import free_port
from twincd.sandbox.stack import local_repo_path

TWINCD = [sys.executable, "-m", "twincd.cli"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_env(root: Path, **overrides: object) -> Path:
    """The embedded default environment, moved to ``root`` and to free ports."""
    env = yaml.safe_load(DEFAULT_ENV.read_text())
    state = root / "state"
    env["state_dir"] = str(state)
    env["prefect"] = {"api_url": f"http://127.0.0.1:{free_port()}/api"}
    # The repos are reached over the stack's authenticated git server, as the embedded default does.
    git = f"http://127.0.0.1:{free_port()}"
    env["git"] = {"credentials": [{"url": f"{git}/", "username": "twincd", "token": "env:TWINCD_GIT_TOKEN"}]}
    env["manifests"]["repo"] = f"{git}/manifests.git"
    env["apps"]["hello"]["repo"] = f"{git}/hello.git"
    registry = f"127.0.0.1:{free_port()}"
    env["registries"] = {
        "local": {
            "url": registry,
            "insecure": True,
            "username": "twincd",
            "password": "env:TWINCD_REGISTRY_PASSWORD",
        }
    }
    env["builder"] = {"url": f"unix://{state}/run/podman.sock"}
    for cluster in env["clusters"].values():
        cluster["kubeconfig"] = str(state / "kubeconfig")
    env["sandbox"] = {
        "cluster_ports": {name: free_port() for name in env["clusters"]},
        "git_port": int(git.rsplit(":", 1)[1]),
        "registry_token_port": free_port(),
        "runner_schedules": False,
    }
    env["timeouts"] = {"approval_seconds": 600, "rollout_seconds": 30}
    env.update(overrides)
    path = root / "env.yaml"
    path.write_text(yaml.safe_dump(env, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def stack_env() -> Iterator[Environment]:
    # A short base path: the podman socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="twincd-e2e-"))
    env = load_environment(write_env(root))
    try:
        stack.up(env, say=lambda line: None)
        yield env
    finally:
        stack.down(env, say=lambda line: None)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def twincd(
    env: Environment, *args: str, timeout: float = 300, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does, against the test stack's environment file (``extra_env``: the
    variables its ``env:`` secret references name)."""
    return subprocess.run(
        [*TWINCD, "--env", env.source, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url, **extra_env},
    )


def start_twincd(env: Environment, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
    """A long-running CLI command (``webhook``, ``serve``) in a session of its own."""
    return subprocess.Popen(
        [*TWINCD, "--env", env.source, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url, **extra_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_twincd(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # a runner's flow-run subprocesses go with it
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 120, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def flow_run(env: Environment, run_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{env.prefect.api_url.rstrip('/')}/flow_runs/{run_id}").json())


def final_run(env: Environment, run_id: str, timeout: float = 240) -> dict[str, Any]:
    """The run once it ended (Completed, Failed, Cancelled, Crashed)."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
    wait_for(lambda: flow_run(env, run_id)["state"]["type"] in final, f"run {run_id} to end", timeout)
    return flow_run(env, run_id)


def run_logs(env: Environment, run_id: str) -> str:
    """Every log line of the run (and its subflows), as the Prefect UI shows them."""
    api = env.prefect.api_url.rstrip("/")
    subflows = httpx.post(
        f"{api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
    ).json()
    ids = [run_id, *(r["id"] for r in subflows)]
    lines: list[str] = []
    while True:  # the server answers at most 200 logs per call (PREFECT_API_DEFAULT_LIMIT)
        page = httpx.post(
            f"{api}/logs/filter",
            json={
                "logs": {"flow_run_id": {"any_": ids}},
                "sort": "TIMESTAMP_ASC",
                "limit": 200,
                "offset": len(lines),
            },
        ).json()
        lines += [str(line["message"]) for line in page]
        if len(page) < 200:
            return "\n".join(lines)


def run_id_of(output: str) -> str:
    """The flow run a CLI command printed (its Prefect UI link)."""
    ids = re.findall(r"/runs/flow-run/([0-9a-f-]{36})", output)
    assert ids, f"no flow run link in:\n{output}"
    return ids[-1]


def approve(env: Environment, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``twincd approve ARGS`` once a run waits for it (exit 2 while nothing waits yet)."""
    deadline = time.monotonic() + timeout
    while True:
        result = twincd(env, "approve", *args)
        if result.returncode != 2 or time.monotonic() > deadline:
            return result
        time.sleep(1)


def release_app(env: Environment, tag: str, *, page: str) -> str:
    """Commit a change to the sample app and tag it: a new release with a new image digest."""
    repo = local_repo_path(env, env.apps["hello"].repo)
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", tmp, "-c", "user.name=dev", "-c", "user.email=dev@example.test"]
        subprocess.run(["git", "clone", "-q", str(repo), tmp], check=True)
        Path(tmp, "index.html").write_text(page)
        subprocess.run([*git, "commit", "-qam", f"release {tag}"], check=True)
        subprocess.run([*git, "tag", tag], check=True)
        subprocess.run([*git, "push", "-q", "origin", "main", tag], check=True)
        return subprocess.run(
            [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()


def deployment(env: Environment, cluster: str, app: str) -> dict[str, Any]:
    """``kubectl get deployment`` of ``app`` (namespace and name alike) on a sandbox cluster, with
    its managedFields (kubectl hides them by default since 1.21)."""
    out = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(env.state_path / "kubeconfig"),
            "--context",
            f"sandbox-{cluster}",
            "get",
            "deployment",
            "-n",
            app,
            app,
            "-o",
            "json",
            "--show-managed-fields",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def git_refs(repo: Path) -> dict[str, str]:
    out = subprocess.run(
        ["git", "-C", str(repo), "for-each-ref", "--format=%(refname) %(objectname)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


def registry_headers(env: Environment, actions: str = "pull") -> dict[str, str]:
    """A Bearer token for ``hello`` from the stack's token service, as a person with the stack's
    credentials gets one (the registry requires tokens)."""
    password = registry_auth.password_path(env.state_path).read_text().strip()
    answer = httpx.get(
        f"http://127.0.0.1:{env.sandbox.registry_token_port}/token",
        params={"service": registry_auth.SERVICE, "scope": f"repository:hello:{actions}"},
        auth=(registry_auth.USERNAME, password),
    )
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}
