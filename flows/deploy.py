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
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.futures import PrefectFuture
from prefect.input import RunInput
from prefect.states import Cancelled

from tasks.deploy import (
    apply_overlay,
    bake,
    build_image,
    check_release,
    close_merge_request,
    load_environment_task,
    merge,
    notify,
    open_merge_request,
    post_validation,
    pull_ref,
    push_image,
    read_pins,
    revert_branch,
    set_image,
    validate,
    verify_rollout,
    wait_for_merge,
)
from twincd.adapters.builder import PushedImage
from twincd.adapters.git import ReleaseBranch
from twincd.config import DEFAULT_ENV, Environment, GitlabForge
from twincd.domain import Event, MergeRequest, Phase, Release, RolloutVerdict, Timeline
from twincd.errors import CancelledByUser, PermanentError, TwincdError


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


class _Story:
    """The release's timeline as the run goes on: every step adds an event, `tell` notifies.

    One object per flow run, so a failure anywhere can still tell the whole story so far.
    """

    def __init__(self, environment: Environment, app: str, tag: str) -> None:
        self.environment = environment
        self.timeline = Timeline(app, tag)

    def add(
        self,
        step: str,
        status: str,
        text: str,
        *,
        cluster: str = "",
        url: str = "",
        digest: str = "",
        actor: str = "",
        tell: bool = False,
    ) -> None:
        self.timeline = self.timeline.add(
            Event(
                step,
                status,
                text,
                datetime.now(UTC).isoformat(),
                cluster,
                url=url,
                digest=digest,
                actor=actor,
            )
        )
        if tell:
            self.tell()

    def tell(self) -> None:
        notify(self.environment, self.timeline)


def approval_key(branch: str) -> str:
    # Prefect run-input keys allow lowercase letters, digits and dashes only.
    return "approve-" + re.sub(r"[^a-z0-9]+", "-", branch.lower()).strip("-")


@flow(name="deploy", flow_run_name="deploy-{app}-{tag}", log_prints=True)
def deploy(
    app: str, tag: str, env: str = str(DEFAULT_ENV), auto_approve: bool = False
) -> DeployResult | State:
    """Deploy a tagged release of an app to every cluster.

    Args:
        app: The app's name in the environment file (e.g. hello).
        tag: The git tag of the app's repository to release (e.g. v1.2.0).
        env: The environment file: clusters, manifests repo, forge, registries, notifier.
        auto_approve: Merge without waiting for a person (demos, CI).
    """
    environment = load_environment_task(env)
    release = check_release(environment, app, tag)
    story = _Story(environment, app, tag)
    story.add("release", "ok", f"tag {tag} is commit {release.commit[:12]}")
    try:
        return _deploy(environment, release, story, auto_approve)
    except Refused as e:
        return Cancelled(message=str(e))
    except Exception as e:
        # Only our own errors' text goes to chat: an SDK's may carry request details.
        why = str(e) if isinstance(e, TwincdError) else f"unexpected {type(e).__name__} (see the run's logs)"
        story.add("result", "failed", why, tell=True)
        raise


def _merge_stage(
    environment: Environment,
    release: Release,
    branch: ReleaseBranch,
    clusters: tuple[str, ...],
    title: str,
    story: _Story,
    approver: str | None,
    auto_approve: bool,
) -> tuple[str, str]:
    """Open, validate and merge one branch; return (merge commit, approver).

    ``approver`` set means the release was approved already (a later stage of a sequential rollout).
    """
    mr = open_merge_request(environment, branch, title, _mr_description(release, branch, clusters))
    story.add(
        "merge-request",
        "ok",
        f"{'reused' if mr.reused else 'opened'} {mr.ref} ({mr.state}): {mr.title}",
        url=mr.web_url,
    )
    report = validate(environment, release.app, branch, clusters)
    post_validation(environment, mr, report)
    if not report.ok:
        findings = "\n".join(str(f) for f in report.errors)
        story.add("validate", "failed", findings, tell=True)
        raise ValidationFailed(
            f"validation of {', '.join(report.overlays)} failed; nothing was merged:\n{findings}"
        )
    story.add(
        "validate",
        "ok",
        f"{report.resources} resources valid in {', '.join(report.overlays)}"
        + (f"; {len(report.unchecked)} unchecked (no schema)" if report.unchecked else ""),
    )
    if mr.state != "merged":
        mr, approver = _land(environment, mr, branch, story, auto_approve, approver)
    assert mr.merge_commit is not None
    story.add(
        "merge",
        "ok",
        f"{mr.ref} merged as {mr.merge_commit[:12]}",
        url=mr.web_url,
        actor=approver or "",
        tell=True,
    )
    return mr.merge_commit, approver or ""


def _land(
    environment: Environment,
    mr: MergeRequest,
    branch: ReleaseBranch,
    story: _Story,
    auto_approve: bool,
    approver: str | None = None,
) -> tuple[MergeRequest, str]:
    """Get the MR merged: by a person on GitLab, or approved in the Prefect UI (or auto) and merged."""
    if approver is None and not auto_approve and isinstance(environment.forge, GitlabForge):
        # People review and merge on GitLab; twincd waits for them.
        story.add("merge", "waiting", f"waiting for a merge of {mr.ref}", url=mr.web_url, tell=True)
        try:
            return wait_for_merge(environment, mr), "GitLab"
        except CancelledByUser as e:
            story.add("merge", "cancelled", str(e), tell=True)
            raise Refused(str(e)) from e
    if approver is None:
        story.add("merge", "waiting", f"waiting for approval of {mr.ref}", url=mr.web_url, tell=True)
        approver = "auto-approve" if auto_approve else _wait_for_approval(environment, mr, branch, story)
    return merge(environment, mr, approver), approver


def _wait_for_approval(
    environment: Environment, mr: MergeRequest, branch: ReleaseBranch, story: _Story
) -> str:
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(
                description=_approval_text(mr.title, branch.diff, story.timeline), approved=False
            ),
            timeout=int(environment.timeouts.approval_seconds),
            poll_interval=2,
            key=approval_key(branch.branch),
        )
    except FlowPauseTimeout:
        answer = None
    if answer is None or not answer.approved:
        who = (answer.approver if answer else "") or "a reviewer"
        comment = (
            answer.comment if answer else f"no answer within {environment.timeouts.approval_seconds:.0f} s"
        )
        close_merge_request(environment, mr, f"refused by {who}: {comment}")
        message = (
            f"{mr.ref} {'refused by ' + who if answer else 'not approved in time'}"
            f"{': ' + comment if comment else ''}; nothing reached "
            f"{environment.manifests.branch}; branch {branch.branch} kept for inspection"
        )
        story.add("merge", "cancelled", message, actor=who, tell=True)
        raise Refused(message)
    return answer.approver or "a reviewer"


def _verify(
    environment: Environment,
    release: Release,
    clusters: tuple[str, ...],
    revision: str,
    digests: Mapping[str, str | None],
    story: _Story,
    step: str,
) -> tuple[RolloutVerdict, ...]:
    # Clusters without Argo CD get the overlay applied by twincd first (`sync: apply`).
    applies = {
        name: apply_overlay.submit(environment, release.app, name, revision)
        for name in clusters
        if environment.clusters[name].sync == "apply"
    }
    apply_errors = {name: error for name, future in applies.items() if (error := _error_of(future))}
    futures = {
        name: verify_rollout.submit(environment, release, name, revision, digests[name])
        for name in clusters
        if name not in apply_errors
    }
    verdicts = tuple(
        futures[name].result()
        if name in futures
        else RolloutVerdict(name, Phase.FAILED, f"apply failed: {apply_errors[name]}")
        for name in clusters
    )
    for v in verdicts:
        story.add(
            step, "ok" if v.phase is Phase.SUCCEEDED else "failed", v.message, cluster=v.cluster, tell=True
        )
    return verdicts


def _error_of(future: PrefectFuture[Any]) -> str:
    try:
        future.result()
    except TwincdError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - one cluster's surprise must not stop the others' verification
        return f"unexpected {type(e).__name__} (see the run's logs)"
    return ""


def _deploy(environment: Environment, release: Release, story: _Story, auto_approve: bool) -> DeployResult:
    built = build_image(environment, release)
    pushed = push_image(environment, built)
    verb = "already in the registry" if pushed.reused else "pushed"
    story.add(
        "push", "ok", f"{verb}: " + ", ".join(r.pinned for r in pushed.refs), digest=pushed.digest, tell=True
    )

    stages = environment.rollout_stages()
    digests = {c: pull_ref(environment, release.app, c, pushed).digest for c in environment.clusters}
    merges: list[str] = []
    verdicts: list[RolloutVerdict] = []
    approver: str | None = None
    for number, clusters in enumerate(stages, 1):
        name = release.branch if len(stages) == 1 else f"{release.branch}-{clusters[0]}"
        branch = set_image(environment, release, pushed, clusters, name)
        if not branch.diff:
            # The target branch already pins this digest for these clusters (released before).
            story.add(
                "set-image",
                "skipped",
                f"{environment.manifests.branch} already pins {pushed.digest} for {', '.join(clusters)}",
                tell=True,
            )
            revision = branch.base
        else:
            what = "committed" if branch.committed else "already on the branch"
            story.add("set-image", "ok", f"{what}: {branch.branch} at {branch.head[:12]}")
            title = _mr_title(release, pushed, clusters, number, len(stages))
            revision, approver = _merge_stage(
                environment, release, branch, clusters, title, story, approver, auto_approve
            )
            merges.append(revision)
        stage_verdicts = _verify(environment, release, clusters, revision, digests, story, "verify")
        if (
            all(v.phase is Phase.SUCCEEDED for v in stage_verdicts)
            and number < len(stages)
            and environment.rollout.bake_seconds > 0
        ):
            stage_verdicts = tuple(
                bake(
                    environment,
                    release,
                    v.cluster,
                    revision,
                    digests[v.cluster],
                    environment.rollout.bake_seconds,
                )
                for v in stage_verdicts
            )
            for v in stage_verdicts:
                story.add(
                    "bake",
                    "ok" if v.phase is Phase.SUCCEEDED else "failed",
                    f"after {environment.rollout.bake_seconds:.0f}s: {v.message}",
                    cluster=v.cluster,
                    tell=True,
                )
        verdicts.extend(stage_verdicts)
        if any(v.phase is not Phase.SUCCEEDED for v in stage_verdicts):
            skipped = [c for later in stages[number:] for c in later]
            verdicts.extend(
                RolloutVerdict(c, Phase.FAILED, "not rolled out: an earlier stage failed") for c in skipped
            )
            _fail(environment, release, story, tuple(verdicts), merges, auto_approve)
    story.add(
        "result",
        "ok",
        f"{release.app} {release.tag} runs on {', '.join(v.cluster for v in verdicts)}",
        tell=True,
    )
    return DeployResult(release.app, release.tag, pushed.digest, tuple(merges), tuple(verdicts))


def _fail(
    environment: Environment,
    release: Release,
    story: _Story,
    verdicts: tuple[RolloutVerdict, ...],
    merges: list[str],
    auto_approve: bool,
) -> None:
    failed = [v for v in verdicts if v.phase is not Phase.SUCCEEDED]
    summary = (
        "rollout failed on "
        + "; ".join(f"{v.cluster}: {v.message}" for v in failed)
        + "; verified on "
        + (", ".join(v.cluster for v in verdicts if v not in failed) or "none")
    )
    if merges and environment.rollout.revert.on_failure:
        summary += _revert(environment, release, story, merges, auto_approve)
    raise RolloutFailed(summary)


def _revert(
    environment: Environment, release: Release, story: _Story, merges: list[str], auto_approve: bool
) -> str:
    """Open the revert MR; when configured, merge it (after approval) and verify the rollback."""
    branch = revert_branch(environment, release, merges)
    title = f"Revert {release.app} {release.tag}"
    mr = open_merge_request(
        environment,
        branch,
        title,
        f"Rollback of {release.app} {release.tag}: reverts "
        f"{', '.join(m[:12] for m in merges)}.\n\n```diff\n{branch.diff}```\n",
    )
    story.add("revert", "waiting", f"revert MR {mr.ref} opened: {mr.web_url}", url=mr.web_url, tell=True)
    if not environment.rollout.revert.wait:
        return f"; revert MR {mr.ref} opened ({branch.branch})"
    try:
        mr, approver = _land(environment, mr, branch, story, auto_approve)
    except Refused as e:
        return f"; the revert was refused: {e}"
    assert mr.merge_commit is not None
    story.add("revert", "ok", f"{mr.ref} merged as {mr.merge_commit[:12]}", url=mr.web_url, actor=approver)
    digests = read_pins(environment, release.app, mr.merge_commit)
    verdicts = _verify(
        environment, release, tuple(environment.clusters), mr.merge_commit, digests, story, "verify-rollback"
    )
    ok = all(v.phase is Phase.SUCCEEDED for v in verdicts)
    return f"; reverted by {mr.ref} ({mr.merge_commit[:12]}), rollback " + (
        "verified on every cluster"
        if ok
        else "NOT verified: "
        + "; ".join(f"{v.cluster}: {v.message}" for v in verdicts if v.phase is not Phase.SUCCEEDED)
    )


def _mr_title(
    release: Release, pushed: PushedImage, clusters: tuple[str, ...], number: int, stages: int
) -> str:
    stage = f" [stage {number}/{stages}: {', '.join(clusters)}]" if stages > 1 else ""
    return f"{release.app}: release {release.tag} ({pushed.refs[0].short_digest}){stage}"


def _mr_description(release: Release, branch: ReleaseBranch, clusters: tuple[str, ...]) -> str:
    return (
        f"Release `{release.tag}` of `{release.app}` (source {release.commit}) to {', '.join(clusters)}.\n\n"
        f"```diff\n{branch.diff}```\n"
    )


def _approval_text(title: str, diff: str, timeline: Timeline) -> str:
    return (
        f"## {title}\n\nApprove to merge into the manifests branch; leave unticked and submit to refuse.\n\n"
        f"```diff\n{diff}```\n\n{timeline.markdown()}"
    )
