"""Landing a change on the manifests branch: the one step every flow uses to change what runs.

Release stages, reverts, and failover's promote, demote and undo all go the same way:
branch (written by the caller's task) → merge request → validation (releases) → approval and
merge (or a person's merge on the forge) → verification on the clusters. ``land`` is that step, a
plain function of tasks; ``land_subflow`` runs it as a named subflow, so a sequential
rollout's stages, a revert and failover's switches each show as one box in the Prefect run graph.

The approval pause is written once, here (``ask_approval``): the release approval, the revert
approval and the failover plan's approval all use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Cancelled

from tasks.common import untraced
from tasks.deploy import (
    close_merge_request,
    merge,
    notify,
    open_merge_request,
    post_validation,
    validate,
    wait_for_merge,
)
from twincd import wiring
from twincd.config import Environment
from twincd.domain import Event, MergeRequest, ReleaseBranch, RolloutVerdict, Timeline
from twincd.errors import CancelledByUser, PermanentError


class Approval(RunInput):
    """The form shown in the Prefect UI when a run waits for a person."""

    approved: bool = False
    approver: str = ""
    comment: str = ""


class ValidationFailed(PermanentError):
    pass


class Refused(PermanentError):
    """A person refused (or nobody approved in time): the run ends Cancelled."""


class Story:
    """A run's timeline as it goes on: every step adds an event, ``tell`` notifies the team.

    One object per flow run, so a failure anywhere can still tell the whole story so far. Each
    notify waits for the step it reports (``after``), so the run graph draws it after that step.
    """

    def __init__(self, environment: Environment, timeline: Timeline) -> None:
        self.environment = environment
        self.timeline = timeline

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
        after: Sequence[object] = (),
    ) -> None:
        event = Event(
            step, status, text, datetime.now(UTC).isoformat(), cluster, url=url, digest=digest, actor=actor
        )
        self.timeline = self.timeline.add(event)
        if tell:
            self.tell(after=after)

    def tell(self, *, after: Sequence[object] = ()) -> None:
        notify(untraced(self.environment), untraced(self.timeline), wait_for=list(after))


def approval_key(name: str) -> str:
    # Prefect run-input keys allow lowercase letters, digits and dashes only.
    return "approve-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Answer:
    approved: bool
    approver: str
    comment: str
    timed_out: bool = False


def ask_approval(*, description: str, key: str, timeout: float) -> Answer:
    """Pause the run with the approval form until a person answers or ``timeout`` passes."""
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description, approved=False),
            timeout=int(timeout),
            poll_interval=2,
            key=approval_key(key),
        )
    except FlowPauseTimeout:
        return Answer(False, "", f"no answer within {timeout:.0f} s", timed_out=True)
    return Answer(answer.approved, answer.approver, answer.comment)


Kind = Literal["release", "revert", "switch", "undo"]


@dataclass(frozen=True)
class Change:
    """One change to land: what the MR says, what is validated, who approves."""

    kind: Kind  # what the story tells of it (see ``_OPENED`` and ``_MERGED``)
    step: str  # the story's name for its merge: "merge", "revert", "promote", "demote"
    title: str
    description: str
    app: str = ""  # validated when ``validate`` names clusters
    validate: tuple[str, ...] = ()  # the clusters whose app overlay is validated before the merge
    approver: str | None = None  # already approved (later stages, failover): merge at once
    auto_approve: bool = False
    wait: bool = True  # False: open the MR and stop there (a revert people merge themselves)
    # Called with the MR as soon as it is open: from then on a failure may leave it merged
    # (the failover records the switch here, so its undo finds it).
    on_open: Callable[[MergeRequest], None] | None = field(default=None, compare=False)


# What the story says when the MR is opened: (step, status, told); none for a switch or an undo.
_OPENED: dict[Kind, tuple[str, str, bool]] = {
    "release": ("merge-request", "ok", False),
    "revert": ("revert", "waiting", True),
}
# Whether the merge is told at once (True), only recorded (False), or not an event at all (None):
# a revert's merge is told with its verification; an undo is reported in the failover's result.
_MERGED: dict[Kind, bool | None] = {"release": True, "revert": False, "switch": True, "undo": None}


@dataclass(frozen=True)
class Landed:
    """Where the change is now."""

    revision: str  # what the clusters must run (the merge commit; the base when nothing changed)
    mr: MergeRequest | None  # None: the target branch already held the change
    approver: str
    verdicts: tuple[RolloutVerdict, ...] = ()
    merged: bool = True  # False: the MR was opened and left for people (Change.wait is False)


Verify = Callable[[str, Sequence[object]], tuple[RolloutVerdict, ...]]


def land(
    environment: Environment, branch: ReleaseBranch, change: Change, story: Story, verify: Verify
) -> Landed:
    """Branch → MR → validation → approval/merge → ``verify(revision, after)``.

    Raises ValidationFailed (nothing merged) and Refused (nothing merged, the MR closed on the
    local forge or left to people on theirs).
    """
    if not branch.diff:
        # The target branch already holds the change: nothing to merge, only to verify.
        return Landed(branch.base, None, change.approver or "", verify(branch.base, [branch]))
    mr = open_merge_request(untraced(environment), branch, change.title, change.description)
    if change.on_open is not None:
        change.on_open(mr)
    if change.kind in _OPENED:
        step, status, tell = _OPENED[change.kind]
        text = (
            f"{'reused' if mr.reused else 'opened'} {mr.ref} ({mr.state}): {mr.title}"
            if change.kind == "release"
            else f"revert MR {mr.ref} opened: {mr.web_url}"
        )
        story.add(step, status, text, url=mr.web_url, tell=tell, after=[mr])
    if not change.wait:
        return Landed(branch.base, mr, "", merged=False)
    if change.validate:
        report = validate(untraced(environment), change.app, branch, mr, change.validate)
        mr = post_validation(untraced(environment), mr, report)
        if not report.ok:
            findings = "\n".join(str(f) for f in report.errors)
            story.add("validate", "failed", findings, tell=True, after=[mr])
            raise ValidationFailed(
                f"validation of {', '.join(report.overlays)} failed; nothing was merged:\n{findings}"
            )
        story.add(
            "validate",
            "ok",
            f"{report.resources} resources valid in {', '.join(report.overlays)}"
            + (f"; {len(report.unchecked)} unchecked (no schema)" if report.unchecked else "")
            + "".join(f"\n⚠️ {f}" for f in report.warnings),
        )
    approver = change.approver or ""
    if mr.state != "merged":
        mr, approver = _merge(environment, mr, branch, change, story)
    if mr.merge_commit is None:  # every forge returns a merged MR with its merge commit
        raise PermanentError(f"{mr.ref} is {mr.state} without a merge commit; re-run to verify it")
    told = _MERGED[change.kind]
    if told is not None:
        by = f" by {approver}" if change.kind == "switch" else ""
        approvals = f"; approved by {', '.join(mr.approved_by)}" if mr.approved_by else ""
        text = f"{mr.ref} merged as {mr.merge_commit[:12]}{by}{approvals}"
        story.add(change.step, "ok", text, url=mr.web_url, actor=approver, tell=told, after=[mr])
    return Landed(mr.merge_commit, mr, approver, verify(mr.merge_commit, [mr]))


def _merge(
    environment: Environment, mr: MergeRequest, branch: ReleaseBranch, change: Change, story: Story
) -> tuple[MergeRequest, str]:
    """Get the MR merged: by a person on the forge, or approved in the Prefect UI (or auto) and merged."""
    approver = change.approver
    if approver is None and not change.auto_approve and wiring.forge_type(environment).merged_by_people:
        # People review and merge on the forge; twincd waits for them.
        story.add(
            "merge", "waiting", f"waiting for a merge of {mr.ref}", url=mr.web_url, tell=True, after=[mr]
        )
        try:
            merged = wait_for_merge(untraced(environment), mr)
        except CancelledByUser as e:
            story.add("merge", "cancelled", str(e), tell=True)
            raise Refused(str(e)) from e
        # Who merged, as the forge says (GitLab's merged_by); its name only when it does not say.
        return merged, merged.merged_by or wiring.forge_type(environment).name
    if approver is None:
        story.add(
            "merge", "waiting", f"waiting for approval of {mr.ref}", url=mr.web_url, tell=True, after=[mr]
        )
        approver = "auto-approve" if change.auto_approve else _approve(environment, mr, branch, story)
    return merge(untraced(environment), mr, approver), approver


def _approve(environment: Environment, mr: MergeRequest, branch: ReleaseBranch, story: Story) -> str:
    answer = ask_approval(
        description=_approval_text(mr.title, branch.diff, story.timeline),
        key=branch.branch,
        timeout=environment.timeouts.approval_seconds,
    )
    if answer.approved:
        return answer.approver or "a reviewer"
    who = answer.approver or "a reviewer"
    closed = close_merge_request(untraced(environment), mr, f"refused by {who}: {answer.comment}")
    message = (
        f"{mr.ref} {'not approved in time' if answer.timed_out else 'refused by ' + who}"
        f"{': ' + answer.comment if answer.comment else ''}; nothing reached "
        f"{environment.manifests.branch}; branch {branch.branch} kept for inspection"
    )
    story.add("merge", "cancelled", message, actor=who, tell=True, after=[closed])
    raise Refused(message)


def _approval_text(title: str, diff: str, timeline: Timeline) -> str:
    return (
        f"## {title}\n\nApprove to merge into the manifests branch; leave unticked and submit to refuse.\n\n"
        f"```diff\n{diff}```\n\n{timeline.markdown()}"
    )


def land_subflow(
    stage: str, environment: Environment, branch: ReleaseBranch, change: Change, story: Story, verify: Verify
) -> Landed:
    """``land`` as the subflow ``<this run's name>/<stage>``: one box in the run graph.

    The subflow's parameters are only what people need to see (the branch and the MR's title):
    the environment, the story and the verification are the closure's, so no configuration is
    stored with the subflow run. A refusal ends the subflow Cancelled and raises Refused here.
    """

    def landing(branch_name: str, title: str) -> Landed | State:
        try:
            return land(environment, branch, change, story, verify)
        except Refused as e:
            return Cancelled(message=str(e))

    name = f"{flow_run.name}/{stage}"
    subflow = flow(name="land", flow_run_name=name, log_prints=True)(landing)
    state = subflow(branch.branch, change.title, return_state=True)
    if state.is_cancelled():
        raise Refused(state.message or f"{name} was refused")
    landed = state.result()  # raises what failed the subflow
    if not isinstance(landed, Landed):
        raise PermanentError(f"{name} ended {state.name} without a result")
    return landed
