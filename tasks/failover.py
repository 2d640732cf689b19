"""The failover flow's tasks: thin wrappers, one I/O call each, retries on transient failures only."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.common import FRESH, IO_RETRIES
from twincd import failover, kustomize, wiring
from twincd.config import Environment
from twincd.domain import ReleaseBranch, Role, RolloutVerdict
from twincd.errors import TwincdError
from twincd.failover import FailoverPlan, Health, Overlay, SwitchComponents, read_back, switch_edit


@task(name="read-overlays", **IO_RETRIES, **FRESH)
def read_overlays(env: Environment) -> tuple[Overlay, ...]:
    """Which component every app overlay references at the manifests branch head."""
    files = {
        (c, app): f"{env.app_overlay(app, c)}/kustomization.yaml" for c in env.clusters for app in env.apps
    }
    with wiring.manifests(env).checkout(env.manifests.branch) as work:
        return failover.read_overlays(work, repo=env.manifests.repo, files=files)


@task(name="read-dns", **IO_RETRIES, **FRESH)
def read_dns(env: Environment) -> frozenset[str] | None:
    """The record's IPs at the authoritative server; None when DNS is not managed by twincd."""
    dns = wiring.dns(env)
    return dns.read_a(env.dns_record()[0]) if dns.managed else None


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


@task(name="switch-components", task_run_name="switch-{action.step}", **IO_RETRIES, **FRESH)
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


@task(name="revert-switch", task_run_name="undo-{step}", **IO_RETRIES, **FRESH)
def revert_switch(env: Environment, step: str, merge_commit: str, branch: str) -> ReleaseBranch:
    """Undo a merged switch: ``git revert -m 1`` of its merge commit, on ``branch``."""
    return wiring.manifests(env).write_revert(branch=branch, merge_commits=[merge_commit])


@task(name="merged-into", **IO_RETRIES, **FRESH)
def merged_into(env: Environment, branch: str) -> str | None:
    """Whether a switch branch reached the manifests branch after all (its merge call failed)."""
    return wiring.manifests(env).merged_into(branch)


@task(name="verify-role", task_run_name="verify-{app}-{cluster_name}-{role}", **FRESH)
def verify_role(env: Environment, cluster_name: str, app: str, role: Role, revision: str) -> RolloutVerdict:
    """Wait until the cluster runs ``revision`` with the app at full replicas (active) or at 0 (standby).

    Any image will do (digest None): a failover changes replicas, never images.
    """
    target = wiring.rollout_target(env, cluster_name, app, revision)
    return wiring.rollouts(env).verify_role(target, role=role, app=app, timeout=env.timeouts.rollout_seconds)


@task(name="check-health", task_run_name="health-{cluster_name}", **FRESH)
def check_health(env: Environment, cluster_name: str) -> Health:
    """API reachable and every app's workload available at its full replica count (one look)."""
    specs = [env.app(app).workload for app in env.apps]
    try:
        found = wiring.cluster(env, cluster_name).workloads([(w.kind, w.namespace, w.name) for w in specs])
    except TwincdError as e:
        return Health(cluster_name, False, (f"API server: {e}",))
    return failover.workload_health(
        cluster_name,
        [
            (app, f"{w.kind} {w.namespace}/{w.name}", obj)
            for app, w, obj in zip(env.apps, specs, found, strict=True)
        ],
    )


@task(name="probe-health", task_run_name="probe-{cluster_name}", **FRESH)
def probe_health(env: Environment, cluster_name: str, health_url: str, health: Health) -> Health:
    """The HTTP health URL through the cluster's ingress IP, with the public name as Host."""
    url = health_url.format(ingress_ip=env.clusters[cluster_name].ingress_ip)
    ok, seen = wiring.probe().check(url, host=env.dns_record()[1])
    return failover.with_probe(health, seen, ok)


@task(name="replace-dns", **IO_RETRIES, **FRESH)
def replace_dns(env: Environment, ips: frozenset[str]) -> frozenset[str]:
    """Replace the record set with ``ips`` (one atomic change); returns what was written."""
    name, _, ttl = env.dns_record()
    wiring.dns(env).replace_a(name, ips, ttl=ttl)
    return ips


@task(name="read-back-dns", **FRESH)
def read_back_dns(env: Environment, expect: frozenset[str], timeout: float = 30.0) -> frozenset[str]:
    """Poll the authoritative server until the record holds exactly ``expect`` (bounded)."""
    name, shown, _ = env.dns_record()
    return read_back(wiring.dns(env), name, expect, shown_as=shown, timeout=timeout)
