"""The deploy flow: build → push → set-image → merge request → validate → notify → wait → verify.

Orchestration only: every I/O call is a task, and tasks take the results of the tasks before
them, so the run graph in the Prefect UI draws the eight steps with verification fanning out
per cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled

from tasks.deploy import (
    build_image,
    check_release,
    close_merge_request,
    load_environment_task,
    merge,
    notify,
    open_merge_request,
    push_image,
    set_image,
    validate,
    verify_rollout,
)
from twincd.config import DEFAULT_ENV, Environment
from twincd.domain import Event, Phase, Release, RolloutVerdict, Timeline
from twincd.errors import PermanentError, TwincdError


class Approval(RunInput):
    """The form shown in the Prefect UI when the run waits for a person to merge."""

    approved: bool = False
    approver: str = ""
    comment: str = ""


class ValidationFailed(PermanentError):
    pass


class RolloutFailed(PermanentError):
    pass


@dataclass(frozen=True)
class DeployResult:
    app: str
    tag: str
    digest: str
    merge_commit: str
    verdicts: tuple[RolloutVerdict, ...]


def _event(timeline: Timeline, step: str, status: str, text: str, cluster: str = "") -> Timeline:
    return timeline.add(Event(step, status, text, datetime.now(UTC).isoformat(), cluster))


def approval_key(timeline: Timeline) -> str:
    # Prefect run-input keys allow lowercase letters, digits and dashes only.
    return timeline.key.replace("release-", "approve-", 1)


@flow(name="deploy", flow_run_name="deploy-{app}-{tag}", log_prints=True)
def deploy(app: str, tag: str, env: str = str(DEFAULT_ENV), auto_approve: bool = False) -> DeployResult | State:
    """Deploy a tagged release of an app to every cluster.

    app: the app's name in the environment file; tag: the git tag of the app repo to release;
    env: the environment file; auto_approve: merge without waiting for a person (demos, CI).
    """
    environment = load_environment_task(env)
    release = check_release(environment, app, tag)
    timeline = _event(Timeline(app, tag), "release", "ok", f"tag {tag} is commit {release.commit[:12]}")
    try:
        return _deploy(environment, release, timeline, auto_approve)
    except TwincdError as e:
        notify(environment, _event(timeline, "result", "failed", str(e)))
        raise


def _deploy(environment: Environment, release: Release, timeline: Timeline, auto_approve: bool) -> DeployResult | State:
    app, tag = release.app, release.tag
    built = build_image(environment, release)
    pushed = push_image(environment, built)
    verb = "already in the registry" if pushed.reused else "pushed"
    timeline = _event(timeline, "push", "ok", f"{verb}: " + ", ".join(r.pinned for r in pushed.refs))

    branch = set_image(environment, release, pushed)
    if not branch.diff:
        # The target branch already runs this digest (released before): nothing to merge.
        timeline = _event(timeline, "set-image", "skipped", f"{environment.manifests.branch} already pins {pushed.digest}")
        revision = branch.base
    else:
        what = "committed" if branch.committed else "already on the branch"
        timeline = _event(timeline, "set-image", "ok", f"{what}: {branch.branch} at {branch.head[:12]}")
        mr = open_merge_request(environment, release, branch, pushed)
        timeline = _event(timeline, "merge-request", "ok",
                          f"{'reused' if mr.reused else 'opened'} {mr.ref} ({mr.state}): {mr.title}")
        report = validate(environment, release, branch)
        if not report.ok:
            findings = "\n".join(str(f) for f in report.errors)
            notify(environment, _event(timeline, "validate", "failed", findings))
            raise ValidationFailed(f"validation of {', '.join(report.overlays)} failed; nothing was merged:\n{findings}")
        timeline = _event(timeline, "validate", "ok",
                          f"{report.resources} resources valid in {', '.join(report.overlays)}"
                          + (f"; {len(report.unchecked)} unchecked (no schema)" if report.unchecked else ""))
        if mr.state != "merged":
            timeline = _event(timeline, "merge", "waiting", f"waiting for approval of {mr.ref}")
            notify(environment, timeline)
            if auto_approve:
                approver = "auto-approve"
            else:
                answer = pause_flow_run(
                    wait_for_input=Approval.with_initial_data(
                        description=_approval_text(mr.title, branch.diff, timeline), approved=False),
                    timeout=int(environment.timeouts.approval_seconds), poll_interval=2,
                    key=approval_key(timeline),
                )
                if answer is None or not answer.approved:
                    who = (answer.approver if answer else "") or "a reviewer"
                    close_merge_request(environment, mr, f"refused by {who}: {answer.comment if answer else ''}")
                    message = f"{mr.ref} refused by {who}; nothing reached {environment.manifests.branch}; " \
                              f"branch {branch.branch} kept for inspection"
                    notify(environment, _event(timeline, "merge", "cancelled", message))
                    return Cancelled(message=message)
                approver = answer.approver or "a reviewer"
            mr = merge(environment, mr, approver)
        assert mr.merge_commit is not None
        timeline = _event(timeline, "merge", "ok", f"{mr.ref} merged as {mr.merge_commit[:12]}")
        revision = mr.merge_commit
    notify(environment, timeline)

    futures = [verify_rollout.submit(environment, release, name, revision, pushed) for name in environment.clusters]
    verdicts = tuple(f.result() for f in futures)
    for v in verdicts:
        status = "ok" if v.phase is Phase.SUCCEEDED else "failed"
        timeline = _event(timeline, "verify", status, v.message, cluster=v.cluster)
        notify(environment, timeline)
    failed = [v for v in verdicts if v.phase is not Phase.SUCCEEDED]
    if failed:
        raise RolloutFailed("rollout failed on " + "; ".join(f"{v.cluster}: {v.message}" for v in failed)
                            + "; verified on " + (", ".join(v.cluster for v in verdicts if v not in failed) or "none"))
    notify(environment, _event(timeline, "result", "ok", f"{app} {tag} runs on {', '.join(v.cluster for v in verdicts)}"))
    return DeployResult(app, tag, pushed.digest, revision, verdicts)


def _approval_text(title: str, diff: str, timeline: Timeline) -> str:
    return (f"## {title}\n\nApprove to merge into the manifests branch; leave unticked and submit to refuse.\n\n"
            f"```diff\n{diff}```\n\n{timeline.markdown()}")
