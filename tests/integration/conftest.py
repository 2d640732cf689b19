"""Session-scoped services for integration tests, each on a free port under its own temp dir.

They never touch the local stack's state dir or default ports (5000, 4200, ...), so tests run beside
a running `twincd up`, and every daemon is stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness

from twincd.sandbox.buildd import start_buildd, stop_buildd
from twincd.sandbox.procs import free_port
from twincd.sandbox.registry import start_registry, stop_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A docker-registry on a free port: its address, ``127.0.0.1:<port>`` (plain HTTP)."""
    state_dir = tmp_path_factory.mktemp("registry")
    try:
        yield start_registry(state_dir, free_port())
    finally:
        stop_registry(state_dir)


@pytest.fixture(scope="session")
def second_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another docker-registry, like `registry`: an app that pushes to one registry per cloud."""
    state_dir = tmp_path_factory.mktemp("registry-b")
    try:
        yield start_registry(state_dir, free_port())
    finally:
        stop_registry(state_dir)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A docker-registry that requires tokens from the stack's token service (``auth: token``):
    its address and its state dir (where the stack user's password lives)."""
    state_dir = tmp_path_factory.mktemp("registry-token")
    try:
        yield start_registry(state_dir, free_port(), token_port=free_port()), state_dir
    finally:
        stop_registry(state_dir)


# The user and password ECR's GetAuthorizationToken gives under moto (mock_aws), for the Basic registry.
ECR_USER, ECR_PASSWORD = "AWS", "123456789012-auth-token"


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A docker-registry with ``auth: htpasswd`` (Basic challenges, as ECR answers): one bcrypt user."""
    import bcrypt

    state_dir = tmp_path_factory.mktemp("registry-basic")
    htpasswd = state_dir / "htpasswd"
    htpasswd.write_text(f"{ECR_USER}:{bcrypt.hashpw(ECR_PASSWORD.encode(), bcrypt.gensalt()).decode()}\n")
    try:
        yield start_registry(state_dir, free_port(), htpasswd=htpasswd)
    finally:
        stop_registry(state_dir)


@pytest.fixture(scope="session")
def ecr_registry(basic_registry: str) -> Iterator[str]:
    """ECR's repository rule (a push never creates a repository; only ``hello-ecr`` exists) in
    front of the htpasswd registry (Basic challenges, as ECR answers): ``127.0.0.1:<port>``."""
    from tests.fakes.ecr_front import ecr_front
    from twincd.sandbox.serving import serve_asgi

    served = serve_asgi(ecr_front(f"http://{basic_registry}", created=["hello-ecr"]), name="ecr-front")
    try:
        yield f"127.0.0.1:{served.port}"
    finally:
        served.stop()


@pytest.fixture(scope="session")
def builder(
    tmp_path_factory: pytest.TempPathFactory,
    registry: str,
    second_registry: str,
    token_registry: tuple[str, Path],
    basic_registry: str,
    ecr_registry: str,
) -> Iterator[str]:
    """The Docker Engine API base URL: an existing Docker, or a podman service pushing to the registries."""
    state_dir = tmp_path_factory.mktemp("buildd")
    insecure = [registry, second_registry, token_registry[0], basic_registry, ecr_registry]
    try:
        yield start_buildd(state_dir, insecure_registries=insecure)
    finally:
        stop_buildd(state_dir)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One throwaway Prefect server for the whole session (~20 s to start here, so only once).

    Analytics off: the server's telemetry write races its migrations ("database is locked").
    Heartbeats off: they add ~1 s to every flow run (docs/platform.md, "Prefect").
    """
    with (
        temporary_settings(
            {PREFECT_SERVER_ANALYTICS_ENABLED: False, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        ),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield
