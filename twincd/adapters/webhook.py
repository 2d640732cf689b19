"""`twincd webhook`: GitLab "Tag Push Hook" events start runs of the Prefect ``deploy`` deployment,
and "Merge Request Hook" events resume the runs that wait for that MR's merge or close.

Prefect's incoming webhooks are a Prefect Cloud feature; on a self-hosted server this small
Starlette app is the receiving end. It answers fast and does no deploying itself: it checks the
delivery, maps the project to an app, and creates a flow run through the Prefect API with the
idempotency key ``<project>:<tag>:<sha>``, so GitLab's retries and duplicate deliveries all land
on one run (the Prefect server returns the existing run for a known key).

Answers: 401 wrong or missing ``X-Gitlab-Token``; 413 body over ``max_body``; 400 not JSON or not
a tag push payload; 202 ``{"ignored": reason}`` for tag deletions, other event kinds, tags that
are not releases of the app and projects mapped to no app; 202 ``{"flow_run_id": ...}`` for a run,
or ``{"pending": true, "idempotency_key": ...}`` when the run takes longer than ``answer_within``
to create (it is still created); 503 when the Prefect API cannot be reached (GitLab shows it in
the hook's recent events).

An unmapped project is not an error of the delivery: a group-level hook sends the events of every
project in the group, and GitLab disables a hook that keeps failing ("Project or group webhooks
that fail four consecutive times are automatically disabled"; 4xx answers were disabled
permanently, since GitLab 17.x 4xx and 5xx are disabled temporarily and permanently after 40:
https://docs.gitlab.com/ee/user/project/integrations/webhooks.html#auto-disabled-webhooks,
gitlab-org/gitlab!166329). A 404 for every other project of the group would switch off the
deploys of the mapped ones, so it is answered 202 ``{"ignored": ...}`` and logged.

Replays and concurrent deliveries of one tag share one run creation through one Prefect client
(``_Runs``), so a burst costs one Prefect call per tag, not per delivery.

A Merge Request Hook (``object_kind: merge_request``) with ``object_attributes.action`` ``merge``
or ``close`` resumes the runs suspended while waiting for that project's MR (twincd.adapters.waits)
with who did it (``user.username``); other actions (open, update, approved, ...) are answered 202
``{"ignored": ...}``. A delivery GitLab sends again (the same ``Idempotency-Key``) is answered
from memory. The run is not told what happened, only to look at the forge: it reads the MR and
decides, so a forged or stale event cannot merge or close anything; the token check still
applies first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from twincd.adapters.secrets import Secret
from twincd.config import Environment
from twincd.errors import ConfigError
from twincd.release import BadTag, check_tag

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # GitLab tag push payloads are a few KiB; commits lists are capped at 20
PATH = "/hooks/gitlab"
ANSWER_WITHIN = 1.0  # seconds a delivery waits for its run before it is answered `pending`
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # SHA-1, or SHA-256 object format


@dataclass(frozen=True)
class MergeRequestEvent:
    """The fields of a GitLab Merge Request Hook payload that twincd uses."""

    project: str  # project.path_with_namespace of the MR's target project
    iid: int
    action: str  # object_attributes.action: open, update, approved, merge, close, reopen, ...
    user: str  # user.username: who did it


@dataclass(frozen=True)
class TagPush:
    """The fields of a GitLab Tag Push Hook payload that twincd uses."""

    project: str  # project.path_with_namespace, e.g. "apps/hello"
    tag: str
    sha: str | None  # checkout_sha: the tagged commit; None when the tag was deleted


class MalformedEvent(ValueError):
    pass


class _TooLarge(Exception):
    pass


def parse_tag_push(payload: object) -> TagPush | None:
    """The tag push in ``payload``; None for other event kinds; MalformedEvent when fields are wrong."""
    if not isinstance(payload, dict):
        raise MalformedEvent("the body must be a JSON object")
    if payload.get("object_kind") != "tag_push":
        return None
    ref, project, sha = payload.get("ref"), payload.get("project"), payload.get("checkout_sha")
    if not isinstance(ref, str) or not ref.startswith("refs/tags/") or ref == "refs/tags/":
        raise MalformedEvent("`ref` must be a string refs/tags/<tag>")
    path = project.get("path_with_namespace") if isinstance(project, dict) else None
    if not isinstance(path, str) or not path:
        raise MalformedEvent("`project.path_with_namespace` must be a non-empty string")
    if sha is not None and (not isinstance(sha, str) or not _SHA.match(sha)):
        raise MalformedEvent("`checkout_sha` must be null or a commit SHA")
    return TagPush(project=path, tag=ref.removeprefix("refs/tags/"), sha=sha)


def parse_merge_request(payload: dict[str, Any]) -> MergeRequestEvent:
    """The merge request event in ``payload`` (``object_kind`` already ``merge_request``)."""
    attributes, project, user = payload.get("object_attributes"), payload.get("project"), payload.get("user")
    if not isinstance(attributes, dict):
        raise MalformedEvent("`object_attributes` must be an object")
    iid, action = attributes.get("iid"), attributes.get("action")
    if not isinstance(iid, int) or isinstance(iid, bool) or iid < 1:
        raise MalformedEvent("`object_attributes.iid` must be a positive integer")
    if not isinstance(action, str):
        raise MalformedEvent("`object_attributes.action` must be a string")
    path = project.get("path_with_namespace") if isinstance(project, dict) else None
    if not isinstance(path, str) or not path:
        raise MalformedEvent("`project.path_with_namespace` must be a non-empty string")
    username = user.get("username") if isinstance(user, dict) else None
    return MergeRequestEvent(path, iid, action, username if isinstance(username, str) else "")


def default_projects(env: Environment) -> dict[str, str]:
    """Project name → app, by the basename of each app's repository (``apps/hello`` ↔ ``…/hello.git``).

    Only the last path segment is compared, so ``team-a/hello`` and ``team-b/hello`` both match:
    pass ``projects=`` (full paths) when project names are not unique on the GitLab instance.
    """
    return {PurePosixPath(app.repo).name.removesuffix(".git").lower(): name for name, app in env.apps.items()}


def create_app(
    env: Environment,
    *,
    secret: Secret | str,
    deployment: str = "deploy/deploy",
    max_body: int = MAX_BODY,
    projects: Mapping[str, str] | None = None,
    answer_within: float = ANSWER_WITHIN,
) -> Starlette:
    """The webhook app. ``projects`` maps GitLab ``path_with_namespace`` to an app name."""
    token = secret.reveal() if isinstance(secret, Secret) else secret
    if not token:
        raise ConfigError("the webhook secret is empty: GitLab's X-Gitlab-Token would not be checked")
    expected = token.encode()
    exact = _exact_projects(env, projects)
    by_basename = default_projects(env)
    runs = _Runs(deployment)
    resumes = _Resumes(answer_within)

    def app_of(project: str) -> str | None:
        if exact is not None:
            return exact.get(project.lower())
        return by_basename.get(project.rsplit("/", 1)[-1].lower())

    async def receive(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            payload = await _payload(request, expected, max_body)
            if payload.get("object_kind") == "merge_request":
                delivery = request.headers.get("idempotency-key") or request.headers.get(
                    "x-gitlab-event-uuid", ""
                )
                return await resumes.answer(delivery, payload)
            event = _tag_push(payload)
            app = _release_app(env, event, app_of(event.project))
        except _Answered as answered:
            return answered.response
        return await _start_run(runs, app, event, t0, answer_within)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One Prefect client for the process (its connection pool and TLS context built once, not
        # per delivery), and the deployment looked up at startup: a missing one is reported before
        # the first tag is pushed, and the first delivery does not pay for the lookup.
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            runs.client = resumes.client = client
            try:
                await runs.deployment_id()
            except Exception as e:  # noqa: BLE001 - serve anyway: every delivery looks it up again
                log.warning("webhook starting without deployment %s: %s", deployment, e)
            yield
            # Deliveries answered `pending` were promised a run: finish creating them first.
            await runs.drain(timeout=30)
            runs.client = resumes.client = None

    return Starlette(
        routes=[Route(PATH, receive, methods=["POST"]), Route("/healthz", health, methods=["GET"])],
        lifespan=lifespan,
    )


def _exact_projects(env: Environment, projects: Mapping[str, str] | None) -> dict[str, str] | None:
    """``projects`` with lower-cased keys, each checked to name an app of ``env``; None if not given."""
    if projects is None:
        return None
    exact = {k.lower(): v for k, v in projects.items()}
    for project, app in exact.items():
        if app not in env.apps:
            raise ConfigError(
                f"webhook project {project!r} maps to unknown app {app!r} "
                f"(known apps: {', '.join(sorted(env.apps))})"
            )
    return exact


class _Answered(Exception):
    """A delivery answered without creating a run: refused, malformed or ignored."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _payload(request: Request, expected: bytes, max_body: int) -> dict[str, Any]:
    """The delivery's JSON object, once its token and size are checked; raises _Answered if not."""
    # Constant-time comparison of bytes: a timing side channel cannot guess the token.
    given = request.headers.get("x-gitlab-token", "").encode()
    if not hmac.compare_digest(given, expected):
        raise _Answered(_answer(401, {"error": "missing or wrong X-Gitlab-Token"}))
    try:
        body = await _read_capped(request, max_body)
    except _TooLarge:
        raise _Answered(_answer(413, {"error": f"body larger than {max_body} bytes"})) from None
    except ClientDisconnect:
        raise _Answered(
            _answer(400, {"error": "the client disconnected before sending the whole body"})
        ) from None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise _Answered(_answer(400, {"error": "malformed event: the body is not JSON"})) from None
    if not isinstance(payload, dict):
        raise _Answered(_answer(400, {"error": "malformed event: the body must be a JSON object"}))
    return payload


def _tag_push(payload: dict[str, Any]) -> TagPush:
    """The payload's tag push of a tag that exists; raises _Answered for anything else."""
    try:
        event = parse_tag_push(payload)
    except MalformedEvent as e:
        raise _Answered(_answer(400, {"error": f"malformed tag push event: {e}"})) from None
    if event is None:
        raise _Answered(_ignored("not a Tag Push Hook or Merge Request Hook event"))
    if event.sha is None:
        raise _Answered(_ignored(f"tag {event.tag} of {event.project} was deleted"))
    return event


class _Resumes:
    """Merge Request Hook deliveries → the runs waiting for that MR, told to look at the forge.

    A delivery is known again by its ``Idempotency-Key`` (GitLab keeps it across retries and
    "Resend request"; webhooks docs, "Delivery headers", gitlab-org/gitlab!160952), else its
    ``X-Gitlab-Event-UUID`` (shared by the hooks one event triggers), with the project, MR and
    action: its answer is given again without a Prefect call. Finding the runs costs a read per
    waiting run, so a delivery is answered 202 ``pending`` after ``answer_within`` and the resume
    goes on (GitLab gives a hook 10 s; a lost one is made up for by watch-waits).
    """

    MAX_EVENTS = 10_000

    def __init__(self, answer_within: float) -> None:
        self.client: PrefectClient | None = None
        self.answer_within = answer_within
        self._answered: OrderedDict[str, asyncio.Task[tuple[int, dict[str, Any]]]] = OrderedDict()

    async def answer(self, delivery: str, payload: dict[str, Any]) -> JSONResponse:
        try:
            event = parse_merge_request(payload)
        except MalformedEvent as e:
            return _answer(400, {"error": f"malformed merge request event: {e}"})
        if event.action not in ("merge", "close"):
            return _ignored(f"merge request action {event.action!r}: only merge and close resume a run")
        if self.client is None:
            raise RuntimeError("the webhook's Prefect client is not open (served outside its lifespan?)")
        key = f"{delivery}:{event.project}!{event.iid}:{event.action}" if delivery else ""
        known = self._answered.get(key) if key else None
        replayed = known is not None
        if known is None:
            known = asyncio.get_running_loop().create_task(self._resume(self.client, event))
            if key:
                self._answered[key] = known
                while len(self._answered) > self.MAX_EVENTS:
                    self._answered.popitem(last=False)
        try:
            status, body = await asyncio.wait_for(asyncio.shield(known), self.answer_within)
        except TimeoutError:
            return _answer(202, {"pending": True, "merge_request": f"{event.project}!{event.iid}"})
        except Exception as e:  # noqa: BLE001 - the Prefect API is down: GitLab may redeliver
            if key and self._answered.get(key) is known:
                self._answered.pop(key)  # not done: a redelivery tries again
            log.warning(
                "merge request %s!%d: could not resume: %s", event.project, event.iid, type(e).__name__
            )
            return _answer(
                503,
                {"error": f"the Prefect API did not answer ({type(e).__name__}); redeliver later"},
                headers={"Retry-After": "30"},
            )
        return _answer(status, {**body, **({"replayed": True} if replayed else {})})

    async def _resume(self, client: PrefectClient, event: MergeRequestEvent) -> tuple[int, dict[str, Any]]:
        from twincd.adapters import waits

        ref = f"!{event.iid}"
        waiting = [
            w
            for w in await waits.waiting_runs(client)
            if w.waiting.mr is not None
            and w.waiting.mr.ref == ref
            and w.waiting.project.lower() == event.project.lower()
        ]
        if not waiting:
            log.info("merge request %s%s %s: no run waits for it", event.project, ref, event.action)
            return 202, {"ignored": f"no run waits for {event.project}{ref}"}
        # Not an answer but "look at the forge": the run reads the MR and decides (a forged or
        # stale event, or one about an MR reopened since, cannot merge or close anything).
        merged = event.action == "merge"
        run_input = waits.answer(
            approved=False,
            approver=event.user,
            comment=f"{'merged' if merged else 'closed'} on GitLab",
            seen_on_forge=True,
        )
        resumed: list[str] = []
        skipped: list[str] = []
        for w in waiting:
            why = await waits.resume(client, w.id, run_input)
            (skipped if why else resumed).append(why or str(w.id))
        log.info(
            "merge request %s%s %s by %s: resumed %s", event.project, ref, event.action, event.user, resumed
        )
        return 202, {"resumed": resumed, **({"not_resumed": skipped} if skipped else {})}


def _release_app(env: Environment, event: TagPush, app: str | None) -> str:
    """``app`` (the event's project's app) if the tag is one of its releases; raises _Answered if not."""
    if app is None:
        # 202, not 404: see the module docstring (group hooks; GitLab disables failing hooks).
        raise _Answered(_ignored(f"project {event.project} is not mapped to an app of {env.source}"))
    try:
        check_tag(app=app, tag=event.tag, pattern=env.apps[app].tag_pattern)
    except BadTag as e:
        raise _Answered(_ignored(str(e))) from None
    return app


async def _start_run(runs: _Runs, app: str, event: TagPush, t0: float, answer_within: float) -> JSONResponse:
    """Create the run of the deployment for ``event`` (one per project, tag and commit).

    GitLab gives a hook 10 s and asks receivers to answer fast and queue slow work (its webhook
    docs, "Webhook receiver requirements"); a burst queues run creations on the Prefect server.
    So a creation that takes longer than ``answer_within`` is answered 202 ``pending`` and goes on
    in the background; a failure after that is logged with the key, for a redelivery from
    GitLab's "Recent events".
    """
    key = f"{event.project}:{event.tag}:{event.sha}"
    creation = runs.start({"app": app, "tag": event.tag}, key)
    try:
        run_id = await asyncio.wait_for(asyncio.shield(creation), answer_within)
    except TimeoutError:
        log.info(
            "tag push %s %s: run %s still being created; answered pending", event.project, event.tag, key
        )
        return _answer(202, {"pending": True, "app": app, "tag": event.tag, "idempotency_key": key})
    except _DeploymentMissing as e:
        log.error("%s", e)
        return _answer(500, {"error": str(e)})
    except Exception as e:  # noqa: BLE001 - the Prefect API is down or refused: GitLab may redeliver
        log.warning("could not create a %s run for %s: %s", runs.deployment, key, type(e).__name__)
        return _answer(
            503,
            {"error": f"the Prefect API did not accept the run ({type(e).__name__}); redeliver later"},
            headers={"Retry-After": "30"},
        )
    log.info(
        "tag push %s %s -> %s run %s (%.0f ms)",
        event.project,
        event.tag,
        runs.deployment,
        run_id,
        (time.perf_counter() - t0) * 1000,
    )
    return _answer(202, {"flow_run_id": str(run_id), "app": app, "tag": event.tag, "idempotency_key": key})


class _DeploymentMissing(Exception):
    pass


class _Runs:
    """Runs of one deployment by idempotency key, through one Prefect client.

    GitLab redelivers a hook it thinks failed, and people replay them from the UI: the Prefect
    server answers a known idempotency key with the existing run, but each such call still costs
    a request and a database transaction (the queue behind a burst). Here a key seen before is
    answered from memory, and deliveries of a key whose run is being created share that one
    creation instead of making their own; a creation that failed is forgotten, so a redelivery
    tries again.
    """

    MAX_KEYS = 10_000  # remembered keys; the oldest are forgotten (the server still dedupes them)

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.client: PrefectClient | None = None
        self._id: UUID | None = None
        self._runs: OrderedDict[str, asyncio.Task[UUID]] = OrderedDict()

    async def deployment_id(self) -> UUID:
        if self._id is None:
            self._id = await _deployment_id(await self._client(), self.deployment)
        return self._id

    def start(self, parameters: dict[str, Any], key: str) -> asyncio.Task[UUID]:
        """The creation of the run for ``key``: the one already started, or a new one."""
        known = self._runs.get(key)
        if known is not None:
            return known
        task = asyncio.get_running_loop().create_task(self._create(parameters, key))
        task.add_done_callback(lambda done: self._finished(key, done))
        self._runs[key] = task
        while len(self._runs) > self.MAX_KEYS:
            self._runs.popitem(last=False)
        return task

    async def drain(self, *, timeout: float) -> None:
        """Wait for the creations still under way (at shutdown)."""
        pending = [t for t in self._runs.values() if not t.done()]
        if pending:
            log.info("finishing %d run creation(s) before stopping", len(pending))
            await asyncio.wait(pending, timeout=timeout)

    def _finished(self, key: str, task: asyncio.Task[UUID]) -> None:
        error = None if task.cancelled() else task.exception()  # retrieved: no "never retrieved"
        if task.cancelled() or error is not None:
            if self._runs.get(key) is task:
                self._runs.pop(key)  # not created: the next delivery tries again
            why = "cancelled" if error is None else type(error).__name__
            log.warning("creating the run for %s failed (%s): a redelivery tries again", key, why)

    async def _create(self, parameters: dict[str, Any], key: str) -> UUID:
        from prefect.exceptions import ObjectNotFound

        client = await self._client()
        for attempt in (1, 2):
            deployment_id = await self.deployment_id()
            try:
                run = await client.create_flow_run_from_deployment(
                    deployment_id, parameters=parameters, idempotency_key=key
                )
                return run.id
            except ObjectNotFound:
                # The deployment was re-created under a new id since it was looked up: again.
                self._id = None
                if attempt == 2:
                    raise _DeploymentMissing(
                        f"deployment {self.deployment} vanished while creating a run"
                    ) from None
        raise AssertionError("unreachable")

    async def _client(self) -> PrefectClient:
        if self.client is None:
            raise RuntimeError("the webhook's Prefect client is not open (served outside its lifespan?)")
        return self.client


async def _deployment_id(client: PrefectClient, deployment: str) -> UUID:
    from prefect.exceptions import ObjectNotFound

    try:
        return (await client.read_deployment_by_name(deployment)).id
    except ObjectNotFound:
        raise _DeploymentMissing(
            f"no deployment {deployment} on the Prefect server at {client.api_url}: "
            "start `twincd serve` or run `prefect deploy`"
        ) from None


def _answer(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _ignored(reason: str) -> JSONResponse:
    log.info("ignored delivery: %s", reason)
    return _answer(202, {"ignored": reason})


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes (declared or actually streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge  # refused before reading a byte
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # chunked bodies carry no Content-Length
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def serve(
    env: Environment,
    *,
    secret: Secret,
    host: str = "127.0.0.1",
    port: int = 8085,
    deployment: str = "deploy/deploy",
    projects: Mapping[str, str] | None = None,
    max_body: int = 1024 * 1024,
    answer_within: float = ANSWER_WITHIN,
) -> None:
    """Serve the webhook until interrupted (``twincd webhook``)."""
    import uvicorn

    app = create_app(
        env,
        secret=secret,
        deployment=deployment,
        projects=projects,
        max_body=max_body,
        answer_within=answer_within,
    )
    # The access log shows method, path and status; the token travels in a header and is never logged.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
