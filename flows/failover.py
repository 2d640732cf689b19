"""The failover flow: Active/Active ⇄ Active/Standby, through the manifests repo and DNS, health-gated.

Orchestration only. The plan (``twincd.failover``) is published before anything changes; a dry
run stops there. Then, in the plan's order: promote (switch overlays to components/active, land
the change in the subflow ``failover-<mode>/promote``, verify full replicas), health gate, DNS
replace + read back, demote (components/standby, ``…/demote``, verify scaled to 0). Any failure
after the first change puts back what was changed, newest first (DNS record set; merged switches
by a revert MR, each in a subflow ``…/undo-<step>``), notifies, and ends the run failed with the
list of what was undone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.landing import Change, Story, ask_approval, deadline, failure_text, land_subflow
from flows.turns import one_at_a_time
from tasks.common import untraced
from tasks.failover import (
    check_health,
    merged_into,
    probe_health,
    publish_plan,
    read_back_dns,
    read_dns,
    read_overlays,
    replace_dns,
    revert_switch,
    switch_components,
    verify_role,
)
from twincd.config import DEFAULT_ENV, Environment, load_environment
from twincd.domain import MergeRequest, Phase, Role, RolloutVerdict, Timeline, Waiting
from twincd.errors import PermanentError
from twincd.failover import (
    FailoverPlan,
    Health,
    HealthGate,
    Overlay,
    PlanError,
    ReplaceRecord,
    SwitchComponents,
    Target,
    branch_name,
    check_record_change,
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
class ReplacedRecord:
    """A DNS write that was attempted: undone by writing ``old`` back unless the server still holds it."""

    old: frozenset[str]


Undoable = MergedSwitch | PendingSwitch | ReplacedRecord


@dataclass(frozen=True)
class FailoverResult:
    target: str
    dry_run: bool
    plan: str  # the markdown published before anything changed
    done: tuple[str, ...]  # what was carried out, in order
    record: frozenset[str] | None  # the DNS record as read back at the end (None: not managed)


@flow(name="failover", flow_run_name="failover-{mode}", log_prints=True)
def failover(
    mode: Literal["active-active", "active-standby"],
    active: str | None = None,
    dry_run: bool = False,
    reason: str = "",
    emergency: bool = False,
    env: str = str(DEFAULT_ENV),
    auto_approve: bool = False,
    health_url: str = "",
) -> FailoverResult | State:
    """Switch the clusters between Active/Active and Active/Standby, or move the active side.

    Args:
        mode: active-active (every cluster serves) or active-standby (only `active` serves).
        active: The serving cluster when mode is active-standby (e.g. aks); empty for active-active.
        dry_run: Publish the plan as an artifact and stop; nothing is changed.
        reason: Why (required unless dry_run); goes into the commits, merge requests and notifications.
        emergency: Merge without waiting for approval; still recorded as merge requests with the reason.
        env: The environment file (clusters, manifests repo, forge, DNS).
        auto_approve: Merge without waiting for approval (demos, CI).
        health_url: Optional HTTP URL checked on each serving cluster before DNS changes;
            `{ingress_ip}` is replaced by the cluster's ingress IP, e.g. http://{ingress_ip}/healthz.
    """
    environment = load_environment(env)
    target = Target(mode, active)
    if dry_run:
        return _failover(environment, target, True, reason, emergency, auto_approve, health_url)
    if not reason.strip():
        raise PlanError("a failover needs a reason (it goes into the commits, the MRs and the notifications)")
    # One failover at a time, planned from what the one before left (flows/turns.py).
    with one_at_a_time(environment, "failover", "failover", lambda run: not run.parameters.get("dry_run")):
        return _failover(environment, target, False, reason, emergency, auto_approve, health_url)


def _failover(
    environment: Environment,
    target: Target,
    dry_run: bool,
    reason: str,
    emergency: bool,
    auto_approve: bool,
    health_url: str,
) -> FailoverResult | State:
    overlays = read_overlays(untraced(environment))
    record = read_dns(untraced(environment))
    plan = plan_failover(topology_of(environment, overlays, record), target, http_health=bool(health_url))
    markdown = publish_plan(plan, reason, dry_run, emergency)
    print(markdown)
    if dry_run or plan.noop:
        return FailoverResult(target.label, dry_run, markdown, (), record)

    run_id = str(flow_run.id or "manual")
    story = Story(environment, Timeline("failover", f"{target.label} {run_id[:8]}", run=run_id))
    story.add(
        "plan",
        "ok",
        f"{'EMERGENCY ' if emergency else ''}{plan.current.describe()} → {target.label}; reason: {reason}",
    )
    if emergency or auto_approve:
        approver = f"emergency ({reason})" if emergency else "auto-approve"
    else:
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
                f"no approval of the failover to {target.label} within "
                f"{environment.timeouts.approval_seconds:.0f} s; nothing was changed"
                if answer.timed_out
                else f"failover to {target.label} refused by {answer.approver or 'a reviewer'}; "
                "nothing was changed"
            )
            story.add("approve", "cancelled", message, tell=True)
            return Cancelled(message=message)
        approver = answer.approver or "a reviewer"
    story.tell(after=[markdown])

    changes: list[Undoable] = []
    try:
        done = _execute(environment, plan, run_id, reason, approver, health_url, story, changes)
    except Exception as e:  # whatever failed, what was changed is put back
        undone = _undo(environment, plan, run_id, reason, story, changes)
        text = f"failover to {target.label} failed: {failure_text(e, 'failover')}. Undone: " + (
            "; ".join(undone) or "nothing had changed"
        )
        story.add("result", "failed", text, tell=True)
        raise FailoverFailed(text) from e
    final = read_dns(untraced(environment))
    story.add("result", "ok", f"{target.label}: serving {', '.join(plan.serving)}", tell=True, after=[final])
    return FailoverResult(target.label, False, markdown, done, final)


def _verify_roles(
    environment: Environment, overlays: Sequence[Overlay], role: Role, revision: str, after: Sequence[object]
) -> tuple[RolloutVerdict, ...]:
    futures = [
        verify_role.submit(
            untraced(environment), o.cluster, o.app, role, revision, wait_for=list(after), return_state=False
        )
        for o in overlays
    ]
    return tuple(f.result() for f in futures)


def _switch(
    environment: Environment,
    plan: FailoverPlan,
    action: SwitchComponents,
    run_id: str,
    reason: str,
    approver: str,
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
        return _verify_roles(environment, action.overlays, action.role, revision, after)

    landed = land_subflow(action.step, environment, branch, change, story, verify)
    if landed.mr is not None:
        changes[-1] = MergedSwitch(action, landed.mr)
    failed = [v for v in landed.verdicts if v.phase is not Phase.SUCCEEDED]
    for v in landed.verdicts:
        story.add("verify", "ok" if v not in failed else "failed", v.message, cluster=v.cluster)
    if failed:
        raise FailoverFailed(
            f"{action.step} not verified: " + "; ".join(f"{v.cluster}: {v.message}" for v in failed)
        )


def _health(environment: Environment, action: HealthGate, health_url: str, story: Story) -> dict[str, Health]:
    checks = {c: check_health.submit(untraced(environment), c) for c in action.clusters}
    results = {c: f.result() for c, f in checks.items()}
    probes = {
        c: probe_health.submit(
            untraced(environment), c, health_url, h, wait_for=[checks[c]], return_state=False
        )
        for c, h in results.items()
        if health_url and h.healthy
    }
    health = {c: probes[c].result() if c in probes else h for c, h in results.items()}
    for h in health.values():
        story.add("health", "ok" if h.healthy else "failed", "; ".join(h.checks), cluster=h.cluster)
    story.tell(after=[*checks.values(), *probes.values()])
    return health


def _execute(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    approver: str,
    health_url: str,
    story: Story,
    changes: list[Undoable],
) -> tuple[str, ...]:
    """Carry out the plan in order; record each change in ``changes`` as soon as it may have happened."""
    done: list[str] = []
    health: dict[str, Health] = {}
    for action in plan.actions:
        if isinstance(action, SwitchComponents):
            _switch(environment, plan, action, run_id, reason, approver, story, changes)
        elif isinstance(action, HealthGate):
            health = _health(environment, action, health_url, story)
            gate(plan, health)
        elif isinstance(action, ReplaceRecord):
            check_record_change(plan, health)
            # Recorded before the write: a timeout may hide a write the server did apply.
            changes.append(ReplacedRecord(action.old))
            written = replace_dns(untraced(environment), action.new)
            seen = read_back_dns(untraced(environment), written, READ_BACK_SECONDS)
            story.add(
                "dns", "ok", f"{action.name} reads back {', '.join(sorted(seen))}", tell=True, after=[seen]
            )
        done.append(action.describe())
    return tuple(done)


def _undo(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    story: Story,
    changes: list[Undoable],
) -> list[str]:
    """Put back every change, newest first; each undo step's failure is reported, not raised."""
    undone: list[str] = []
    for change in reversed(changes):
        try:
            if isinstance(change, ReplacedRecord):
                undone.append(_undo_dns(environment, change))
            else:
                undone += _undo_switch(environment, plan, run_id, reason, story, change)
        except Exception as e:  # noqa: BLE001 - one failed undo must not hide the failure or the other undos
            undone.append(f"could not undo {type(change).__name__}: {failure_text(e, 'failover')}")
    return undone


def _undo_dns(environment: Environment, change: ReplacedRecord) -> str:
    if read_dns(untraced(environment)) == change.old:
        return f"DNS still held {', '.join(sorted(change.old))}: nothing to put back"
    written = replace_dns(untraced(environment), change.old)
    read_back_dns(untraced(environment), written, READ_BACK_SECONDS)
    return f"DNS put back to {', '.join(sorted(change.old))}"


def _undo_switch(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    story: Story,
    change: MergedSwitch | PendingSwitch,
) -> list[str]:
    action = change.action
    step, clusters = action.step, ", ".join(action.clusters)
    ref = change.mr.ref
    if isinstance(change, MergedSwitch):
        merge_commit = change.mr.merge_commit
    else:
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
        description=f"Undo of {ref} after a failed failover to {plan.target.label}."
        f"\n\nReason of the failover: {reason}\n\n```diff\n{branch.diff}```\n",
        approver="twincd undo",
    )

    def verify(revision: str, after: Sequence[object]) -> tuple[RolloutVerdict, ...]:
        # Serving again before the DNS undo (next in line) sends traffic back here.
        return (
            _verify_roles(environment, action.overlays, "active", revision, after) if step == "demote" else ()
        )

    landed = land_subflow(f"undo-{step}", environment, branch, undo, story, verify)
    mr_ref = landed.mr.ref if landed.mr else "(nothing to merge)"
    return [
        f"{step} of {clusters} reverted by {mr_ref} ({landed.revision[:12]})",
        *(f"{v.cluster}: {v.message}" for v in landed.verdicts),
    ]
