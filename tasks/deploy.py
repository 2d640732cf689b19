"""The deploy flow's tasks: thin wrappers, one I/O call each, retries on transient failures only."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import IO_RETRIES, cluster_ref, rollout_target
from twincd import kustomize
from twincd.adapters import builder, cluster, git, notify_console, slack
from twincd.adapters.forge_local import LocalForge
from twincd.adapters.gitlab import GitlabForge
from twincd.adapters.secrets import resolve_secret
from twincd.config import Environment, load_environment
from twincd.config import GitlabForge as GitlabConfig
from twincd.config import SlackNotifier as SlackConfig
from twincd.domain import (
    EditResult,
    Finding,
    ImageChange,
    ImageRef,
    MergeRequest,
    Phase,
    Release,
    RolloutVerdict,
    Timeline,
    ValidationReport,
)
from twincd.errors import PermanentError, TwincdError
from twincd.release import check_tag
from twincd.validate import SchemaValidator, parse_documents, render_overlay, validate_overlay


@task(name="load-environment")
def load_environment_task(env_file: str) -> Environment:
    return load_environment(env_file)


@task(name="check-release", **IO_RETRIES)
def check_release(env: Environment, app: str, tag: str) -> Release:
    """Bad input fails here, before anything is built, pushed or committed."""
    cfg = env.app(app)
    check_tag(app=app, tag=tag, pattern=cfg.tag_pattern)
    return Release(app=app, tag=tag, commit=git.tag_commit(repo_url=str(env.path(cfg.repo)), tag=tag))


def _insecure(env: Environment) -> frozenset[str]:
    return frozenset(r.url for r in env.registries.values() if r.insecure)


def _builder_url(env: Environment) -> str:
    url = env.builder.url
    if url is None:
        return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if url.startswith("unix://") and not url.startswith("unix:///"):
        return "unix://" + str(env.path(url.removeprefix("unix://")))  # relative socket path
    return url


@task(name="build-image", **IO_RETRIES)
def build_image(env: Environment, release: Release) -> builder.BuiltImage:
    cfg = env.app(release.app)
    return builder.build_image(
        repo_url=str(env.path(cfg.repo)),
        tag=release.tag,
        image=cfg.image,
        registries=[env.registries[r].url for r in cfg.registries],
        base_url=_builder_url(env),
        insecure_registries=_insecure(env),
        commit=release.commit,
    )


@task(name="push-image", **IO_RETRIES)
def push_image(env: Environment, built: builder.BuiltImage) -> builder.PushedImage:
    return builder.push_image(built=built, base_url=_builder_url(env), insecure_registries=_insecure(env))


def pull_ref(env: Environment, app: str, cluster_name: str, pushed: builder.PushedImage) -> ImageRef:
    """The image as the registry the cluster pulls from holds it (one registry per cloud is common)."""
    return pushed.ref_for(env.pull_registry(app, cluster_name), env.app(app).image)


@task(name="set-image", task_run_name="set-image-{branch}", **IO_RETRIES)
def set_image(
    env: Environment, release: Release, pushed: builder.PushedImage, clusters: tuple[str, ...], branch: str
) -> git.ReleaseBranch:
    """Pin the digest in the app's overlay of each cluster, on ``branch``, and push it."""
    image = env.app(release.app).image
    overlays = [env.app_overlay(release.app, name) for name in clusters]

    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        files: dict[str, str] = {}
        changes: list[ImageChange] = []
        for name, overlay in zip(clusters, overlays):
            rel = f"{overlay}/kustomization.yaml"
            path = work / rel
            if not path.exists():
                raise PermanentError(
                    f"{env.manifests.repo}: {rel} does not exist (overlay of app "
                    f"{release.app!r} on cluster {name!r}); add it to the manifests repo"
                )
            result: EditResult = kustomize.set_image(
                path.read_text(), file=rel, image=image, ref=pull_ref(env, release.app, name, pushed)
            )
            if result.changed:
                files[rel] = result.text
                changes.extend(result.changes)
        return files, tuple(changes)

    message = (
        f"{release.app}: release {release.tag}\n\nPin {image} to {pushed.digest} in "
        f"{', '.join(overlays)}.\n\nSource: {release.commit}\n"
    )
    return git.write_release_branch(
        repo_url=str(env.path(env.manifests.repo)),
        target=env.manifests.branch,
        branch=branch,
        edit=edit,
        message=message,
    )


@task(name="revert-branch", **IO_RETRIES)
def revert_branch(env: Environment, release: Release, merge_commits: list[str]) -> git.ReleaseBranch:
    """A branch `twincd/<app>/<tag>-revert` reverting the release's merge commits."""
    return git.write_revert_branch(
        repo_url=str(env.path(env.manifests.repo)),
        target=env.manifests.branch,
        branch=f"{release.branch}-revert",
        merge_commits=merge_commits[::-1],
    )


@task(name="read-pins", **IO_RETRIES)
def read_pins(env: Environment, app: str, revision: str) -> dict[str, str | None]:
    """The digest each cluster's overlay of the app pins at ``revision`` (None: not pinned)."""
    image = env.app(app).image
    pins: dict[str, str | None] = {}
    with git.clone(str(env.path(env.manifests.repo)), ref=revision) as repo:
        for name in env.clusters:
            rel = f"{env.app_overlay(app, name)}/kustomization.yaml"
            entries = kustomize.images_of((Path(str(repo.working_tree_dir)) / rel).read_text(), file=rel)
            pins[name] = next((e.digest for e in entries if e.name == image and e.digest), None)
    return pins


@contextlib.contextmanager
def forge_of(env: Environment) -> Iterator[LocalForge | GitlabForge]:
    """The configured forge for one task; a GitLab session is closed when the task is done."""
    if isinstance(env.forge, GitlabConfig):
        with GitlabForge.from_config(env.forge) as gitlab:
            yield gitlab
    else:
        yield LocalForge(repo_url=str(env.path(env.manifests.repo)), records_dir=env.state_path / "forge")


@task(name="post-validation", **IO_RETRIES)
def post_validation(env: Environment, mr: MergeRequest, report: ValidationReport) -> None:
    """The validation result as an MR note (GitLab); the local forge shows it in the approval form."""
    with forge_of(env) as forge:
        if isinstance(forge, GitlabForge):
            forge.post_validation(mr, report)


# No retries and no timeout here: the adapter owns its deadline and rides out GitLab outages.
@task(name="wait-for-merge")
def wait_for_merge(env: Environment, mr: MergeRequest) -> MergeRequest:
    """Wait for a person to merge the MR on GitLab (polling with backoff, never a busy loop)."""
    assert isinstance(env.forge, GitlabConfig)
    with GitlabForge.from_config(env.forge) as gitlab:
        return gitlab.wait_for_merge(
            mr,
            timeout=env.timeouts.approval_seconds,
            poll=env.forge.poll_seconds,
            max_poll=env.forge.max_poll_seconds,
        )


@task(name="open-merge-request", **IO_RETRIES)
def open_merge_request(
    env: Environment, branch: git.ReleaseBranch, title: str, description: str
) -> MergeRequest:
    with forge_of(env) as forge:
        return forge.open(
            source_branch=branch.branch,
            target_branch=env.manifests.branch,
            title=title,
            description=description,
            head=branch.head,
        )


@task(name="validate", **IO_RETRIES)
def validate(
    env: Environment, app: str, branch: git.ReleaseBranch, clusters: tuple[str, ...]
) -> ValidationReport:
    """Render and check the app's overlay of each cluster at the branch head."""
    validator = SchemaValidator(kubernetes_version=env.kubernetes_version)
    overlays: list[str] = []
    resources = 0
    findings: list[Finding] = []
    with git.clone(str(env.path(env.manifests.repo)), ref=branch.head) as repo:
        for name in clusters:
            overlay = env.app_overlay(app, name)
            report = validate_overlay(Path(str(repo.working_tree_dir)), overlay, validator=validator)
            overlays.append(overlay)
            resources += report.resources
            findings.extend(report.findings)
    return ValidationReport(tuple(overlays), resources, tuple(findings))


@task(name="notify")
def notify(env: Environment, timeline: Timeline) -> None:
    """Tell the team. A failing notifier never fails a deploy: the failure is logged and noted."""
    logger = get_run_logger()
    try:
        notify_console.publish(timeline, list(env.clusters), logger=logger)
    except Exception as e:  # noqa: BLE001 - by design, see docstring
        logger.warning("console notifier failed (the deploy goes on): %s", type(e).__name__)
    if not isinstance(env.notifier, SlackConfig):
        return
    try:
        token = resolve_secret(env.notifier.token)
    except TwincdError as e:
        logger.warning("Slack notifier not configured (the deploy goes on): %s", e)
        return
    result = slack.SlackNotifier(
        token.reveal(),
        env.notifier.channel,
        mention_on_failure=env.notifier.mention_on_failure,
        store=slack.PrefectVariableThreadStore(),
        logger=logger,
        base_url=env.notifier.api_url,
    ).publish(timeline, list(env.clusters))
    if not result.ok:  # the error text is token-free (the adapter scrubs it)
        try:
            create_markdown_artifact(
                key=timeline.key.replace("release-", "slack-", 1),
                markdown=f"Slack notifier failed: `{result.error}`",
            )
        except Exception as e:  # noqa: BLE001 - see the docstring
            logger.warning("could not note the Slack failure in an artifact: %s", type(e).__name__)


@task(name="merge", **IO_RETRIES)
def merge(env: Environment, mr: MergeRequest, approved_by: str) -> MergeRequest:
    with forge_of(env) as forge:
        return forge.merge(mr, approved_by=approved_by)


@task(name="close-merge-request", **IO_RETRIES)
def close_merge_request(env: Environment, mr: MergeRequest, reason: str) -> MergeRequest:
    with forge_of(env) as forge:
        return forge.close(mr, reason=reason)


@task(name="apply-overlay", task_run_name="apply-{cluster_name}", **IO_RETRIES)
def apply_overlay(env: Environment, app: str, cluster_name: str, revision: str) -> cluster.ApplyResult:
    """`sync: apply` clusters (no Argo CD): server-side apply of the app's overlay at ``revision``."""
    overlay = env.app_overlay(app, cluster_name)
    with git.clone(str(env.path(env.manifests.repo)), ref=revision) as repo:
        docs = parse_documents(render_overlay(Path(str(repo.working_tree_dir)), overlay), source=overlay)
    return cluster.apply_overlay(cluster_ref(env, cluster_name), docs)


@task(name="verify-rollout", task_run_name="verify-{cluster_name}")
def verify_rollout(
    env: Environment,
    release: Release,
    cluster_name: str,
    revision: str,
    digest: str | None,
    timeout: float | None = None,
) -> RolloutVerdict:
    """Wait for the cluster to run the release; a cluster that is down becomes a FAILED verdict."""
    target = rollout_target(env, cluster_name, release.app, revision, digest)
    try:
        with git.contains_checker(str(env.path(env.manifests.repo)), revision) as contains:
            return cluster.verify_rollout(
                replace(target, contains=contains),
                timeout=env.timeouts.rollout_seconds if timeout is None else timeout,
            )
    except TwincdError as e:
        return RolloutVerdict(cluster_name, Phase.FAILED, str(e))


@task(name="bake", task_run_name="bake-{cluster_name}")
def bake(
    env: Environment, release: Release, cluster_name: str, revision: str, digest: str | None, seconds: float
) -> RolloutVerdict:
    """Let a verified stage run for ``seconds``, then check it is still rolled out and healthy."""
    time.sleep(seconds)
    return verify_rollout.fn(env, release, cluster_name, revision, digest, timeout=5)
