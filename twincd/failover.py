"""Failover planning: current topology + target → an ordered plan that never drops traffic.

Pure: no I/O, no Prefect, no SDK. The flow reads the topology (which Kustomize Component each
app overlay references, which IPs each app's DNS records hold and their TTL), asks
``plan_failover`` for the actions, publishes ``FailoverPlan.markdown()`` and executes the actions
in order. Topology is per app: each app has its own record(s) and may be Active/Active or
Active/Standby, and may carry a constraint (``only``) a failover keeps unless forced.

The order is the whole point: bring up what will serve (promote), check it is healthy (gate),
point DNS at it, read DNS back, wait for the old record set's TTL so that resolvers stop handing
out the old IPs, and only then stop what no longer serves (demote).

Rules enforced here rather than in the flow, so unit tests pin them:
- a plan never publishes an empty record set (never remove the last IP);
- ``gate`` refuses to publish any IP of a cluster that failed the app's health check, and
  refuses a DNS change unless a healthy IP stays in the record;
- a topology already at the target gives an empty plan (no MR, no DNS write);
- a constraint is broken only with ``force``, and the plan says so and why the constraint exists.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from twincd.config import Environment
from twincd.domain import ARecords, Phase, Role, RolloutVerdict
from twincd.errors import PermanentError, TransientError
from twincd.ports import Dns

ACTIVE = "components/active"
STANDBY = "components/standby"

Mode = Literal["active-active", "active-standby"]


class PlanError(PermanentError):
    """The target cannot be reached safely from here (unknown cluster, no ingress IP, a constraint)."""


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
class Constraint:
    """What an app's topology must stay (``only``), and why (shown whenever a plan meets it)."""

    only: Mode
    why: str

    def allows(self, serving: Sequence[str], clusters: Sequence[str]) -> bool:
        if self.only == "active-standby":
            return len(serving) == 1
        return set(serving) == set(clusters)


@dataclass(frozen=True)
class Record:
    """One A record of an app as the authority holds it now (``ttl``: as read; None: no set)."""

    name: str  # relative to the zone
    fqdn: str
    ips: frozenset[str]
    ttl: int | None
    write_ttl: int  # the TTL twincd writes (configured)


@dataclass(frozen=True)
class AppState:
    """One app now: its overlays' components, its DNS records (empty: not managed), its constraint."""

    app: str
    overlays: tuple[Overlay, ...]
    records: tuple[Record, ...] = ()
    constraint: Constraint | None = None

    def role(self, cluster: str) -> Role:
        roles = {o.role for o in self.overlays if o.cluster == cluster}
        return roles.pop() if len(roles) == 1 else "unknown"

    def serving(self, clusters: Sequence[str]) -> tuple[str, ...]:
        return tuple(c for c in clusters if self.role(c) == "active")


@dataclass(frozen=True)
class Topology:
    """What runs where now: every app's overlays at the manifests branch head and its records."""

    clusters: tuple[str, ...]
    ingress_ips: tuple[tuple[str, tuple[str, ...]], ...]  # (cluster, its ingress IPs) in cluster order
    apps: tuple[AppState, ...]

    def ips(self, cluster: str) -> tuple[str, ...]:
        return dict(self.ingress_ips).get(cluster, ())

    def app(self, name: str) -> AppState:
        for a in self.apps:
            if a.app == name:
                return a
        raise PlanError(f"unknown app {name!r} (known: {', '.join(a.app for a in self.apps)})")

    def describe(self, app: AppState) -> str:
        roles = ", ".join(f"{c} {app.role(c)}" for c in self.clusters)
        if not app.records:
            return f"{roles}; DNS not managed"
        records = "; ".join(f"{r.fqdn}: {', '.join(sorted(r.ips)) or 'no A records'}" for r in app.records)
        return f"{roles}; {records}"


@dataclass(frozen=True)
class Target:
    """What is asked: some apps (none named: every app) to a mode, or every app off some clusters."""

    mode: Mode | None = None
    active: str | None = None  # the serving cluster when mode is active-standby
    apps: tuple[str, ...] = ()
    evacuate: tuple[str, ...] = ()  # clusters every app stops serving from

    @property
    def label(self) -> str:
        """For branch names and artifact keys: ``evacuate-aks``, ``hello-active-standby-aks``."""
        if self.evacuate:
            return "evacuate-" + "-".join(self.evacuate)
        mode = self.mode if self.mode == "active-active" else f"{self.mode}-{self.active}"
        return "-".join([*self.apps, mode])

    def serving(self, app: AppState, clusters: Sequence[str]) -> tuple[str, ...]:
        """The clusters that serve ``app`` once this target is reached."""
        if not self.evacuate:
            return tuple(clusters) if self.mode == "active-active" else (str(self.active),)
        left = tuple(c for c in app.serving(clusters) if c not in self.evacuate)
        # An app served only from the evacuated side is promoted on the first cluster left.
        return left or tuple(c for c in clusters if c not in self.evacuate)[:1]


def mode_label(serving: Sequence[str], clusters: Sequence[str]) -> str:
    if set(serving) == set(clusters):
        return "active-active"
    if len(serving) == 1:
        return f"active-standby on {serving[0]}"
    return f"active-active on {', '.join(serving)} only"


@dataclass(frozen=True)
class AppChange:
    """One app's line in the plan: where it is, where it goes, and the constraint it meets."""

    app: str
    current: str
    target: str
    serving: tuple[str, ...]
    constraint: str = ""  # "only active-standby: <why>", plus "BROKEN by --force" when so


@dataclass(frozen=True)
class SwitchComponents:
    """Switch overlays to one component, merge, verify (promote: full replicas; demote: scaled to 0)."""

    step: Literal["promote", "demote"]
    role: Role  # the component every overlay below ends up referencing
    clusters: tuple[str, ...]
    overlays: tuple[Overlay, ...]
    # Clusters whose Argo CD is unreachable: twincd server-side applies their overlays itself.
    direct: tuple[str, ...] = ()
    # Clusters whose API server is unreachable: the change is merged (git stays the truth) and
    # reaches them when they are back; it cannot be verified now.
    unverified: tuple[str, ...] = ()

    def describe(self) -> str:
        verify = (
            "verify every workload at full replicas"
            if self.role == "active"
            else "verify every workload scaled to 0 (standby)"
        )
        files = ", ".join(f"`{o.file}`" for o in self.overlays)
        text = (
            f"**{self.step}** {', '.join(self.clusters)}: switch {files} to `{component(self.role)}`, merge"
            + (f", apply to {', '.join(self.direct)} directly (Argo CD unreachable)" if self.direct else "")
            + f", {verify}"
        )
        if self.unverified:
            text += f" except on {', '.join(self.unverified)} (unreachable: not verified now)"
        return text


@dataclass(frozen=True)
class HealthGate:
    """Every (app, cluster) that will serve must be healthy before DNS names it or anything is demoted."""

    checks: tuple[tuple[str, str], ...]  # (app, cluster)
    http: tuple[str, ...] = ()  # apps whose HTTP health path is checked through every ingress IP

    def describe(self) -> str:
        parts = []
        for app in dict.fromkeys(a for a, _ in self.checks):
            clusters = ", ".join(c for a, c in self.checks if a == app)
            how = "workload available" + (
                "; its health path through every ingress IP as its clients reach it: Host and SNI, "
                "certificate verified, 2xx only"
                if app in self.http
                else ""
            )
            parts.append(f"{app} on {clusters} ({how})")
        return f"**health gate** {'; '.join(parts)}"


@dataclass(frozen=True)
class ReplaceRecord:
    """Replace an app's whole A record set in one atomic change, then read it back until it shows ``new``."""

    app: str
    name: str  # relative to the zone
    fqdn: str
    old: frozenset[str]
    new: frozenset[str]
    ttl: int  # written with the new set

    def describe(self) -> str:
        old = ", ".join(sorted(self.old)) or "(none)"
        return (
            f"**dns** replace A `{self.fqdn}` {old} → {', '.join(sorted(self.new))} (TTL {self.ttl}), "
            "read back from the authoritative server until it shows the new set"
        )


@dataclass(frozen=True)
class WaitTtl:
    """Resolvers may hand out a removed IP until the old set's TTL runs out: demote after that."""

    seconds: int
    names: tuple[str, ...]
    skip: bool = False  # --emergency

    def describe(self) -> str:
        names = ", ".join(f"`{n}`" for n in self.names)
        if self.skip:
            return (
                f"**TTL wait** skipped (emergency): resolvers may still send clients to the removed IPs "
                f"of {names} for up to {self.seconds} s after the change"
            )
        return f"**TTL wait** {self.seconds} s (the old TTL of {names}) before anything is demoted"


Action = SwitchComponents | HealthGate | ReplaceRecord | WaitTtl


@dataclass(frozen=True)
class FailoverPlan:
    current: Topology
    target: Target
    changes: tuple[AppChange, ...]
    actions: tuple[Action, ...]
    notes: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()  # clusters whose API server did not answer when planned

    @property
    def noop(self) -> bool:
        return not self.actions

    def summary(self) -> str:
        return "; ".join(f"{c.app} {c.current.split(';')[0]} → {c.target}" for c in self.changes)

    def markdown(self, *, reason: str = "", dry_run: bool = False, emergency: bool = False) -> str:
        lines = [f"# Failover: {self.target.label}", ""]
        if dry_run:
            lines += ["**Dry run**: nothing below is carried out.", ""]
        if emergency:
            lines += ["**Emergency**: merges do not wait for approval (still recorded on the forge).", ""]
        if reason:
            lines += [f"Reason: {reason}", ""]
        for c in self.changes:
            ips = ", ".join(ip for cluster in c.serving for ip in self.current.ips(cluster))
            lines.append(f"- **{c.app}**: {c.current} → {c.target}" + (f" ({ips})" if ips else ""))
            if c.constraint:
                lines.append(f"  - constraint: {c.constraint}")
        lines.append("")
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


def plan_failover(
    current: Topology,
    target: Target,
    *,
    http_health: Sequence[str] = (),
    force: bool = False,
    emergency: bool = False,
    unreachable: Mapping[str, str] | None = None,
    argocd: Mapping[str, str | None] | None = None,
) -> FailoverPlan:
    """The ordered actions from ``current`` to ``target`` (empty when already there).

    ``http_health``: the apps whose health gate includes the HTTP check through every ingress IP.
    ``unreachable``: clusters whose API server did not answer, and why. ``argocd``: for each cluster,
    the cluster that hosts its Argo CD; where that one is unreachable, twincd applies the switch itself.
    """
    _check_target(current, target)
    down = dict(unreachable or {})
    apps = [current.app(a) for a in target.apps] if target.apps else list(current.apps)
    changes: list[AppChange] = []
    notes: list[str] = []
    promote: list[Overlay] = []
    demote: list[Overlay] = []
    checks: list[tuple[str, str]] = []
    records: list[ReplaceRecord] = []
    broken: list[str] = []
    for app in apps:
        if not app.overlays:
            raise PlanError(f"{app.app}: no overlays found: nothing to switch")
        serving = target.serving(app, current.clusters)
        changes.append(_app_change(current, app, serving, force, broken))
        up = [o for o in app.overlays if o.cluster in serving and o.role != "active"]
        off = [o for o in app.overlays if o.cluster not in serving and o.role != "standby"]
        dns = _record_changes(current, app, serving, notes)
        promote += up
        demote += off
        records += dns
        if up or off or dns:
            # Also when nothing is promoted: whatever serves next is checked before DNS or a
            # demotion leans on it.
            checks += [(app.app, c) for c in serving]
    if broken and not force:
        raise PlanError(
            "refusing to break a constraint (--force overrides, and the plan says so): " + "; ".join(broken)
        )
    direct = _direct(current, promote, demote, down, argocd, notes)

    def switch(step: Literal["promote", "demote"], role: Role, overlays: list[Overlay]) -> SwitchComponents:
        clusters = _clusters(overlays, current)
        return SwitchComponents(
            step,
            role,
            clusters,
            tuple(overlays),
            tuple(c for c in clusters if c in direct),
            tuple(c for c in clusters if c in down),
        )

    actions: list[Action] = []
    if promote:
        actions.append(switch("promote", "active", promote))
    if checks:
        gated = tuple(a for a in dict.fromkeys(a for a, _ in checks) if a in http_health)
        actions.append(HealthGate(tuple(checks), gated))
    actions += records
    shrinking = [r for r in records if r.old - r.new]
    if demote and shrinking:
        ttl = max(_old_ttl(current, r) for r in shrinking)
        actions.append(WaitTtl(ttl, tuple(r.fqdn for r in shrinking), skip=emergency))
    if demote:
        actions.append(switch("demote", "standby", demote))
    return FailoverPlan(current, target, tuple(changes), tuple(actions), tuple(notes), tuple(sorted(down)))


def _direct(
    current: Topology,
    promote: Sequence[Overlay],
    demote: Sequence[Overlay],
    down: Mapping[str, str],
    argocd: Mapping[str, str | None] | None,
    notes: list[str],
) -> tuple[str, ...]:
    """The clusters twincd applies itself (Argo CD is unreachable); refuses to promote where the API
    server is unreachable, and notes the demotions that cannot be verified now."""
    stranded = sorted({o.cluster for o in promote if o.cluster in down})
    if stranded:
        raise PlanError(
            f"cannot promote on {', '.join(stranded)}: its API server is unreachable "
            f"({'; '.join(down[c] for c in stranded)})"
        )
    hosts = {c: host for c, host in (argocd or {}).items() if c not in down and host in down}
    for host in dict.fromkeys(hosts.values()):
        notes.append(
            f"Argo CD unreachable (it runs on {host}): applying directly. Each switch is still merged "
            f"into the manifests branch (git stays the truth; its MR says why), then twincd server-side "
            f"applies the overlays of {', '.join(c for c, h in hosts.items() if h == host)} at that "
            "revision (field manager twincd) and verifies them. Once Argo CD is back, the drift check "
            "shows whether it agrees."
        )
    direct = tuple(c for c in current.clusters if c in hosts)
    for cluster in sorted({o.cluster for o in demote if o.cluster in down}):
        notes.append(
            f"{cluster} is unreachable ({down[cluster]}): its demotion is merged and reaches it when it "
            "is back; it is not verified now."
        )
    return direct


def _check_target(current: Topology, target: Target) -> None:
    unknown = [
        c
        for c in (*target.evacuate, *([target.active] if target.active else []))
        if c not in current.clusters
    ]
    if unknown:
        raise PlanError(
            f"unknown cluster(s) {', '.join(map(repr, unknown))}; known: {', '.join(current.clusters)}"
        )
    if target.evacuate:
        if target.mode is not None or target.active is not None:
            raise PlanError("an evacuation takes no mode: every app keeps its topology on what is left")
        if set(target.evacuate) >= set(current.clusters):
            raise PlanError("evacuating every cluster leaves nothing to serve")
    elif target.mode == "active-standby" and target.active is None:
        raise PlanError(f"active-standby needs the active cluster, one of {', '.join(current.clusters)}")
    elif target.mode == "active-active" and target.active is not None:
        raise PlanError("active-active takes no active cluster (every cluster serves)")
    elif target.mode is None:
        raise PlanError("give a mode (active-active, or active-standby with the active cluster) or evacuate")
    if not current.apps:
        raise PlanError("no apps: nothing to switch")


def _app_change(
    current: Topology, app: AppState, serving: tuple[str, ...], force: bool, broken: list[str]
) -> AppChange:
    said = ""
    if app.constraint is not None:
        said = f"only {app.constraint.only}: {app.constraint.why}"
        if not app.constraint.allows(serving, current.clusters):
            broken.append(
                f"{app.app} must stay {app.constraint.only} ({app.constraint.why}); "
                f"the target makes it {mode_label(serving, current.clusters)}"
            )
            said += " (BROKEN by --force)" if force else " (would be broken)"
    return AppChange(app.app, current.describe(app), mode_label(serving, current.clusters), serving, said)


def _record_changes(
    current: Topology, app: AppState, serving: tuple[str, ...], notes: list[str]
) -> list[ReplaceRecord]:
    if not app.records:
        targets = ", ".join(f"{c} ({', '.join(current.ips(c)) or 'no ingress IP'})" for c in serving)
        notes.append(
            f"{app.app}: DNS is not managed by twincd: point its name at {targets} yourself. twincd "
            "demotes right after the health gate: with the local forge, change DNS before approving "
            "this plan; with GitLab, before merging the demote MR."
        )
        return []
    missing = [c for c in serving if not current.ips(c)]
    if missing:
        raise PlanError(
            f"cluster(s) {', '.join(missing)} have no ingress IP: DNS cannot point {app.app} at them"
        )
    new = frozenset(ip for c in serving for ip in current.ips(c))
    return [
        ReplaceRecord(app.app, r.name, r.fqdn, r.ips, new, r.write_ttl) for r in app.records if r.ips != new
    ]


def _old_ttl(current: Topology, change: ReplaceRecord) -> int:
    record = next(r for r in current.app(change.app).records if r.fqdn == change.fqdn)
    return record.ttl if record.ttl is not None else record.write_ttl


def _clusters(overlays: Sequence[Overlay], topology: Topology) -> tuple[str, ...]:
    names = {o.cluster for o in overlays}
    return tuple(c for c in topology.clusters if c in names)


@dataclass(frozen=True)
class Health:
    """One app's health on one cluster: every check passed, or the first failure's reason."""

    app: str
    cluster: str
    healthy: bool
    checks: tuple[str, ...]  # what was checked, and how it went, for people


def workload_health(app: str, cluster: str, what: str, obj: Mapping[str, object] | None) -> Health:
    """The app's workload found and available at its full replica count.

    One look, no waiting: the rollout was verified before, so anything short of healthy now is a
    reason not to send traffic to ``cluster``.
    """
    spec = obj.get("spec", {}) if obj is not None else {}
    status = obj.get("status", {}) if obj is not None else {}
    want = spec.get("replicas", 1) if isinstance(spec, Mapping) else 1
    available = status.get("availableReplicas", 0) if isinstance(status, Mapping) else 0
    if obj is None or not want or available < want:
        shown = "not found" if obj is None else f"{available}/{want} replicas available"
        return Health(app, cluster, False, (f"{what} {shown}",))
    return Health(app, cluster, True, (f"{what}: {available}/{want} replicas available",))


def with_probe(health: Health, check: str, ok: bool) -> Health:
    """``health`` plus one more check (an HTTP probe through the ingress): healthy only if both are."""
    return Health(health.app, health.cluster, health.healthy and ok, (*health.checks, check))


def consecutive(
    check: Callable[[], tuple[bool, str]],
    *,
    successes: int,
    attempts: int,
    interval: float,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, str]:
    """``successes`` healthy answers in a row within ``attempts`` tries: one lucky answer from a
    pod that is still starting (or a flapping one) is not health."""
    streak, seen = 0, ""
    for attempt in range(1, attempts + 1):
        ok, seen = check()
        streak = streak + 1 if ok else 0
        if streak >= successes:
            return True, f"{seen} ({successes} in a row)"
        if attempts - attempt < successes - streak:
            break  # not enough tries left for the streak
        sleep(interval)
    return False, f"{seen} ({streak} of {successes} healthy answers in a row within {attempts} tries)"


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


def gate(plan: FailoverPlan, health: Mapping[tuple[str, str], Health]) -> None:
    """Raise HealthGateFailed unless every (app, cluster) the plan gates is healthy.

    Then no IP of an unhealthy cluster is ever published, and a record change always leaves at
    least one healthy IP (the serving set is never empty).
    """
    checks = [c for a in plan.actions if isinstance(a, HealthGate) for c in a.checks]
    unhealthy = [c for c in checks if c not in health or not health[c].healthy]
    if unhealthy:
        why = "; ".join(
            f"{app} on {cluster}: "
            + (health[(app, cluster)].checks[-1] if (app, cluster) in health else "not checked")
            for app, cluster in unhealthy
        )
        raise HealthGateFailed(f"health gate failed ({why}); DNS was not changed")
    for action in plan.actions:
        if isinstance(action, ReplaceRecord):
            check_record_change(plan, action, health)


def check_record_change(
    plan: FailoverPlan, action: ReplaceRecord, health: Mapping[tuple[str, str], Health]
) -> None:
    """The last line of defence before a DNS write: nothing unhealthy in, something healthy left."""
    mine = {c: h for (app, c), h in health.items() if app == action.app}
    healthy_ips = {ip for c, h in mine.items() if h.healthy for ip in plan.current.ips(c)}
    if not action.new:
        raise HealthGateFailed(f"refusing to remove the last IP of {action.fqdn}")
    unchecked = sorted(action.new - healthy_ips)
    if unchecked:
        raise HealthGateFailed(
            f"refusing to publish {', '.join(unchecked)} in {action.fqdn}: its cluster did not pass "
            f"{action.app}'s health check"
        )


def branch_name(target: Target, run_id: str, step: str) -> str:
    """``twincd/failover/<target>-<short id>/<step>``: one branch per merge of one failover run."""
    short = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8] or "manual"
    return f"twincd/failover/{target.label}-{short}/{step}"


def topology_of(
    env: Environment,
    overlays: Sequence[Overlay],
    records: Mapping[str, ARecords],
    ingress: Mapping[str, tuple[str, ...]] | None = None,
) -> Topology:
    """What runs where now: the overlays read, each app's records as read (by relative name), and
    each cluster's ingress IPs: read from its Service (``ingress``), else as configured."""
    clusters = tuple(env.clusters)
    owners: dict[str, str] = {}
    for app in env.apps:
        for r in env.app_records(app):
            if r.fqdn in owners:
                # Refused here, not when the file is read: deploys do not care, a failover would
                # move both apps with one record.
                raise PlanError(
                    f"apps {owners[r.fqdn]} and {app} both use the DNS record {r.fqdn}: give each app "
                    "its own (`apps.<app>.dns.record`) before a failover"
                )
            owners[r.fqdn] = app
    apps = []
    for app in env.apps:
        configured = env.app_topology(app)
        constraint = Constraint(configured.only, configured.why) if configured.only else None
        found = tuple(
            Record(r.name, r.fqdn, records[r.name].ips, records[r.name].ttl, r.ttl)
            for r in env.app_records(app)
            if r.name in records
        )
        apps.append(AppState(app, tuple(o for o in overlays if o.app == app), found, constraint))
    ips = tuple((c, (ingress or {}).get(c, env.clusters[c].ips)) for c in clusters)
    return Topology(clusters, ips, tuple(apps))


def load_balancer_ips(
    service: Mapping[str, object] | None, *, where: str, resolve: Callable[[str], tuple[str, ...]]
) -> tuple[str, ...]:
    """Every address of a LoadBalancer Service's ``status.loadBalancer.ingress``: ``ip`` entries as
    they are, ``hostname`` entries (AWS load balancers publish a name, not IPs) resolved to their
    A records, one per availability zone."""
    if service is None:
        raise PlanError(f"{where}: not found")
    status = service.get("status")
    entries = status.get("loadBalancer", {}).get("ingress") if isinstance(status, Mapping) else None
    ips: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping) and entry.get("ip"):
            ips.append(str(entry["ip"]))
        elif isinstance(entry, Mapping) and entry.get("hostname"):
            ips += resolve(str(entry["hostname"]))
    if not ips:
        raise PlanError(f"{where}: status.loadBalancer.ingress has no address yet (pending)")
    # Sorted: getaddrinfo rotates a name's addresses, and the plan (whose digest keys its approval)
    # must read the same for the same addresses.
    return tuple(sorted(set(ips), key=ipaddress.IPv4Address))


def evacuated(env: Environment, what: str) -> tuple[str, ...]:
    """The clusters ``--evacuate`` names: a cluster, or every cluster of a cloud (``azure``)."""
    if what in env.clusters:
        return (what,)
    found = tuple(name for name, c in env.clusters.items() if c.cloud == what)
    if not found:
        clouds = sorted({c.cloud for c in env.clusters.values()})
        raise PlanError(
            f"--evacuate {what!r}: neither a cluster ({', '.join(env.clusters)}) "
            f"nor a cloud ({', '.join(clouds)})"
        )
    return found


class DnsReadBackFailed(PermanentError):
    """The authoritative server did not show the new record set in time."""


def read_back(
    dns: Dns, name: str, expect: frozenset[str], *, shown_as: str, timeout: float = 30.0, every: float = 0.5
) -> frozenset[str]:
    """Poll the provider until ``name`` holds exactly ``expect`` (bounded by ``timeout``).

    What is read back is what the adapter reads: the server twincd updates (RFC 2136: the primary,
    whose secondaries follow its NOTIFY), Route 53 after the change is INSYNC on all its name
    servers, Azure's ARM view of the record set. It proves the write took; the TTL wait after it
    covers resolvers that cached the old set.
    """
    deadline = time.monotonic() + timeout
    seen: frozenset[str] | str = "nothing yet"
    while True:
        try:
            seen = dns.read(name).ips
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
