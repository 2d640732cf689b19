"""A burst of GitLab Tag Push Hook deliveries at `twincd webhook`, all at once.

The burst of the probe that found the webhook could not hold one: 20 tags × 10 deliveries each
(GitLab's retries and people's replays) plus 50 forged ones, sent concurrently. The webhook is
`twincd webhook`, its own process, creating runs on a throwaway Prefect server for a stub
`deploy` deployment (no worker runs them): on SQLite (`prefect_test_harness`), or with
``--database postgresql`` a `prefect server start` on a PostgreSQL of its own (the stack's
twincd.sandbox.postgres). GitLab gives a hook 10 s to answer. Runs are counted once every
creation has finished (answers may be ``pending``: the run is still being created).

    .venv/bin/python benchmarks/webhook_burst.py [--tags 20] [--replays 10] [--forged 50]
        [--database sqlite|postgresql]

Last line: ``deliveries N: runs R of E expected, forged accepted A, p50 X s, p99 Y s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from twincd.adapters.webhook import PATH
from twincd.config import DEFAULT_ENV
from twincd.sandbox.procs import free_port

SECRET = "burst-secret-0123456789"
SHA = "5e1b" * 10


@flow(name="deploy")
def deploy_stub(app: str, tag: str, env: str = "") -> None:
    """Stands in for flows/deploy.py:deploy; never runs (no worker)."""


def _payload(tag: str) -> bytes:
    return json.dumps(
        {
            "object_kind": "tag_push",
            "ref": f"refs/tags/{tag}",
            "checkout_sha": SHA,
            "project": {"id": 7, "path_with_namespace": "apps/hello"},
            "commits": [],
        }
    ).encode()


@contextmanager
def _webhook(tmp: Path) -> Iterator[tuple[str, int]]:
    """`twincd webhook` on a free port, against the harness's Prefect server."""
    data = yaml.safe_load(DEFAULT_ENV.read_text())
    port = free_port()
    data["prefect"] = {"api_url": PREFECT_API_URL.value()}
    data["state_dir"] = str(tmp / "state")
    data["webhook"] = {"secret": "env:TWINCD_BURST_HOOK", "port": port}
    env_file = tmp / "env.yaml"
    env_file.write_text(yaml.safe_dump(data))
    log = (tmp / "webhook.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "twincd.cli", "--env", str(env_file), "webhook"],
        env={**os.environ, "TWINCD_BURST_HOOK": SECRET},
        cwd=Path(__file__).resolve().parents[1],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"twincd webhook did not start: see {tmp / 'webhook.log'}")
            time.sleep(0.2)
        yield f"{url}{PATH}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


async def _burst(url: str, tags: list[str], replays: int, forged: int) -> list[tuple[bool, int, float, str]]:
    """(genuine, status, seconds, run id) per delivery, all sent at once.

    Each delivery is its own connection, as GitLab's Sidekiq workers send them, written as raw
    HTTP/1.1 on asyncio streams: an HTTP client library spends more CPU per request than the
    webhook does, and would measure itself.
    """
    where = httpx.URL(url)
    host, port, path = where.host, where.port or 80, where.raw_path.decode()

    async def send(tag: str, token: str) -> tuple[bool, int, float, str]:
        body = _payload(tag)
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"X-Gitlab-Event: Tag Push Hook\r\nX-Gitlab-Token: {token}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 120)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 120)
            writer.close()
        except (OSError, TimeoutError):
            return token == SECRET, 0, time.perf_counter() - t0, ""  # never answered
        seconds = time.perf_counter() - t0
        head, _, content = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        run = str(json.loads(content or b"{}").get("flow_run_id", "")) if status == 202 else ""
        return token == SECRET, status, seconds, run

    sends = [send(t, SECRET) for t in tags for _ in range(replays)]
    sends += [send(f"v9.9.{i}", "forged-token") for i in range(forged)]
    return list(await asyncio.gather(*sends))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _runs(deployment_id: Any) -> int:
    async with get_client() as client:
        found = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200
        )
    return len(found)


@contextmanager
def _server(database: str, tmp: Path) -> Iterator[None]:
    """A throwaway Prefect server on ``database``, the process's PREFECT_API_URL while it runs."""
    if database == "sqlite":
        with prefect_test_harness(server_startup_timeout=120):
            yield
        return
    from twincd.sandbox import postgres, procs

    state = tmp / "state"
    port = procs.free_port()
    url = postgres.start_postgres(state, procs.free_port())
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--port", str(port)],
        env={
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        procs.wait_until(lambda: _healthy(f"{api}/health"), 120, "the Prefect server")
        with temporary_settings({PREFECT_API_URL: api}):
            yield
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        procs.stop_daemon(postgres.NAME, state_dir=state)
        shutil.rmtree(postgres.data_dir(state), ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tags", type=int, default=20)
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--forged", type=int, default=50)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    tags = [f"v3.{i}.0" for i in range(args.tags)]
    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        tempfile.TemporaryDirectory() as tmp,
        _server(args.database, Path(tmp)),
    ):
        deployment_id = deploy_stub.to_deployment(name="deploy").apply()
        with _webhook(Path(tmp)) as (url, pid):
            cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
            results = asyncio.run(_burst(url, tags, args.replays, args.forged))
            cpu, wall = _cpu_seconds(pid) - cpu0, time.perf_counter() - t0
            deadline = time.monotonic() + 60  # `pending` answers: their runs are still being made
            while (runs := asyncio.run(_runs(deployment_id))) < len(tags) and time.monotonic() < deadline:
                time.sleep(0.5)
    genuine = sorted(s for ok, _, s, _ in results if ok)
    answered = [s for ok, code, s, _ in results if ok and code == 202]
    per_tag = {run for ok, code, _, run in results if ok and code == 202}
    accepted_forged = sum(1 for ok, code, _, _ in results if not ok and code != 401)
    p50 = statistics.median(genuine)
    p99 = genuine[min(len(genuine) - 1, int(len(genuine) * 0.99))]
    per = cpu / len(results) * 1000
    print(f"burst wall {wall:.2f} s; the webhook process used {cpu:.2f} s of CPU ({per:.1f} ms per delivery)")
    print(f"genuine answered 202: {len(answered)} of {len(genuine)}; distinct runs named: {len(per_tag)}")
    print(
        f"slowest genuine answer: {genuine[-1]:.3f} s; within GitLab's 10 s: {sum(s < 10 for s in genuine)}"
    )
    print(f"Prefect server database: {args.database}")
    print(
        f"deliveries {len(results)}: runs {runs} of {len(tags)} expected, forged accepted {accepted_forged}, "
        f"p50 {p50:.3f} s, p99 {p99:.3f} s"
    )


if __name__ == "__main__":
    main()
