"""The local stack's build service: a Docker Engine API to build and push images.

An existing Docker (``DOCKER_HOST`` or ``/var/run/docker.sock``) is used when it answers. Otherwise
``podman system service`` is started on ``<state_dir>/run/podman.sock`` with every piece of its state
(image storage, temp files, events, network configs) under the state dir, so that a test session's
build service runs beside the stack's and ``rm -rf`` of the state dir leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from twincd.adapters.builder import ping
from twincd.errors import PermanentError
from twincd.sandbox.procs import daemon_status, start_daemon, stop_daemon, write_config

NAME = "podman"
DOCKER_SOCKET = "/var/run/docker.sock"
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107


def socket_path(state_dir: Path) -> Path:
    return state_dir.resolve() / "run" / "podman.sock"


def existing_engine() -> str | None:
    """The base URL of a Docker Engine API that already answers, if any."""
    candidates = [os.environ.get("DOCKER_HOST", ""), f"unix://{DOCKER_SOCKET}"]
    return next((url for url in candidates if url and ping(url)), None)


def write_podman_config(
    state_dir: Path, *, insecure_registries: Sequence[str], storage_driver: str = "vfs"
) -> tuple[dict[str, str], bool]:
    """Write the podman service's config files; return its environment and whether any file changed."""
    state = state_dir.resolve()
    conf = state / "podman"
    tmp = state / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)

    def q(value: object) -> str:
        # A JSON string is a valid TOML basic string, whatever the path holds.
        return json.dumps(str(value))

    # crun fails here (setrlimit, cgroups hybrid mode): runc with cgroupfs and fixed ulimits works,
    # and RUN steps get no network namespace setup (there is no network to reach anyway).
    # tmp_dir, the events log and network configs default to /run/libpod, /run/containers and
    # /etc/containers, shared by every podman on the machine: keep them in our state dir.
    containers_conf = f"""[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {q(state / "run" / "podman-events.log")}
tmp_dir = {q(state / "run" / "libpod")}

[network]
network_config_dir = {q(conf / "networks")}
"""
    # vfs copies layers instead of mounting them: slower for big images, but it needs no overlay mount
    # left behind under graphroot (the overlay driver bind-mounts graphroot/overlay and keeps it).
    storage_conf = f"""[storage]
driver = {q(storage_driver)}
graphroot = {q(state / "podman" / "storage")}
runroot = {q(state / "run" / "podman-storage")}
"""
    # Plain-HTTP registries must be listed, or push tries HTTPS and fails ("server gave HTTP
    # response to HTTPS client"). Nothing else: the Docker-compatible API maps short names such as
    # `FROM busybox` to docker.io itself, whatever search registries say.
    registries_conf = "".join(
        f"[[registry]]\nlocation = {q(registry)}\ninsecure = true\n\n" for registry in insecure_registries
    )
    files = {
        "CONTAINERS_CONF": (conf / "containers.conf", containers_conf),
        "CONTAINERS_STORAGE_CONF": (conf / "storage.conf", storage_conf),
        "CONTAINERS_REGISTRIES_CONF": (conf / "registries.conf", registries_conf),
    }
    changed = [write_config(path, text) for path, text in files.values()]
    env = {var: str(path) for var, (path, _) in files.items()}
    env["TMPDIR"] = str(tmp)  # buildah writes build temp files there (default /var/tmp)
    return env, any(changed)


def start_buildd(
    state_dir: Path,
    *,
    insecure_registries: Sequence[str] = (),
    storage_driver: str = "vfs",
    timeout: float = 60.0,
) -> str:
    """Return the base URL of a Docker Engine API, starting podman's service if none answers.

    ``insecure_registries`` (``host:port``) are pushed to over plain HTTP by podman; Docker already
    treats 127.0.0.0/8 as insecure by default.
    """
    existing = existing_engine()
    if existing is not None:
        return existing
    podman = shutil.which("podman")
    if podman is None:
        raise PermanentError(
            "no Docker engine answers and podman is not installed: apt-get install -y podman runc"
        )
    sock = socket_path(state_dir)
    if len(str(sock).encode()) > _MAX_SOCKET_PATH:
        raise PermanentError(f"state dir {state_dir} is too deep: the socket path {sock} exceeds 107 bytes")
    env, changed = write_podman_config(
        state_dir, insecure_registries=insecure_registries, storage_driver=storage_driver
    )
    if changed:
        # podman reads its config at start: a running service would keep the old registries.
        stop_daemon(NAME, state_dir=state_dir)
    if daemon_status(NAME, state_dir=state_dir) is None:
        # A socket file left by a killed service would make the new one fail to bind.
        sock.unlink(missing_ok=True)
    sock.parent.mkdir(parents=True, exist_ok=True)
    base_url = f"unix://{sock}"
    start_daemon(
        NAME,
        [podman, "system", "service", "--time=0", base_url],
        state_dir=state_dir,
        env=env,
        ready=lambda: ping(base_url),
        timeout=timeout,
    )
    return base_url


def stop_buildd(state_dir: Path) -> bool:
    """Stop the podman service of this state dir (an existing Docker engine is never ours to stop)."""
    return stop_daemon(NAME, state_dir=state_dir)
