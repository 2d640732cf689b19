"""Failover planning: current topology + target → an ordered plan that never drops traffic.

Pure: no I/O, no Prefect, no SDK. The flow reads the topology (which Kustomize Component each
app overlay references, which IPs the DNS record holds), asks ``plan_failover`` for the actions,
publishes ``FailoverPlan.markdown()`` and executes the actions in order. The order is the whole
point (issue #7): bring up what will serve, check it is healthy, point DNS at it, read DNS back,
and only then stop what no longer serves.

Rules enforced here rather than in the flow, so unit tests pin them:
- a plan never publishes an empty record set (never remove the last IP);
- ``gate`` refuses to publish any IP whose cluster failed its health check, and refuses the DNS
  change unless at least one healthy IP stays in the record;
- a topology already at the target gives an empty plan (no MR, no DNS write).
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from twincd.config import Environment
from twincd.domain import Phase, Role, RolloutVerdict
from twincd.errors import PermanentError, TransientError
from twincd.ports import Dns

ACTIVE = "components/active"
STANDBY = "components/standby"

Mode = Literal["active-active", "active-standby"]


class PlanError(PermanentError):
    """The target cannot be reached safely from here (unknown cluster, no ingress IP, ...)."""


class HealthGateFailed(PermanentError):
    """A cluster that would serve is not healthy: DNS is not changed."""


@dataclass(frozen=True)
class Overlay:
    """One app's overlay on one cluster and the component it references."""

    cluster: str
    app: str
    file: str  # kustomization.yaml path relative to the manifests repo root
    role: Role


@dataclass(frozen=True)
class Topology:
    """What runs where now: overlays at the manifests branch head, and the DNS record."""

    clusters: tuple[str, ...]
    ingress_ips: tuple[tuple[str, str | None], ...]  # (cluster, ingress IP) in cluster order
    overlays: tuple[Overlay, ...]
    record: frozenset[str] | None  # None: DNS is not managed by twincd
    record_name: str = ""  # e.g. "web.example.test", for people

    def ip(self, cluster: str) -> str | None:
        return dict(self.ingress_ips).get(cluster)

    def role(self, cluster: str) -> Role:
        roles = {o.role for o in self.overlays if o.cluster == cluster}
        return roles.pop() if len(roles) == 1 else "unknown"

    def describe(self) -> str:
        roles = ", ".join(f"{c} {self.role(c)}" for c in self.clusters)
        dns = "not managed" if self.record is None else (", ".join(sorted(self.record)) or "no A records")
        return f"{roles}; {self.record_name or 'DNS'}: {dns}"


@dataclass(frozen=True)
class Target:
    mode: Mode
    active: str | None = None  # the serving cluster when mode is active-standby

    @property
    def label(self) -> str:
        """For branch names and artifact keys: ``active-active`` or ``active-standby-aks``."""
        return self.mode if self.mode == "active-active" else f"{self.mode}-{self.active}"

    def serving(self, clusters: Sequence[str]) -> tuple[str, ...]:
        return (
            tuple(clusters)
            if self.mode == "active-active"
            else tuple(c for c in clusters if c == self.active)
        )


@dataclass(frozen=True)
class SwitchComponents:
    """Switch overlays to one component, merge, verify (promote: full replicas; demote: scaled to 0)."""

    step: Literal["promote", "demote"]
    role: Role  # the component every overlay below ends up referencing
    clusters: tuple[str, ...]
    overlays: tuple[Overlay, ...]

    def describe(self) -> str:
        verify = (
            "verify every workload at full replicas"
            if self.role == "active"
            else "verify every workload scaled to 0 (standby)"
        )
        files = ", ".join(f"`{o.file}`" for o in self.overlays)
        return (
            f"**{self.step}** {', '.join(self.clusters)}: switch {files} to `{component(self.role)}`, "
            f"merge, {verify}"
        )


@dataclass(frozen=True)
class HealthGate:
    """Every serving cluster must be healthy before DNS names it (and before anything is demoted)."""

    clusters: tuple[str, ...]
    http: bool = False

    def describe(self) -> str:
        extra = ", HTTP health URL through the ingress IP" if self.http else ""
        return f"**health gate** {', '.join(self.clusters)}: API reachable, workloads available{extra}"


@dataclass(frozen=True)
class ReplaceRecord:
    """Replace the whole A record set in one atomic change, then read it back until it shows ``new``."""

    name: str
    old: frozenset[str]
    new: frozenset[str]

    def describe(self) -> str:
        old = ", ".join(sorted(self.old)) or "(none)"
        return (
            f"**dns** replace A `{self.name}` {old} → {', '.join(sorted(self.new))}, "
            "read back from the authoritative server until it shows the new set"
        )


Action = SwitchComponents | HealthGate | ReplaceRecord


@dataclass(frozen=True)
class FailoverPlan:
    current: Topology
    target: Target
    serving: tuple[str, ...]
    actions: tuple[Action, ...]
    notes: tuple[str, ...] = ()

    @property
    def noop(self) -> bool:
        return not self.actions

    def markdown(self, *, reason: str = "", dry_run: bool = False, emergency: bool = False) -> str:
        lines = [f"# Failover to {self.target.label}", ""]
        if dry_run:
            lines += ["**Dry run**: nothing below is carried out.", ""]
        if emergency:
            lines += ["**Emergency**: merges do not wait for approval (still recorded on the forge).", ""]
        if reason:
            lines += [f"Reason: {reason}", ""]
        target = ", ".join(self.serving)
        ips = ", ".join(ip for c in self.serving if (ip := self.current.ip(c)))
        lines += [
            f"- current: {self.current.describe()}",
            f"- target: {self.target.label}: {target} {'serves' if len(self.serving) == 1 else 'serve'}"
            + (f" ({ips})" if self.current.record is not None else ""),
            "",
        ]
        if self.noop:
            lines.append("Already at the target: nothing to do.")
        else:
            lines += [f"{i}. {a.describe()}" for i, a in enumerate(self.actions, 1)]
        if self.notes:
            lines += ["", *(f"> {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def component(role: Role) -> str:
    return ACTIVE if role == "active" else STANDBY


def component_path(overlay_file: str, role: Role) -> str:
    """The component as the overlay references it: relative to the overlay's directory."""
    return posixpath.relpath(component(role), posixpath.dirname(overlay_file))


def role_of(text: str, *, file: str) -> Role:
    """Which of the two components a kustomization references (``unknown``: neither or both)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PlanError(f"{file}: not valid YAML: {getattr(e, 'problem', e)}") from None
    entries = data.get("components") if isinstance(data, dict) else None
    paths = [posixpath.normpath(posixpath.join(posixpath.dirname(file), str(p))) for p in entries or []]
    active, standby = ACTIVE in paths, STANDBY in paths
    if active != standby:
        return "active" if active else "standby"
    return "unknown"


def read_overlays(work: Path, *, repo: str, files: Mapping[tuple[str, str], str]) -> tuple[Overlay, ...]:
    """Which component each ``(cluster, app)`` overlay file of a work tree references."""
    overlays = []
    for (cluster, app), rel in files.items():
        if not (work / rel).exists():
            raise PermanentError(
                f"{repo}: {rel} does not exist (overlay of app {app!r} on cluster {cluster!r})"
            )
        overlays.append(Overlay(cluster, app, rel, role_of((work / rel).read_text(), file=rel)))
    return tuple(overlays)


def switch_edit(overlay: Overlay, role: Role) -> tuple[list[str], list[str]]:
    """``(remove, add)`` for ``kustomize.set_components``: reference ``role``'s component only."""
    other: Role = "standby" if role == "active" else "active"
    return [component_path(overlay.file, other)], [component_path(overlay.file, role)]


def plan_failover(current: Topology, target: Target, *, http_health: bool = False) -> FailoverPlan:
    """The ordered actions from ``current`` to ``target`` (empty when already there)."""
    if target.mode == "active-standby":
        if target.active not in current.clusters:
            raise PlanError(
                f"active-standby needs the active cluster, one of {', '.join(current.clusters)}; "
                f"got {target.active!r}"
            )
    elif target.active is not None:
        raise PlanError("active-active takes no active cluster (every cluster serves)")
    if not current.overlays:
        raise PlanError("no app overlays found: nothing to switch")
    serving = target.serving(current.clusters)
    notes: list[str] = []

    promote = [o for o in current.overlays if o.cluster in serving and o.role != "active"]
    demote = [o for o in current.overlays if o.cluster not in serving and o.role != "standby"]
    new_record: frozenset[str] | None = None
    if current.record is not None:
        missing = [c for c in serving if not current.ip(c)]
        if missing:
            raise PlanError(f"cluster(s) {', '.join(missing)} have no ingress_ip: DNS cannot point at them")
        new_record = frozenset(ip for c in serving if (ip := current.ip(c)))
    else:
        notes.append(
            "DNS is not managed by twincd (dns: none): point the record at "
            + ", ".join(f"{c} ({current.ip(c) or 'no ingress_ip'})" for c in serving)
            + " yourself, after the health gate and before the demotion takes effect."
        )

    actions: list[Action] = []
    if promote:
        actions.append(SwitchComponents("promote", "active", _clusters(promote, current), tuple(promote)))
    dns_change = new_record is not None and new_record != current.record
    if promote or demote or dns_change:
        # Also when nothing is promoted: whatever serves next is checked before DNS or a demotion
        # leans on it.
        actions.append(HealthGate(serving, http=http_health))
    if dns_change:
        assert current.record is not None and new_record is not None
        actions.append(ReplaceRecord(current.record_name, current.record, new_record))
    if demote:
        actions.append(SwitchComponents("demote", "standby", _clusters(demote, current), tuple(demote)))
    return FailoverPlan(current, target, serving, tuple(actions), tuple(notes))


def _clusters(overlays: Sequence[Overlay], topology: Topology) -> tuple[str, ...]:
    names = {o.cluster for o in overlays}
    return tuple(c for c in topology.clusters if c in names)


@dataclass(frozen=True)
class Health:
    """One cluster's health check: every check passed, or the first failure's reason."""

    cluster: str
    healthy: bool
    checks: tuple[str, ...]  # what was checked, and how it went, for people


def workload_health(
    cluster: str, workloads: Sequence[tuple[str, str, Mapping[str, object] | None]]
) -> Health:
    """Every app's workload found and available at its full replica count (``(app, what, object)``).

    One look, no waiting: the rollout was verified before, so anything short of healthy now is a
    reason not to send traffic to ``cluster``. The first unhealthy workload ends the check.
    """
    checks: list[str] = []
    for app, what, obj in workloads:
        spec = obj.get("spec", {}) if obj is not None else {}
        status = obj.get("status", {}) if obj is not None else {}
        want = spec.get("replicas", 1) if isinstance(spec, Mapping) else 1
        available = status.get("availableReplicas", 0) if isinstance(status, Mapping) else 0
        if obj is None or not want or available < want:
            shown = "not found" if obj is None else f"{available}/{want} replicas available"
            return Health(cluster, False, (*checks, f"{app}: {what} {shown}"))
        checks.append(f"{app}: {available}/{want} replicas available")
    return Health(cluster, True, tuple(checks))


def with_probe(health: Health, check: str, ok: bool) -> Health:
    """``health`` plus one more check (an HTTP probe through the ingress): healthy only if both are."""
    return Health(health.cluster, health.healthy and ok, (*health.checks, check))


def role_verdict(
    verdict: RolloutVerdict, *, app: str, role: Role, replicas: object, revision: str
) -> RolloutVerdict:
    """A verified rollout of ``revision`` is a verified role only at the replica count the component sets.

    "Rolled out" holds at any replica count: active means at least 1, standby exactly 0.
    """
    if verdict.phase is not Phase.SUCCEEDED:
        return verdict
    if (role == "standby") != (replicas == 0):
        want = "0 (standby)" if role == "standby" else "at least 1 (active)"
        return RolloutVerdict(
            verdict.cluster,
            Phase.FAILED,
            f"{app}: spec.replicas is {replicas}, expected {want} after {revision[:12]}",
        )
    return RolloutVerdict(verdict.cluster, Phase.SUCCEEDED, f"{app}: {verdict.message}", verdict.details)


def gate(plan: FailoverPlan, health: Mapping[str, Health]) -> None:
    """Raise HealthGateFailed unless every serving cluster is healthy.

    Then no IP of an unhealthy cluster is ever published, and a record change always leaves at
    least one healthy IP (the serving set is never empty).
    """
    unhealthy = [c for c in plan.serving if c not in health or not health[c].healthy]
    if unhealthy:
        why = "; ".join(
            f"{c}: {health[c].checks[-1] if c in health and health[c].checks else 'not checked'}"
            for c in unhealthy
        )
        raise HealthGateFailed(f"health gate failed for {', '.join(unhealthy)} ({why}); DNS was not changed")
    check_record_change(plan, health)


def check_record_change(plan: FailoverPlan, health: Mapping[str, Health]) -> None:
    """The last line of defence before a DNS write: nothing unhealthy in, something healthy left."""
    for action in plan.actions:
        if not isinstance(action, ReplaceRecord):
            continue
        healthy_ips = {ip for c, h in health.items() if h.healthy and (ip := plan.current.ip(c))}
        unhealthy_ips = {ip for c, h in health.items() if not h.healthy and (ip := plan.current.ip(c))}
        if not action.new:
            raise HealthGateFailed(f"refusing to remove the last IP of {action.name}")
        if action.new & unhealthy_ips:
            raise HealthGateFailed(
                f"refusing to publish {', '.join(sorted(action.new & unhealthy_ips))} in "
                f"{action.name}: its cluster failed the health check"
            )
        if not action.new & healthy_ips:
            raise HealthGateFailed(
                f"refusing to change {action.name}: no IP of the new set belongs to a "
                "cluster that passed the health check (the last healthy IP would go)"
            )


def branch_name(target: Target, run_id: str, step: str) -> str:
    """``twincd/failover/<target>-<short id>/<step>``: one branch per merge of one failover run."""
    short = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8] or "manual"
    return f"twincd/failover/{target.label}-{short}/{step}"


def topology_of(env: Environment, overlays: tuple[Overlay, ...], record: frozenset[str] | None) -> Topology:
    """What runs where now: the overlays read, the record read, the clusters' ingress IPs."""
    clusters = tuple(env.clusters)
    ips = tuple((c, env.clusters[c].ingress_ip) for c in clusters)
    return Topology(clusters, ips, overlays, record, env.dns_record()[1])


class DnsReadBackFailed(PermanentError):
    """The authoritative server did not show the new record set in time."""


def read_back(
    dns: Dns, name: str, expect: frozenset[str], *, shown_as: str, timeout: float = 30.0, every: float = 0.5
) -> frozenset[str]:
    """Poll the authoritative server until ``name`` holds exactly ``expect`` (bounded by ``timeout``).

    A write can be accepted before every server of the authority serves it (Route 53 is PENDING
    until INSYNC; secondaries follow NOTIFY): only reading it back proves resolvers will get it.
    """
    deadline = time.monotonic() + timeout
    seen: frozenset[str] | str = "nothing yet"
    while True:
        try:
            seen = dns.read_a(name)
            if seen == expect:
                return seen
        except TransientError as e:
            seen = str(e)
        if time.monotonic() >= deadline:
            shown = ", ".join(sorted(seen)) if isinstance(seen, frozenset) else seen
            raise DnsReadBackFailed(
                f"{shown_as} still shows {shown or 'no A records'} after {timeout:g} s; "
                f"expected {', '.join(sorted(expect))}"
            )
        time.sleep(every)
