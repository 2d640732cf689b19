"""The deploy flow's tasks: thin wrappers, one I/O call each, retries on transient failures only."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import get_run_logger, task

from tasks.common import IO_RETRIES
from twincd import kustomize
from twincd.adapters import builder, cluster, git, notify_console
from twincd.adapters.forge_local import LocalForge
from twincd.config import Environment, load_environment
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
from twincd.validate import SchemaValidator, validate_overlay


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
        repo_url=str(env.path(cfg.repo)), tag=release.tag, image=cfg.image,
        registries=[env.registries[r].url for r in cfg.registries], base_url=_builder_url(env),
        insecure_registries=_insecure(env),
    )


@task(name="push-image", **IO_RETRIES)
def push_image(env: Environment, built: builder.BuiltImage) -> builder.PushedImage:
    return builder.push_image(built=built, base_url=_builder_url(env), insecure_registries=_insecure(env))


def _pull_ref(env: Environment, release: Release, cluster_name: str, pushed: builder.PushedImage) -> ImageRef:
    url = env.pull_registry(release.app, cluster_name)
    return next(r for r in pushed.refs if r.name.startswith(url + "/"))


@task(name="set-image", **IO_RETRIES)
def set_image(env: Environment, release: Release, pushed: builder.PushedImage) -> git.ReleaseBranch:
    """Pin the digest in every overlay of the app, on branch twincd/<app>/<tag>, and push it."""
    image = env.app(release.app).image

    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange, ...]]:
        files: dict[str, str] = {}
        changes: list[ImageChange] = []
        for name in env.clusters:
            rel = f"{env.app_overlay(release.app, name)}/kustomization.yaml"
            path = work / rel
            if not path.exists():
                raise PermanentError(f"{env.manifests.repo}: {rel} does not exist (overlay of app "
                                     f"{release.app!r} on cluster {name!r}); add it to the manifests repo")
            result: EditResult = kustomize.set_image(path.read_text(), file=rel, image=image,
                                                     ref=_pull_ref(env, release, name, pushed))
            if result.changed:
                files[rel] = result.text
                changes.extend(result.changes)
        return files, tuple(changes)

    digest = pushed.digest
    message = (f"{release.app}: release {release.tag}\n\nPin {image} to {digest} in "
               f"{', '.join(env.app_overlay(release.app, c) for c in env.clusters)}.\n\n"
               f"Source: {release.commit}\n")
    return git.write_release_branch(repo_url=str(env.path(env.manifests.repo)), target=env.manifests.branch,
                                    branch=release.branch, edit=edit, message=message)


def _forge(env: Environment) -> LocalForge:
    if env.forge.type != "local":
        raise PermanentError(f"{env.source}: forge type {env.forge.type!r} is not supported by this version")
    return LocalForge(repo_url=str(env.path(env.manifests.repo)), records_dir=env.state_path / "forge")


@task(name="open-merge-request", **IO_RETRIES)
def open_merge_request(env: Environment, release: Release, branch: git.ReleaseBranch,
                       pushed: builder.PushedImage) -> MergeRequest:
    title = f"{release.app}: release {release.tag} ({pushed.refs[0].short_digest})"
    description = f"Release `{release.tag}` of `{release.app}` (source {release.commit}).\n\n```diff\n{branch.diff}```\n"
    return _forge(env).open(source_branch=branch.branch, target_branch=env.manifests.branch,
                            title=title, description=description)


@task(name="validate", **IO_RETRIES)
def validate(env: Environment, release: Release, branch: git.ReleaseBranch) -> ValidationReport:
    """Render and check every overlay of the app at the branch head."""
    validator = SchemaValidator(kubernetes_version=env.kubernetes_version)
    overlays: list[str] = []
    resources = 0
    findings: list[Finding] = []
    with git.clone(str(env.path(env.manifests.repo)), ref=branch.head) as repo:
        for name in env.clusters:
            overlay = env.app_overlay(release.app, name)
            report = validate_overlay(Path(str(repo.working_tree_dir)), overlay, validator=validator)
            overlays.append(overlay)
            resources += report.resources
            findings.extend(report.findings)
    return ValidationReport(tuple(overlays), resources, tuple(findings))


@task(name="notify")
def notify(env: Environment, timeline: Timeline) -> None:
    """Tell the team. A failing notifier never fails a deploy: the failure is logged and dropped."""
    logger = get_run_logger()
    try:
        notify_console.publish(timeline, logger=logger)
    except Exception as e:  # noqa: BLE001 - by design, see docstring
        logger.warning("notifier failed (the deploy goes on): %s", type(e).__name__)


@task(name="merge", **IO_RETRIES)
def merge(env: Environment, mr: MergeRequest, approved_by: str) -> MergeRequest:
    return _forge(env).merge(mr, approved_by=approved_by)


@task(name="close-merge-request", **IO_RETRIES)
def close_merge_request(env: Environment, mr: MergeRequest, reason: str) -> MergeRequest:
    return _forge(env).close(mr, reason=reason)


@task(name="verify-rollout", task_run_name="verify-{cluster_name}")
def verify_rollout(env: Environment, release: Release, cluster_name: str, revision: str,
                   pushed: builder.PushedImage) -> RolloutVerdict:
    """Wait for the cluster to run the release; a cluster that is down becomes a FAILED verdict."""
    c = env.clusters[cluster_name]
    w = env.app(release.app).workload
    argocd = c.argocd if c.sync == "argocd" else None
    kubeconfig = str(env.path(c.kubeconfig)) if c.kubeconfig else None
    target = cluster.RolloutTarget(
        cluster=cluster.ClusterRef(cluster_name, c.context, kubeconfig),
        argocd=cluster.ClusterRef(f"Argo CD of {cluster_name}", argocd.context,
                                  str(env.path(argocd.kubeconfig)) if argocd.kubeconfig else kubeconfig)
        if argocd else None,
        application=argocd.application.format(app=release.app, cluster=cluster_name) if argocd else None,
        argocd_namespace=argocd.namespace if argocd else "argocd",
        kind=w.kind, namespace=w.namespace, name=w.name, revision=revision,
        digest=_pull_ref(env, release, cluster_name, pushed).digest,
    )
    try:
        return cluster.verify_rollout(target, timeout=env.timeouts.rollout_seconds)
    except TwincdError as e:
        return RolloutVerdict(cluster_name, Phase.FAILED, str(e))
