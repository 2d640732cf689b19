"""The tag-push webhook over real HTTP, creating runs on a real Prefect server (the test harness).

The ``deploy`` deployment here belongs to a stub flow with the real one's name and parameters:
the webhook only creates runs (no worker picks them up), so what is checked is the run the
Prefect server holds: its deployment, parameters and idempotency.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import uvicorn
from prefect import flow
from prefect.blocks.system import Secret as PrefectSecret
from prefect.client.orchestration import get_client
from starlette.applications import Starlette

from tests.fakes.gitlab import HOOK_FAILURES_TO_DISABLE, FakeGitlab
from twincd.adapters.secrets import SecretNotFound, resolve_secret
from twincd.adapters.webhook import PATH, create_app
from twincd.config import DEFAULT_ENV, Environment, load_environment

pytestmark = pytest.mark.integration

SECRET = "hook-secret-0123456789"
SHA = "4f2a" * 10


@flow(name="deploy")
def deploy_stub(app: str, tag: str, env: str = "") -> None:
    """Stands in for flows/deploy.py:deploy; never runs here (no worker)."""


@pytest.fixture(scope="session")
def deployment_id(prefect_harness: None) -> UUID:
    deployment = deploy_stub.to_deployment(name="deploy")
    result = deployment.apply()
    assert isinstance(result, UUID)
    return result


@pytest.fixture(scope="session")
def env() -> Environment:
    return load_environment(DEFAULT_ENV)  # app `hello`, repo .twincd/git/hello.git


def _serve(app: Starlette) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def hook(env: Environment, deployment_id: UUID) -> Iterator[str]:
    """The webhook URL (projects mapped by repository basename)."""
    # Room for a slow run creation on a loaded machine: the answer always names the run here.
    app = create_app(env, secret=SECRET, max_body=64 * 1024, answer_within=30)
    yield from (f"{url}{PATH}" for url in _serve(app))


def tag_push(tag: str = "v1.2.3", *, sha: str | None = SHA, project: str = "apps/hello") -> dict[str, Any]:
    """A GitLab Tag Push Hook payload (trimmed to what GitLab always sends)."""
    return {
        "object_kind": "tag_push",
        "event_name": "tag_push",
        "ref": f"refs/tags/{tag}",
        "before": "0" * 40,
        "after": sha or "0" * 40,
        "checkout_sha": sha,
        "user_name": "dev",
        "project": {"id": 7, "path_with_namespace": project, "name": project.rsplit("/", 1)[-1]},
        "commits": [],
        "total_commits_count": 0,
    }


def post(url: str, body: object, *, token: str | None = SECRET, raw: bytes | None = None) -> httpx.Response:
    headers = {"X-Gitlab-Event": "Tag Push Hook", "Content-Type": "application/json"}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return httpx.post(
        url, content=raw if raw is not None else json.dumps(body).encode(), headers=headers, timeout=30
    )


@pytest.mark.parametrize("token", [None, "", "wrong", SECRET + "x"])
def test_missing_or_wrong_token_is_401(hook: str, token: str | None) -> None:
    r = post(hook, tag_push(), token=token)
    assert r.status_code == 401 and "X-Gitlab-Token" in r.json()["error"]


def test_oversized_body_is_413_declared_or_streamed(hook: str) -> None:
    big = json.dumps({**tag_push(), "padding": "x" * 70_000}).encode()
    assert post(hook, None, raw=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to refuse up front
        yield from (big[i : i + 8192] for i in range(0, len(big), 8192))

    r = httpx.post(hook, content=chunks(), headers={"X-Gitlab-Token": SECRET}, timeout=30)
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({**tag_push(), "ref": "refs/heads/main"}).encode(), "refs/tags/"),
        (json.dumps({**tag_push(), "project": None}).encode(), "path_with_namespace"),
        (json.dumps({**tag_push(), "checkout_sha": "$(reboot)"}).encode(), "checkout_sha"),
    ],
)
def test_malformed_body_is_400(hook: str, raw: bytes, reason: str) -> None:
    r = post(hook, None, raw=raw)
    assert r.status_code == 400 and reason in r.json()["error"]


def test_tag_deletion_is_ignored(hook: str) -> None:
    r = post(hook, tag_push(sha=None))
    assert r.status_code == 202 and "deleted" in r.json()["ignored"]


@pytest.mark.parametrize(
    ("tag", "reason"), [("latest", "tag_pattern"), ("v1.0.0..x", "not a safe release tag")]
)
def test_tag_that_is_no_release_is_ignored(hook: str, tag: str, reason: str) -> None:
    r = post(hook, tag_push(tag))
    assert r.status_code == 202 and reason in r.json()["ignored"]


def test_other_event_kinds_are_ignored(hook: str) -> None:
    r = post(hook, {**tag_push(), "object_kind": "push", "ref": "refs/heads/main"})
    assert r.status_code == 202 and "not a Tag Push Hook" in r.json()["ignored"]


def test_unknown_project_is_ignored_with_202(hook: str) -> None:
    # A group hook sends every project's events; a 4xx would get the hook disabled by GitLab.
    r = post(hook, tag_push(project="apps/unknown"))
    assert r.status_code == 202 and "apps/unknown is not mapped" in r.json()["ignored"]
    assert "flow_run_id" not in r.json()


async def _read_run(run_id: str) -> Any:
    async with get_client() as client:
        return await client.read_flow_run(UUID(run_id))


async def _create_run_directly(deployment_id: UUID, key: str) -> UUID:
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment_id, parameters={"app": "hello", "tag": "v1.2.3"}, idempotency_key=key
        )
        return run.id


def test_release_tag_creates_one_run_and_replays_land_on_it(hook: str, deployment_id: UUID) -> None:
    import asyncio

    timings = []
    ids = []
    for _ in range(3):  # the delivery, then GitLab's retry and a manual redelivery
        t0 = time.perf_counter()
        r = post(hook, tag_push("v1.2.3"))
        timings.append(time.perf_counter() - t0)
        assert r.status_code == 202, r.text
        ids.append(r.json()["flow_run_id"])
    assert len(set(ids)) == 1
    run = asyncio.run(_read_run(ids[0]))
    assert run.deployment_id == deployment_id
    assert run.parameters == {"app": "hello", "tag": "v1.2.3"}
    assert run.idempotency_key == f"apps/hello:v1.2.3:{SHA}"
    # For comparison, the one Prefect API call the webhook makes per delivery, made directly.
    t0 = time.perf_counter()
    asyncio.run(_create_run_directly(deployment_id, f"apps/hello:v1.2.3:{SHA}"))
    direct = time.perf_counter() - t0
    print(
        f"webhook answer times: first {timings[0] * 1000:.0f} ms, replays "
        + ", ".join(f"{t * 1000:.0f} ms" for t in timings[1:])
        + f"; the Prefect call alone (new client): {direct * 1000:.0f} ms"
    )
    # ~50-150 ms on an idle machine; the bound is GitLab's: it times a webhook out after 10 s.
    assert max(timings) < 5.0

    # The same tag moved to another commit is another release: a new run.
    other = post(hook, tag_push("v1.2.3", sha="9" * 40)).json()["flow_run_id"]
    assert other != ids[0]


def test_a_burst_of_replays_and_forgeries_makes_one_run_per_tag(hook: str, deployment_id: UUID) -> None:
    """40 deliveries at once: 4 tags × 8 replays (answered while the first of each is still being
    created) and 8 forged ones. Exactly one run per tag, every replay names it, nothing forged in."""
    import asyncio

    tags = [f"v7.0.{i}" for i in range(4)]

    async def burst() -> list[httpx.Response]:
        headers = {"X-Gitlab-Event": "Tag Push Hook", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=30) as client:
            sends = [
                client.post(
                    hook,
                    content=json.dumps(tag_push(t)).encode(),
                    headers={**headers, "X-Gitlab-Token": SECRET},
                )
                for t in tags
                for _ in range(8)
            ] + [
                client.post(
                    hook,
                    content=json.dumps(tag_push("v7.0.9")).encode(),
                    headers={**headers, "X-Gitlab-Token": "forged"},
                )
                for _ in range(8)
            ]
            return list(await asyncio.gather(*sends))

    answers = asyncio.run(burst())
    genuine, forged = answers[:32], answers[32:]
    assert [r.status_code for r in forged] == [401] * 8
    assert all(r.status_code == 202 for r in genuine), [r.text for r in genuine if r.status_code != 202]
    by_tag: dict[str, set[str]] = {}
    for r in genuine:
        by_tag.setdefault(r.json()["tag"], set()).add(r.json()["flow_run_id"])
    assert sorted(by_tag) == tags and all(len(ids) == 1 for ids in by_tag.values())

    async def runs_by_key() -> dict[str | None, int]:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        async with get_client() as client:
            found = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200
            )
        counts: dict[str | None, int] = {}
        for run in found:
            counts[run.idempotency_key] = counts.get(run.idempotency_key, 0) + 1
        return counts

    counts = asyncio.run(runs_by_key())
    assert [counts.get(f"apps/hello:{t}:{SHA}") for t in tags] == [1, 1, 1, 1]
    assert f"apps/hello:v7.0.9:{SHA}" not in counts


def test_a_slow_run_creation_is_answered_pending_and_still_made_once(
    env: Environment, deployment_id: UUID
) -> None:
    """GitLab wants a fast answer: past ``answer_within`` the delivery is answered 202 pending, the
    run is still created, and a replay afterwards names that one run."""
    for url in _serve(create_app(env, secret=SECRET, answer_within=0)):
        first = post(url + PATH, tag_push("v8.1.0"))
        assert first.status_code == 202 and first.json()["pending"] is True
        assert first.json()["idempotency_key"] == f"apps/hello:v8.1.0:{SHA}"
        deadline = time.monotonic() + 30
        while "flow_run_id" not in (replay := post(url + PATH, tag_push("v8.1.0")).json()):
            assert time.monotonic() < deadline, replay
            time.sleep(0.2)
    run = asyncio.run(_read_run(replay["flow_run_id"]))
    assert run.idempotency_key == f"apps/hello:v8.1.0:{SHA}" and run.deployment_id == deployment_id


def test_explicit_project_mapping_and_missing_deployment(env: Environment, deployment_id: UUID) -> None:
    app = create_app(
        env, secret=SECRET, projects={"Platform/Hello-Service": "hello"}, deployment="deploy/missing"
    )
    for url in _serve(app):
        ignored = post(url + PATH, tag_push(project="apps/hello"))  # basenames no longer count
        assert ignored.status_code == 202 and "not mapped" in ignored.json()["ignored"]
        r = post(url + PATH, tag_push(project="platform/hello-service"))
        assert r.status_code == 500 and "no deployment deploy/missing" in r.json()["error"]


def test_secret_references_resolve_from_prefect_blocks(prefect_harness: None) -> None:
    # Here because this module has a Prefect server: `secret:NAME` reads a Prefect Secret block.
    PrefectSecret(value=SECRET).save("twincd-webhook-test", overwrite=True)
    resolved = resolve_secret("secret:twincd-webhook-test")
    assert resolved.reveal() == SECRET and SECRET not in f"{resolved} {resolved!r}"
    with pytest.raises(SecretNotFound, match="no Prefect Secret block named 'twincd-nope'") as e:
        resolve_secret("secret:twincd-nope")
    with pytest.raises(SecretNotFound, match="TWINCD_SURELY_UNSET"):
        resolve_secret("env:TWINCD_SURELY_UNSET")
    assert SECRET not in str(e.value)


def test_a_group_hook_stays_enabled_for_projects_twincd_does_not_know(hook: str, tmp_path: Path) -> None:
    """GitLab sends a group hook every project's tag pushes and disables a hook that fails four
    times in a row (the fake does too): other projects' tags must not switch off the deploys."""
    with FakeGitlab(repo=tmp_path / "unused.git", token="glpat-unused") as gitlab_fake:
        group_hook = gitlab_fake.add_group_hook(hook, token=SECRET, group="apps")
        for i in range(HOOK_FAILURES_TO_DISABLE + 2):
            assert gitlab_fake.push_tag(f"apps/other-{i}", "v1.0.0", SHA) == [202]
        assert not group_hook.disabled
        assert gitlab_fake.push_tag("apps/hello", "v1.2.9", SHA) == [202]  # still delivered: a run
        # The same hook pointed at an endpoint that answers 404 is disabled after four deliveries.
        broken = gitlab_fake.add_group_hook(hook.replace(PATH, "/hooks/nowhere"), token=SECRET, group="ops")
        for i in range(HOOK_FAILURES_TO_DISABLE + 1):
            gitlab_fake.push_tag(f"ops/tool-{i}", "v1.0.0", SHA)
        assert broken.disabled and [s for _, s in broken.deliveries] == [404] * HOOK_FAILURES_TO_DISABLE


def merge_request_event(
    iid: int, action: str, *, project: str = "infra/manifests", user: str = "alice"
) -> dict[str, Any]:
    """A GitLab Merge Request Hook payload (trimmed to what GitLab always sends)."""
    return {
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 9, "name": user.title(), "username": user},
        "project": {"id": 42, "path_with_namespace": project},
        "object_attributes": {
            "iid": iid,
            "action": action,
            "state": "merged" if action == "merge" else "closed",
        },
    }


def _suspended_run(deployment_id: UUID, iid: int, tag: str) -> UUID:
    """A run of the deployment suspended while it waits for MR ``iid``, with its record."""
    from prefect.states import Running, Suspended

    from twincd.adapters import waits
    from twincd.domain import MergeRequest, Waiting

    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"app": "hello", "tag": tag})
        client.set_flow_run_state(run.id, Running(), force=True)
        client.set_flow_run_state(run.id, Suspended(timeout_seconds=3600, pause_key="approve-x"), force=True)
    mr = MergeRequest(f"!{iid}", f"twincd/hello/{tag}", "main", "t", "opened", "https://gitlab.example/mr")
    waits.record(
        run.id, "approve-x", Waiting(mr, "env.yaml", "2999-01-01T00:00:00+00:00", project="infra/manifests")
    )
    return run.id


def _state(run_id: UUID) -> str:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None
    return str(state.type.value)


def test_a_merge_request_hook_resumes_the_run_that_waits_for_it(hook: str, deployment_id: UUID) -> None:
    waiting = _suspended_run(deployment_id, 31, "v3.1.0")
    other = _suspended_run(deployment_id, 32, "v3.2.0")
    headers = {"X-Gitlab-Token": SECRET, "X-Gitlab-Event": "Merge Request Hook", "Idempotency-Key": "k-31"}

    assert (
        httpx.post(
            hook, json=merge_request_event(31, "merge"), headers={**headers, "X-Gitlab-Token": "x"}
        ).status_code
        == 401
    )
    ignored = httpx.post(hook, json=merge_request_event(31, "update"), headers=headers, timeout=30)
    assert ignored.status_code == 202 and "only merge and close" in ignored.json()["ignored"]
    elsewhere = httpx.post(
        hook, json=merge_request_event(31, "merge", project="other/repo"), headers=headers, timeout=30
    )
    assert elsewhere.status_code == 202 and "no run waits" in elsewhere.json()["ignored"]
    assert _state(waiting) == "PAUSED"

    resumed = httpx.post(hook, json=merge_request_event(31, "merge"), headers=headers, timeout=30)
    assert resumed.status_code == 202 and resumed.json()["resumed"] == [str(waiting)], resumed.text
    assert _state(waiting) == "SCHEDULED" and _state(other) == "PAUSED"  # only the run of !31
    again = httpx.post(hook, json=merge_request_event(31, "merge"), headers=headers, timeout=30)
    assert again.json() == {**resumed.json(), "replayed": True}  # GitLab's retry: answered from memory
    closed = httpx.post(
        hook,
        json=merge_request_event(32, "close"),
        headers={**headers, "Idempotency-Key": "k-32"},
        timeout=30,
    )
    assert closed.json()["resumed"] == [str(other)] and _state(other) == "SCHEDULED"
    malformed = httpx.post(
        hook,
        json={"object_kind": "merge_request", "object_attributes": {"iid": "x"}},
        headers=headers,
        timeout=30,
    )
    assert malformed.status_code == 400 and "iid" in malformed.json()["error"]
