"""`twincd ...`: the local stack, deploys, approvals and serving the flows.

Prefect is imported only by the commands that need it, after PREFECT_API_URL points at the
stack's server: without it every command would start a throwaway server (20-30 s each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twincd.adapters import waits
from twincd.config import DEFAULT_ENV, REPO_ROOT, Environment, load_environment
from twincd.errors import ConfigError, TwincdError


def _use_prefect(env: Environment) -> None:
    from twincd.sandbox.stack import export_sandbox_secrets, prefect_env

    export_sandbox_secrets(env)
    # The environment file says which Prefect server runs its flows; it wins over the shell's.
    for key, value in prefect_env(env).items():
        if key != "PREFECT_HOME":  # the client keeps the user's own profile directory
            os.environ[key] = value
    # flows/ and tasks/ live at the repository root (prefect.yaml entrypoints).
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    _await_prefect(os.environ["PREFECT_API_URL"], float(os.environ.get(PREFECT_WAIT, "120")))


# How long a command waits for a Prefect API that does not answer before it gives up.
PREFECT_WAIT = "TWINCD_PREFECT_WAIT"


def _await_prefect(api_url: str, seconds: float) -> None:
    """Wait, with backoff, for the Prefect API to answer its health check (at most ``seconds``).

    Prefect's client retries 429/502/503 and dropped connections with backoff, but a connection
    refused only on a client that has connected before (prefect/client/base.py, "Only retry
    ConnectError after we've successfully connected once"), and every ``get_client()`` is a new
    client: a command started while the server restarts would fail at once. Once this returns there
    is a server to connect to; Prefect's retries (PREFECT_CLIENT_MAX_RETRIES, see
    stack.prefect_env) then cover a server that answers 503 or drops connections, not one that is
    gone again.
    Gives up silently: the command's first call then fails with its one-line message.
    """
    import base64

    import httpx
    from prefect.settings import get_current_settings

    # As Prefect's client reaches it: its TLS settings and credentials (prefect/client/orchestration).
    api = get_current_settings().api
    verify: bool | str = False if api.tls_insecure_skip_verify else (api.ssl_cert_file or True)
    headers = {}
    if api.key:
        headers["Authorization"] = f"Bearer {api.key.get_secret_value()}"
    elif api.auth_string:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
        )
    deadline = time.monotonic() + seconds
    delay, said = 0.5, False
    while True:
        try:
            answer = httpx.get(f"{api_url.rstrip('/')}/health", timeout=5, verify=verify, headers=headers)
            if answer.status_code < 500:
                return
            why = f"HTTP {answer.status_code}"
        except httpx.HTTPError as e:
            why = type(e).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if not said:
            print(
                f"twincd: the Prefect API at {api_url} does not answer ({why}); trying again for up to "
                f"{seconds:.0f} s (--prefect-wait; `twincd up` starts the local stack)",
                file=sys.stderr,
            )
            said = True
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 15)


def _ui_url(env: Environment, flow_run_id: Any) -> str:
    base = os.environ.get("PREFECT_API_URL", env.prefect.api_url).rstrip("/").removesuffix("/api")
    return f"{base}/runs/flow-run/{flow_run_id}"


def cmd_up(env: Environment, args: argparse.Namespace) -> int:
    from twincd.sandbox import stack

    stack.up(env)
    print(f"Prefect UI: {env.prefect.api_url.removesuffix('/api')}   stop with: twincd down")
    return 0


def cmd_down(env: Environment, args: argparse.Namespace) -> int:
    from twincd.sandbox import stack

    stack.down(env)
    return 0


def cmd_status(env: Environment, args: argparse.Namespace) -> int:
    from twincd.sandbox import stack

    states = stack.status(env)
    for name, pid in states.items():
        print(f"{name:<16} {'running (pid ' + str(pid) + ')' if pid else 'stopped'}")
    return 0 if all(states.values()) else 3


def cmd_seed(env: Environment, args: argparse.Namespace) -> int:
    from twincd.sandbox import stack

    stack.seed_repos(env)
    print("seeded: " + ", ".join([env.manifests.repo, *(a.repo for a in env.apps.values())]))
    return 0


# The flows' deployments (prefect.yaml, `twincd serve`, the local stack's runner).
DEPLOY, FAILOVER = "deploy/deploy", "failover/failover"


def _run_deploy(env: Environment, app: str, tag: str, auto_approve: bool, image: str = "") -> int:
    _use_prefect(env)
    # Nothing waits for a person: run it here, where its logs print as it goes.
    from flows.deploy import deploy

    state = deploy(
        app=app, tag=tag, env=env.source, auto_approve=auto_approve, image=image, return_state=True
    )
    print(f"\n{state.name}: {state.message or ''}".rstrip())
    print(f"Run in the Prefect UI: {_ui_url(env, state.state_details.flow_run_id)}")
    return 0 if state.is_completed() else 1


def _start_deployment(env: Environment, name: str, parameters: dict[str, Any], env_file: str | None) -> int:
    """A run of deployment ``name``, followed until it ends or waits for a person.

    A run that waits for a person must be a run of a deployment: Prefect suspends only those
    (its process exits while people take their time) and a worker, ``twincd serve`` or the local
    stack's runner takes it up again when it is resumed. The run gets ``env_file`` (``--env``)
    only when one was given, as an absolute path (a runner on this machine reads it); otherwise
    the deployment's own (workers: the Prefect Variable ``twincd_env``, a file of the clone).
    """
    _use_prefect(env)
    if env_file is not None:
        parameters = {**parameters, "env": str(Path(env_file).resolve())}
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            print(
                f"twincd: no deployment {name} on the Prefect server at {env.prefect.api_url}: "
                "a run that waits for approval runs from a deployment. Start `twincd serve` (one "
                "machine; `twincd up` starts it for the local stack) or `prefect deploy --all` and a "
                "worker; or pass --auto-approve",
                file=sys.stderr,
            )
            return 2
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    print(f"started a run of {name}: {_ui_url(env, run.id)}")
    return _follow(env, run.id)


_UNCLAIMED = 30.0  # seconds a followed run may stay Scheduled before the CLI says nobody took it up


def _follow(env: Environment, run_id: Any, *, since: datetime | None = None, poll: float = 1.0) -> int:
    """Print the run's logs (and its subflows', from ``since``) until it ends (0: Completed) or waits (0)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        LogFilterTimestamp,
        TaskRunFilter,
        TaskRunFilterId,
    )
    from prefect.client.schemas.sorting import LogSort

    printed: set[Any] = set()
    started, warned = time.monotonic(), False
    tasks: dict[Any, str] = {}  # task run id -> its name, to say whose log line it is
    ended_at: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
            )
            logs = client.read_logs(
                LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[run_id, *(r.id for r in subflows)]),
                    timestamp=LogFilterTimestamp(after_=since),  # type: ignore[arg-type]  # a datetime: pydantic takes it
                ),
                sort=LogSort.TIMESTAMP_ASC,
            )
            fresh = [log for log in logs if log.id not in printed]
            unnamed = list(
                {log.task_run_id for log in fresh if log.task_run_id and log.task_run_id not in tasks}
            )
            if unnamed:
                found = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=unnamed)))
                tasks.update({t.id: t.name for t in found})
            for log in fresh:
                printed.add(log.id)
                who = tasks.get(log.task_run_id, "") if log.task_run_id else run.name
                print(f"{log.timestamp:%H:%M:%S} | {who} | {log.message}")
            state = run.state
            if (
                state is not None
                and state.is_scheduled()
                and time.monotonic() - started > _UNCLAIMED
                and not warned
            ):
                warned = True  # a run nobody takes up: say why the wait goes on
                print(
                    f"{run.name} is still {state.name} after {_UNCLAIMED:.0f} s: is a runner "
                    "(`twincd serve`, `twincd up`) or a worker of its work pool running?",
                    file=sys.stderr,
                )
            settled = state is not None and (state.is_final() or state.is_paused())
            if settled and ended_at is None:
                ended_at = time.monotonic()
            # Logs reach the API in batches (every PREFECT_LOGGING_TO_API_BATCH_INTERVAL, 2 s)
            # after the state: read until a few quiet polls have passed.
            if ended_at is not None and not fresh and time.monotonic() - ended_at > 3 * poll + 2:
                break
            time.sleep(poll)
    assert state is not None
    print(f"\n{state.name}: {state.message or ''}".rstrip())
    if state.is_paused() and (state.state_details.pause_key or "").startswith(waits.TURN):
        print(
            f"{run.name} waits for its turn behind an earlier change of the same app (nothing runs meanwhile)"
        )
    elif state.is_paused():
        p = run.parameters
        command = f"{p['app']} {p['tag']}" if "app" in p else p.get("mode", "")
        print(
            f"{run.name} waits for a person (nothing runs meanwhile): approve it in the Prefect UI or "
            f"with `twincd approve {command}` (`--refuse` to refuse), or merge or close its MR on the forge"
        )
    print(f"Run in the Prefect UI: {_ui_url(env, run_id)}")
    return 0 if state.is_completed() or state.is_paused() else 1


def cmd_deploy(env: Environment, args: argparse.Namespace) -> int:
    env.app(args.app)  # an unknown app fails here, before Prefect is even imported
    if not args.auto_approve:  # it waits for a person: a run of the deployment
        return _start_deployment(
            env, DEPLOY, {"app": args.app, "tag": args.tag, "image": args.image}, args.env
        )
    return _run_deploy(env, args.app, args.tag, True, args.image)


def _resume(env: Environment, name: str, run_input: dict[str, Any], run_id: str = "") -> int:
    """Resume the waiting run called ``name`` (or with id ``run_id``) with ``run_input`` (the UI's form)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        waiting = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(like_=name.removesuffix("*")),
                state=FlowRunFilterState(name=FlowRunFilterStateName(any_=list(waits.WAITING_STATES))),
            )
        )
        runs = [
            r
            for r in waiting
            if (r.name == name or name.endswith("*") and r.name.startswith(name[:-1]))
            and (not run_id or str(r.id) == run_id)
        ]
    if not runs:
        print(
            f"no waiting run named {name}{' with id ' + run_id if run_id else ''}: "
            "nothing waits for approval",
            file=sys.stderr,
        )
        return 2
    if len(runs) > 1:
        # Never guess which one a person meant to approve.
        print(
            f"{len(runs)} waiting runs are named {name}; choose one with --run:\n"
            + "\n".join(f"  {r.id}  started {r.start_time}" for r in runs),
            file=sys.stderr,
        )
        return 2
    if (runs[0].state and runs[0].state.state_details.pause_key or "").startswith(waits.TURN):
        print(
            f"{name} waits for its turn behind an earlier change, not for approval: it asks for "
            "approval once that one ended",
            file=sys.stderr,
        )
        return 2
    refused = _cannot_answer(env, runs[0])
    if refused:
        print(refused, file=sys.stderr)
        return 2
    resumed_at = datetime.now(UTC)
    resume_flow_run(runs[0].id, run_input=run_input)
    print(f"{'approved' if run_input['approved'] else 'refused'} {name}: {_ui_url(env, runs[0].id)}")
    if runs[0].state_name == "Paused":
        return 0  # a run paused in its own process goes on there; only a suspended one is taken up anew
    return _follow(env, runs[0].id, since=resumed_at)


def _cannot_answer(env: Environment, run: Any) -> str:
    """Why ``run`` cannot take a person's answer ("" when it can): its process died while it was
    paused in it, or its MR was already merged or closed on the forge (the forge decided)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from twincd import wiring

    async def check() -> tuple[str, str]:
        """Why not, from Prefect ("" when it may), and what the run waits for (its record's JSON)."""
        async with get_client() as client:
            if run.state_name == "Paused" and (why := await waits.dead(client, run)):
                return (
                    f"{run.name} was paused in a process that is gone ({why}): it cannot go on. "
                    "`twincd watch-waits` marks it Crashed; re-run it (the steps already done are kept)",
                    "",
                )
            try:
                return "", await client.read_flow_run_input(
                    run.id, waits.PREFIX + (run.state.state_details.pause_key or "")
                )
            except ObjectNotFound:
                return "", ""

    why, record = asyncio.run(check())
    mr = waits.from_json(record).mr if record else None
    if why or mr is None:
        return why
    # Out of the event loop: Prefect's Secret block loads synchronously only outside one.
    with wiring.forge(env) as forge:
        now = forge.get(mr)
    if now.state in ("merged", "closed"):
        by = f" by {now.merged_by}" if now.merged_by else ""
        return (
            f"{run.name}: {now.ref} ({now.web_url}) is already {now.state}{by} on {forge.name}: there is "
            "nothing to approve. The run reads it when it is resumed (the Merge Request Hook, or "
            "`twincd watch-waits` now)"
        )
    return ""


def cmd_approve(env: Environment, args: argparse.Namespace) -> int:
    _use_prefect(env)

    # One failover runs at a time (flows/turns.py): `failover` finds it whatever its target.
    target = "failover-*" if args.app == "failover" else f"deploy-{args.app}-{args.tag}"
    return _resume(
        env,
        target,
        waits.answer(approved=not args.refuse, approver=args.approver, comment=args.comment),
        args.run,
    )


def cmd_demo(env: Environment, args: argparse.Namespace) -> int:
    from twincd.sandbox import stack

    t0 = time.monotonic()
    stack.up(env)
    app = next(iter(env.apps))
    code = _run_deploy(env, app, args.tag, auto_approve=True)
    print(f"demo finished in {time.monotonic() - t0:.1f} s; the stack keeps running (twincd down stops it)")
    return code


def cmd_drift(env: Environment, args: argparse.Namespace) -> int:
    _use_prefect(env)
    from flows.drift import drift_check

    state = drift_check(env=env.source, fail_on_drift=args.fail_on_drift, return_state=True)
    print(f"\n{state.name}: {state.message or ''}".rstrip())
    print(f"Run in the Prefect UI: {_ui_url(env, state.state_details.flow_run_id)}")
    if not state.is_completed():
        return 1
    report = state.result()
    return (
        3 if getattr(report, "items", ()) else 0
    )  # like terraform's -detailed-exitcode: drift is not an error


def cmd_serve(env: Environment, args: argparse.Namespace) -> int:
    _use_prefect(env)
    from prefect import serve

    from flows.deploy import deploy
    from flows.drift import drift_check
    from flows.failover import failover
    from flows.waiting import watch_waits

    source = str(Path(env.source).resolve())  # runs may start in another working directory
    scheduled = not args.without_schedules
    deployments = [
        deploy.to_deployment(name="deploy", parameters={"env": source}),
        failover.to_deployment(name="failover", parameters={"env": source}),
        drift_check.to_deployment(
            name="drift-check", parameters={"env": source}, cron="*/15 * * * *" if scheduled else None
        ),
        # Resumes runs whose MR was merged or closed while no hook reached twincd, and overdue ones.
        watch_waits.to_deployment(name="watch-waits", cron="*/10 * * * *" if scheduled else None),
    ]
    # In a sync context to_deployment returns the deployment itself, never a coroutine.
    serve(*[d for d in deployments if not isinstance(d, Coroutine)])
    return 0


def cmd_watch_waits(env: Environment, args: argparse.Namespace) -> int:
    """The watch-waits flow, now (it also runs every 10 minutes where `twincd serve` runs)."""
    _use_prefect(env)
    import asyncio

    from flows.waiting import watch_waits

    async def watch() -> Any:
        return await watch_waits(return_state=True)

    state = asyncio.run(watch())
    print(f"\n{state.name}: {state.message or ''}".rstrip())
    return 0 if state.is_completed() else 1


def cmd_failover(env: Environment, args: argparse.Namespace) -> int:
    for app in args.apps:
        env.app(app)  # an unknown app is refused before anything starts
    parameters = {
        "mode": None if args.evacuate else "active-active" if args.active_active else "active-standby",
        "active": args.to,
        "apps": args.apps,
        "evacuate": args.evacuate or "",
        "force": args.force,
        "dry_run": args.dry_run,
        "reason": args.reason,
        "emergency": args.emergency,
        "auto_approve": args.auto_approve,
    }
    if not (args.dry_run or args.emergency or args.auto_approve):
        return _start_deployment(env, FAILOVER, parameters, args.env)  # waits for the plan's approval
    _use_prefect(env)
    from flows.failover import failover

    state = failover(**parameters, env=env.source, return_state=True)
    print(f"\n{state.name}: {state.message or ''}".rstrip())
    print(f"Run in the Prefect UI: {_ui_url(env, state.state_details.flow_run_id)}")
    return 0 if state.is_completed() else 1


def cmd_webhook(env: Environment, args: argparse.Namespace) -> int:
    if env.webhook is None:
        raise ConfigError(f"{env.source}: `twincd webhook` needs a `webhook: {{secret: env:VAR}}` section")
    _use_prefect(env)
    from twincd.adapters import webhook
    from twincd.adapters.secrets import resolve_secret

    cfg = env.webhook
    projects = {a.project: name for name, a in env.apps.items() if a.project} or None
    endpoint = f"http://{cfg.host}:{cfg.port}/hooks/gitlab"
    print(f"GitLab Tag Push Hook endpoint: {endpoint} -> deployment {cfg.deployment}")
    webhook.serve(
        env,
        secret=resolve_secret(cfg.secret),
        host=cfg.host,
        port=cfg.port,
        deployment=cfg.deployment,
        projects=projects,
        max_body=cfg.max_body,
        answer_within=cfg.answer_seconds,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twincd", description=__doc__)
    parser.add_argument("--env", default=None, help="environment file (default: deployments/local.yaml)")
    parser.add_argument(
        "--prefect-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for a Prefect API that does not answer (default 120; or ${PREFECT_WAIT})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up", help="start the local stack (Prefect, registry, build API, git repos, sandbox clusters)"
    )
    sub.add_parser("down", help="stop the local stack")
    sub.add_parser("status", help="show which services of the local stack run")
    sub.add_parser("seed", help="create the sample app and manifests repos (idempotent)")
    p = sub.add_parser("deploy", help="deploy a tagged release of an app")
    p.add_argument("app")
    p.add_argument("tag")
    p.add_argument("--auto-approve", action="store_true", help="merge without waiting for a person")
    p.add_argument(
        "--image", default="", metavar="REF@sha256:...", help="an image CI built and pushed: no build or push"
    )
    p = sub.add_parser("approve", help="approve (or --refuse) the release or failover waiting for a merge")
    p.add_argument("app", help="the app, or `failover` for the failover waiting")
    p.add_argument("tag", nargs="?", default="", help="the release tag (not for a failover)")
    p.add_argument("--refuse", action="store_true")
    p.add_argument("--approver", default=os.environ.get("USER", "cli"))
    p.add_argument("--comment", default="")
    p.add_argument(
        "--run", default="", metavar="FLOW_RUN_ID", help="which run, when several wait under one name"
    )
    p = sub.add_parser("demo", help="up + seed + deploy with auto-approve; leaves the stack running")
    p.add_argument("--tag", default="v1.0.0")
    p = sub.add_parser(
        "failover", help="switch apps Active/Active <-> Active/Standby, or evacuate a cloud, via git and DNS"
    )
    p.add_argument("apps", nargs="*", metavar="APP", help="the apps to switch (default: every app)")
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--to", metavar="CLUSTER", help="active-standby with CLUSTER serving")
    side.add_argument("--active-active", action="store_true", help="every cluster serves")
    side.add_argument(
        "--evacuate",
        metavar="CLUSTER|CLOUD",
        help="every app off that cluster or cloud: Active/Standby apps promoted elsewhere, "
        "Active/Active apps narrowed, constraints kept",
    )
    p.add_argument("--force", action="store_true", help="break an app's topology constraint (`only:`)")
    p.add_argument("--reason", default="", help="why (required unless --dry-run); recorded everywhere")
    p.add_argument("--dry-run", action="store_true", help="show the plan and stop")
    p.add_argument(
        "--emergency",
        action="store_true",
        help="merge without waiting for approval and skip the TTL wait before demoting (still audited)",
    )
    p.add_argument("--auto-approve", action="store_true")
    p = sub.add_parser("serve", help="serve the flows as Prefect deployments (no worker needed)")
    p.add_argument("--without-schedules", action="store_true", help="no drift-check or watch-waits cron")
    sub.add_parser("watch-waits", help="resume the runs whose MR was merged or closed, or whose wait is over")
    p = sub.add_parser("drift", help="compare the clusters with the manifests branch and with each other")
    p.add_argument("--fail-on-drift", action="store_true", help="end the run failed when drift is found")
    sub.add_parser("webhook", help="serve the GitLab Tag Push Hook endpoint that starts deploy runs")
    args = parser.parse_args(argv)
    if args.prefect_wait is not None:
        os.environ[PREFECT_WAIT] = str(args.prefect_wait)
    env: Environment | None = None
    try:
        env = load_environment(args.env or DEFAULT_ENV)
        handler = globals()[f"cmd_{args.command.replace('-', '_')}"]
        code: int = handler(env, args)
        return code
    except TwincdError as e:
        print(f"twincd: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        told = _prefect_api_error(e, env.prefect.api_url if env else "")
        if told is None:
            raise
        print(f"twincd: {told}", file=sys.stderr)
        return 3


def _prefect_api_error(error: BaseException, api_url: str) -> str | None:
    """One line for an error of the Prefect API (down, 5xx after the client's own retries); None
    for any other error. Prefect's client already retried 429/502/503 with backoff
    (PREFECT_CLIENT_MAX_RETRIES, default 5; prefect/client/base.py)."""
    import httpx

    if not isinstance(error, httpx.HTTPError) or not api_url:
        return None
    try:
        url = str(error.request.url)
    except RuntimeError:  # an error raised before a request was made
        return None
    if not url.startswith(api_url.rstrip("/")):
        return None
    if isinstance(error, httpx.HTTPStatusError):
        code = error.response.status_code
        if code < 500 and code not in (408, 429):
            return None  # a request of ours the API refused: a bug to see whole, not an outage
        return (
            f"the Prefect API at {api_url} answered HTTP {code} {error.response.reason_phrase} "
            "(after the client's retries); nothing more was done: run the command again once it answers"
        )
    return (
        f"cannot reach the Prefect API at {api_url} ({type(error).__name__}): start it "
        "(`twincd up` for the local stack) or check prefect.api_url in the environment file"
    )


if __name__ == "__main__":
    sys.exit(main())
