"""Registries that require authentication, as every hosted registry does: the real docker-registry
with ``auth: token`` and the stack's token service (distribution's token protocol), pushed to by a
real podman through the Docker Engine API and read by the registry adapter.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from pathlib import Path

import pytest

from twincd.adapters.builder import DockerBuilder, TagConflict
from twincd.adapters.git import tag_commit
from twincd.adapters.registry import REVISION_LABEL, OciRegistry, RegistryDenied
from twincd.adapters.secrets import Secret
from twincd.errors import TransientError
from twincd.sandbox import registry_auth
from twincd.sandbox.seed import seed_app

TAG = "v1.0.0"


def password(state: Path) -> Secret:
    return Secret(registry_auth.password_path(state).read_text().strip())


def authed(url: str, state: Path) -> OciRegistry:
    return OciRegistry(url=url, insecure=True, username=registry_auth.USERNAME, password=password(state))


@pytest.fixture(scope="module")
def app_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bare = tmp_path_factory.mktemp("apps") / "hello.git"
    seed_app(bare)
    return bare


def test_anonymous_and_wrong_credentials_are_refused_saying_where_they_came_from(
    token_registry: tuple[str, Path],
) -> None:
    url, _ = token_registry
    with pytest.raises(RegistryDenied, match="anonymously"):
        OciRegistry(url=url, insecure=True, docker_config=False).digest("hello", TAG)
    wrong = OciRegistry(url=url, insecure=True, username="twincd", password=Secret("not-the-password"))
    with pytest.raises(RegistryDenied) as e:
        wrong.digest("hello", TAG)
    assert "environment file's registry entry" in str(e.value) and "token service" in str(e.value)
    assert "not-the-password" not in str(e.value)


def test_push_through_the_engine_and_read_back_with_a_token(
    token_registry: tuple[str, Path], builder: str, app_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url, state = token_registry
    commit = tag_commit(repo_url=str(app_repo), tag=TAG)
    engine = DockerBuilder(base_url=builder, registries=[authed(url, state)])
    built = engine.build(repo_url=str(app_repo), tag=TAG, commit=commit, image="hello-auth")
    pushed = engine.push(built)
    registry = authed(url, state)
    assert registry.digest("hello-auth", TAG) == pushed.digest
    assert (registry.labels("hello-auth", TAG) or {})[REVISION_LABEL] == commit  # its provenance
    again = engine.build(repo_url=str(app_repo), tag=TAG, commit=commit, image="hello-auth")
    assert again.reused and engine.push(again).refs == pushed.refs  # no second image
    assert password(state).reveal() not in caplog.text


def test_a_registry_url_with_a_path_names_the_repository_under_it(
    token_registry: tuple[str, Path], builder: str, app_repo: Path
) -> None:
    url, state = token_registry
    team = f"{url}/team/apps"  # as registry.gitlab.example.com/group/project
    commit = tag_commit(repo_url=str(app_repo), tag=TAG)
    engine = DockerBuilder(base_url=builder, registries=[authed(team, state)])
    pushed = engine.push(engine.build(repo_url=str(app_repo), tag=TAG, commit=commit, image="hello"))
    assert pushed.refs[0].name == f"{team}/hello"
    assert authed(url, state).digest("team/apps/hello", TAG) == pushed.digest  # /v2/team/apps/hello/...


def test_a_tag_moved_to_another_commit_is_not_released_with_the_old_image(
    token_registry: tuple[str, Path], builder: str, app_repo: Path
) -> None:
    url, state = token_registry
    old = tag_commit(repo_url=str(app_repo), tag=TAG)
    engine = DockerBuilder(base_url=builder, registries=[authed(url, state)])
    engine.push(engine.build(repo_url=str(app_repo), tag=TAG, commit=old, image="hello-moved"))
    with tempfile.TemporaryDirectory() as work:
        git = ["git", "-C", work, "-c", "user.name=dev", "-c", "user.email=dev@example.test"]
        subprocess.run(["git", "clone", "-q", str(app_repo), work], check=True)
        Path(work, "index.html").write_text("<h1>moved</h1>\n")
        subprocess.run([*git, "commit", "-qam", "moved"], check=True)
        subprocess.run([*git, "tag", "-f", TAG], check=True, capture_output=True)
        subprocess.run([*git, "push", "-q", "-f", "origin", "main", f"refs/tags/{TAG}"], check=True)
    moved = tag_commit(repo_url=str(app_repo), tag=TAG)
    assert moved != old
    with pytest.raises(TagConflict) as e:
        engine.build(repo_url=str(app_repo), tag=TAG, commit=moved, image="hello-moved")
    assert f"was built from {old[:12]}" in str(e.value) and "the tag was moved" in str(e.value)


def test_a_basic_auth_registry_with_ecr_credentials(
    basic_registry: str, builder: str, app_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ECR answers Basic challenges and takes user AWS with GetAuthorizationToken's password: the
    credentials come from boto3 (against moto's ECR endpoint), the registry is a real htpasswd one."""
    from moto import mock_aws

    from tests.integration.conftest import ECR_PASSWORD
    from twincd.adapters.ecr import EcrLogin

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(var, value)  # moto's fake identity (the process environment, not an SDK)
    with pytest.raises(RegistryDenied, match="anonymously"):
        OciRegistry(url=basic_registry, insecure=True, docker_config=False).digest("hello-ecr", TAG)
    wrong = OciRegistry(url=basic_registry, insecure=True, username="AWS", password=Secret("nope"))
    with pytest.raises(RegistryDenied, match="environment file's registry entry"):
        wrong.digest("hello-ecr", TAG)
    with mock_aws():
        ecr = OciRegistry(url=basic_registry, insecure=True, login=EcrLogin(region="eu-west-1"))
        assert ecr.credentials() is not None and ecr.credentials().password.reveal() == ECR_PASSWORD  # type: ignore[union-attr]
        commit = tag_commit(repo_url=str(app_repo), tag=TAG)
        engine = DockerBuilder(base_url=builder, registries=[ecr])
        pushed = engine.push(engine.build(repo_url=str(app_repo), tag=TAG, commit=commit, image="hello-ecr"))
        assert ecr.digest("hello-ecr", TAG) == pushed.digest


def test_a_push_to_an_ecr_repository_nobody_created_says_to_create_it(
    ecr_registry: str, builder: str, app_repo: Path
) -> None:
    """ECR creates no repository on push: the engine's NAME_UNKNOWN is a permanent error (a retry
    cannot help) that says what to create; the repository that exists takes the same image."""
    from tests.integration.conftest import ECR_PASSWORD, ECR_USER
    from twincd.adapters.registry import RegistryError

    ecr = OciRegistry(url=ecr_registry, insecure=True, username=ECR_USER, password=Secret(ECR_PASSWORD))
    engine = DockerBuilder(base_url=builder, registries=[ecr])
    commit = tag_commit(repo_url=str(app_repo), tag=TAG)
    built = engine.build(repo_url=str(app_repo), tag=TAG, commit=commit, image="hello-missing")
    with pytest.raises(RegistryError) as refused:
        engine.push(built)
    assert "the repository does not exist in" in str(refused.value)
    assert "create the repository 'hello-missing' there (e.g. `aws ecr create-repository" in str(
        refused.value
    )
    assert not isinstance(refused.value, TransientError)  # not retried by the task
    pushed = engine.push(engine.build(repo_url=str(app_repo), tag=TAG, commit=commit, image="hello-ecr"))
    assert ecr.digest("hello-ecr", TAG) == pushed.digest


def test_a_token_is_reused_while_valid_and_replaced_once_it_expires(tmp_path: Path) -> None:
    """Tokens live 12 s here (the client renews them 10 s early): the registry's own log shows one
    challenge for two reads in a row, and a second challenge only after the token expired."""
    import time

    from twincd.sandbox.procs import free_port, log_path
    from twincd.sandbox.registry import NAME, start_registry, stop_registry

    def challenges() -> int:
        lines = log_path(NAME, state_dir=tmp_path).read_text().splitlines()
        return sum("error authorizing context" in line and "never-pushed" in line for line in lines)

    def settled(expected: int) -> int:
        deadline = time.monotonic() + 5  # the registry writes its log as it goes
        while challenges() < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return challenges()

    url = start_registry(tmp_path, free_port(), token_port=free_port(), token_lifetime=12)
    try:
        registry = authed(url, tmp_path)
        assert registry.digest("never-pushed", TAG) is None  # authorized: the tag is simply missing
        assert registry.digest("never-pushed", TAG) is None
        assert settled(1) == 1  # the second read reused the token
        time.sleep(13)  # the token has expired at the registry
        assert registry.digest("never-pushed", TAG) is None
        assert settled(2) == 2  # a fresh token, after one more challenge
    finally:
        stop_registry(tmp_path)


def test_acr_credentials_from_an_entra_token_exchanged_at_the_registry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ACR: azure-identity's real ManagedIdentityCredential gets an Entra ID token (App Service
    style endpoint), the registry's /oauth2/exchange turns it into a refresh token, and the Bearer
    flow asks /oauth2/token for an access token with it; the refresh token is reused, no token is
    logged, and an identity without a role on the registry is told which role it needs."""
    from azure.identity import ManagedIdentityCredential

    from tests.fakes.acr import FakeAcr
    from twincd.adapters.acr import AcrLogin

    with FakeAcr() as acr:
        # The process environment of an App Service managed identity (not an SDK patch).
        monkeypatch.setenv("IDENTITY_ENDPOINT", f"{acr.url}/msi/token")
        monkeypatch.setenv("IDENTITY_HEADER", acr.identity_header)
        digest = acr.push("team/hello", TAG)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(RegistryDenied, match="anonymously"):
            OciRegistry(url=acr.host, insecure=True, docker_config=False).digest("team/hello", TAG)
        login = AcrLogin(registry_url=acr.host, insecure=True, credential=ManagedIdentityCredential())
        registry = OciRegistry(url=acr.host, insecure=True, login=login)
        assert registry.digest("team/hello", TAG) == digest
        assert registry.digest("team/hello", "v9.9.9") is None
        assert acr.seen("/oauth2/exchange") == 1  # the refresh token is cached
        assert acr.seen("/msi/token") == 1
        creds = registry.credentials()
        assert creds is not None and creds.username == "00000000-0000-0000-0000-000000000000"
        logged = caplog.text + "".join(str(r.args) for r in caplog.records)
        for token in set(acr.aad_tokens) | acr.refresh_tokens | acr.access_tokens:
            assert token not in logged

    with FakeAcr() as denied:
        denied.role = False
        monkeypatch.setenv("IDENTITY_ENDPOINT", f"{denied.url}/msi/token")
        login = AcrLogin(registry_url=denied.host, insecure=True, credential=ManagedIdentityCredential())
        with pytest.raises(RegistryDenied, match="AcrPull role") as e:
            OciRegistry(url=denied.host, insecure=True, login=login).digest("team/hello", TAG)
        assert not any(t in str(e.value) for t in denied.aad_tokens)
