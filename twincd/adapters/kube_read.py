"""Cheap reads of live objects for the drift check: one LIST per (kind, namespace), never a GET per object.

The number of API calls grows with kinds × namespaces, not with objects. Built-in kinds map to
their API paths through a static table; any other kind (custom resources such as SealedSecret) is
resolved by one discovery GET of its group-version per reader, cached. Callers get plain dicts
(the objects as ``kubectl get -o json`` prints them) and the cluster adapter's errors only:
``ClusterError`` (transient), ``ClusterDenied`` (401/403), ``ClusterRefused`` (another 4xx).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

from kubernetes import client as k8s

from twincd.adapters.cluster import (
    ClusterDenied,
    ClusterError,
    _read_json,
    api_client,
    apply_overlay,
    verify_rollout,
)
from twincd.domain import ApplyResult, ClusterRef, Phase, Role, RolloutTarget, RolloutVerdict
from twincd.drift import AppRead, ClusterRead, ListScope, list_scopes, place_namespaces
from twincd.errors import TwincdError
from twincd.failover import role_verdict
from twincd.ports import Manifests


@dataclass(frozen=True)
class KindInfo:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str) -> str:
        prefix = f"/apis/{self.api_version}" if "/" in self.api_version else f"/api/{self.api_version}"
        return (
            f"{prefix}/namespaces/{namespace}/{self.plural}" if self.namespaced else f"{prefix}/{self.plural}"
        )


def _builtin(api_version: str, namespaced: bool, *kinds: tuple[str, str]) -> dict[tuple[str, str], KindInfo]:
    return {(api_version, kind): KindInfo(api_version, kind, plural, namespaced) for kind, plural in kinds}


# The built-in kinds manifests usually hold; their paths are fixed by Kubernetes, so no discovery.
BUILTIN_KINDS: dict[tuple[str, str], KindInfo] = {
    **_builtin(
        "v1",
        True,
        ("ConfigMap", "configmaps"),
        ("Secret", "secrets"),
        ("Service", "services"),
        ("ServiceAccount", "serviceaccounts"),
        ("PersistentVolumeClaim", "persistentvolumeclaims"),
        ("Pod", "pods"),
        ("LimitRange", "limitranges"),
        ("ResourceQuota", "resourcequotas"),
    ),
    **_builtin("v1", False, ("Namespace", "namespaces"), ("PersistentVolume", "persistentvolumes")),
    **_builtin(
        "apps/v1",
        True,
        ("Deployment", "deployments"),
        ("StatefulSet", "statefulsets"),
        ("DaemonSet", "daemonsets"),
        ("ReplicaSet", "replicasets"),
    ),
    **_builtin("batch/v1", True, ("Job", "jobs"), ("CronJob", "cronjobs")),
    **_builtin("networking.k8s.io/v1", True, ("Ingress", "ingresses"), ("NetworkPolicy", "networkpolicies")),
    **_builtin("networking.k8s.io/v1", False, ("IngressClass", "ingressclasses")),
    **_builtin("policy/v1", True, ("PodDisruptionBudget", "poddisruptionbudgets")),
    **_builtin("autoscaling/v2", True, ("HorizontalPodAutoscaler", "horizontalpodautoscalers")),
    **_builtin("rbac.authorization.k8s.io/v1", True, ("Role", "roles"), ("RoleBinding", "rolebindings")),
    **_builtin(
        "rbac.authorization.k8s.io/v1",
        False,
        ("ClusterRole", "clusterroles"),
        ("ClusterRoleBinding", "clusterrolebindings"),
    ),
    **_builtin("apiextensions.k8s.io/v1", False, ("CustomResourceDefinition", "customresourcedefinitions")),
}


class KindNotServed(ClusterDenied):
    """The cluster does not serve a kind the manifests use (e.g. a CRD that is not installed)."""


class LiveReader:
    """Reads one cluster; counts every API call it makes (``calls``) and the LISTs among them (``lists``)."""

    def __init__(self, ref: ClusterRef, *, api: k8s.ApiClient | None = None) -> None:
        self.ref = ref
        self._api = api if api is not None else api_client(ref)
        self._owns_api = api is None
        self._discovered: dict[str, dict[str, KindInfo]] = {}  # group-version → kind → info
        self.calls = 0
        self.lists = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_api:
            self._api.close()

    def get(self, what: str, path: str, query: Sequence[tuple[str, str]] = ()) -> dict[str, Any] | None:
        """GET ``path`` as JSON; None on 404. Every failure is a cluster adapter error: the client's
        ApiException (status 0 for TLS failures), urllib3 and OS errors become ClusterError, 401/403
        ClusterDenied (through cluster.py's own request helper, so both adapters agree)."""
        self.calls += 1
        try:
            status, data = _read_json(self.ref, self._api, what, "GET", path, query=query)
        except ValueError:  # a 2xx body that is not JSON: not an API server (yet), e.g. a proxy page
            raise ClusterError(
                f"cluster {self.ref.name}: {what}: the API server's answer is not JSON"
            ) from None
        if status == 404:
            return None
        if not isinstance(data, dict):
            raise ClusterError(
                f"cluster {self.ref.name}: {what}: the API server answered {type(data).__name__}, "
                "not a JSON object"
            )
        return data

    def kind(self, api_version: str, kind: str) -> KindInfo | None:
        """How to list ``kind``; None when the cluster does not serve it."""
        info = BUILTIN_KINDS.get((api_version, kind))
        if info is not None:
            return info
        if api_version not in self._discovered:
            prefix = "/apis/" if "/" in api_version else "/api/"
            found = self.get(f"discover {api_version}", prefix + api_version) or {}
            self._discovered[api_version] = {
                str(r["kind"]): KindInfo(
                    api_version, str(r["kind"]), str(r["name"]), bool(r.get("namespaced"))
                )
                for r in found.get("resources", [])
                if "/" not in str(r.get("name", ""))
            }
        return self._discovered[api_version].get(kind)

    def namespaced(self, api_version: str, kind: str) -> bool:
        info = self.kind(api_version, kind)
        return True if info is None else info.namespaced  # unknown kinds are reported missing as they are

    def list(self, scope: ListScope) -> list[dict[str, Any]]:
        """Every object of one kind in one namespace (label-selected when the scope says so): one call.

        No ``limit``/``continue`` paging: one response per scope is what keeps the call count at
        kinds × namespaces; a real API server answers an unpaged LIST from its watch cache.
        """
        info = self.kind(scope.api_version, scope.kind)
        if info is None:
            return []
        query = [("labelSelector", scope.label_selector)] if scope.label_selector else []
        where = f" in {scope.namespace}" if scope.namespace else ""
        self.lists += 1
        body = self.get(f"list {scope.kind}{where}", info.path(scope.namespace), query)
        items = (body or {}).get("items", [])
        # Items of a LIST carry neither apiVersion nor kind: put them back, the comparison keys on them.
        return [{**item, "apiVersion": scope.api_version, "kind": scope.kind} for item in items]


def read_cluster(
    ref: ClusterRef, *, desired: Mapping[str, Iterable[Mapping[str, Any]]], api: k8s.ApiClient | None = None
) -> ClusterRead:
    """The live objects of every app's (kind, namespace) scopes on one cluster.

    ``desired`` maps app → its rendered objects for this cluster. Two apps sharing a scope each
    list it with their own label selector, so each app's read stays independent; a scope without a
    selector (e.g. cluster-scoped Namespaces) is the same for every app and listed once.
    """
    with LiveReader(ref, api=api) as reader:
        apps = []
        listed: dict[ListScope, list[dict[str, Any]]] = {}
        for app, docs in desired.items():
            placed = place_namespaces(docs, namespaced=reader.namespaced)
            scopes = list_scopes(placed, app=app)
            for scope in scopes:
                if scope not in listed:
                    listed[scope] = reader.list(scope)
            # Shared between the apps that list one scope: read only, never changed in place.
            live = [obj for scope in scopes for obj in listed[scope]]
            apps.append(AppRead(app, placed, tuple(live)))
        return ClusterRead(ref.name, tuple(apps), reader.lists, reader.calls)


class KubeCluster:
    """One cluster (the ``Cluster`` port): cheap reads, and server-side apply for ``sync: apply``."""

    def __init__(self, ref: ClusterRef) -> None:
        self.ref = ref

    def workloads(self, refs: Sequence[tuple[str, str, str]]) -> list[Mapping[str, Any] | None]:
        """One LIST of each workload's kind in its namespace (apps/v1), through one client."""
        with LiveReader(self.ref) as reader:
            found: list[Mapping[str, Any] | None] = []
            for kind, namespace, name in refs:
                items = reader.list(ListScope("apps/v1", kind, namespace))
                found.append(next((o for o in items if o.get("metadata", {}).get("name") == name), None))
            return found

    def read(self, desired: Mapping[str, Iterable[Mapping[str, Any]]]) -> ClusterRead:
        return read_cluster(self.ref, desired=desired)

    def service(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        with LiveReader(self.ref) as reader:
            return reader.get(
                f"read Service {namespace}/{name}", f"/api/v1/namespaces/{namespace}/services/{name}"
            )

    def apply(self, objects: Iterable[Mapping[str, Any]]) -> ApplyResult:
        return apply_overlay(self.ref, objects)


class KubeRollouts:
    """The ``Rollouts`` port: list-then-watch verification (``twincd.adapters.cluster``).

    ``manifests`` answers whether a later revision Argo CD synced contains the one verified (the
    monorepo moves on: another app's release may land before Argo CD syncs ours).
    """

    def __init__(self, *, manifests: Manifests) -> None:
        self._manifests = manifests

    def verify(self, target: RolloutTarget, *, timeout: float) -> RolloutVerdict:
        with self._manifests.ancestry(target.revision) as contains:
            return verify_rollout(replace(target, contains=contains), timeout=timeout)

    def verify_role(self, target: RolloutTarget, *, role: Role, app: str, timeout: float) -> RolloutVerdict:
        """Rolled out at ``target.revision``, and at the replica count the component sets.

        Never raises for a cluster: whatever fails becomes a FAILED verdict, as in ``verify``.
        """
        try:
            # As in ``verify``: Argo CD may have synced a later commit of the monorepo (the next
            # switch of the same failover) that contains this one.
            with self._manifests.ancestry(target.revision) as contains:
                verdict = verify_rollout(replace(target, contains=contains), timeout=timeout)
            if verdict.phase is not Phase.SUCCEEDED:
                return verdict
            (workload,) = KubeCluster(target.cluster).workloads(
                [(target.kind, target.namespace, target.name)]
            )
        except TwincdError as e:
            return RolloutVerdict(target.cluster.name, Phase.FAILED, str(e))
        replicas = (workload or {}).get("spec", {}).get("replicas")
        return role_verdict(verdict, app=app, role=role, replicas=replicas, revision=target.revision)
