"""The failover flow's tasks: thin wrappers, one I/O call each, retries on transient failures only."""

from __future__ import annotations

import functools
import socket
import time

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.common import FRESH, IO_RETRIES, ONCE_PER_BRANCH, once_per_run
from twincd import failover, kustomize, wiring
from twincd.config import Environment
from twincd.domain import ARecords, ReleaseBranch, Role, RolloutVerdict
from twincd.errors import TransientError, TwincdError
from twincd.failover import (
    FailoverPlan,
    Health,
    Overlay,
    ReplaceRecord,
    SwitchComponents,
    consecutive,
    read_back,
    switch_edit,
)


@task(name="read-overlays", **IO_RETRIES, **FRESH)
def read_overlays(env: Environment) -> tuple[Overlay, ...]:
    """Which component every app overlay references at the manifests branch head."""
    files = {
        (c, app): f"{env.app_overlay(app, c)}/kustomization.yaml" for c in env.clusters for app in env.apps
    }
    with wiring.manifests(env).checkout(env.manifests.branch) as work:
        return failover.read_overlays(work, repo=env.manifests.repo, files=files)


@task(name="read-dns", **IO_RETRIES, **FRESH)
def read_dns(env: Environment) -> dict[str, ARecords]:
    """Every app's records (by name relative to the zone) as the authoritative server holds them,
    with their TTL; empty when DNS is not managed by twincd."""
    dns = wiring.dns(env)
    if not dns.managed:
        return {}
    return {r.name: dns.read(r.name) for app in env.apps for r in env.app_records(app)}


@task(name="read-record", task_run_name="read-{name}", **IO_RETRIES, **FRESH)
def read_record(env: Environment, name: str) -> ARecords:
    """One record set (by name relative to the zone) as the authoritative server holds it."""
    return wiring.dns(env).read(name)


@task(name="publish-plan")
def publish_plan(plan: FailoverPlan, reason: str, dry_run: bool, emergency: bool) -> str:
    """The plan as a markdown artifact in the Prefect UI, before anything changes."""
    markdown = plan.markdown(reason=reason, dry_run=dry_run, emergency=emergency)
    create_markdown_artifact(
        markdown=markdown,
        key=f"failover-plan-{plan.target.label}",
        description=f"Failover plan: {plan.summary()}",
    )
    return markdown


@task(name="keep-plan", **once_per_run(lambda parameters: "plan"))
def keep_plan(plan: FailoverPlan | None) -> FailoverPlan | None:
    """The plan this run carries out: the first one given here in the run, persisted, so a run
    resumed after waiting for a merge carries out what was planned, not a plan made afresh."""
    return plan


@task(name="switch-components", task_run_name="switch-{action.step}", **IO_RETRIES, **ONCE_PER_BRANCH)
def switch_components(env: Environment, action: SwitchComponents, branch: str, reason: str) -> ReleaseBranch:
    """Point every overlay of the action at its component, on ``branch``, and push it."""
    edits = {o.file: switch_edit(o, action.role) for o in action.overlays}
    message = (
        f"failover: {action.step} {', '.join(action.clusters)} ({action.role})\n\n"
        f"Switch {', '.join(edits)} to {action.role}.\n\nReason: {reason}\n"
    )
    return wiring.manifests(env).write_branch(
        branch=branch, edit=kustomize.switch_components(edits), message=message
    )


@task(name="revert-switch", task_run_name="undo-{step}", **IO_RETRIES, **ONCE_PER_BRANCH)
def revert_switch(env: Environment, step: str, merge_commit: str, branch: str) -> ReleaseBranch:
    """Undo a merged switch: ``git revert -m 1`` of its merge commit, on ``branch``."""
    return wiring.manifests(env).write_revert(branch=branch, merge_commits=[merge_commit])


@task(name="merged-into", **IO_RETRIES, **FRESH)
def merged_into(env: Environment, branch: str) -> str | None:
    """Whether a switch branch reached the manifests branch after all (its merge call failed)."""
    return wiring.manifests(env).merged_into(branch)


@task(name="verify-role", task_run_name="verify-{app}-{cluster_name}-{role}", **FRESH)
def verify_role(
    env: Environment, cluster_name: str, app: str, role: Role, revision: str, direct: bool = False
) -> RolloutVerdict:
    """Wait until the cluster runs ``revision`` with the app at full replicas (active) or at 0 (standby).

    Any image will do (digest None): a failover changes replicas, never images. ``direct``: twincd
    applied the overlay itself, so no Argo CD Application is asked or waited for.
    """
    target = wiring.rollout_target(env, cluster_name, app, revision, argocd=not direct)
    return wiring.rollouts(env).verify_role(target, role=role, app=app, timeout=env.timeouts.rollout_seconds)


@task(name="api-reachable", task_run_name="reach-{cluster_name}", **FRESH)
def api_unreachable(env: Environment, cluster_name: str) -> str:
    """Why the cluster's API server cannot be reached ("" when it answers): one read, no retries,
    so a cluster that is down is planned around at once."""
    w = next(iter(env.apps.values())).workload
    try:
        wiring.cluster(env, cluster_name).workloads([(w.kind, w.namespace, w.name)])
    except TransientError as e:
        return str(e)
    return ""


@task(name="read-ingress-ips", task_run_name="ingress-{cluster_name}", **IO_RETRIES, **FRESH)
def read_ingress_ips(env: Environment, cluster_name: str) -> tuple[str, ...]:
    """The cluster's ingress IPs from its LoadBalancer Service (hostnames resolved to IPv4)."""
    svc = env.clusters[cluster_name].ingress_service
    assert svc is not None
    return failover.load_balancer_ips(
        wiring.cluster(env, cluster_name).service(svc.namespace, svc.name),
        where=f"cluster {cluster_name}: Service {svc.namespace}/{svc.name}",
        resolve=resolve_ipv4,
    )


def resolve_ipv4(hostname: str) -> tuple[str, ...]:
    try:
        found = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise failover.PlanError(
            f"the load balancer name {hostname} does not resolve: {e.strerror}"
        ) from None
    return tuple(dict.fromkeys(str(addr[4][0]) for addr in found))


@task(name="check-health", task_run_name="health-{app}-{cluster_name}", **FRESH)
def check_health(env: Environment, app: str, cluster_name: str) -> Health:
    """API reachable and the app's workload available at its full replica count (one look)."""
    w = env.app(app).workload
    what = f"{w.kind} {w.namespace}/{w.name}"
    try:
        (found,) = wiring.cluster(env, cluster_name).workloads([(w.kind, w.namespace, w.name)])
    except TwincdError as e:
        return Health(app, cluster_name, False, (f"API server: {e}",))
    return failover.workload_health(app, cluster_name, what, found)


@task(name="probe-health", task_run_name="probe-{health.app}-{health.cluster}", **FRESH)
def probe_health(env: Environment, health: Health, ips: tuple[str, ...]) -> Health:
    """The app's health path through every ingress IP of the cluster, as its clients reach it: the
    public name as Host and SNI, its certificate verified, several 2xx answers in a row per IP."""
    cfg = env.app(health.app).health
    assert cfg is not None
    host = cfg.host or env.app_records(health.app)[0].fqdn
    ca_file = str(env.path(cfg.ca_file)) if cfg.ca_file else None
    probe = wiring.probe(cfg.timeout_seconds)
    for ip in ips:
        url = f"{cfg.scheme}://{ip}:{cfg.effective_port}{cfg.path}"
        ok, seen = consecutive(
            functools.partial(probe.check, url, host=host, ca_file=ca_file),
            successes=cfg.successes,
            attempts=cfg.attempts,
            interval=cfg.interval_seconds,
        )
        health = failover.with_probe(health, seen, ok)
        if not ok:
            break
    return health


@task(name="replace-dns", task_run_name="dns-{action.fqdn}", **IO_RETRIES, **FRESH)
def replace_dns(env: Environment, action: ReplaceRecord, ips: frozenset[str]) -> frozenset[str]:
    """Replace the record set with ``ips`` (one atomic change); returns what was written."""
    wiring.dns(env).replace_a(action.name, ips, ttl=action.ttl)
    return ips


@task(name="read-back-dns", task_run_name="read-back-{action.fqdn}", **FRESH)
def read_back_dns(
    env: Environment, action: ReplaceRecord, expect: frozenset[str], timeout: float = 30.0
) -> frozenset[str]:
    """Poll the authoritative server until the record holds exactly ``expect`` (bounded)."""
    return read_back(wiring.dns(env), action.name, expect, shown_as=action.fqdn, timeout=timeout)


@task(name="wait-ttl", task_run_name="ttl-wait-{seconds}s")
def wait_ttl(seconds: int, names: tuple[str, ...]) -> None:
    """Let the old record sets expire from resolvers' caches before their IPs stop serving."""
    time.sleep(seconds)
