"""Tasks of the drift check: render the desired state once, read and compare each cluster, report,
and remember the findings between runs (a Prefect Variable holds the fingerprint)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
from prefect.variables import Variable

from tasks.common import IO_RETRIES, cluster_ref
from twincd import drift
from twincd.adapters import git, kube_read, slack
from twincd.adapters.secrets import resolve_secret
from twincd.config import Environment
from twincd.config import SlackNotifier as SlackConfig
from twincd.errors import TwincdError
from twincd.validate import parse_documents, render_overlay

# A drift check must always look at the clusters as they are now: never a cached answer.
_FRESH: dict[str, Any] = {"cache_policy": NO_CACHE}


@dataclass(frozen=True)
class DesiredState:
    """Every app's rendered overlay per cluster, at one commit of the manifests branch."""

    revision: str
    by_cluster: dict[str, dict[str, tuple[dict[str, Any], ...]]]  # cluster → app → objects


@dataclass(frozen=True)
class PreviousRun:
    fingerprint: str
    items: tuple[drift.DriftItem, ...]


def state_slug(env: Environment) -> str:
    """Names the drift state of one environment file (two files never share their findings).

    Prefect artifact keys allow lowercase letters, digits and dashes; Variable names also allow
    underscores: the slug fits both.
    """
    stem = re.sub(r"[^a-z0-9]+", "-", Path(env.source).stem.lower()).strip("-") or "env"
    digest = hashlib.sha256(str(Path(env.source).resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def serving_clusters(env: Environment) -> frozenset[str]:
    if env.topology.mode == "active-standby" and env.topology.active is not None:
        return frozenset({env.topology.active})
    return frozenset(env.clusters)


def render_all(
    repo_dir: Path, overlays: dict[tuple[str, str], str]
) -> dict[str, dict[str, tuple[dict[str, Any], ...]]]:
    """Render (cluster, app) → overlay; overlays that do not exist mean the app does not run there."""
    present = {k: o for k, o in overlays.items() if (repo_dir / o).is_dir()}

    def render(overlay: str) -> tuple[dict[str, Any], ...]:
        return tuple(parse_documents(render_overlay(repo_dir, overlay), source=overlay))

    # kustomize is a subprocess per overlay: run them side by side.
    with ThreadPoolExecutor(max_workers=4) as pool:
        rendered = dict(zip(present, pool.map(render, present.values()), strict=True))
    out: dict[str, dict[str, tuple[dict[str, Any], ...]]] = {}
    for (cluster, app), docs in rendered.items():
        out.setdefault(cluster, {})[app] = docs
    return out


@task(name="manifests-head", **IO_RETRIES, **_FRESH)
def manifests_head(env: Environment) -> str:
    """The commit the manifests branch points at now (one ls-remote)."""
    repo = str(env.path(env.manifests.repo))
    head = git.branch_head(repo_url=repo, branch=env.manifests.branch)
    if head is None:
        raise git.GitRefNotFound(f"{repo}: branch {env.manifests.branch!r} does not exist")
    return head


# What a commit renders to does not change, and kustomize is the slow part of a check (~2 s of CPU
# per 1,000 objects here): the scheduled runs between two merges reuse the render of the commit.
@task(
    name="render-desired",
    cache_policy=INPUTS,
    persist_result=True,
    cache_expiration=timedelta(days=7),
    **IO_RETRIES,
)
def render_desired(env: Environment, revision: str) -> DesiredState:
    """One clone at ``revision``; every app's overlay for every cluster, rendered."""
    with git.clone(str(env.path(env.manifests.repo)), ref=revision) as repo:
        overlays = {(c, a): env.app_overlay(a, c) for c in env.clusters for a in env.apps}
        by_cluster = render_all(Path(str(repo.working_tree_dir)), overlays)
    return DesiredState(revision, {c: by_cluster.get(c, {}) for c in env.clusters})


def application_name(env: Environment, app: str, cluster_name: str) -> str | None:
    argocd = env.clusters[cluster_name].argocd
    return argocd.application.format(app=app, cluster=cluster_name) if argocd is not None else None


def compare_cluster(env: Environment, cluster_name: str, read: kube_read.ClusterRead) -> drift.ClusterCheck:
    items: list[drift.DriftItem] = []
    workloads: list[drift.WorkloadState] = []
    for a in read.apps:
        items += drift.compare_app(
            app=a.app,
            cluster=cluster_name,
            desired=a.desired,
            live=a.live,
            application=application_name(env, a.app, cluster_name),
        )
        workloads += drift.workload_states(app=a.app, cluster=cluster_name, desired=a.desired, live=a.live)
    return drift.ClusterCheck(
        cluster_name, tuple(items), tuple(workloads), read.objects, read.lists, read.calls
    )


@task(name="check-cluster", task_run_name="check-{cluster_name}", **IO_RETRIES, **_FRESH)
def check_cluster(env: Environment, cluster_name: str, desired: DesiredState) -> drift.ClusterCheck:
    """Read one cluster (one LIST per kind and namespace) and compare it with the desired state."""
    read = kube_read.read_cluster(cluster_ref(env, cluster_name), desired=desired.by_cluster[cluster_name])
    check = compare_cluster(env, cluster_name, read)
    get_run_logger().info(
        "%s: %d live objects read in %d API calls (%d lists); %d finding(s)",
        cluster_name,
        check.objects,
        check.calls,
        check.lists,
        len(check.items),
    )
    return check


@task(name="read-previous-findings", **IO_RETRIES, **_FRESH)
def read_previous(env: Environment) -> PreviousRun | None:
    """The last complete run's fingerprint and findings (read back from its table artifact)."""
    state = Variable.get(f"drift-check-{state_slug(env)}")
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
        return None
    items: tuple[drift.DriftItem, ...] = ()
    artifact = state.get("artifact")
    if isinstance(artifact, str):
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact)]))
            )
        if found and isinstance(found[0].data, str):
            items = tuple(drift.from_row(row) for row in json.loads(found[0].data))
    return PreviousRun(state["fingerprint"], items)


@task(name="publish-report", **_FRESH)
def publish_report(
    env: Environment,
    desired: DesiredState,
    items: tuple[drift.DriftItem, ...],
    checks: tuple[drift.ClusterCheck, ...],
) -> str:
    """The findings table and the markdown summary; returns the table artifact's id."""
    slug = state_slug(env)
    table_id = create_table_artifact(
        [drift.to_row(i) for i in items],
        key=f"drift-findings-{slug}",
        description=f"Drift findings at {desired.revision[:12]} ({len(items)})",
    )
    create_markdown_artifact(
        drift.summary_markdown(
            items,
            revision=desired.revision,
            clusters=list(env.clusters),
            checked={c.cluster: (c.objects, c.calls) for c in checks},
        ),
        key=f"drift-summary-{slug}",
        description="Drift check summary",
    )
    return str(table_id)


@task(name="notify-drift-change", **_FRESH)
def notify_change(
    env: Environment,
    desired: DesiredState,
    appeared: tuple[drift.DriftItem, ...],
    cleared: tuple[drift.DriftItem, ...],
) -> str:
    """Log what appeared and cleared and keep it as a markdown artifact (what a notifier will send)."""
    logger = get_run_logger()
    logger.warning("drift changed: %d appeared, %d cleared", len(appeared), len(cleared))
    for i in appeared:
        logger.warning("appeared: %s", i)
    for i in cleared:
        logger.info("cleared: %s", i)
    text = drift.changes_markdown(appeared, cleared, revision=desired.revision)
    create_markdown_artifact(text, key=f"drift-changes-{state_slug(env)}", description="Drift changed")
    if isinstance(env.notifier, SlackConfig):
        _tell_slack(env.notifier, text, logger)
    return text


def _tell_slack(
    cfg: SlackConfig, text: str, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
) -> None:
    """Drift changes as one Slack message; like every notifier failure, logged and never raised."""
    try:
        token = resolve_secret(cfg.token)
    except TwincdError as e:
        logger.warning("Slack notifier not configured: %s", e)
        return
    slack.SlackNotifier(
        token.reveal(), cfg.channel, store=slack.MemoryThreadStore(), base_url=cfg.api_url, logger=logger
    ).announce(text)


@task(name="save-drift-state", **IO_RETRIES, **_FRESH)
def save_state(env: Environment, fingerprint: str, table_artifact: str, revision: str) -> None:
    # The Variable holds the fingerprint and where the findings are: Variable values are capped at
    # 5,000 characters, a findings table is not.
    Variable.set(
        f"drift-check-{state_slug(env)}",
        {"fingerprint": fingerprint, "artifact": table_artifact, "revision": revision},
        overwrite=True,
    )
