"""What twincd asks of Argo CD while verifying, decided from the Application as Argo CD writes it."""

from __future__ import annotations

import copy
from typing import Any

from twincd.adapters.cluster import _evaluate, sync_wanted
from twincd.domain import ClusterRef, Phase, RolloutTarget
from twincd.rollout import automated

MERGE = "3f2c9e1d" + "0" * 32
LATER = "9a8b7c6d" + "1" * 32
OLDER = "0c1d2e3f" + "2" * 32


def target(contains: set[str] = frozenset({LATER})) -> RolloutTarget:  # type: ignore[assignment]
    return RolloutTarget(
        cluster=ClusterRef("eks", "eks"),
        argocd=ClusterRef("argocd", "aks"),
        application="hello-eks",
        argocd_namespace="argocd",
        kind="Deployment",
        namespace="hello",
        name="hello",
        revision=MERGE,
        contains=lambda revision: revision in contains,
    )


MANUAL: dict[str, Any] = {
    "metadata": {"name": "hello-eks", "namespace": "argocd"},
    "spec": {"syncPolicy": {"syncOptions": ["CreateNamespace=true"]}},
    "status": {
        "sync": {"status": "OutOfSync", "revision": MERGE},
        "operationState": {
            "phase": "Succeeded",
            "operation": {"sync": {"revision": OLDER}, "initiatedBy": {"username": "alice"}},
            "syncResult": {"revision": OLDER},
        },
    },
}


def manual(**changes: Any) -> dict[str, Any]:
    app = copy.deepcopy(MANUAL)
    for key, value in changes.items():
        app[key] = value
    return app


def test_automated_follows_argo_cds_enabled_flag() -> None:
    assert automated({"spec": {"syncPolicy": {"automated": {}}}})
    assert automated({"spec": {"syncPolicy": {"automated": {"prune": True, "enabled": True}}}})
    assert not automated({"spec": {"syncPolicy": {"automated": {"enabled": False}}}})
    assert not automated({"spec": {"syncPolicy": {"syncOptions": []}}})
    assert not automated({"spec": {}})


def test_a_manual_application_behind_the_release_wants_a_sync() -> None:
    assert sync_wanted(MANUAL, target())


def test_no_sync_while_an_operation_runs_and_none_after_it_was_tried_or_done() -> None:
    running = manual(operation={"sync": {"revision": OLDER}, "initiatedBy": {"username": "bob"}})
    assert not sync_wanted(running, target())  # asked again once it has ended
    tried = manual()
    tried["status"]["operationState"]["operation"]["sync"]["revision"] = MERGE
    tried["status"]["operationState"]["phase"] = "Failed"
    assert not sync_wanted(tried, target())  # a failed sync of the release is the verdict's
    synced_later = manual()
    synced_later["status"]["sync"] = {"status": "Synced", "revision": LATER}
    assert not sync_wanted(synced_later, target())
    assert not sync_wanted({**MANUAL, "spec": {"syncPolicy": {"automated": {}}}}, target())


def test_a_branch_name_is_no_commit_that_holds_the_release() -> None:
    """While manifests fail to load, Argo CD shows the unresolved targetRevision ("main")."""
    broken = manual()
    broken["status"]["sync"] = {"status": "Synced", "revision": "main"}
    assert sync_wanted(broken, target(contains={"main", LATER}))


COMPARISON_ERROR = {"type": "ComparisonError", "message": "Failed to load target state: boom"}


def seen(app: dict[str, Any]) -> dict[str, tuple[dict[str, Any], ...]]:
    return {"workload": (), "application": (app,)}


def test_an_error_before_argo_cd_reconciled_the_refresh_is_waited_out() -> None:
    """``main`` as the revision must not count as "a later commit that holds the merge"."""
    app = manual(spec={"syncPolicy": {"automated": {}}})
    app["status"] = {"sync": {"status": "Unknown", "revision": "main"}, "conditions": [COMPARISON_ERROR]}
    waiting = _evaluate(target(contains={"main"}), seen(app), lambda app: False)
    assert waiting.phase is Phase.PROGRESSING, waiting
    failed = _evaluate(target(contains={"main"}), seen(app), lambda app: True)
    assert (
        failed.phase is Phase.FAILED
        and "ComparisonError: Failed to load target state: boom" in failed.message
    )
