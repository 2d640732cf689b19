"""The drift-check flow: the manifests branch against every cluster, and cluster against cluster.

Orchestration only. Each cluster is read and compared in its own task, in parallel; the findings
are reported every run, and notified only when they differ from the last complete run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import State, flow, get_run_logger
from prefect.states import Completed

from tasks.common import untraced
from tasks.drift import (
    check_cluster,
    manifests_head,
    notify_change,
    publish_report,
    read_previous,
    render_desired,
    save_state,
)
from twincd import drift
from twincd.config import DEFAULT_ENV, load_environment
from twincd.errors import PermanentError, TransientError, TwincdError


class DriftFound(PermanentError):
    """Raised only with ``fail_on_drift``: the clusters do not run what the manifests say."""


class ClustersUnreadable(TransientError):
    """Some clusters could not be read: the check is incomplete and its state is not kept."""


@dataclass(frozen=True)
class DriftReport:
    revision: str
    fingerprint: str
    items: tuple[drift.DriftItem, ...]
    appeared: tuple[drift.DriftItem, ...]
    cleared: tuple[drift.DriftItem, ...]
    notified: bool


def _run_name() -> str:
    return f"drift-check-{datetime.now(UTC):%Y%m%d-%H%M%S}"


@flow(name="drift-check", flow_run_name=_run_name, log_prints=True)
def drift_check(env: str = str(DEFAULT_ENV), fail_on_drift: bool = False) -> State:
    """Compare every cluster with the overlays at the head of the manifests branch.

    Args:
        env: The environment file: clusters, manifests repo, notifier.
        fail_on_drift: End the run Failed (instead of Completed with the drift flagged) when there
            is any finding.
    """
    logger = get_run_logger()
    environment = load_environment(env)
    desired = render_desired(untraced(environment), manifests_head(untraced(environment)))
    futures = {
        name: check_cluster.submit(untraced(environment), name, desired) for name in environment.clusters
    }
    previous = read_previous(untraced(environment))

    checks: list[drift.ClusterCheck] = []
    unreadable: list[str] = []
    for name, future in futures.items():
        try:
            checks.append(future.result())
        except TwincdError as e:
            unreadable.append(f"{name}: {e}")
    workloads = [w for c in checks for w in c.workloads]
    # Each app's serving clusters as git has them (a failover moves them): a standby scaled to
    # zero is no skew.
    items = tuple(i for c in checks for i in c.items) + tuple(
        item
        for app in environment.apps
        for item in drift.find_skew(
            [w for w in workloads if w.app == app], serving=drift.serving_in_git(desired.by_cluster, app)
        )
    )
    table = publish_report(untraced(environment), desired, items, tuple(checks))
    if unreadable:
        # Keeping this run's state would make every finding of the unread clusters look "cleared".
        raise ClustersUnreadable("drift check incomplete, state not kept: " + "; ".join(unreadable))

    fingerprint = drift.fingerprint(items)
    before = previous.fingerprint if previous is not None else drift.fingerprint(())
    appeared, cleared = drift.diff_findings(previous.items if previous is not None else (), items)
    changed = fingerprint != before
    if changed:
        notify_change(untraced(environment), desired, appeared, cleared)
    save_state(untraced(environment), fingerprint, table, desired.revision)
    report = DriftReport(desired.revision, fingerprint, items, appeared, cleared, changed)

    message = (
        (
            f"{len(items)} drift finding(s) at {desired.revision[:12]}"
            f" ({'changed' if changed else 'unchanged'} since the last run)"
        )
        if items
        else f"no drift at {desired.revision[:12]}"
    )
    logger.info(message)
    if items and fail_on_drift:
        raise DriftFound(
            message + ": " + "; ".join(str(i) for i in items[:5]) + ("; ..." if len(items) > 5 else "")
        )
    return Completed(message=message, data=report)
