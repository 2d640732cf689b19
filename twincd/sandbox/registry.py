"""The local stack's OCI registry: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Storage is a plain directory under the state dir, so a test session can run its own registry beside
the stack's, and ``rm -rf`` of the state dir removes every image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from twincd.errors import PermanentError
from twincd.sandbox.procs import start_daemon, stop_daemon, write_config

NAME = "registry"


def write_registry_config(state_dir: Path, port: int) -> tuple[Path, bool]:
    """Write ``<state_dir>/registry.yml``; return its path and whether its content changed."""
    storage = state_dir / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    config = state_dir / "registry.yml"
    # A JSON string is a valid YAML double-quoted scalar: any path survives. No auth: it binds to
    # loopback only. Deletes are on so tests and people can remove images through the API.
    text = f"""version: 0.1
log: {{level: info, fields: {{service: registry}}}}
storage:
  filesystem: {{rootdirectory: {json.dumps(str(storage.resolve()))}}}
  delete: {{enabled: true}}
http:
  addr: "127.0.0.1:{port}"
"""
    return config, write_config(config, text)


def registry_ready(port: int) -> bool:
    """``GET /v2/`` answers 200 (the distribution API's version check)."""
    try:
        # trust_env=False: a proxy from the environment must not intercept loopback.
        return httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def start_registry(state_dir: Path, port: int, *, timeout: float = 30.0) -> str:
    """Start (or find running) the registry on 127.0.0.1:``port``; return ``127.0.0.1:<port>``."""
    # Debian names the binary docker-registry; upstream release tarballs name it registry.
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        raise PermanentError("no docker-registry binary on PATH: apt-get install -y docker-registry")
    config, changed = write_registry_config(state_dir, port)
    if changed:
        # A registry already running from this state dir still serves the old port: restart it.
        stop_daemon(NAME, state_dir=state_dir)
    start_daemon(
        NAME,
        [binary, "serve", str(config)],
        state_dir=state_dir,
        ready=lambda: registry_ready(port),
        timeout=timeout,
    )
    return f"127.0.0.1:{port}"


def stop_registry(state_dir: Path) -> bool:
    return stop_daemon(NAME, state_dir=state_dir)
