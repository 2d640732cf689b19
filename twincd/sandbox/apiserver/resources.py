"""The resource types the sandbox API server serves, and the JSON documents they hold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


def copy_json(obj: Any) -> Any:
    """Deep copy; the JSON round trip is also what makes stored objects independent of callers."""
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class Column:
    """A printer column for kubectl's Table output.

    ``template`` holds ``{dotted.path}`` placeholders, so a column stays data (like a CRD's
    additionalPrinterColumns) while still allowing composites such as READY ``1/3``.
    """

    name: str
    template: str
    default: str = ""


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    # Whether writes are split between the object and its /status subresource. Mirrors the real
    # types: ConfigMaps have no status at all, and Argo CD's Application CRD declares no status
    # subresource (argoproj/argo-cd#22967), so its controller writes status through the object.
    status_subresource: bool = True
    # Strategic merge patch only exists for built-in types; the real server answers 415 for
    # custom resources.
    builtin: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    columns: tuple[Column, ...] = ()
    # What the server puts in status on create: the real Namespace strategy sets phase Active, and
    # some status fields are not omitempty in the Go types, so they always serialise (the v37
    # client rejects a ReplicaSet status without ``replicas``).
    initial_status: tuple[tuple[str, Any], ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The name the real server uses in messages, e.g. ``deployments.apps``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_ALL = ("all",)
_NO_STATUS: dict[str, Any] = {"status_subresource": False}
_READY_REPLICAS = Column("Ready", "{status.readyReplicas}/{spec.replicas}", "0")

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        short_names=("ns",),
        columns=(Column("Status", "{status.phase}"),),
        initial_status=(("phase", "Active"),),
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",), **_NO_STATUS),
    ResourceType("", "v1", "secrets", "Secret", **_NO_STATUS),
    ResourceType("", "v1", "services", "Service", short_names=("svc",), categories=_ALL),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",), **_NO_STATUS),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        short_names=("po",),
        categories=_ALL,
        columns=(Column("Status", "{status.phase}", "Pending"),),
    ),
    ResourceType("", "v1", "events", "Event", short_names=("ev",), **_NO_STATUS),
    ResourceType(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        short_names=("deploy",),
        categories=_ALL,
        columns=(
            _READY_REPLICAS,
            Column("Up-to-date", "{status.updatedReplicas}", "0"),
            Column("Available", "{status.availableReplicas}", "0"),
        ),
    ),
    ResourceType(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        short_names=("rs",),
        categories=_ALL,
        columns=(
            Column("Desired", "{spec.replicas}", "0"),
            Column("Current", "{status.replicas}", "0"),
            Column("Ready", "{status.readyReplicas}", "0"),
        ),
        initial_status=(("replicas", 0),),
    ),
    ResourceType(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        short_names=("sts",),
        categories=_ALL,
        columns=(_READY_REPLICAS,),
        initial_status=(("replicas", 0),),
    ),
    ResourceType(
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        short_names=("ds",),
        categories=_ALL,
        initial_status=tuple(
            (key, 0)
            for key in (
                "currentNumberScheduled",
                "desiredNumberScheduled",
                "numberMisscheduled",
                "numberReady",
            )
        ),
    ),
    ResourceType("batch", "v1", "jobs", "Job", categories=_ALL),
    ResourceType("batch", "v1", "cronjobs", "CronJob", short_names=("cj",), categories=_ALL),
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", short_names=("ing",)),
    ResourceType(
        "argoproj.io",
        "v1alpha1",
        "applications",
        "Application",
        builtin=False,
        short_names=("app", "apps"),
        **_NO_STATUS,
        columns=(
            Column("Sync Status", "{status.sync.status}"),
            Column("Health Status", "{status.health.status}"),
        ),
    ),
    ResourceType("bitnami.com", "v1alpha1", "sealedsecrets", "SealedSecret", builtin=False),
)
NAMESPACES = RESOURCES[0]

# The namespaces every real cluster starts with; clients (and kubectl's default context) assume
# ``default`` exists.
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
