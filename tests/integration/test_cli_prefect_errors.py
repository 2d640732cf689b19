"""The CLI names the Prefect API when it is down or failing, in one line, never with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from starlette.responses import JSONResponse

from tests.fakes import ServedFake
from twincd.config import DEFAULT_ENV
from twincd.sandbox.procs import free_port


class _LockedPrefect(ServedFake):
    """A Prefect server whose SQLite database is locked: every request is a 503 (seen under load)."""

    _name = "locked-prefect"

    def __init__(self) -> None:
        self.requests = 0

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        await JSONResponse({"detail": "database is locked"}, status_code=503)(scope, receive, send)


def _approve(tmp_path: Path, api_url: str) -> subprocess.CompletedProcess[str]:
    data = yaml.safe_load(DEFAULT_ENV.read_text())
    data["prefect"] = {"api_url": api_url}
    data["state_dir"] = str(tmp_path / "state")
    env_file = tmp_path / "env.yaml"
    env_file.write_text(yaml.safe_dump(data))
    # One retry instead of twincd's seven (2+4+8+... s of backoff): a Prefect setting; and 3 s
    # instead of 120 of waiting for an API that does not answer at all.
    environ = {**os.environ, "PREFECT_CLIENT_MAX_RETRIES": "1", "TWINCD_PREFECT_WAIT": "3"}
    return subprocess.run(
        [sys.executable, "-m", "twincd.cli", "--env", str(env_file), "approve", "hello", "v1.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_a_prefect_api_that_is_down_is_named_in_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    done = _approve(tmp_path, url)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == (  # waited with backoff first (a server restarting comes back in seconds)
        f"twincd: the Prefect API at {url} does not answer (ConnectError); trying again for up to 3 s "
        "(--prefect-wait; `twincd up` starts the local stack)"
    )
    assert lines[-1] == (
        f"twincd: cannot reach the Prefect API at {url} (ConnectError): start it (`twincd up` for "
        "the local stack) or check prefect.api_url in the environment file"
    )


def test_a_prefect_api_answering_503_is_retried_then_named(tmp_path: Path) -> None:
    with _LockedPrefect() as prefect:
        done = _approve(tmp_path, f"{prefect.url}/api")
        assert prefect.requests >= 2  # Prefect's client retried the 503
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"twincd: the Prefect API at {prefect.url}/api answered HTTP 503 Service Unavailable"
    )
