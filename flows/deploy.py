"""The deploy flow: build → push → set-image → merge request → validate → notify → wait → verify.

Orchestration only: every I/O call is a task, and tasks take the results of the tasks before
them, so the run graph in the Prefect UI draws the eight steps with verification fanning out
per cluster.

Rollout strategies (`rollout:` in the environment file):
- parallel: one branch `twincd/<app>/<tag>` and one MR pin the digest in every cluster's overlay;
  every cluster is verified in parallel.
- sequential: one MR per stage (`twincd/<app>/<tag>-<cluster>`), because a forge merges a whole MR
  and a stage must reach `main` only after the stage before it was verified and baked. A person
  approves the release once (the first MR); later stages are merged by twincd after the bake, with
  the approver recorded in each merge commit. A failure stops the rollout before the next cloud.
When verification fails, a revert MR (`twincd/<app>/<tag>-revert`, `git revert -m 1` of every
merge of this release) is opened, and, when `rollout.revert.wait` is set, approved like a release
and verified back to the previous digests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled

from tasks.deploy import (
    bake,
    build_image,
    check_release,
    close_merge_request,
    load_environment_task,
    merge,
    notify,
    open_merge_request,
    push_image,
    read_pins,
    revert_branch,
    set_image,
    validate,
    verify_rollout,
)
from twincd.adapters.builder import PushedImage
from twincd.adapters.git import ReleaseBranch
from twincd.config import DEFAULT_ENV, Environment
from twincd.domain import Event, MergeRequest, Phase, Release, RolloutVerdict, Timeline
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


class Refused(PermanentError):
    """A person refused the merge request: the run ends Cancelled."""


@dataclass(frozen=True)
class DeployResult:
    app: str
    tag: str
    digest: str
    merge_commits: tuple[str, ...]
    verdicts: tuple[RolloutVerdict, ...]


def _event(timeline: Timeline, step: str, status: str, text: str, cluster: str = "") -> Timeline:
    return timeline.add(Event(step, status, text, datetime.now(UTC).isoformat(), cluster))


def approval_key(branch: str) -> str:
    # Prefect run-input keys allow lowercase letters, digits and dashes only.
    return "approve-" + re.sub(r"[^a-z0-9]+", "-", branch.lower()).strip("-")


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
    except Refused as e:
        return Cancelled(message=str(e))
    except TwincdError as e:
        notify(environment, _event(timeline, "result", "failed", str(e)))
        raise


@dataclass(frozen=True)
class _Merged:
    timeline: Timeline
    revision: str  # what the clusters must run: the merge commit, or the target head when already there
    merge_commit: str | None  # None when nothing had to be merged
    approver: str


def _merge_stage(environment: Environment, release: Release, branch: ReleaseBranch, clusters: tuple[str, ...],
                 title: str, timeline: Timeline, approver: str | None, auto_approve: bool) -> _Merged:
    """Open, validate and merge one branch; ``approver`` set means the release was approved already."""
    mr = open_merge_request(environment, branch, title, _mr_description(release, branch, clusters))
    timeline = _event(timeline, "merge-request", "ok", f"{'reused' if mr.reused else 'opened'} {mr.ref} ({mr.state}): {mr.title}")
    report = validate(environment, release.app, branch, clusters)
    if not report.ok:
        findings = "\n".join(str(f) for f in report.errors)
        notify(environment, _event(timeline, "validate", "failed", findings))
        raise ValidationFailed(f"validation of {', '.join(report.overlays)} failed; nothing was merged:\n{findings}")
    timeline = _event(timeline, "validate", "ok", f"{report.resources} resources valid in {', '.join(report.overlays)}"
                      + (f"; {len(report.unchecked)} unchecked (no schema)" if report.unchecked else ""))
    if mr.state != "merged":
        if approver is None:
            timeline = _event(timeline, "merge", "waiting", f"waiting for approval of {mr.ref}")
            notify(environment, timeline)
            approver = "auto-approve" if auto_approve else _wait_for_approval(environment, mr, branch, timeline)
        mr = merge(environment, mr, approver)
    assert mr.merge_commit is not None
    timeline = _event(timeline, "merge", "ok", f"{mr.ref} merged as {mr.merge_commit[:12]} (approved by {approver})")
    notify(environment, timeline)
    return _Merged(timeline, mr.merge_commit, mr.merge_commit, approver or "")


def _wait_for_approval(environment: Environment, mr: MergeRequest, branch: ReleaseBranch, timeline: Timeline) -> str:
    answer = pause_flow_run(
        wait_for_input=Approval.with_initial_data(
            description=_approval_text(mr.title, branch.diff, timeline), approved=False),
        timeout=int(environment.timeouts.approval_seconds), poll_interval=2,
        key=approval_key(branch.branch),
    )
    if answer is None or not answer.approved:
        who = (answer.approver if answer else "") or "a reviewer"
        comment = answer.comment if answer else ""
        close_merge_request(environment, mr, f"refused by {who}: {comment}")
        message = (f"{mr.ref} refused by {who}{': ' + comment if comment else ''}; nothing reached "
                   f"{environment.manifests.branch}; branch {branch.branch} kept for inspection")
        notify(environment, _event(timeline, "merge", "cancelled", message))
        raise Refused(message)
    return answer.approver or "a reviewer"


def _verify(environment: Environment, release: Release, clusters: tuple[str, ...], revision: str,
            digests: Mapping[str, str | None], timeline: Timeline, step: str) -> tuple[Timeline, tuple[RolloutVerdict, ...]]:
    futures = [verify_rollout.submit(environment, release, name, revision, digests[name]) for name in clusters]
    verdicts = tuple(f.result() for f in futures)
    for v in verdicts:
        timeline = _event(timeline, step, "ok" if v.phase is Phase.SUCCEEDED else "failed", v.message, cluster=v.cluster)
        notify(environment, timeline)
    return timeline, verdicts


def _deploy(environment: Environment, release: Release, timeline: Timeline, auto_approve: bool) -> DeployResult:
    built = build_image(environment, release)
    pushed = push_image(environment, built)
    verb = "already in the registry" if pushed.reused else "pushed"
    timeline = _event(timeline, "push", "ok", f"{verb}: " + ", ".join(r.pinned for r in pushed.refs))

    stages = environment.rollout_stages()
    digests = {c: _pulled_digest(environment, release, pushed, c) for c in environment.clusters}
    merges: list[str] = []
    verdicts: list[RolloutVerdict] = []
    approver: str | None = None
    for number, clusters in enumerate(stages, 1):
        name = release.branch if len(stages) == 1 else f"{release.branch}-{clusters[0]}"
        branch = set_image(environment, release, pushed, clusters, name)
        if not branch.diff:
            # The target branch already pins this digest for these clusters (released before).
            timeline = _event(timeline, "set-image", "skipped",
                              f"{environment.manifests.branch} already pins {pushed.digest} for {', '.join(clusters)}")
            revision = branch.base
        else:
            what = "committed" if branch.committed else "already on the branch"
            timeline = _event(timeline, "set-image", "ok", f"{what}: {branch.branch} at {branch.head[:12]}")
            title = _mr_title(release, pushed, clusters, number, len(stages))
            merged = _merge_stage(environment, release, branch, clusters, title, timeline, approver, auto_approve)
            timeline, revision, approver = merged.timeline, merged.revision, merged.approver
            if merged.merge_commit:
                merges.append(merged.merge_commit)
        notify(environment, timeline)
        timeline, stage_verdicts = _verify(environment, release, clusters, revision, digests, timeline, "verify")
        if all(v.phase is Phase.SUCCEEDED for v in stage_verdicts) and number < len(stages) \
                and environment.rollout.bake_seconds > 0:
            stage_verdicts = tuple(bake(environment, release, v.cluster, revision, digests[v.cluster],
                                        environment.rollout.bake_seconds) for v in stage_verdicts)
            for v in stage_verdicts:
                timeline = _event(timeline, "bake", "ok" if v.phase is Phase.SUCCEEDED else "failed",
                                  f"after {environment.rollout.bake_seconds:.0f}s: {v.message}", cluster=v.cluster)
        verdicts.extend(stage_verdicts)
        if any(v.phase is not Phase.SUCCEEDED for v in stage_verdicts):
            skipped = [c for later in stages[number:] for c in later]
            verdicts.extend(RolloutVerdict(c, Phase.FAILED, "not rolled out: an earlier stage failed") for c in skipped)
            _fail(environment, release, timeline, tuple(verdicts), merges, auto_approve, approver)
    notify(environment, _event(timeline, "result", "ok",
                               f"{release.app} {release.tag} runs on {', '.join(v.cluster for v in verdicts)}"))
    return DeployResult(release.app, release.tag, pushed.digest, tuple(merges), tuple(verdicts))


def _fail(environment: Environment, release: Release, timeline: Timeline, verdicts: tuple[RolloutVerdict, ...],
          merges: list[str], auto_approve: bool, approver: str | None) -> None:
    failed = [v for v in verdicts if v.phase is not Phase.SUCCEEDED]
    summary = "rollout failed on " + "; ".join(f"{v.cluster}: {v.message}" for v in failed) \
        + "; verified on " + (", ".join(v.cluster for v in verdicts if v not in failed) or "none")
    if merges and environment.rollout.revert.on_failure:
        summary += _revert(environment, release, timeline, merges, auto_approve)
    raise RolloutFailed(summary)


def _revert(environment: Environment, release: Release, timeline: Timeline, merges: list[str],
            auto_approve: bool) -> str:
    """Open the revert MR; when configured, merge it (after approval) and verify the rollback."""
    branch = revert_branch(environment, release, merges)
    title = f"Revert {release.app} {release.tag}"
    mr = open_merge_request(environment, branch, title, f"Rollback of {release.app} {release.tag}: reverts "
                            f"{', '.join(m[:12] for m in merges)}.\n\n```diff\n{branch.diff}```\n")
    timeline = _event(timeline, "revert", "waiting", f"revert MR {mr.ref} opened: {mr.web_url}")
    notify(environment, timeline)
    if not environment.rollout.revert.wait:
        return f"; revert MR {mr.ref} opened ({branch.branch})"
    try:
        approver = "auto-approve" if auto_approve else _wait_for_approval(environment, mr, branch, timeline)
    except Refused as e:
        return f"; the revert was refused: {e}"
    mr = merge(environment, mr, approver)
    assert mr.merge_commit is not None
    digests = read_pins(environment, release.app, mr.merge_commit)
    timeline, verdicts = _verify(environment, release, tuple(environment.clusters), mr.merge_commit, digests,
                                 _event(timeline, "revert", "ok", f"{mr.ref} merged as {mr.merge_commit[:12]}"),
                                 "verify-rollback")
    ok = all(v.phase is Phase.SUCCEEDED for v in verdicts)
    return f"; reverted by {mr.ref} ({mr.merge_commit[:12]}), rollback " + (
        "verified on every cluster" if ok else "NOT verified: " + "; ".join(
            f"{v.cluster}: {v.message}" for v in verdicts if v.phase is not Phase.SUCCEEDED))


def _pulled_digest(environment: Environment, release: Release, pushed: PushedImage, cluster: str) -> str:
    url = environment.pull_registry(release.app, cluster)
    return next(r.digest for r in pushed.refs if r.name.startswith(url + "/"))


def _mr_title(release: Release, pushed: PushedImage, clusters: tuple[str, ...], number: int, stages: int) -> str:
    stage = f" [stage {number}/{stages}: {', '.join(clusters)}]" if stages > 1 else ""
    return f"{release.app}: release {release.tag} ({pushed.refs[0].short_digest}){stage}"


def _mr_description(release: Release, branch: ReleaseBranch, clusters: tuple[str, ...]) -> str:
    return (f"Release `{release.tag}` of `{release.app}` (source {release.commit}) to {', '.join(clusters)}.\n\n"
            f"```diff\n{branch.diff}```\n")


def _approval_text(title: str, diff: str, timeline: Timeline) -> str:
    return (f"## {title}\n\nApprove to merge into the manifests branch; leave unticked and submit to refuse.\n\n"
            f"```diff\n{diff}```\n\n{timeline.markdown()}")
