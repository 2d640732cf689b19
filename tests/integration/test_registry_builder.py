"""Builder and registry adapters against a real docker-registry and podman service; process control.

Every image name is unique per test: the session registry outlives each test, and a tag it already
holds would (rightly) be reused instead of built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import docker
import pytest

import twincd.adapters.builder as builder_module
from twincd.adapters.builder import (
    BuilderUnavailable,
    BuildFailed,
    BuiltImage,
    PushFailed,
    SourceUnavailable,
    TagConflict,
    TagNotFound,
    build_image,
    push_image,
)
from twincd.adapters.registry import RegistryUnavailable, manifest_digest
from twincd.errors import PermanentError, TransientError
from twincd.sandbox.procs import (
    DaemonExited,
    DaemonNotReady,
    daemon_status,
    free_port,
    pid_path,
    port_open,
    start_daemon,
    stop_daemon,
)
from twincd.sandbox.registry import start_registry, stop_registry

pytestmark = pytest.mark.integration

TAG = "v1.0.0"
_GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.test",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.test",
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=_GIT_ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


def containerfile(revision: str) -> str:
    return (
        "FROM scratch\n"
        "COPY busybox /bin/busybox\n"
        f'LABEL test.revision="{revision}"\n'
        'CMD ["/bin/busybox", "true"]\n'
    )


@pytest.fixture
def app_worktree(tmp_path: Path) -> Path:
    """An app repo: tag v1.0.0 on revision "one", a later commit "two" on main, a dirty "three"."""
    work = tmp_path / "hello"
    work.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    shutil.copy("/bin/busybox", work / "busybox")
    (work / "Containerfile").write_text(containerfile("one"))
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "one", cwd=work)
    git("tag", "-a", TAG, "-m", "release one", cwd=work)
    (work / "Containerfile").write_text(containerfile("two"))
    git("commit", "--quiet", "-am", "two", cwd=work)
    (work / "Containerfile").write_text(containerfile("three"))
    return work


@pytest.fixture
def app_repo(app_worktree: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "hello.git"
    git("clone", "--quiet", "--bare", str(app_worktree), str(bare), cwd=tmp_path)
    return bare


def image_labels(base_url: str, image_id: str) -> dict[str, str]:
    client = docker.DockerClient(base_url=base_url, version="1.41")
    try:
        labels: dict[str, str] = client.images.get(image_id).labels
        return labels
    finally:
        client.close()


def test_build_push_reads_back_digest_then_reuses(registry: str, builder: str, app_repo: Path) -> None:
    started = time.monotonic()
    built = build_image(
        repo_url=str(app_repo),
        tag=TAG,
        image="hello",
        registries=[registry],
        base_url=builder,
        insecure_registries={registry},
    )
    pushed = push_image(built=built, base_url=builder, insecure_registries={registry})
    elapsed = time.monotonic() - started
    print(f"build + push of {built.targets[0]}: {elapsed:.2f} s")

    assert not built.reused and not pushed.reused
    assert built.commit == git("rev-parse", f"{TAG}^{{commit}}", cwd=app_repo)
    labels = image_labels(builder, built.image_id)
    assert labels["test.revision"] == "one"  # the tagged commit, not main's later "two"
    assert labels["org.opencontainers.image.revision"] == built.commit
    readback = manifest_digest(registry_url=registry, insecure=True, repository="hello", reference=TAG)
    assert pushed.digest == readback
    assert [ref.pinned for ref in pushed.refs] == [f"{registry}/hello@{readback}"]

    # Again: every registry holds hello:v1.0.0, so the builder is not even contacted (a dead socket).
    dead = f"unix://{app_repo.parent}/no-builder.sock"
    again = build_image(
        repo_url=str(app_repo),
        tag=TAG,
        image="hello",
        registries=[registry],
        base_url=dead,
        insecure_registries={registry},
    )
    assert again.reused and again.image_id == ""
    repushed = push_image(built=again, base_url=dead, insecure_registries={registry})
    assert repushed.reused and repushed.refs == pushed.refs


def push_to_first_only(built: BuiltImage, base_url: str, registry: str) -> str:
    """An earlier run that pushed to the first registry and stopped before the second: its digest."""
    pushed = push_image(
        built=replace(built, registries=built.registries[:1]),
        base_url=base_url,
        insecure_registries={registry},
    )
    return pushed.digest


def test_partial_push_is_completed_with_the_same_image(
    registry: str, second_registry: str, builder: str, app_repo: Path
) -> None:
    both = {registry, second_registry}
    first = build_image(
        repo_url=str(app_repo),
        tag=TAG,
        image="hello-partial",
        registries=[registry, second_registry],
        base_url=builder,
        insecure_registries=both,
    )
    digest = push_to_first_only(first, builder, registry)
    assert (
        manifest_digest(
            registry_url=second_registry, insecure=True, repository="hello-partial", reference=TAG
        )
        is None
    )

    again = build_image(
        repo_url=str(app_repo),
        tag=TAG,
        image="hello-partial",
        registries=[registry, second_registry],
        base_url=builder,
        insecure_registries=both,
    )
    # Nothing built: the image the first run built is what the second registry gets.
    assert not again.reused and again.image_id == first.image_id
    assert [ref.pinned for ref in again.existing] == [f"{registry}/hello-partial@{digest}"]
    pushed = push_image(built=again, base_url=builder, insecure_registries=both)
    assert [ref.pinned for ref in pushed.refs] == [
        f"{registry}/hello-partial@{digest}",
        f"{second_registry}/hello-partial@{digest}",
    ]
    for address in (registry, second_registry):
        assert (
            manifest_digest(registry_url=address, insecure=True, repository="hello-partial", reference=TAG)
            == digest
        )


def test_partial_push_without_the_builders_image_is_refused_not_rebuilt(
    registry: str, second_registry: str, builder: str, app_repo: Path
) -> None:
    both = {registry, second_registry}
    first = build_image(
        repo_url=str(app_repo),
        tag=TAG,
        image="hello-lost",
        registries=[registry, second_registry],
        base_url=builder,
        insecure_registries=both,
    )
    digest = push_to_first_only(first, builder, registry)
    client = docker.DockerClient(base_url=builder, version="1.41")
    try:  # the builder's storage was reset since: it no longer holds the image
        client.images.remove(first.image_id, force=True)
    finally:
        client.close()

    with pytest.raises(TagConflict) as caught:
        build_image(
            repo_url=str(app_repo),
            tag=TAG,
            image="hello-lost",
            registries=[registry, second_registry],
            base_url=builder,
            insecure_registries=both,
        )
    message = str(caught.value)
    assert isinstance(caught.value, PermanentError)
    assert f"{registry}/hello-lost has {digest}" in message and f"not in {second_registry}" in message
    assert (
        f"skopeo copy --src-tls-verify=false --dest-tls-verify=false docker://{registry}/hello-lost:{TAG} "
        f"docker://{second_registry}/hello-lost:{TAG}"
    ) in message
    assert "delete the tag" in message
    assert (
        manifest_digest(registry_url=registry, insecure=True, repository="hello-lost", reference=TAG)
        == digest
    )
    assert (
        manifest_digest(registry_url=second_registry, insecure=True, repository="hello-lost", reference=TAG)
        is None
    )


def test_partial_push_of_another_image_under_the_tag_is_refused(
    registry: str, second_registry: str, builder: str, app_worktree: Path
) -> None:
    both = {registry, second_registry}
    first = build_image(
        repo_url=str(app_worktree),
        tag=TAG,
        image="hello-swapped",
        registries=[registry, second_registry],
        base_url=builder,
        insecure_registries=both,
    )
    digest = push_to_first_only(first, builder, registry)
    # Since then the builder's <second>/hello-swapped:v1.0.0 became another image (revision "two").
    git("tag", "v2.0.0", "main", cwd=app_worktree)
    other = build_image(
        repo_url=str(app_worktree),
        tag="v2.0.0",
        image="hello-swapped-other",
        registries=[registry],
        base_url=builder,
        insecure_registries=both,
    )
    client = docker.DockerClient(base_url=builder, version="1.41")
    try:
        client.api.tag(other.image_id, f"{second_registry}/hello-swapped", TAG)
    finally:
        client.close()

    again = build_image(
        repo_url=str(app_worktree),
        tag=TAG,
        image="hello-swapped",
        registries=[registry, second_registry],
        base_url=builder,
        insecure_registries=both,
    )
    with pytest.raises(TagConflict) as caught:
        push_image(built=again, base_url=builder, insecure_registries=both)
    message = str(caught.value)
    pushed = manifest_digest(
        registry_url=second_registry, insecure=True, repository="hello-swapped", reference=TAG
    )
    assert pushed is not None and pushed != digest
    assert (
        f"{registry}/hello-swapped has {digest}" in message
        and f"{second_registry}/hello-swapped has {pushed}" in message
    )
    assert "skopeo copy" in message
    # The first registry's release was never pushed over.
    assert (
        manifest_digest(registry_url=registry, insecure=True, repository="hello-swapped", reference=TAG)
        == digest
    )


def test_builds_the_tag_not_the_dirty_worktree(registry: str, builder: str, app_worktree: Path) -> None:
    built = build_image(
        repo_url=str(app_worktree),
        tag=TAG,
        image="hello-worktree",
        registries=[registry],
        base_url=builder,
        insecure_registries={registry},
    )
    assert image_labels(builder, built.image_id)["test.revision"] == "one"


def test_failing_build_is_permanent(registry: str, builder: str, app_worktree: Path) -> None:
    (app_worktree / "Containerfile").write_text("FROM scratch\nCOPY missing /missing\n")
    git("commit", "--quiet", "-am", "broken", cwd=app_worktree)
    git("tag", "v2.0.0", cwd=app_worktree)
    with pytest.raises(BuildFailed) as caught:
        build_image(
            repo_url=str(app_worktree),
            tag="v2.0.0",
            image="hello-broken",
            registries=[registry],
            base_url=builder,
            insecure_registries={registry},
        )
    assert isinstance(caught.value, PermanentError) and "COPY missing" in str(caught.value)


def test_unknown_tag_is_permanent(app_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(TagNotFound) as caught:
        build_image(
            repo_url=str(app_repo),
            tag="v9.9.9",
            image="hello",
            registries=["127.0.0.1:1"],
            base_url=f"unix://{tmp_path}/none.sock",
        )
    assert isinstance(caught.value, PermanentError)
    assert str(app_repo) in str(caught.value) and "v9.9.9" in str(caught.value)


def test_git_errors_show_no_url_credentials(tmp_path: Path) -> None:
    # git may echo a URL in another spelling than repo_url (here: another URL altogether); every
    # URL in its output loses its user:token part.
    repo_url = "http://deploy:url-s3cret@127.0.0.1:1/hello.git"
    echoed = "https://deploy:url-s3cret@gitlab.example.test/infra/hello.git/"
    git("init", "--quiet", cwd=tmp_path)
    with pytest.raises(SourceUnavailable) as caught:  # "fatal: Not a valid object name <echoed>"
        builder_module._git(repo_url, "cannot read", "ls-tree", "--name-only", echoed, cwd=tmp_path)
    message = str(caught.value)
    assert "url-s3cret" not in message
    assert (
        "http://127.0.0.1:1/hello.git" in message
        and "https://gitlab.example.test/infra/hello.git/" in message
    )


def test_registry_on_a_closed_port_is_unavailable() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnavailable) as caught:
        manifest_digest(registry_url=address, insecure=True, repository="hello", reference=TAG)
    assert isinstance(caught.value, TransientError)
    assert address in str(caught.value) and "hello" in str(caught.value)


def test_unreachable_builder_is_transient(registry: str, app_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(BuilderUnavailable):
        build_image(
            repo_url=str(app_repo),
            tag=TAG,
            image="hello-nobuilder",
            registries=[registry],
            base_url=f"unix://{tmp_path}/none.sock",
            insecure_registries={registry},
        )


def test_push_error_in_the_stream_is_detected(builder: str, app_repo: Path, tmp_path: Path) -> None:
    # The push API answers 200 and reports failures inside its JSON stream: stop the registry
    # between build and push, and the failure must still surface.
    state_dir = tmp_path / "doomed-registry"
    doomed = start_registry(state_dir, free_port())
    try:
        built = build_image(
            repo_url=str(app_repo),
            tag=TAG,
            image="hello-doomed",
            registries=[doomed],
            base_url=builder,
            insecure_registries={doomed},
        )
    finally:
        stop_registry(state_dir)
    with pytest.raises(PushFailed) as caught:
        push_image(built=built, base_url=builder, insecure_registries={doomed})
    assert doomed in str(caught.value)


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]


def test_daemon_start_status_idempotent_stop(tmp_path: Path) -> None:
    port = free_port()

    def serving() -> bool:
        return port_open("127.0.0.1", port)

    pid = start_daemon("web", http_server(port), state_dir=tmp_path, ready=serving, timeout=10)
    try:
        assert daemon_status("web", state_dir=tmp_path) == pid
        assert start_daemon("web", http_server(port), state_dir=tmp_path, ready=serving, timeout=10) == pid
        assert (tmp_path / "logs" / "web.log").read_text().count("starting:") == 1
    finally:
        assert stop_daemon("web", state_dir=tmp_path)
    assert daemon_status("web", state_dir=tmp_path) is None
    assert not port_open("127.0.0.1", port)
    assert not pid_path("web", state_dir=tmp_path).exists()
    assert not stop_daemon("web", state_dir=tmp_path)


def test_stale_pid_file_spares_the_process_that_reused_the_pid(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    start_daemon("sleeper", sleeper, state_dir=tmp_path, ready=lambda: True, timeout=10)
    record = json.loads(pid_path("sleeper", state_dir=tmp_path).read_text())
    stop_daemon("sleeper", state_dir=tmp_path)

    # A stranger now holds the PID the file names (PID reuse), with its own start time.
    stranger = subprocess.Popen(sleeper)
    try:
        pid_path("sleeper", state_dir=tmp_path).write_text(json.dumps({**record, "pid": stranger.pid}))
        assert daemon_status("sleeper", state_dir=tmp_path) is None
        assert not stop_daemon("sleeper", state_dir=tmp_path)
        time.sleep(0.2)
        assert stranger.poll() is None
        assert not pid_path("sleeper", state_dir=tmp_path).exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_daemon_that_exits_names_its_log(tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "import sys; print('bad config', flush=True); sys.exit(3)"]
    with pytest.raises(DaemonExited) as caught:
        start_daemon("crash", crash, state_dir=tmp_path, ready=lambda: False, timeout=10)
    log = tmp_path / "logs" / "crash.log"
    assert "code 3" in str(caught.value) and str(log) in str(caught.value)
    assert "bad config" in log.read_text()


def test_daemon_never_ready_is_stopped(tmp_path: Path) -> None:
    seen: list[int] = []

    def never() -> bool:
        seen.append(json.loads(pid_path("slow", state_dir=tmp_path).read_text())["pid"])
        return False

    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(DaemonNotReady) as caught:
        start_daemon("slow", slow, state_dir=tmp_path, ready=never, timeout=0.5)
    assert "slow" in str(caught.value) and "slow.log" in str(caught.value)
    assert seen and not Path(f"/proc/{seen[0]}").exists()
    assert daemon_status("slow", state_dir=tmp_path) is None
