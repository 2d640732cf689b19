"""A whole second local stack for end-to-end tests: free ports, its own temp state dir.

It runs beside a developer's `twincd up` (which uses the default ports) and is stopped at the end
of the session. Flows run through the real CLI in subprocesses, exactly as a user runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from twincd.config import DEFAULT_ENV, Environment, load_environment
from twincd.sandbox import registry_auth, stack
from twincd.sandbox.procs import free_port
from twincd.sandbox.stack import local_repo_path

TWINCD = [sys.executable, "-m", "twincd.cli"]


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


def twincd(env: Environment, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does, against the test stack's environment file."""
    return subprocess.run(
        [*TWINCD, "--env", env.source, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url},
    )


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
