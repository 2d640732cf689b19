"""The failover flow: per app Active/Active ⇄ Active/Standby, or a whole cloud evacuated, through
the manifests repo and DNS, health-gated.

Orchestration only. The plan (``twincd.failover``) is published before anything changes; a dry
run stops there. Then, in the plan's order: promote (switch overlays to components/active, land
the change in the subflow ``promote``, verify full replicas), health gate, each app's DNS replace
+ read back, the old records' TTL wait, demote (components/standby, ``demote``, verify scaled to 0).
Any failure after the first change puts back what was changed, newest first (DNS record sets;
merged switches by a revert MR, each in a subflow ``undo-<step>``), notifies, and ends the run
failed with the list of what was undone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.landing import (
    Change,
    Story,
    ask_approval,
    deadline,
    failure_text,
    land_approved,
    land_subflow,
    resumed,
)
from flows.turns import one_at_a_time
from tasks.common import untraced
from tasks.deploy import apply_overlay
from tasks.failover import (
    api_unreachable,
    check_health,
    keep_plan,
    merged_into,
    probe_health,
    publish_plan,
    read_back_dns,
    read_dns,
    read_ingress_ips,
    read_overlays,
    read_record,
    replace_dns,
    revert_switch,
    switch_components,
    verify_role,
    wait_ttl,
)
from twincd import wiring
from twincd.config import DEFAULT_ENV, Environment, load_environment
from twincd.domain import ARecords, MergeRequest, Phase, Role, RolloutVerdict, Timeline, Waiting
from twincd.errors import PermanentError, TwincdError
from twincd.failover import (
    FailoverPlan,
    Health,
    HealthGate,
    PlanError,
    ReplaceRecord,
    SwitchComponents,
    Target,
    WaitTtl,
    branch_name,
    check_record_change,
    evacuated,
    gate,
    plan_failover,
    topology_of,
)

READ_BACK_SECONDS = 30.0


class FailoverFailed(PermanentError):
    pass


@dataclass(frozen=True)
class MergedSwitch:
    """A switch that reached the manifests branch: undone by a revert MR."""

    action: SwitchComponents
    mr: MergeRequest


@dataclass(frozen=True)
class PendingSwitch:
    """A switch whose merge was asked for: it may have reached the branch even if the call failed."""

    action: SwitchComponents
    mr: MergeRequest


@dataclass(frozen=True)
class EarlierSwitch:
    """A switch an earlier pass of this run merged (a person merged it on the forge and the run
    resumed from the top), not reached again by this pass before it failed."""

    action: SwitchComponents
    branch: str


@dataclass(frozen=True)
class ReplacedRecord:
    """A DNS write that was attempted: undone by writing ``old`` back unless the server still holds it."""

    action: ReplaceRecord


Undoable = MergedSwitch | PendingSwitch | EarlierSwitch | ReplacedRecord


@dataclass(frozen=True)
class FailoverResult:
    target: str
    dry_run: bool
    plan: str  # the markdown published before anything changed
    done: tuple[str, ...]  # what was carried out, in order
    records: dict[str, frozenset[str]]  # every app record (full name) as read back at the end


def _run_name() -> str:
    p = flow_run.parameters
    return (
        "failover-"
        + _target(p.get("mode"), p.get("active"), p.get("apps") or (), p.get("evacuate", ""), None).label
    )


def _target(
    mode: str | None, active: str | None, apps: Sequence[str], evacuate: str, env: Environment | None
) -> Target:
    if evacuate:
        clusters = evacuated(env, evacuate) if env is not None else (evacuate,)
        return Target(apps=tuple(apps), evacuate=clusters)
    return Target(mode, active or None, tuple(apps))  # type: ignore[arg-type]


@flow(name="failover", flow_run_name=_run_name, log_prints=True)
def failover(
    mode: Literal["active-active", "active-standby"] | None = None,
    active: str | None = None,
    apps: list[str] | None = None,
    evacuate: str = "",
    force: bool = False,
    dry_run: bool = False,
    reason: str = "",
    emergency: bool = False,
    env: str = str(DEFAULT_ENV),
    auto_approve: bool = False,
) -> FailoverResult | State:
    """Switch apps between Active/Active and Active/Standby, move their active side, or evacuate a cloud.

    Args:
        mode: active-active (every cluster serves) or active-standby (only `active` serves); empty
            with `evacuate`.
        active: The serving cluster when mode is active-standby (e.g. aks).
        apps: The apps to switch; empty: every app.
        evacuate: A cluster (e.g. aks) or a cloud (e.g. azure) every app moves off: Active/Standby
            apps served there are promoted on the other side, Active/Active apps narrowed.
        force: Break an app's topology constraint (`only:`); the plan says so and why it exists.
        dry_run: Publish the plan as an artifact and stop; nothing is changed.
        reason: Why (required unless dry_run); goes into the commits, merge requests and notifications.
        emergency: Merge without waiting for approval and skip the TTL wait before demoting; still
            recorded as merge requests with the reason.
        env: The environment file (clusters, manifests repo, forge, DNS).
        auto_approve: Merge without waiting for approval (demos, CI).
    """
    environment = load_environment(env)
    target = _target(mode, active, apps or (), evacuate, environment)
    if dry_run:
        return _failover(environment, target, True, reason, emergency, auto_approve, force)
    if not reason.strip():
        raise PlanError("a failover needs a reason (it goes into the commits, the MRs and the notifications)")
    # One failover at a time, planned from what the one before left (flows/turns.py).
    with one_at_a_time(environment, "failover", "failover", lambda run: not run.parameters.get("dry_run")):
        return _failover(environment, target, False, reason, emergency, auto_approve, force)


def _failover(
    environment: Environment,
    target: Target,
    dry_run: bool,
    reason: str,
    emergency: bool,
    auto_approve: bool,
    force: bool,
) -> FailoverResult | State:
    try:
        plan, records = _plan(environment, target, force, emergency)
    except TwincdError:
        # A run resumed after a merge plans again from the top; when that fails (a cluster that
        # blips, a load balancer still pending), the plan kept before the wait still holds.
        kept_before = keep_plan(None) if resumed() else None
        if kept_before is None:
            raise
        plan, records = kept_before, {}
        print("Could not plan again after the wait: carrying out the plan kept from before it")
    markdown = publish_plan(plan, reason, dry_run, emergency)
    print(markdown)
    if dry_run:
        return FailoverResult(target.label, dry_run, markdown, (), _fqdns(environment, records))

    run_id = str(flow_run.id or "manual")
    story = Story(environment, Timeline("failover", f"{target.label} {run_id[:8]}", run=run_id))
    if not plan.noop:
        story.add("plan", "ok", f"{'EMERGENCY ' if emergency else ''}{plan.summary()}; reason: {reason}")
    approver = _approver(environment, plan, markdown, run_id, reason, emergency, auto_approve, story)
    if isinstance(approver, State):
        return approver
    # What is carried out is the plan that got past approval first in this run. A run that waits
    # for a merge on the forge resumes from the top, and planning again from what the switch it
    # waited for changed would find less (or nothing) left to do: its steps are re-entered in the
    # kept plan's order instead, each finding its work done.
    kept = keep_plan(plan)
    assert kept is not None  # given a plan, it returns one
    if kept != plan:
        markdown = publish_plan(kept, reason, False, emergency)  # the artifact shows what is carried out
        print(f"Resumed: carrying out the plan made before the wait:\n{markdown}")
    plan = kept
    if plan.noop:
        return FailoverResult(target.label, False, markdown, (), _fqdns(environment, records))
    story.tell(after=[markdown])

    changes: list[Undoable] = []
    try:
        done = _execute(environment, plan, run_id, reason, approver, story, changes)
    except Exception as e:  # whatever failed, what was changed is put back
        undone = _undo(environment, plan, run_id, reason, story, changes)
        text = f"failover {target.label} failed: {failure_text(e, 'failover')}. Undone: " + (
            "; ".join(undone) or "nothing had changed"
        )
        story.add("result", "failed", text, tell=True)
        raise FailoverFailed(text) from e
    final = read_dns(untraced(environment))
    serving = "; ".join(f"{c.app} on {', '.join(c.serving)}" for c in plan.changes)
    story.add("result", "ok", f"{target.label}: serving {serving}", tell=True, after=[final])
    return FailoverResult(target.label, False, markdown, done, _fqdns(environment, final))


def _plan(
    environment: Environment, target: Target, force: bool, emergency: bool
) -> tuple[FailoverPlan, dict[str, ARecords]]:
    """The plan from what runs now: overlays, DNS records, reachable clusters, ingress IPs."""
    overlays = read_overlays(untraced(environment))
    records = read_dns(untraced(environment))
    reach = {c: api_unreachable.submit(untraced(environment), c) for c in environment.clusters}
    down = {c: why for c, f in reach.items() if (why := f.result())}
    ingress = {
        c: read_ingress_ips.submit(untraced(environment), c)
        for c, cfg in environment.clusters.items()
        if cfg.ingress_service is not None and c not in down
    }
    plan = plan_failover(
        topology_of(environment, overlays, records, {c: f.result() for c, f in ingress.items()}),
        target,
        http_health=[a for a, cfg in environment.apps.items() if cfg.health is not None],
        force=force,
        emergency=emergency,
        unreachable=down,
        argocd={c: environment.argocd_host(c) for c in environment.clusters},
    )
    return plan, records


def _approver(
    environment: Environment,
    plan: FailoverPlan,
    markdown: str,
    run_id: str,
    reason: str,
    emergency: bool,
    auto_approve: bool,
    story: Story,
) -> str | None | State:
    """Who approved the plan; None when each switch waits for people to merge its MR on the forge
    (GitLab); a Cancelled state when the plan was refused or not approved in time."""
    if emergency or auto_approve:
        return f"emergency ({reason})" if emergency else "auto-approve"
    forge = wiring.forge_type(environment)
    if plan.noop:
        return None
    if forge.merged_by_people:
        # Approval happens where the team approves changes: each switch is a merge request that
        # people approve and merge on the forge (its rules apply); the run waits suspended.
        story.add(
            "approve",
            "ok",
            f"each switch below is a merge request to approve and merge on {forge.name}",
            tell=True,
            after=[markdown],
        )
        return None
    story.add("approve", "waiting", "waiting for approval of the plan", tell=True, after=[markdown])
    timeout = environment.timeouts.approval_seconds
    answer = ask_approval(
        description=f"{markdown}\n\nApprove to carry out this plan; leave unticked to refuse.",
        # The plan in the key: a run resumed after the world changed plans again, and a
        # changed plan is asked for again, never carried out under an earlier approval.
        key=f"failover-{run_id[:8]}-{hashlib.sha256(markdown.encode()).hexdigest()[:12]}",
        timeout=timeout,
        waiting=Waiting(None, environment.source, deadline(timeout)),
    )
    if not answer.approved:
        message = (
            f"no approval of the failover {plan.target.label} within {timeout:.0f} s; nothing was changed"
            if answer.timed_out
            else f"failover {plan.target.label} refused by {answer.approver or 'a reviewer'}; "
            "nothing was changed"
        )
        story.add("approve", "cancelled", message, tell=True)
        return Cancelled(message=message)
    return answer.approver or "a reviewer"


def _fqdns(environment: Environment, records: dict[str, ARecords]) -> dict[str, frozenset[str]]:
    return {
        r.fqdn: records[r.name].ips
        for a in environment.apps
        for r in environment.app_records(a)
        if r.name in records
    }


def _verify_roles(
    environment: Environment,
    action: SwitchComponents,
    role: Role,
    revision: str,
    after: Sequence[object],
    story: Story,
) -> tuple[RolloutVerdict, ...]:
    """Each overlay's cluster at ``revision`` in ``role``. Where Argo CD is unreachable (or absent,
    ``sync: apply``) twincd server-side applies the overlay first; an unreachable cluster is skipped."""
    futures = []
    for o in action.overlays:
        if o.cluster in action.unverified:
            story.add(
                "verify",
                "skipped",
                f"{o.app}: unreachable; gets {revision[:12]} when back",
                cluster=o.cluster,
            )
            continue
        direct = o.cluster in action.direct or environment.clusters[o.cluster].sync == "apply"
        applied = (
            [
                apply_overlay.submit(
                    untraced(environment),
                    o.app,
                    o.cluster,
                    revision,
                    wait_for=list(after),
                    return_state=False,
                )
            ]
            if direct
            else []
        )
        futures.append(
            verify_role.submit(
                untraced(environment),
                o.cluster,
                o.app,
                role,
                revision,
                direct,
                wait_for=[*after, *applied],
                return_state=False,
            )
        )
    return tuple(f.result() for f in futures)


def _switch(
    environment: Environment,
    plan: FailoverPlan,
    action: SwitchComponents,
    run_id: str,
    reason: str,
    approver: str | None,
    story: Story,
    changes: list[Undoable],
) -> None:
    """Land one switch and verify it; record it in ``changes`` as soon as it may reach the branch."""
    branch = switch_components(
        untraced(environment), action, branch_name(plan.target, run_id, action.step), reason
    )

    def record(mr: MergeRequest) -> None:
        # Recorded before the merge: a failure after the forge merged must still be undone.
        changes.append(PendingSwitch(action, mr))

    change = Change(
        kind="switch",
        step=action.step,
        title=f"failover: {action.step} {', '.join(action.clusters)}",
        description=f"{action.describe()}\n\nReason: {reason}\n\n```diff\n{branch.diff}```\n",
        approver=approver,
        on_open=record,
    )

    def verify(revision: str, after: Sequence[object]) -> tuple[RolloutVerdict, ...]:
        return _verify_roles(environment, action, action.role, revision, after, story)

    landed = land_approved(action.step, environment, branch, change, story, verify)
    if landed.mr is not None:
        changes[-1] = MergedSwitch(action, landed.mr)
    failed = [v for v in landed.verdicts if v.phase is not Phase.SUCCEEDED]
    for v in landed.verdicts:
        story.add("verify", "ok" if v not in failed else "failed", v.message, cluster=v.cluster)
    if failed:
        raise FailoverFailed(
            f"{action.step} not verified: " + "; ".join(f"{v.cluster}: {v.message}" for v in failed)
        )


def _health(
    environment: Environment, plan: FailoverPlan, action: HealthGate, story: Story
) -> dict[tuple[str, str], Health]:
    checks = {(a, c): check_health.submit(untraced(environment), a, c) for a, c in action.checks}
    results = {k: f.result() for k, f in checks.items()}
    probes = {
        k: probe_health.submit(
            untraced(environment), h, plan.current.ips(h.cluster), wait_for=[checks[k]], return_state=False
        )
        for k, h in results.items()
        if k[0] in action.http and h.healthy
    }
    health = {k: probes[k].result() if k in probes else h for k, h in results.items()}
    for h in health.values():
        story.add(
            "health", "ok" if h.healthy else "failed", f"{h.app}: " + "; ".join(h.checks), cluster=h.cluster
        )
    story.tell(after=[*checks.values(), *probes.values()])
    return health


def _execute(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    approver: str | None,
    story: Story,
    changes: list[Undoable],
) -> tuple[str, ...]:
    """Carry out the plan in order; record each change in ``changes`` as soon as it may have happened."""
    done: list[str] = []
    health: dict[tuple[str, str], Health] = {}
    found_done: list[ReplaceRecord] = []  # DNS changes an earlier pass of this run made
    for action in plan.actions:
        started = time.monotonic()
        if isinstance(action, SwitchComponents):
            _switch(environment, plan, action, run_id, reason, approver, story, changes)
        elif isinstance(action, HealthGate):
            health = _health(environment, plan, action, story)
            gate(plan, health)
        elif isinstance(action, ReplaceRecord):
            check_record_change(plan, action, health)
            if resumed() and _holds(environment, action, action.new):
                found_done.append(action)
            # Recorded before the write: a timeout may hide a write the server did apply.
            changes.append(ReplacedRecord(action))
            written = replace_dns(untraced(environment), action, action.new)
            seen = read_back_dns(untraced(environment), action, written, READ_BACK_SECONDS)
            story.add(
                "dns", "ok", f"{action.fqdn} reads back {', '.join(sorted(seen))}", tell=True, after=[seen]
            )
        elif isinstance(action, WaitTtl) and _written_before(plan, found_done):
            # DNS held the new sets before this pass: an earlier pass of this run wrote them, waited
            # for the old TTL, and then asked for the merge it was resumed by.
            print(f"TTL wait: done before the wait for a merge ({', '.join(action.names)})")
        elif isinstance(action, WaitTtl) and not action.skip:
            story.add(
                "dns",
                "ok",
                f"waiting {action.seconds} s for the old TTL of {', '.join(action.names)}",
                tell=True,
            )
            wait_ttl(action.seconds, action.names)
        took = time.monotonic() - started
        # One line per step with its wall time: where a failover spends its time, in the run's log.
        print(f"step {len(done) + 1} of {len(plan.actions)} done in {took:.1f} s: {_step_name(action)}")
        done.append(f"{action.describe()} [{took:.1f} s]")
    return tuple(done)


def _holds(environment: Environment, action: ReplaceRecord, ips: frozenset[str]) -> bool:
    return read_record(untraced(environment), action.name).ips == ips


def _written_before(plan: FailoverPlan, found_done: Sequence[ReplaceRecord]) -> bool:
    writes = [a for a in plan.actions if isinstance(a, ReplaceRecord)]
    return bool(writes) and all(w in found_done for w in writes)


def _step_name(action: object) -> str:
    if isinstance(action, SwitchComponents):
        return f"{action.step} {', '.join(action.clusters)}"
    if isinstance(action, HealthGate):
        return "health gate"
    if isinstance(action, ReplaceRecord):
        return f"dns {action.fqdn} + read back"
    return "TTL wait" + (" (skipped)" if isinstance(action, WaitTtl) and action.skip else "")


def _undo(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    story: Story,
    changes: list[Undoable],
) -> list[str]:
    """Put back every change, newest first; each undo step's failure is reported, not raised.

    A run resumed after a merge on the forge re-enters its plan from the top, so a failure may come
    before this pass reached again what an earlier pass did: those are found on the forge (a
    switch merged into the target) and in DNS (a record holding the new set), and undone too.
    """
    index = {id(a): i for i, a in enumerate(plan.actions)}
    todo = [(index[id(c.action)], c) for c in changes]
    seen = {i for i, _ in todo}
    now: dict[str, ARecords] | None = None
    for i, action in enumerate(plan.actions):
        if i in seen:
            continue
        if isinstance(action, SwitchComponents):
            branch = branch_name(plan.target, run_id, action.step)
            if merged_into(untraced(environment), branch) is not None:
                todo.append((i, EarlierSwitch(action, branch)))
        elif isinstance(action, ReplaceRecord):
            now = now if now is not None else read_dns(untraced(environment))
            if now.get(action.name, ARecords(frozenset(), None)).ips == action.new:
                todo.append((i, ReplacedRecord(action)))
    undone: list[str] = []
    for _, change in sorted(todo, key=lambda t: t[0], reverse=True):
        try:
            if isinstance(change, ReplacedRecord):
                undone.append(_undo_dns(environment, plan, change.action))
            else:
                undone += _undo_switch(environment, plan, run_id, reason, story, change)
        except Exception as e:  # noqa: BLE001 - one failed undo must not hide the failure or the other undos
            undone.append(f"could not undo {type(change).__name__}: {failure_text(e, 'failover')}")
    return undone


def _undo_dns(environment: Environment, plan: FailoverPlan, action: ReplaceRecord) -> str:
    # Never publish again an IP of a cluster that could not be reached when the plan was made
    # (an evacuation of a cloud that is down): the rule of the health gate holds for undos too.
    dead = {ip for c in plan.unreachable for ip in plan.current.ips(c)}
    old = action.old - dead
    if not old:
        return (
            f"{action.fqdn} left at {', '.join(sorted(action.new))}: its old IPs "
            f"({', '.join(sorted(action.old))}) belong to unreachable clusters"
        )
    if _holds(environment, action, old):
        return f"{action.fqdn} still held {', '.join(sorted(old))}: nothing to put back"
    written = replace_dns(untraced(environment), action, old)
    read_back_dns(untraced(environment), action, written, READ_BACK_SECONDS)
    dropped = f" (not {', '.join(sorted(action.old & dead))}: unreachable)" if action.old & dead else ""
    return f"{action.fqdn} put back to {', '.join(sorted(old))}{dropped}"


def _undo_switch(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    story: Story,
    change: MergedSwitch | PendingSwitch | EarlierSwitch,
) -> list[str]:
    action = change.action
    step, clusters = action.step, ", ".join(action.clusters)
    if isinstance(change, EarlierSwitch):
        ref = f"the merge of {change.branch}"
        merge_commit = merged_into(untraced(environment), change.branch)
    elif isinstance(change, MergedSwitch):
        ref, merge_commit = change.mr.ref, change.mr.merge_commit
    else:
        ref = change.mr.ref
        merge_commit = merged_into(untraced(environment), change.mr.source_branch)
    if merge_commit is None:
        return [f"{step} of {clusters}: {ref} never reached the branch, nothing to revert"]
    branch = revert_switch(
        untraced(environment), step, merge_commit, branch_name(plan.target, run_id, f"undo-{step}")
    )
    undo = Change(
        kind="undo",
        step=f"undo-{step}",
        title=f"Revert failover: {step}",
        description=f"Undo of {ref} after a failed failover {plan.target.label}."
        f"\n\nReason of the failover: {reason}\n\n```diff\n{branch.diff}```\n",
        approver="twincd undo",
    )

    def verify(revision: str, after: Sequence[object]) -> tuple[RolloutVerdict, ...]:
        # An undone demotion serves again before the DNS undo (next in line) sends traffic back; an
        # undone promotion is verified back at standby, so "undone" is what the clusters show (and
        # Argo CD is asked now, not at its next poll).
        role: Role = "active" if step == "demote" else "standby"
        return _verify_roles(environment, action, role, revision, after, story)

    landed = land_subflow(f"undo-{step}", environment, branch, undo, story, verify)
    mr_ref = landed.mr.ref if landed.mr else "(nothing to merge)"
    return [
        f"{step} of {clusters} reverted by {mr_ref} ({landed.revision[:12]})",
        *(f"{v.cluster}: {v.message}" for v in landed.verdicts),
    ]
