"""The deploy flow's tasks: thin wrappers, one I/O call each, retries on transient failures only.

Each task asks ``twincd.wiring`` for the port it needs; the environment is an argument (loaded in
the flow body, not by a task), so the run graph draws only the data each step hands to the next.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import FRESH, IO_RETRIES, ONCE_PER_BRANCH, ONCE_PER_CLUSTER_REVISION, once_per_run
from twincd import kustomize, wiring
from twincd.adapters.registry import REVISION_LABEL
from twincd.config import Environment
from twincd.domain import (
    ApplyResult,
    BuiltImage,
    CaughtUp,
    ImageRef,
    MergeRequest,
    Phase,
    PushedImage,
    Release,
    ReleaseBranch,
    RolloutVerdict,
    Timeline,
    ValidationReport,
)
from twincd.errors import PermanentError, TwincdError
from twincd.release import check_tag, pull_ref
from twincd.validate import ImagePolicy, SchemaValidator, parse_documents, render_overlay, validate_overlays


@task(name="check-release", **IO_RETRIES)
def check_release(env: Environment, app: str, tag: str) -> Release:
    """Bad input fails here, before anything is built, pushed or committed."""
    check_tag(app=app, tag=tag, pattern=env.app(app).tag_pattern)
    return Release(app=app, tag=tag, commit=wiring.app_source(env, app).tag_commit(tag))


@task(name="build-image", **IO_RETRIES)
def build_image(env: Environment, release: Release) -> BuiltImage:
    return wiring.builder(env, env.app_registry_urls(release.app), app=release.app).build(
        repo_url=wiring.app_repo_url(env, release.app),
        tag=release.tag,
        commit=release.commit,
        image=env.app(release.app).image,
    )


@task(name="check-prebuilt-image", **IO_RETRIES)
def check_prebuilt(env: Environment, release: Release, image: str) -> PushedImage:
    """An image CI built and pushed (``REF@sha256:…``), found in every registry the app lists.

    When the image carries its provenance label, it must be the build of the tag's commit.
    """
    name, _, digest = image.rpartition("@")
    ImageRef(name=name, digest=digest)  # a malformed digest is refused before any request
    ref_image = env.app(release.app).image
    if not name or not name.endswith("/" + ref_image):
        raise PermanentError(
            f"--image {image!r} is not <registry>/{ref_image}@sha256:<digest> "
            f"(the app's image is {ref_image!r})"
        )
    refs = []
    for registry in wiring.registries(env, env.app_registry_urls(release.app)):
        found = registry.digest(ref_image, digest)
        if found is None:
            raise PermanentError(
                f"{registry.url}/{ref_image}@{digest} does not exist: push the image to every "
                f"registry app {release.app!r} lists ({', '.join(env.app(release.app).registries)}) "
                "before deploying it"
            )
        built_from = (registry.labels(ref_image, digest) or {}).get(REVISION_LABEL)
        if built_from and built_from != release.commit:
            raise PermanentError(
                f"{registry.url}/{ref_image}@{digest[:19]} was built from {built_from[:12]}, but tag "
                f"{release.tag} is commit {release.commit[:12]}: it is not this release's image"
            )
        refs.append(ImageRef(name=f"{registry.url}/{ref_image}", digest=digest, tag=release.tag))
    return PushedImage(refs=tuple(refs), reused=True)


@task(name="push-image", **IO_RETRIES)
def push_image(env: Environment, built: BuiltImage) -> PushedImage:
    return wiring.builder(env, built.registries).push(built)


@task(name="set-image", task_run_name="set-image-{branch}", **IO_RETRIES, **ONCE_PER_BRANCH)
def set_image(
    env: Environment, release: Release, pushed: PushedImage, clusters: tuple[str, ...], branch: str
) -> ReleaseBranch:
    """Pin the digest in the app's overlay of each cluster, on ``branch``, and push it."""
    image = env.app(release.app).image
    overlays = [env.app_overlay(release.app, name) for name in clusters]
    pins = {
        f"{overlay}/kustomization.yaml": (
            pull_ref(env, release.app, name, pushed),
            f"overlay of app {release.app!r} on cluster {name!r}",
        )
        for name, overlay in zip(clusters, overlays, strict=True)
    }
    message = (
        f"{release.app}: release {release.tag}\n\nPin {image} to {pushed.digest} in "
        f"{', '.join(overlays)}.\n\nSource: {release.commit}\n"
    )
    edit = kustomize.pin_images(repo=env.manifests.repo, image=image, pins=pins)
    return wiring.manifests(env).write_branch(branch=branch, edit=edit, message=message, overlays=overlays)


@task(name="revert-branch", **IO_RETRIES, **ONCE_PER_BRANCH)
def revert_branch(env: Environment, branch: str, merge_commits: Sequence[str]) -> ReleaseBranch:
    """A branch reverting ``merge_commits`` (``git revert -m 1`` each, in the order given)."""
    return wiring.manifests(env).write_revert(branch=branch, merge_commits=merge_commits)


@task(name="read-pins", **IO_RETRIES)
def read_pins(env: Environment, app: str, revision: str) -> dict[str, str | None]:
    """The digest each cluster's overlay of the app pins at ``revision`` (None: not pinned)."""
    files = {name: f"{env.app_overlay(app, name)}/kustomization.yaml" for name in env.clusters}
    overlays = [env.app_overlay(app, name) for name in env.clusters]
    with wiring.manifests(env).checkout(revision, overlays=overlays) as work:
        return kustomize.pinned_digests(work, image=env.app(app).image, files=files)


@task(name="open-merge-request", **IO_RETRIES, **ONCE_PER_BRANCH)
def open_merge_request(env: Environment, branch: ReleaseBranch, title: str, description: str) -> MergeRequest:
    with wiring.forge(env) as forge:
        return forge.open(
            source_branch=branch.branch,
            target_branch=env.manifests.branch,
            title=title,
            description=description,
            head=branch.head,
        )


# Validated once per run and branch head: a resumed run validates again only a branch that moved.
@task(
    name="validate",
    **IO_RETRIES,
    **once_per_run(
        lambda p: f"{p['branch'].head}:{','.join(p['clusters'])}:{','.join(p.get('touched', ()))}"
    ),
)
def validate(
    env: Environment,
    app: str,
    branch: ReleaseBranch,
    mr: MergeRequest,
    clusters: tuple[str, ...],
    touched: tuple[str, ...] = (),
) -> ValidationReport:
    """Render and check the app's overlay of each cluster at the head of the MR's branch.

    ``touched``: paths the target's newer commits changed (the branch was brought up to it): every
    other app's overlay on these clusters that reads one of them is checked too, so what the merge
    lands is checked wherever it changed, not only where this change did.
    """
    own = [env.app_overlay(app, name) for name in clusters]
    others = (
        {env.app_overlay(a, name): a for a in env.apps if a != app for name in clusters} if touched else {}
    )
    validator = SchemaValidator(kubernetes_version=env.kubernetes_version)
    with wiring.manifests(env).checkout(branch.head, overlays=[*own, *others]) as work:
        reports = [validate_overlays(work, own, validator=validator, images=_image_policy(env, app))]
        for overlay, other in others.items():
            if _reads_any(work, overlay, touched):
                reports.append(
                    validate_overlays(work, [overlay], validator=validator, images=_image_policy(env, other))
                )
    return ValidationReport(
        tuple(o for r in reports for o in r.overlays),
        sum(r.resources for r in reports),
        tuple(f for r in reports for f in r.findings),
    )


def _image_policy(env: Environment, app: str) -> ImagePolicy:
    return ImagePolicy(
        managed=env.managed_images(app),
        unpinned=env.validation.unpinned_images,
        allowed=env.validation.allowed_unpinned,
    )


def _reads_any(work: Path, overlay: str, paths: Sequence[str]) -> bool:
    """Whether ``kubectl kustomize overlay`` reads any of ``paths`` (or what cannot be told); names
    that no longer exist count (a base the target's commits deleted is what broke it)."""
    inputs = kustomize.kustomize_inputs(work, overlay, missing=True)
    return kustomize.UNKNOWN in inputs or kustomize.touches(paths, inputs)


@task(name="post-validation", **IO_RETRIES)
def post_validation(env: Environment, mr: MergeRequest, report: ValidationReport) -> MergeRequest:
    """The validation result on the MR, where reviewers see it; the MR goes on to the merge."""
    with wiring.forge(env) as forge:
        forge.post_validation(mr, report)
    return replace(mr)  # a result of its own, so the run graph draws validate → post-validation → merge


@task(name="read-merge-request", **IO_RETRIES, **FRESH)
def read_merge_request(env: Environment, mr: MergeRequest) -> MergeRequest:
    """The MR as the forge shows it now (merged, closed or still open, and by whom)."""
    with wiring.forge(env) as forge:
        return forge.get(mr)


@task(name="catch-up", task_run_name="catch-up-{branch.branch}", **IO_RETRIES, **FRESH)
def catch_up(env: Environment, branch: ReleaseBranch) -> CaughtUp:
    """The branch brought up to the target's head, so that what is validated next is what merges."""
    return wiring.manifests(env).catch_up(branch)


@task(name="merge", **IO_RETRIES)
def merge(env: Environment, mr: MergeRequest, approved_by: str, onto: str | None = None) -> MergeRequest:
    with wiring.forge(env) as forge:
        return forge.merge(mr, approved_by=approved_by, onto=onto)


@task(name="close-merge-request", **IO_RETRIES)
def close_merge_request(env: Environment, mr: MergeRequest, reason: str) -> MergeRequest:
    with wiring.forge(env) as forge:
        return forge.close(mr, reason=reason)


@task(name="notify")
def notify(env: Environment, timeline: Timeline) -> None:
    """Tell the team. A failing notifier never fails a deploy: the failure is logged and noted."""
    logger = get_run_logger()
    for notifier in wiring.notifiers(env, logger=logger):
        told = notifier.publish(timeline, list(env.clusters))
        if told.ok:
            continue
        # Each adapter logged its failure already; the note in the UI says it again where people
        # look. The error text is secret-free (each adapter scrubs its own).
        try:
            create_markdown_artifact(
                key=timeline.key.replace("release-", f"{notifier.name}-", 1),
                markdown=f"{notifier.name.capitalize()} notifier failed: `{told.error}`",
            )
        except Exception as e:  # noqa: BLE001 - see the docstring
            logger.warning("could not note the notifier failure in an artifact: %s", type(e).__name__)


@task(name="apply-overlay", task_run_name="apply-{cluster_name}", **IO_RETRIES, **ONCE_PER_CLUSTER_REVISION)
def apply_overlay(env: Environment, app: str, cluster_name: str, revision: str) -> ApplyResult:
    """`sync: apply` clusters (no Argo CD): server-side apply of the app's overlay at ``revision``.

    The overlay is rendered from a checkout at ``revision`` first: what is applied is what was merged.
    """
    overlay = env.app_overlay(app, cluster_name)
    with wiring.manifests(env).checkout(revision, overlays=[overlay]) as work:
        objects = parse_documents(render_overlay(work, overlay), source=overlay)
    return wiring.cluster(env, cluster_name).apply(objects)


@task(name="verify-rollout", task_run_name="verify-{cluster_name}", **ONCE_PER_CLUSTER_REVISION)
def verify_rollout(
    env: Environment,
    app: str,
    cluster_name: str,
    revision: str,
    digest: str | None,
    timeout: float | None = None,
) -> RolloutVerdict:
    """Wait for the cluster to run the release; a cluster that is down becomes a FAILED verdict."""
    target = wiring.rollout_target(env, cluster_name, app, revision, digest)
    try:
        return wiring.rollouts(env).verify(
            target, timeout=env.timeouts.rollout_seconds if timeout is None else timeout
        )
    except TwincdError as e:
        return RolloutVerdict(cluster_name, Phase.FAILED, str(e))


@task(name="bake", task_run_name="bake-{cluster_name}", **ONCE_PER_CLUSTER_REVISION)
def bake(
    env: Environment,
    app: str,
    cluster_name: str,
    revision: str,
    digest: str | None,
    seconds: float,
) -> RolloutVerdict:
    """Let a verified stage run for ``seconds``, then check it is still rolled out and healthy."""
    time.sleep(seconds)
    return verify_rollout.fn(env, app, cluster_name, revision, digest, timeout=5)
