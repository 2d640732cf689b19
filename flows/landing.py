"""Landing a change on the manifests branch: the one step every flow uses to change what runs.

Release stages, reverts, and failover's promote, demote and undo all go the same way:
branch (written by the caller's task) → merge request → validation (releases) → approval and
merge (or a person's merge on the forge) → verification on the clusters. ``land`` is that step, a
plain function of tasks; ``land_subflow`` runs it as a named subflow, so a sequential
rollout's stages, a revert and failover's switches each show as one box in the Prefect run graph.

The wait for a person is written once, here (``ask_approval``, ``await_person``): the release
approval, the revert approval and the failover plan's approval all use it. The run is suspended
while it waits (no process held), which Prefect allows only in a parent run: ``land_approved``
lands a change in two passes around the answer, and the wait happens between them in the parent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import httpx
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, PrefectHTTPStatusError
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from tasks.common import untraced
from tasks.deploy import (
    catch_up,
    close_merge_request,
    merge,
    notify,
    open_merge_request,
    post_validation,
    read_merge_request,
    validate,
)
from twincd import wiring
from twincd.adapters import waits
from twincd.adapters.git import redact_url
from twincd.config import Environment, GitlabForge
from twincd.domain import CaughtUp, Event, MergeRequest, ReleaseBranch, RolloutVerdict, Timeline, Waiting
from twincd.errors import PermanentError, TargetMoved, TransientError, TwincdError


class Approval(RunInput):
    """The form shown in the Prefect UI when a run waits for a person."""

    approved: bool = False
    approver: str = ""
    comment: str = ""
    # Set by the reconciliation when nobody answered before the deadline (twincd.adapters.waits).
    timed_out: bool = False
    # Set by a Merge Request Hook or the reconciliation: "look at the forge", not a person's answer.
    seen_on_forge: bool = False


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
        try:
            notify(untraced(self.environment), untraced(self.timeline), wait_for=list(after))
        except Exception as e:  # noqa: BLE001 - telling must never replace what it tells of
            get_run_logger().warning("could not tell the team (%s); the run goes on", failure_text(e, "run"))


def failure_text(e: BaseException, rerun: str) -> str:
    """A failure as people read it: what failed, naming the system, and whether re-running ``rerun``
    (the deploy, the failover) completes it. Only twincd's own messages are quoted: an SDK's text
    may carry request details."""
    if isinstance(e, TransientError):
        return f"{e} (transient: re-running the {rerun} completes it; the steps already done are kept)"
    if isinstance(e, TwincdError):
        return str(e)
    if isinstance(e, httpx.HTTPError | PrefectHTTPStatusError):
        # Adapters map their own connection errors and statuses; an HTTP error that gets here is
        # almost always the Prefect client's (a PrefectHTTPStatusError always is).
        api = redact_url(PREFECT_API_URL.value() or "(ephemeral)")
        who = (
            "the Prefect API" if isinstance(e, PrefectHTTPStatusError) else "an HTTP call (the Prefect API?)"
        )
        return (
            f"{who} at {api} failed ({type(e).__name__}); re-run the {rerun} once it answers: the steps "
            "already done are kept"
        )
    return f"unexpected {type(e).__name__} (see the run's logs)"


def approval_key(name: str) -> str:
    # Prefect run-input keys allow lowercase letters, digits and dashes only.
    return "approve-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Answer:
    approved: bool
    approver: str
    comment: str
    timed_out: bool = False
    seen_on_forge: bool = False


# Prefect fails a suspended run this long after its deadline if nothing resumed it before (the
# reconciliation resumes it at the deadline, so the run itself closes the MR and tells the team).
_EXPIRY_GRACE = timedelta(hours=1)


def this_run() -> FlowRun | None:
    context = FlowRunContext.get()
    return context.flow_run if context else None


def resumed() -> bool:
    """Whether this run waited before (its replay from the top after a resume)."""
    run = this_run()
    return bool(run is not None and run.empirical_policy.pause_keys)


def suspendable(run: FlowRun | None) -> bool:
    """Whether Prefect's server lets ``run`` suspend: a run of a deployment, not a subflow."""
    return run is not None and run.deployment_id is not None and run.parent_task_run_id is None


def deadline(seconds: float) -> str:
    """``seconds`` from now, as a waiting run's deadline (ISO 8601, UTC)."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def ask_approval(*, description: str, key: str, timeout: float, waiting: Waiting | None = None) -> Answer:
    """Wait for a person's answer on the approval form (Prefect UI, ``twincd approve``, a hook).

    A run of a deployment is *suspended*: its process exits, nothing is held while people take
    days, and the answer schedules it again (it runs from the top; the steps before find their
    work done, and this call returns the answer, its pause key having fired). ``waiting`` is
    recorded beside it so a merge hook or the reconciliation can find it. A run with no
    deployment (the flow called from Python) cannot be suspended (Prefect's server refuses,
    twincd.adapters.waits), so it pauses in its process instead, and says so.
    """
    form = Approval.with_initial_data(description=description, approved=False)
    run = this_run()
    if run is not None and waiting is not None:
        waits.record(run.id, approval_key(key), waiting)
    try:
        if suspendable(run):
            answer = suspend_flow_run(
                wait_for_input=form,
                timeout=int(timeout + _EXPIRY_GRACE.total_seconds()),
                key=approval_key(key),
            )
        else:
            get_run_logger().warning(
                "this run has no deployment (or is a subflow): it waits for approval in its process; "
                "start it from a deployment (`twincd deploy`, a worker, `twincd serve`) to free it"
            )
            answer = pause_flow_run(
                wait_for_input=form, timeout=int(timeout), poll_interval=2, key=approval_key(key)
            )
    except FlowPauseTimeout:
        return Answer(False, "", f"no answer within {timeout:.0f} s", timed_out=True)
    return Answer(answer.approved, answer.approver, answer.comment, answer.timed_out, answer.seen_on_forge)


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
    # The MR opened and validated earlier in this run, as the forge showed it when a person
    # answered (merged on the forge, or still open to merge): not opened or told again.
    reviewed: MergeRequest | None = None
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
    merged: bool = True  # False: the MR is open, left for people (Change.wait) or waiting for one


Verify = Callable[[str, Sequence[object]], tuple[RolloutVerdict, ...]]


def land(
    environment: Environment, branch: ReleaseBranch, change: Change, story: Story, verify: Verify
) -> Landed:
    """Branch → MR → validation → merge → ``verify(revision, after)``.

    A change no person approved yet (``approver`` None, not ``auto_approve``) stops before the
    merge with ``Landed.merged`` False: ``land_approved`` asks, then lands it again.
    Raises ValidationFailed (nothing merged).
    """
    if not branch.diff:
        # The target branch already holds the change: nothing to merge, only to verify.
        return Landed(branch.base, None, change.approver or "", verify(branch.base, [branch]))
    if change.reviewed is not None:
        mr = change.reviewed  # opened and validated before a person answered; as the forge shows it now
    else:
        mr = _open(environment, branch, change, story)
        if not change.wait:
            return Landed(branch.base, mr, "", merged=False)
        if mr.state == "merged" or resumed():
            # As the forge shows it now: merged by a person on the forge before a re-run, or
            # merged or closed while this run waited (its MR is the one it opened before).
            mr = read_merge_request(untraced(environment), mr)
    if change.validate and mr.state != "merged":  # a merged MR has nothing left to gate
        mr = _validate(environment, branch, change, mr, story)
    if mr.state == "merged":
        approver = change.approver or mr.merged_by or wiring.forge_type(environment).name
    elif change.approver is None and not change.auto_approve:
        return Landed(branch.base, mr, "", merged=False)  # a person decides: see land_approved
    else:
        approver = change.approver or "auto-approve"
        mr = _merge_validated(environment, branch, change, mr, story, approver)
    if mr.merge_commit is None:  # every forge returns a merged MR with its merge commit
        raise PermanentError(f"{mr.ref} is {mr.state} without a merge commit; re-run to verify it")
    told = _MERGED[change.kind]
    if told is not None:
        by = f" by {approver}" if change.kind == "switch" else ""
        approvals = f"; approved by {', '.join(mr.approved_by)}" if mr.approved_by else ""
        text = f"{mr.ref} merged as {mr.merge_commit[:12]}{by}{approvals}"
        story.add(change.step, "ok", text, url=mr.web_url, actor=approver, tell=told, after=[mr])
    return Landed(mr.merge_commit, mr, approver, verify(mr.merge_commit, [mr]))


def _open(environment: Environment, branch: ReleaseBranch, change: Change, story: Story) -> MergeRequest:
    """The change's MR (one per branch and run: a resumed run finds the one it opened)."""
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
    return mr


def _validate(
    environment: Environment,
    branch: ReleaseBranch,
    change: Change,
    mr: MergeRequest,
    story: Story,
    caught: CaughtUp | None = None,
) -> MergeRequest:
    """Render and check the change's overlays (``caught``: the branch brought up to a target that
    moved, and every overlay the target's new commits touched); raises ValidationFailed (nothing
    merged)."""
    touched = caught.paths if caught is not None else ()
    report = validate(untraced(environment), change.app, branch, mr, change.validate, touched)
    mr = post_validation(untraced(environment), mr, report)
    target = environment.manifests.branch
    moved = (
        f"{target} moved to {branch.base[:12]} since validation; its new commits:\n"
        + "\n".join(f"  {c}" for c in caught.commits[:10])
        if caught is not None and caught.moved
        else ""
    )
    if not report.ok:
        findings = "\n".join(str(f) for f in report.errors)
        own = {environment.app_overlay(change.app, c) for c in change.validate}
        if caught is not None and any(f.overlay not in own for f in report.errors):
            text = (
                f"{moved}\nThey break {target} itself, not this change: {mr.ref} was not merged. Fix "
                f"{target} and re-run.\n{findings}"
            )
        elif caught is not None:
            text = f"{moved}\n{mr.ref} merged onto them fails validation; nothing was merged:\n{findings}"
        else:
            text = f"validation of {', '.join(report.overlays)} failed; nothing was merged:\n{findings}"
        story.add("validate", "failed", text, url=mr.web_url, tell=True, after=[mr])
        raise ValidationFailed(text)
    if caught is not None:
        if moved:
            get_run_logger().info("%s\nthe merge result is valid: merging it", moved)
        story.add(
            "validate",
            "ok",
            (f"{moved}\n" if moved else "") + f"{report.resources} resources of the merge result valid in "
            f"{', '.join(report.overlays)}",
        )
    elif change.reviewed is None:  # told once: validated again before twincd merges after an approval
        story.add(
            "validate",
            "ok",
            f"{report.resources} resources valid in {', '.join(report.overlays)}"
            + (f"; {len(report.unchecked)} unchecked (no schema)" if report.unchecked else "")
            + "".join(f"\n⚠️ {f}" for f in report.warnings),
        )
    return mr


_MERGE_ATTEMPTS = 5  # targets that move again between a validation and its merge


def _merge_validated(
    environment: Environment,
    branch: ReleaseBranch,
    change: Change,
    mr: MergeRequest,
    story: Story,
    approver: str,
) -> MergeRequest:
    """Merge exactly the tree that was validated.

    A change that is validated is first brought up to the target's head (``catch_up``: a no-op
    when the target did not move); when that changed the branch, its head, which is what the
    merge will land, is validated again, with every overlay the target's new commits touched.
    The merge is then a compare-and-swap on that target commit (``onto``); a target that moved
    again in between starts it over.
    """
    if not change.validate:
        return merge(untraced(environment), mr, approver)
    for _ in range(_MERGE_ATTEMPTS):
        caught = catch_up(untraced(environment), branch)
        moved, branch = caught.branch.head != branch.head, caught.branch
        if moved:
            mr = _validate(environment, branch, change, replace(mr, sha=branch.head), story, caught)
        try:
            return merge(untraced(environment), mr, approver, branch.base)
        except TargetMoved:
            continue
    raise TransientError(
        f"{environment.manifests.branch} moved {_MERGE_ATTEMPTS} times while {mr.ref} was validated and "
        "merged; nothing was merged. Re-run the release"
    )


def land_approved(
    stage: str | None,
    environment: Environment,
    branch: ReleaseBranch,
    change: Change,
    story: Story,
    verify: Verify,
) -> Landed:
    """``land`` (as the subflow ``stage``, or in this run when None), with a person's answer between.

    A change nobody approved yet lands in two passes: the first opens and validates the MR and
    stops; this run (never a subflow: only a parent run can be suspended) waits for the person;
    the second pass reuses the MR, validates again what will be merged, merges (unless the person
    merged on the forge) and verifies.
    """

    def run(change: Change) -> Landed:
        if stage is None:
            return land(environment, branch, change, story, verify)
        return land_subflow(stage, environment, branch, change, story, verify)

    landed = run(change)
    if landed.merged or landed.mr is None or not change.wait:
        return landed
    approver, now = await_person(environment, landed.mr, branch, change, story)
    return run(replace(change, approver=approver, reviewed=now))


_MAX_WAITS = 20  # waits for one MR (each resumed by a hook the forge did not bear out)


def _decided(environment: Environment, mr: MergeRequest) -> MergeRequest:
    """The MR once the forge shows it opened, merged or closed (GitLab shows `locked` while merging)."""
    now = read_merge_request(untraced(environment), mr)
    for _ in range(30):
        if now.state in ("opened", "merged", "closed"):
            return now
        time.sleep(2)
        now = read_merge_request(untraced(environment), mr)
    return now


def await_person(
    environment: Environment, mr: MergeRequest, branch: ReleaseBranch, change: Change, story: Story
) -> tuple[str, MergeRequest]:
    """Who approved or merged ``mr``, and the MR as it is now; Refused when refused, closed or timed out.

    With a forge where people merge (GitLab), the run waits for their merge or close (the Merge
    Request Hook or the reconciliation resumes it); with the local forge, for the approval form.
    Either way the forge is the truth once the run resumes: its MR is read again.
    """
    forge = wiring.forge_type(environment)
    timeout = environment.timeouts.approval_seconds
    now = _decided(environment, mr) if forge.merged_by_people else mr
    answer = Answer(False, "", "")
    for attempt in range(1, _MAX_WAITS + 1):
        if now.state != "opened":
            break
        if attempt == 1:
            what = "a merge" if forge.merged_by_people else "approval"
            story.add(
                "merge", "waiting", f"waiting for {what} of {mr.ref}", url=mr.web_url, tell=True, after=[now]
            )
        waiting = Waiting(
            mr=mr,
            env=environment.source,
            deadline=deadline(timeout),
            project=environment.forge.project if isinstance(environment.forge, GitlabForge) else "",
        )
        # Every wait under a key of its own: a key that fired returns its answer at once (a replay).
        answer = ask_approval(
            description=_approval_text(mr.title, branch.diff, story.timeline),
            key=branch.branch if attempt == 1 else f"{branch.branch}-{attempt}",
            timeout=timeout,
            waiting=waiting,
        )
        if not forge.merged_by_people:
            break  # the form is the answer
        now = _decided(environment, mr)
        if not answer.seen_on_forge:
            break  # a person's answer on the form (approved: twincd merges; or refused, or timed out)
        # A hook or the reconciliation said merged or closed, and the forge shows it open (a stale
        # or forged event, an MR reopened since): wait again; only the forge decides.
    if now.state == "merged":
        # Who merged, as the forge says (GitLab's merged_by); its name only when it does not say.
        return now.merged_by or answer.approver or forge.name, now
    who = answer.approver or "a reviewer"
    target = environment.manifests.branch
    if now.state == "closed":
        message = (
            f"{mr.ref} ({mr.web_url}) was closed{' by ' + answer.approver if answer.approver else ''}"
            f" without being merged; nothing reached {target}. Reopen it and re-run the deploy to release."
        )
        story.add("merge", "cancelled", message, actor=answer.approver, tell=True)
        raise Refused(message)
    if answer.approved:
        return who, now  # twincd merges; a forge's own rules (GitLab's approval rules) still apply
    if answer.timed_out and forge.merged_by_people:
        message = (
            f"{mr.ref} ({mr.web_url}) was not merged within {timeout:.0f} s; it stays open on {forge.name}: "
            "merge it and re-run the deploy to verify the rollout, or close it"
        )
        story.add("merge", "cancelled", message, tell=True)
        raise Refused(message)
    message = (
        f"{mr.ref} {'not approved in time' if answer.timed_out else 'refused by ' + who}"
        f"{': ' + answer.comment if answer.comment else ''}; nothing reached "
        f"{target}; branch {branch.branch} kept for inspection"
    )
    after: list[object] = []
    try:
        after.append(close_merge_request(untraced(environment), mr, f"refused by {who}: {answer.comment}"))
    except Exception as e:  # noqa: BLE001 - a close that fails must not hide the refusal
        message += f"; closing {mr.ref} ({mr.web_url}) failed: {failure_text(e, 'deploy')}: close it by hand"
    story.add("merge", "cancelled", message, actor=who, tell=True, after=after)
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
    stored with the subflow run.
    """

    def landing(branch_name: str, title: str) -> Landed:
        return land(environment, branch, change, story, verify)

    name = f"{flow_run.name}/{stage}"
    subflow = flow(name="land", flow_run_name=name, log_prints=True)(landing)
    state = subflow(branch.branch, change.title, return_state=True)
    landed = state.result()  # raises what failed the subflow
    if not isinstance(landed, Landed):
        raise PermanentError(f"{name} ended {state.name} without a result")
    return landed
