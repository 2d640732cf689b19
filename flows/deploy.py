"""The deploy flow: build → push → set-image → merge request → validate → notify → wait → verify.

Orchestration only: every I/O call is a task, and tasks take the results of the tasks before
them, so the run graph in the Prefect UI draws the eight steps with verification fanning out
per cluster. The environment file is read in the flow body, not by a task: it is configuration,
and a task that produced it would have an edge to every other node.

Rollout strategies (`rollout:` in the environment file):
- parallel: one branch `twincd/<app>/<tag>` and one MR pin the digest in every cluster's overlay;
  every cluster is verified in parallel.
- sequential: one MR per stage (`twincd/<app>/<tag>-<cluster>`), because a forge merges a whole MR
  and a stage must reach `main` only after the stage before it was verified and baked. Each stage
  is a subflow `deploy-<app>-<tag>/<cluster>`. A person approves the release once (the first MR);
  later stages are merged by twincd after the bake, with the approver recorded in each merge
  commit. A failure stops the rollout before the next cloud.
When verification fails, a revert MR (`twincd/<app>/<tag>-revert`, `git revert -m 1` of every
merge of this release) is opened in the subflow `deploy-<app>-<tag>/revert`, and, when
`rollout.revert.wait` is set, approved like a release and verified back to the previous digests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import allow_failure, flow
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.landing import Change, Refused, Story, failure_text, land_approved
from flows.turns import one_at_a_time
from tasks.common import untraced
from tasks.deploy import (
    apply_overlay,
    bake,
    build_image,
    check_prebuilt,
    check_release,
    push_image,
    read_merge_request,
    read_pins,
    revert_branch,
    set_image,
    verify_rollout,
)
from twincd.config import DEFAULT_ENV, Environment, load_environment
from twincd.domain import MergeRequest, Phase, PushedImage, Release, ReleaseBranch, RolloutVerdict, Timeline
from twincd.errors import PermanentError, TwincdError
from twincd.release import pull_ref


class RolloutFailed(PermanentError):
    pass


@dataclass(frozen=True)
class DeployResult:
    app: str
    tag: str
    digest: str
    merge_commits: tuple[str, ...]
    verdicts: tuple[RolloutVerdict, ...]


@flow(name="deploy", flow_run_name="deploy-{app}-{tag}", log_prints=True)
def deploy(
    app: str, tag: str, env: str = str(DEFAULT_ENV), auto_approve: bool = False, image: str = ""
) -> DeployResult | State:
    """Deploy a tagged release of an app to every cluster.

    Args:
        app: The app's name in the environment file (e.g. hello).
        tag: The git tag of the app's repository to release (e.g. v1.2.0).
        env: The environment file: clusters, manifests repo, forge, registries, notifier.
        auto_approve: Merge without waiting for a person (demos, CI).
        image: An image CI built and pushed (<registry>/<image>@sha256:<digest>): no build or push;
            the digest must be in every registry the app lists.
    """
    environment = load_environment(env)
    release = check_release(untraced(environment), app, tag)
    story = Story(environment, Timeline(app, tag, run=str(flow_run.id or "")))
    story.add("release", "ok", f"tag {tag} is commit {release.commit[:12]}")
    try:
        # One release of an app at a time: a later one waits for its turn (flows/turns.py).
        with one_at_a_time(
            environment, f"release-{app}", "deploy", lambda run: run.parameters.get("app") == app
        ):
            return _deploy(environment, release, story, auto_approve, image)
    except Refused as e:
        return Cancelled(message=str(e))
    except Exception as e:
        story.add("result", "failed", failure_text(e, "deploy"), tell=True)
        raise


def _deploy(
    environment: Environment, release: Release, story: Story, auto_approve: bool, image: str = ""
) -> DeployResult:
    if image:
        pushed = check_prebuilt(untraced(environment), release, image)
        verb = "built by CI, found"
    else:
        built = build_image(untraced(environment), release)
        pushed = push_image(untraced(environment), built)
        verb = "already in the registry" if pushed.reused else "pushed"
    story.add(
        "push",
        "ok",
        f"{verb}: " + ", ".join(r.pinned for r in pushed.refs),
        digest=pushed.digest,
        tell=True,
        after=[pushed],
    )

    stages = environment.rollout_stages()
    digests = {c: pull_ref(environment, release.app, c, pushed).digest for c in environment.clusters}
    merges: list[str] = []
    merged: list[str] = []  # what reached the target, as people read it: "!3 (https://…) as 1a2b3c4d5e6f"
    verdicts: list[RolloutVerdict] = []
    approver: str | None = None
    for number, clusters in enumerate(stages, 1):
        name = release.branch if len(stages) == 1 else f"{release.branch}-{clusters[0]}"
        branch = set_image(untraced(environment), release, pushed, clusters, name)
        if branch.diff:
            what = "committed" if branch.committed else "already on the branch"
            story.add("set-image", "ok", f"{what}: {branch.branch} at {branch.head[:12]}")
        else:
            # The target branch already pins this digest for these clusters (released before).
            story.add(
                "set-image",
                "skipped",
                f"{environment.manifests.branch} already pins {pushed.digest} for {', '.join(clusters)}",
                tell=True,
                after=[branch],
            )
        change = Change(
            kind="release",
            step="merge",
            title=_mr_title(release, pushed, clusters, number, len(stages)),
            description=_mr_description(release, branch, clusters),
            app=release.app,
            validate=clusters,
            approver=approver,
            auto_approve=auto_approve,
        )

        def verify(
            revision: str, after: Sequence[object], clusters: tuple[str, ...] = clusters
        ) -> tuple[RolloutVerdict, ...]:
            return _verify(environment, release, clusters, revision, digests, story, "verify", after)

        stage = None if len(stages) == 1 else clusters[0]
        landed = land_approved(stage, environment, branch, change, story, verify)
        if landed.mr is not None:
            merges.append(landed.revision)
            merged.append(f"{landed.mr.ref} ({landed.mr.web_url}) as {landed.revision[:12]}")
            approver = landed.approver
        stage_verdicts = landed.verdicts
        if (
            all(v.phase is Phase.SUCCEEDED for v in stage_verdicts)
            and number < len(stages)
            and environment.rollout.bake_seconds > 0
        ):
            stage_verdicts = tuple(
                bake(
                    untraced(environment),
                    release.app,
                    v.cluster,
                    landed.revision,
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
                    after=[v],
                )
        verdicts.extend(stage_verdicts)
        if any(v.phase is not Phase.SUCCEEDED for v in stage_verdicts):
            skipped = [c for later in stages[number:] for c in later]
            verdicts.extend(
                RolloutVerdict(c, Phase.FAILED, "not rolled out: an earlier stage failed") for c in skipped
            )
            _fail(environment, release, story, tuple(verdicts), merges, merged, auto_approve)
    story.add(
        "result",
        "ok",
        f"{release.app} {release.tag} runs on {', '.join(v.cluster for v in verdicts)}",
        tell=True,
        after=list(verdicts),
    )
    return DeployResult(release.app, release.tag, pushed.digest, tuple(merges), tuple(verdicts))


def _verify(
    environment: Environment,
    release: Release,
    clusters: tuple[str, ...],
    revision: str,
    digests: Mapping[str, str | None],
    story: Story,
    step: str,
    after: Sequence[object],
) -> tuple[RolloutVerdict, ...]:
    """Every cluster in parallel; clusters without Argo CD get the overlay applied by twincd first."""
    applies = {
        name: apply_overlay.submit(
            untraced(environment), release.app, name, revision, wait_for=list(after), return_state=False
        )
        for name in clusters
        if environment.clusters[name].sync == "apply"
    }
    apply_errors = {name: error for name, future in applies.items() if (error := _error_of(future))}
    # Each cluster waits for its own apply only: one cluster's failed apply must not hold the others.
    futures = {
        name: verify_rollout.submit(
            untraced(environment),
            release.app,
            name,
            revision,
            digests[name],
            wait_for=[*after, *([applies[name]] if name in applies else [])],
            return_state=False,
        )
        for name in clusters
        if name not in apply_errors
    }
    verdicts = tuple(
        futures[name].result()
        if name in futures
        else RolloutVerdict(name, Phase.FAILED, f"apply failed: {apply_errors[name]}")
        for name in clusters
    )
    for name, v in zip(clusters, verdicts, strict=True):
        story.add(
            step,
            "ok" if v.phase is Phase.SUCCEEDED else "failed",
            v.message,
            cluster=v.cluster,
            tell=True,
            # A failed apply is what this notify reports: wait for it, failed or not.
            after=[futures[name] if name in futures else allow_failure(applies[name])],
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


def _fail(
    environment: Environment,
    release: Release,
    story: Story,
    verdicts: tuple[RolloutVerdict, ...],
    merges: list[str],
    merged: list[str],
    auto_approve: bool,
) -> None:
    """Fail the release with the whole truth: every cluster's result, what was merged, what was
    reverted or not (with the revert MR), and what to do next."""
    target = environment.manifests.branch
    failed = [v for v in verdicts if v.phase is not Phase.SUCCEEDED]
    lines = [
        "rollout failed on "
        + "; ".join(f"{v.cluster}: {v.message}" for v in failed)
        + "; verified on "
        + (", ".join(v.cluster for v in verdicts if v not in failed) or "none"),
        f"merged into {target}: " + ("; ".join(merged) or "nothing"),
    ]
    if not merges:
        lines.append(f"next: nothing to revert; fix the cause and re-run the deploy of {release.tag}")
    elif environment.rollout.revert.on_failure:
        lines.extend(_revert(environment, release, story, merges, auto_approve))
    else:
        lines.append(
            f"not reverted (rollout.revert.on_failure is off): {target} still pins {release.tag}. "
            f"Next: revert with `git revert -m 1 {' '.join(m[:12] for m in merges[::-1])}` or release a fix"
        )
    raise RolloutFailed("\n".join(lines))


def _revert(
    environment: Environment, release: Release, story: Story, merges: list[str], auto_approve: bool
) -> list[str]:
    """Open the revert MR; when configured, merge it (after approval) and verify the rollback.

    What happened, as lines of the failure's message: a failing revert is told there, never in
    place of the rollout failure it was made for.
    """
    target = environment.manifests.branch
    by_hand = f"revert by hand: `git revert -m 1 {' '.join(m[:12] for m in merges[::-1])}` on {target}"
    opened: list[MergeRequest] = []
    try:
        branch = revert_branch(untraced(environment), f"{release.branch}-revert", merges[::-1])
        change = Change(
            kind="revert",
            step="revert",
            title=f"Revert {release.app} {release.tag}",
            description=f"Rollback of {release.app} {release.tag}: reverts "
            f"{', '.join(m[:12] for m in merges)}.\n\n```diff\n{branch.diff}```\n",
            auto_approve=auto_approve,
            wait=environment.rollout.revert.wait,
            on_open=opened.append,
        )

        def verify(revision: str, after: Sequence[object]) -> tuple[RolloutVerdict, ...]:
            digests = read_pins(
                untraced(environment), release.app, revision, wait_for=list(after), return_state=False
            )
            clusters = tuple(environment.clusters)
            return _verify(
                environment, release, clusters, revision, digests, story, "verify-rollback", [digests]
            )

        landed = land_approved("revert", environment, branch, change, story, verify)
    except Refused as e:
        return [f"the revert was refused: {e}", f"next: {target} still pins {release.tag}; release a fix"]
    except Exception as e:  # noqa: BLE001 - the revert's failure is told beside the rollout's, not instead
        now = _as_the_forge_shows(environment, opened[-1]) if opened else None
        if now is not None and now.state == "merged":  # merged: what failed is the check of the rollback
            ref, why = f"{now.ref} ({now.web_url})", failure_text(e, "deploy")
            story.add(
                "revert", "failed", f"reverted by {ref}, but the rollback was not verified: {why}", tell=True
            )
            return [
                f"reverted by {ref} as {(now.merge_commit or '')[:12]}; the rollback was NOT verified: {why}",
                "next: look at the clusters; the manifests are back at the previous release",
            ]
        where = (
            f"revert MR {opened[-1].ref} ({opened[-1].web_url}) is open"
            if opened
            else "no revert MR was opened"
        )
        story.add("revert", "failed", f"the revert failed: {failure_text(e, 'deploy')}; {where}", tell=True)
        return [
            f"the revert FAILED: {failure_text(e, 'deploy')}",
            f"{where}; {target} still pins {release.tag}. Next: "
            + (f"merge {opened[-1].ref} by hand" if opened else by_hand),
        ]
    mr = landed.mr
    ref = f"{mr.ref} ({mr.web_url})" if mr else "(none)"
    if not landed.merged:
        return [f"revert MR {ref} opened, not merged", f"next: merge {ref} to roll back, or release a fix"]
    failed = [v for v in landed.verdicts if v.phase is not Phase.SUCCEEDED]
    if failed:
        return [
            f"reverted by {ref} as {landed.revision[:12]}; rollback NOT verified: "
            + "; ".join(f"{v.cluster}: {v.message}" for v in failed),
            "next: look at those clusters; the manifests are back at the previous release",
        ]
    return [
        f"reverted by {ref} as {landed.revision[:12]}; rollback verified on every cluster",
        f"next: fix {release.app} and release a new tag",
    ]


def _as_the_forge_shows(environment: Environment, mr: MergeRequest) -> MergeRequest | None:
    """``mr`` as the forge shows it now; None when the forge cannot say (a failure already told)."""
    try:
        return read_merge_request(untraced(environment), mr)
    except Exception:  # noqa: BLE001 - this only words a failure message
        return None


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
