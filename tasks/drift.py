"""Tasks of the drift check: render the desired state once, read and compare each cluster, report,
and remember the findings between runs (a Prefect Variable holds the fingerprint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
from prefect.variables import Variable

from tasks.common import FRESH, IO_RETRIES
from twincd import drift, wiring
from twincd.config import Environment
from twincd.validate import render_overlays


@dataclass(frozen=True)
class DesiredState:
    """Every app's rendered overlay per cluster, at one commit of the manifests branch."""

    revision: str
    by_cluster: dict[str, dict[str, tuple[dict[str, Any], ...]]]  # cluster → app → objects


@dataclass(frozen=True)
class PreviousRun:
    fingerprint: str
    items: tuple[drift.DriftItem, ...]


@task(name="manifests-head", **IO_RETRIES, **FRESH)
def manifests_head(env: Environment) -> str:
    """The commit the manifests branch points at now (one ls-remote)."""
    return wiring.manifests(env).head()


# What a commit renders to does not change, and kustomize is the slow part of a check (~2 s of CPU
# per 1,000 objects here): the scheduled runs between two merges reuse the render of the commit,
# and a new commit renders again only the overlays whose inputs it changed (kept under the state
# dir by their content, twincd.validate.render_overlays).
@task(
    name="render-desired",
    cache_policy=INPUTS,
    persist_result=True,
    cache_expiration=timedelta(days=7),
    **IO_RETRIES,
)
def render_desired(env: Environment, revision: str) -> DesiredState:
    """One work tree at ``revision``; every app's overlay for every cluster, rendered."""
    overlays = {(c, a): env.app_overlay(a, c) for c in env.clusters for a in env.apps}
    with wiring.manifests(env).checkout(revision) as work:
        by_cluster = render_overlays(work, overlays, cache_dir=env.state_path / "renders")
    return DesiredState(revision, {c: by_cluster.get(c, {}) for c in env.clusters})


@task(name="check-cluster", task_run_name="check-{cluster_name}", **IO_RETRIES, **FRESH)
def check_cluster(env: Environment, cluster_name: str, desired: DesiredState) -> drift.ClusterCheck:
    """Read one cluster (one LIST per kind and namespace) and compare it with the desired state."""
    read = wiring.cluster(env, cluster_name).read(desired.by_cluster[cluster_name])
    check = drift.compare_cluster(read, env.applications(cluster_name))
    get_run_logger().info(
        "%s: %d live objects read in %d API calls (%d lists); %d finding(s)",
        cluster_name,
        check.objects,
        check.calls,
        check.lists,
        len(check.items),
    )
    return check


@task(name="read-previous-findings", **IO_RETRIES, **FRESH)
def read_previous(env: Environment) -> PreviousRun | None:
    """The last complete run's fingerprint and findings (read back from its table artifact)."""
    state = Variable.get(f"drift-check-{drift.state_slug(env.source)}")
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


@task(name="publish-report", **FRESH)
def publish_report(
    env: Environment,
    desired: DesiredState,
    items: tuple[drift.DriftItem, ...],
    checks: tuple[drift.ClusterCheck, ...],
) -> str:
    """The findings table and the markdown summary; returns the table artifact's id."""
    slug = drift.state_slug(env.source)
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


@task(name="notify-drift-change", **FRESH)
def notify_change(
    env: Environment,
    desired: DesiredState,
    appeared: tuple[drift.DriftItem, ...],
    cleared: tuple[drift.DriftItem, ...],
) -> str:
    """What appeared and cleared, as a markdown artifact and one message to every notifier."""
    logger = get_run_logger()
    logger.warning("drift changed: %d appeared, %d cleared", len(appeared), len(cleared))
    for i in appeared:
        logger.warning("appeared: %s", i)
    for i in cleared:
        logger.info("cleared: %s", i)
    text = drift.changes_markdown(appeared, cleared, revision=desired.revision)
    create_markdown_artifact(
        text, key=f"drift-changes-{drift.state_slug(env.source)}", description="Drift changed"
    )
    for notifier in wiring.notifiers(env, logger=logger, threads=False):
        notifier.announce(text)  # a failed one logs its failure; a notifier never fails a run
    return text


@task(name="save-drift-state", **IO_RETRIES, **FRESH)
def save_state(env: Environment, fingerprint: str, table_artifact: str, revision: str) -> None:
    # The Variable holds the fingerprint and where the findings are: Variable values are capped at
    # 5,000 characters, a findings table is not.
    Variable.set(
        f"drift-check-{drift.state_slug(env.source)}",
        {"fingerprint": fingerprint, "artifact": table_artifact, "revision": revision},
        overwrite=True,
    )
