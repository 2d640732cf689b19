"""The local stack's OCI registry: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Storage is a plain directory under the state dir, so a test session can run its own registry beside
the stack's, and ``rm -rf`` of the state dir removes every image. With ``token_port`` the registry
requires the distribution token protocol (``auth: token``), with the stack's own token service
(``registry_auth.py``) as the realm: the real registry checking real tokens, as every hosted
registry does. Without it, anonymous (the adapters' tests of unauthenticated registries).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx

from twincd.errors import PermanentError
from twincd.sandbox import registry_auth
from twincd.sandbox.procs import start_daemon, stop_daemon, write_config

NAME = "registry"


def write_registry_config(
    state_dir: Path, port: int, token_port: int | None = None, htpasswd: Path | None = None
) -> tuple[Path, bool]:
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
    if token_port is not None:
        _, cert, _ = registry_auth.ensure_keys(state_dir)
        text += f"""auth:
  token:
    realm: "http://127.0.0.1:{token_port}/token"
    service: {registry_auth.SERVICE}
    issuer: {registry_auth.ISSUER}
    rootcertbundle: {json.dumps(str(cert.resolve()))}
"""
    elif htpasswd is not None:
        # Basic auth against a bcrypt htpasswd file (distribution's `auth: htpasswd`).
        text += f"""auth:
  htpasswd:
    realm: twincd-registry
    path: {json.dumps(str(htpasswd.resolve()))}
"""
    return config, write_config(config, text)


def registry_ready(port: int) -> bool:
    """``GET /v2/`` answers 200, or 401 with a challenge (the distribution API's version check)."""
    try:
        # trust_env=False: a proxy from the environment must not intercept loopback.
        r = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0, trust_env=False)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 or (r.status_code == 401 and "WWW-Authenticate" in r.headers)


def start_registry(
    state_dir: Path,
    port: int,
    *,
    token_port: int | None = None,
    htpasswd: Path | None = None,
    token_lifetime: int = registry_auth.TOKEN_SECONDS,
    timeout: float = 30.0,
) -> str:
    """Start (or find running) the registry on 127.0.0.1:``port``; return ``127.0.0.1:<port>``.

    ``token_port``: require tokens from the stack's token service, started on that port first.
    ``htpasswd``: require Basic auth against that bcrypt htpasswd file instead.
    """
    # Debian names the binary docker-registry; upstream release tarballs name it registry.
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        raise PermanentError("no docker-registry binary on PATH: apt-get install -y docker-registry")
    if token_port is not None:
        start_daemon(
            registry_auth.NAME,
            [
                sys.executable,
                "-m",
                "twincd.sandbox.registry_auth",
                "--state",
                str(state_dir),
                "--port",
                str(token_port),
                "--lifetime",
                str(token_lifetime),
            ],
            state_dir=state_dir,
            ready=lambda: _answers(f"http://127.0.0.1:{token_port}/token"),
            timeout=timeout,
        )
    config, changed = write_registry_config(state_dir, port, token_port, htpasswd)
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


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1.0, trust_env=False)
    except httpx.HTTPError:
        return False
    return True


def stop_registry(state_dir: Path) -> bool:
    stopped = stop_daemon(NAME, state_dir=state_dir)
    stop_daemon(registry_auth.NAME, state_dir=state_dir)
    return stopped
