"""A burst of GitLab Tag Push Hook deliveries at `twincd webhook`, all at once.

The burst of the probe that found the webhook could not hold one: 20 tags × 10 deliveries each
(GitLab's retries and people's replays) plus 50 forged ones, sent concurrently. The webhook runs
under uvicorn as `twincd webhook` serves it, creating runs on a throwaway Prefect server
(SQLite, `prefect_test_harness`) for a stub `deploy` deployment (no worker runs them). GitLab
gives a hook 10 s to answer.

    .venv/bin/python benchmarks/webhook_burst.py [--tags 20] [--replays 10] [--forged 50]

Last line: ``deliveries N: runs R of E expected, forged accepted A, p50 X s, p99 Y s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from typing import Any

import httpx
import uvicorn
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from twincd.adapters.webhook import PATH, create_app
from twincd.config import DEFAULT_ENV, load_environment

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


def _serve(app: Any) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}{PATH}", server, thread


async def _burst(url: str, tags: list[str], replays: int, forged: int) -> list[tuple[bool, int, float, str]]:
    """(genuine, status, seconds, run id) per delivery, all sent at once."""

    async def send(client: httpx.AsyncClient, tag: str, token: str) -> tuple[bool, int, float, str]:
        t0 = time.perf_counter()
        try:
            r = await client.post(
                url,
                content=_payload(tag),
                headers={"X-Gitlab-Event": "Tag Push Hook", "X-Gitlab-Token": token},
            )
            status, run = r.status_code, str(r.json().get("flow_run_id", ""))
        except httpx.HTTPError:
            status, run = 0, ""  # never answered within the timeout
        return token == SECRET, status, time.perf_counter() - t0, run

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        sends = [send(client, t, SECRET) for t in tags for _ in range(replays)]
        sends += [send(client, f"v9.9.{i}", "forged-token") for i in range(forged)]
        return list(await asyncio.gather(*sends))


async def _runs(deployment_id: Any) -> int:
    async with get_client() as client:
        found = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200
        )
    return len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tags", type=int, default=20)
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--forged", type=int, default=50)
    args = parser.parse_args()
    env = load_environment(DEFAULT_ENV)
    tags = [f"v3.{i}.0" for i in range(args.tags)]
    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        deployment_id = deploy_stub.to_deployment(name="deploy").apply()
        url, server, thread = _serve(create_app(env, secret=SECRET))
        try:
            results = asyncio.run(_burst(url, tags, args.replays, args.forged))
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        runs = asyncio.run(_runs(deployment_id))
    genuine = sorted(s for ok, _, s, _ in results if ok)
    answered = [s for ok, code, s, _ in results if ok and code == 202]
    per_tag = {run for ok, code, _, run in results if ok and code == 202}
    accepted_forged = sum(1 for ok, code, _, _ in results if not ok and code != 401)
    p50 = statistics.median(genuine)
    p99 = genuine[min(len(genuine) - 1, int(len(genuine) * 0.99))]
    print(f"genuine answered 202: {len(answered)} of {len(genuine)}; distinct runs named: {len(per_tag)}")
    print(
        f"slowest genuine answer: {genuine[-1]:.3f} s; within GitLab's 10 s: {sum(s < 10 for s in genuine)}"
    )
    print(
        f"deliveries {len(results)}: runs {runs} of {len(tags)} expected, forged accepted {accepted_forged}, "
        f"p50 {p50:.3f} s, p99 {p99:.3f} s"
    )


if __name__ == "__main__":
    main()
