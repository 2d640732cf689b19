"""The failover flow's tasks: thin wrappers, one I/O call each, retries on transient failures only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import httpx
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import IO_RETRIES, cluster_ref, rollout_target
from twincd import kustomize
from twincd.adapters import cluster, git
from twincd.adapters import dns as dnsport
from twincd.adapters.kube_read import LiveReader
from twincd.adapters.secrets import resolve_secret
from twincd.config import Environment
from twincd.domain import ComponentChange, ImageChange, Phase, RolloutVerdict
from twincd.drift import ListScope
from twincd.errors import PermanentError, TwincdError
from twincd.failover import (
    FailoverPlan,
    Health,
    Overlay,
    Role,
    SwitchComponents,
    Topology,
    role_of,
    switch_edit,
)

HTTP_TIMEOUT = 5.0
# Reads must see the world as it is now, and writes must happen: never a cached answer.
_FRESH: dict[str, Any] = {"cache_policy": NO_CACHE}


class DnsReadBackFailed(PermanentError):
    """The authoritative server did not show the new record set in time."""


def dns_port(env: Environment) -> dnsport.DnsPort:
    cfg = env.dns
    if cfg.type == "none":
        return dnsport.NoDns()
    if cfg.type == "route53":
        return dnsport.Route53(zone=cfg.zone, hosted_zone_id=cfg.hosted_zone_id, region=cfg.region)
    if cfg.type == "azure":
        return dnsport.AzureDns(
            subscription_id=cfg.subscription_id,
            resource_group=cfg.resource_group,
            zone=cfg.zone,
            base_url=cfg.base_url,
        )
    return dnsport.Rfc2136(
        server=cfg.server, zone=cfg.zone, key=dnsport.Tsig.parse(resolve_secret(cfg.key).reveal())
    )


def _record(env: Environment) -> str:
    return "" if env.dns.type == "none" else env.dns.record


def record_name(env: Environment) -> str:
    return "" if env.dns.type == "none" else f"{env.dns.record}.{env.dns.zone}"


def topology_of(env: Environment, overlays: tuple[Overlay, ...], record: frozenset[str] | None) -> Topology:
    clusters = tuple(env.clusters)
    return Topology(
        clusters, tuple((c, env.clusters[c].ingress_ip) for c in clusters), overlays, record, record_name(env)
    )


def _overlay_file(env: Environment, app: str, cluster_name: str) -> str:
    return f"{env.app_overlay(app, cluster_name)}/kustomization.yaml"


@task(name="read-overlays", **IO_RETRIES, **_FRESH)
def read_overlays(env: Environment) -> tuple[Overlay, ...]:
    """Which component every app overlay references at the manifests branch head."""
    overlays = []
    with git.clone(str(env.path(env.manifests.repo)), ref=env.manifests.branch) as repo:
        work = Path(str(repo.working_tree_dir))
        for cluster_name in env.clusters:
            for app in env.apps:
                rel = _overlay_file(env, app, cluster_name)
                if not (work / rel).exists():
                    raise PermanentError(
                        f"{env.manifests.repo}: {rel} does not exist (overlay of app {app!r} "
                        f"on cluster {cluster_name!r})"
                    )
                overlays.append(Overlay(cluster_name, app, rel, role_of((work / rel).read_text(), file=rel)))
    return tuple(overlays)


@task(name="read-dns", **IO_RETRIES, **_FRESH)
def read_dns(env: Environment) -> frozenset[str] | None:
    """The record's IPs at the authoritative server; None when DNS is not managed by twincd."""
    port = dns_port(env)
    return port.read_a(_record(env)) if port.managed else None


@task(name="publish-plan")
def publish_plan(plan: FailoverPlan, reason: str, dry_run: bool, emergency: bool) -> str:
    """The plan as a markdown artifact in the Prefect UI, before anything changes."""
    markdown = plan.markdown(reason=reason, dry_run=dry_run, emergency=emergency)
    create_markdown_artifact(
        markdown=markdown,
        key=f"failover-plan-{plan.target.label}",
        description=f"Failover plan: {plan.current.describe()} → {plan.target.label}",
    )
    return markdown


@task(name="switch-components", task_run_name="switch-{action.step}", **IO_RETRIES, **_FRESH)
def switch_components(
    env: Environment, action: SwitchComponents, branch: str, reason: str
) -> git.ReleaseBranch:
    """Point every overlay of the action at its component, on ``branch``, and push it."""
    edits = {o.file: switch_edit(o, action.role) for o in action.overlays}

    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        files: dict[str, str] = {}
        changes: list[ComponentChange] = []
        for rel, (remove, add) in edits.items():
            result = kustomize.set_components((work / rel).read_text(), file=rel, remove=remove, add=add)
            if result.changed:
                files[rel] = result.text
                changes.extend(result.changes)
        # write_release_branch only tests the records and hands them back; its Edit type names
        # image changes because the deploy flow came first (issue note: widen it to both kinds).
        return files, cast(tuple[ImageChange, ...], tuple(changes))

    message = (
        f"failover: {action.step} {', '.join(action.clusters)} ({action.role})\n\n"
        f"Switch {', '.join(edits)} to {action.role}.\n\nReason: {reason}\n"
    )
    return git.write_release_branch(
        repo_url=str(env.path(env.manifests.repo)),
        target=env.manifests.branch,
        branch=branch,
        edit=edit,
        message=message,
    )


@task(name="revert-switch", task_run_name="undo-{step}", **IO_RETRIES, **_FRESH)
def revert_switch(env: Environment, step: str, merge_commit: str, branch: str) -> git.ReleaseBranch:
    """Undo a merged switch: ``git revert -m 1`` of its merge commit, on ``branch``."""
    return git.write_revert_branch(
        repo_url=str(env.path(env.manifests.repo)),
        target=env.manifests.branch,
        branch=branch,
        merge_commits=[merge_commit],
    )


@task(name="merged-into", **IO_RETRIES, **_FRESH)
def merged_into(env: Environment, branch: str) -> str | None:
    """Whether a switch branch reached the manifests branch after all (its merge call failed)."""
    return git.merged_into(
        repo_url=str(env.path(env.manifests.repo)), source=branch, target=env.manifests.branch
    )


def _workload(env: Environment, ref: cluster.ClusterRef, app: str) -> dict[str, Any] | None:
    """The app's workload as the cluster holds it now (one LIST of its kind in its namespace)."""
    w = env.app(app).workload
    with LiveReader(ref) as reader:
        items = reader.list(ListScope("apps/v1", w.kind, w.namespace))
    return next((o for o in items if o.get("metadata", {}).get("name") == w.name), None)


@task(name="verify-role", task_run_name="verify-{app}-{cluster_name}-{role}", **_FRESH)
def verify_role(env: Environment, cluster_name: str, app: str, role: Role, revision: str) -> RolloutVerdict:
    """Wait until the cluster runs ``revision`` with the app at full replicas (active) or at 0 (standby).

    Any image will do (digest None): a failover changes replicas, never images.
    """
    target = rollout_target(env, cluster_name, app, revision)
    try:
        verdict = cluster.verify_rollout(target, timeout=env.timeouts.rollout_seconds)
        if verdict.phase is not Phase.SUCCEEDED:
            return verdict
        # "Rolled out" holds at any replica count: check the count is the one the component sets.
        replicas = (_workload(env, target.cluster, app) or {}).get("spec", {}).get("replicas")
    except TwincdError as e:
        return RolloutVerdict(cluster_name, Phase.FAILED, str(e))
    if (role == "standby") != (replicas == 0):
        want = "0 (standby)" if role == "standby" else "at least 1 (active)"
        return RolloutVerdict(
            cluster_name,
            Phase.FAILED,
            f"{app}: spec.replicas is {replicas}, expected {want} after {revision[:12]}",
        )
    return RolloutVerdict(cluster_name, Phase.SUCCEEDED, f"{app}: {verdict.message}", verdict.details)


@task(name="check-health", task_run_name="health-{cluster_name}", **_FRESH)
def check_health(env: Environment, cluster_name: str, health_url: str) -> Health:
    """API reachable, every app's workload available at its full replica count, optional HTTP check.

    One look, no waiting: the rollout was verified before, so anything short of healthy now is a
    reason not to send traffic here.
    """
    c = env.clusters[cluster_name]
    ref = cluster_ref(env, cluster_name)
    checks: list[str] = []
    try:
        for app in env.apps:
            w = env.app(app).workload
            obj = _workload(env, ref, app)
            spec, status = (obj or {}).get("spec", {}), (obj or {}).get("status", {})
            want, available = spec.get("replicas", 1), status.get("availableReplicas", 0)
            if obj is None or not want or available < want:
                checks.append(
                    f"{app}: {w.kind} {w.namespace}/{w.name} "
                    f"{'not found' if obj is None else f'{available}/{want} replicas available'}"
                )
                return Health(cluster_name, False, tuple(checks))
            checks.append(f"{app}: {available}/{want} replicas available")
    except TwincdError as e:
        return Health(cluster_name, False, (*checks, f"API server: {e}"))
    if health_url:
        url = health_url.format(ingress_ip=c.ingress_ip)
        try:
            # Through the ingress IP, with the public name as Host: what a client resolving DNS gets.
            r = httpx.get(
                url,
                headers={"Host": record_name(env)} if record_name(env) else {},
                timeout=HTTP_TIMEOUT,
                follow_redirects=False,
                trust_env=False,
            )
            ok = r.status_code < 400
            checks.append(f"GET {url}: HTTP {r.status_code}")
        except httpx.HTTPError as e:
            ok = False
            checks.append(f"GET {url}: {type(e).__name__}")
        if not ok:
            return Health(cluster_name, False, tuple(checks))
    return Health(cluster_name, True, tuple(checks))


@task(name="replace-dns", **IO_RETRIES, **_FRESH)
def replace_dns(env: Environment, ips: frozenset[str]) -> None:
    dns_port(env).replace_a(_record(env), ips, ttl=60 if env.dns.type == "none" else env.dns.ttl)


@task(name="read-back-dns", **_FRESH)
def read_back_dns(env: Environment, expect: frozenset[str], timeout: float = 30.0) -> frozenset[str]:
    """Poll the authoritative server until the record holds exactly ``expect`` (bounded)."""
    port, name = dns_port(env), _record(env)
    deadline = time.monotonic() + timeout
    seen: frozenset[str] | str = "nothing yet"
    while True:
        try:
            seen = port.read_a(name)
            if seen == expect:
                return seen
        except dnsport.DnsUnavailable as e:
            seen = str(e)
        if time.monotonic() >= deadline:
            shown = ", ".join(sorted(seen)) if isinstance(seen, frozenset) else seen
            raise DnsReadBackFailed(
                f"{record_name(env)} still shows {shown or 'no A records'} after "
                f"{timeout:g} s; expected {', '.join(sorted(expect))}"
            )
        time.sleep(0.5)
