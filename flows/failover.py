"""The failover flow: Active/Active ⇄ Active/Standby, through the manifests repo and DNS, health-gated.

Orchestration only. The plan (``twincd.failover``) is published before anything changes; a dry
run stops there. Then, in the plan's order: promote (switch overlays to components/active, merge,
verify full replicas), health gate, DNS replace + read back, demote (components/standby, merge,
verify scaled to 0). Any failure after the first change puts back what was changed, newest
first (DNS record set; merged switches by a revert MR), notifies, and ends the run failed with
the list of what was undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.deploy import Approval
from tasks.deploy import load_environment_task, merge, notify, open_merge_request
from tasks.failover import (
    check_health,
    merged_into,
    publish_plan,
    read_back_dns,
    read_dns,
    read_overlays,
    replace_dns,
    revert_switch,
    switch_components,
    topology_of,
    verify_role,
)
from twincd.config import DEFAULT_ENV, Environment
from twincd.domain import Event, MergeRequest, Phase, Timeline
from twincd.errors import PermanentError, TwincdError
from twincd.failover import (
    FailoverPlan,
    Health,
    HealthGate,
    PlanError,
    ReplaceRecord,
    SwitchComponents,
    Target,
    branch_name,
    check_record_change,
    gate,
    plan_failover,
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


Change = MergedSwitch | PendingSwitch | ReplacedRecord


@dataclass(frozen=True)
class FailoverResult:
    target: str
    dry_run: bool
    plan: str  # the markdown published before anything changed
    done: tuple[str, ...]  # what was carried out, in order
    record: frozenset[str] | None  # the DNS record as read back at the end (None: not managed)


def _event(timeline: Timeline, step: str, status: str, text: str, cluster: str = "") -> Timeline:
    return timeline.add(Event(step, status, text, datetime.now(UTC).isoformat(), cluster))


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
    environment = load_environment_task(env)
    target = Target(mode, active)
    if not dry_run and not reason.strip():
        raise PlanError("a failover needs a reason (it goes into the commits, the MRs and the notifications)")
    overlays = read_overlays(environment)
    record = read_dns(environment)
    plan = plan_failover(topology_of(environment, overlays, record), target, http_health=bool(health_url))
    markdown = publish_plan(plan, reason, dry_run, emergency)
    print(markdown)
    if dry_run or plan.noop:
        return FailoverResult(target.label, dry_run, markdown, (), record)

    run_id = str(flow_run.id or "manual")
    timeline = Timeline("failover", f"{target.label} {run_id[:8]}")
    timeline = _event(
        timeline,
        "plan",
        "ok",
        f"{'EMERGENCY ' if emergency else ''}{plan.current.describe()} → {target.label}; reason: {reason}",
    )
    if emergency or auto_approve:
        approver = f"emergency ({reason})" if emergency else "auto-approve"
    else:
        timeline = _event(timeline, "approve", "waiting", "waiting for approval of the plan")
        notify(environment, timeline)
        try:
            answer = pause_flow_run(
                wait_for_input=Approval.with_initial_data(
                    description=f"{markdown}\n\nApprove to carry out this plan; leave unticked to refuse.",
                    approved=False,
                ),
                timeout=int(environment.timeouts.approval_seconds),
                poll_interval=2,
                key=f"approve-failover-{run_id[:8]}",
            )
        except FlowPauseTimeout:
            answer = None
        if answer is None or not answer.approved:
            who = (answer.approver if answer else "") or "a reviewer"
            message = (
                f"failover to {target.label} refused by {who}; nothing was changed"
                if answer
                else f"no approval of the failover to {target.label} within "
                f"{environment.timeouts.approval_seconds:.0f} s; nothing was changed"
            )
            notify(environment, _event(timeline, "approve", "cancelled", message))
            return Cancelled(message=message)
        approver = answer.approver or "a reviewer"
    notify(environment, timeline)

    changes: list[Change] = []
    try:
        timeline, done = _execute(environment, plan, run_id, reason, approver, health_url, timeline, changes)
    except Exception as e:  # whatever failed, what was changed is put back
        undone = _undo(environment, plan, run_id, reason, changes)
        # Only our own errors' text goes to chat: an SDK's may carry request details.
        why = str(e) if isinstance(e, TwincdError) else f"unexpected {type(e).__name__} (see the run's logs)"
        text = f"failover to {target.label} failed: {why}. Undone: " + (
            "; ".join(undone) or "nothing had changed"
        )
        notify(environment, _event(timeline, "result", "failed", text))
        raise FailoverFailed(text) from e
    final = read_dns(environment)
    notify(
        environment, _event(timeline, "result", "ok", f"{target.label}: serving {', '.join(plan.serving)}")
    )
    return FailoverResult(target.label, False, markdown, done, final)


def _execute(
    environment: Environment,
    plan: FailoverPlan,
    run_id: str,
    reason: str,
    approver: str,
    health_url: str,
    timeline: Timeline,
    changes: list[Change],
) -> tuple[Timeline, tuple[str, ...]]:
    """Carry out the plan in order; record each change in ``changes`` as soon as it may have happened."""
    done: list[str] = []
    health: dict[str, Health] = {}
    for action in plan.actions:
        if isinstance(action, SwitchComponents):
            branch = switch_components(
                environment, action, branch_name(plan.target, run_id, action.step), reason
            )
            revision = branch.base
            if branch.diff:
                mr = open_merge_request(
                    environment,
                    branch,
                    f"failover: {action.step} {', '.join(action.clusters)}",
                    f"{action.describe()}\n\nReason: {reason}\n\n```diff\n{branch.diff}```\n",
                )
                # Recorded before the merge: a failure after the forge merged must still be undone.
                changes.append(PendingSwitch(action, mr))
                mr = merge(environment, mr, approver)
                assert mr.merge_commit is not None
                changes[-1] = MergedSwitch(action, mr)
                revision = mr.merge_commit
                timeline = _event(
                    timeline, action.step, "ok", f"{mr.ref} merged as {revision[:12]} by {approver}"
                )
                notify(environment, timeline)
            futures = [
                verify_role.submit(environment, o.cluster, o.app, action.role, revision)
                for o in action.overlays
            ]
            verdicts = [f.result() for f in futures]
            failed = [v for v in verdicts if v.phase is not Phase.SUCCEEDED]
            for v in verdicts:
                timeline = _event(
                    timeline, "verify", "ok" if v not in failed else "failed", v.message, v.cluster
                )
            if failed:
                raise FailoverFailed(
                    f"{action.step} not verified: " + "; ".join(f"{v.cluster}: {v.message}" for v in failed)
                )
            done.append(action.describe())
        elif isinstance(action, HealthGate):
            futures_h = [check_health.submit(environment, c, health_url) for c in action.clusters]
            health = {h.cluster: h for h in (f.result() for f in futures_h)}
            for h in health.values():
                timeline = _event(
                    timeline, "health", "ok" if h.healthy else "failed", "; ".join(h.checks), h.cluster
                )
            notify(environment, timeline)
            gate(plan, health)
            done.append(action.describe())
        elif isinstance(action, ReplaceRecord):
            check_record_change(plan, health)
            # Recorded before the write: a timeout may hide a write the server did apply.
            changes.append(ReplacedRecord(action.old))
            replace_dns(environment, action.new)
            seen = read_back_dns(environment, action.new, READ_BACK_SECONDS)
            timeline = _event(timeline, "dns", "ok", f"{action.name} reads back {', '.join(sorted(seen))}")
            notify(environment, timeline)
            done.append(action.describe())
    return timeline, tuple(done)


def _undo(
    environment: Environment, plan: FailoverPlan, run_id: str, reason: str, changes: list[Change]
) -> list[str]:
    """Put back every change, newest first; each undo step's failure is reported, not raised."""
    undone: list[str] = []
    for change in reversed(changes):
        try:
            if isinstance(change, ReplacedRecord):
                if read_dns(environment) == change.old:
                    undone.append(f"DNS still held {', '.join(sorted(change.old))}: nothing to put back")
                    continue
                replace_dns(environment, change.old)
                read_back_dns(environment, change.old, READ_BACK_SECONDS)
                undone.append(f"DNS put back to {', '.join(sorted(change.old))}")
            else:
                step = change.action.step
                merge_commit = (
                    change.mr.merge_commit
                    if isinstance(change, MergedSwitch)
                    else merged_into(environment, change.mr.source_branch)
                )
                if merge_commit is None:
                    undone.append(
                        f"{step} of {', '.join(change.action.clusters)}: {change.mr.ref} never "
                        "reached the branch, nothing to revert"
                    )
                    continue
                branch = revert_switch(
                    environment, step, merge_commit, branch_name(plan.target, run_id, f"undo-{step}")
                )
                mr = open_merge_request(
                    environment,
                    branch,
                    f"Revert failover: {step}",
                    f"Undo of {change.mr.ref} after a failed failover to {plan.target.label}."
                    f"\n\nReason of the failover: {reason}\n\n```diff\n{branch.diff}```\n",
                )
                mr = merge(environment, mr, "twincd undo")
                assert mr.merge_commit is not None
                undone.append(
                    f"{step} of {', '.join(change.action.clusters)} reverted by {mr.ref} "
                    f"({mr.merge_commit[:12]})"
                )
                if step == "demote":
                    # Serving again before the DNS undo (next in line) sends traffic back here.
                    verdicts = [
                        verify_role.submit(environment, o.cluster, o.app, "active", mr.merge_commit)
                        for o in change.action.overlays
                    ]
                    undone += [f"{v.cluster}: {v.message}" for v in (f.result() for f in verdicts)]
        except TwincdError as e:
            undone.append(f"could not undo {type(change).__name__}: {e}")
    return undone
