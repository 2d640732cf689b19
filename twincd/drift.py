"""Drift: the desired state (overlays rendered at the manifests branch) against the live clusters,
and cluster against cluster. Pure: no I/O, no Prefect, no SDK.

Quiet when nothing is wrong (Argo CD's "OutOfSync with an empty diff", argo-cd#15898, #17394,
#21434, comes from comparing fields nobody set and from server rewrites), precise when something is:

* only the fields the desired object sets are compared; ``status``, server-owned metadata and the
  annotations tools add are never looked at;
* what the API server defaults or rewrites is normalised: ``protocol: TCP``, ``imagePullPolicy``
  (``Always`` for ``:latest`` or untagged images, else ``IfNotPresent``), a few pod/Service
  defaults, quantities (``1000m`` = ``1``, ``1Gi`` = ``1024Mi``), int vs string ports, and the
  order of lists keyed by ``name`` (or ``mountPath``, ``containerPort``, ``port``);
* a field the desired object omits is compared only when the server defaults it to a known value:
  live holding that default is silence, anything else was changed by hand and is reported.

What marks a live object as the app's (for ``unexpected``): it sits in a (kind, namespace) the
app's desired set uses, and carries the label ``app.kubernetes.io/name: <app>`` or Argo CD's
``argocd.argoproj.io/tracking-id`` annotation naming the app's Application (``<application>:...``).
Objects of kinds or namespaces the desired set does not use are never read, so never reported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

APP_LABEL = "app.kubernetes.io/name"
TRACKING_ANNOTATION = "argocd.argoproj.io/tracking-id"

# Annotations that tools write on live objects; never compared even if a manifest carries one.
IGNORED_ANNOTATIONS = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        "deployment.kubernetes.io/revision",
        "argocd.argoproj.io/tracking-id",
        "argocd.argoproj.io/sync-options",
        "argocd.argoproj.io/compare-options",
        "meta.helm.sh/release-name",
        "meta.helm.sh/release-namespace",
    }
)
# Top-level keys never compared: status is the controllers', apiVersion/kind are part of the key,
# metadata is compared through labels and annotations only, and Secret.stringData is write-only.
# (v1 Secret data is compared apart, showing fingerprints instead of values: _secret_data.)
_SKIPPED_TOP_LEVEL = frozenset({"apiVersion", "kind", "metadata", "status", "stringData"})
# Kinds that carry a pod template, and where their pod spec lives (workloads for skew).
_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
}
# Keyed lists: the first of these keys that every element has (with unique values) is the key.
_LIST_KEYS = ("name", "mountPath", "containerPort", "port")
# Where quantities live: the parent key (resources.limits.cpu) or the key itself (sizeLimit).
_QUANTITY_PARENTS = frozenset(
    {"limits", "requests", "hard", "overhead", "capacity", "default", "defaultRequest", "max", "min"}
)
_QUANTITY_KEYS = frozenset({"sizeLimit", "storage"})
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
# How a field the desired object omits reads in an absent desired value or an absent live one.
ABSENT = "(absent)"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Drift(str, Enum):
    MISSING = "missing"  # desired, not live
    MODIFIED = "modified"  # live, with a field that differs from the desired value
    UNEXPECTED = "unexpected"  # live, the app's, not desired
    SKEW = "skew"  # clusters serving the same app disagree (image digests, replica intent)


@dataclass(frozen=True)
class DriftItem:
    """One finding. ``desired`` and ``live`` are display strings (JSON for non-strings)."""

    app: str
    cluster: str  # for skew: the clusters compared, comma-separated
    kind: str
    namespace: str  # "" for cluster-scoped objects
    name: str
    finding: Drift
    path: str = ""  # the field, e.g. spec.template.spec.containers[name=web].image
    desired: str = ""
    live: str = ""

    @property
    def resource(self) -> str:
        return "/".join(p for p in (self.kind, self.namespace, self.name) if p)

    @property
    def fields(self) -> tuple[str, ...]:
        return (
            self.app,
            self.cluster,
            self.kind,
            self.namespace,
            self.name,
            self.finding.value,
            self.path,
            self.desired,
            self.live,
        )

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        values = f": desired {self.desired or ABSENT}, live {self.live or ABSENT}" if self.path else ""
        return f"{self.app} on {self.cluster}: {self.resource} {self.finding.value}{where}{values}"


@dataclass(frozen=True, order=True)
class ObjectKey:
    """An object's identity; the API version is left out (one object, several versions)."""

    group: str
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True, order=True)
class ListScope:
    """One LIST: a kind in a namespace ("" = cluster-scoped), label-selected when possible."""

    api_version: str
    kind: str
    namespace: str
    label_selector: str = ""


@dataclass(frozen=True)
class WorkloadState:
    """What cloud-vs-cloud compares for one workload on one cluster."""

    app: str
    cluster: str
    kind: str
    namespace: str
    name: str
    images: tuple[tuple[str, str], ...]  # (container name, image identity: digest, else name:tag)
    replicas: int | None  # None for kinds without replicas (DaemonSet)


@dataclass(frozen=True)
class ClusterCheck:
    """The result of checking one cluster: findings plus what skew and the benchmark need."""

    cluster: str
    items: tuple[DriftItem, ...]
    workloads: tuple[WorkloadState, ...]
    objects: int  # live objects read
    lists: int  # LIST calls made
    calls: int  # all API calls made (lists + discovery)


@dataclass(frozen=True)
class AppRead:
    """One app's desired objects on one cluster and the live objects read for them."""

    app: str
    desired: tuple[dict[str, Any], ...]  # namespaces placed as the cluster places them
    live: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ClusterRead:
    """Every app's read on one cluster, and what the read cost."""

    cluster: str
    apps: tuple[AppRead, ...]
    lists: int
    calls: int

    @property
    def objects(self) -> int:
        return sum(len(a.live) for a in self.apps)


# --------------------------------------------------------------------------------------------------
# Keys, ownership and what to read
# --------------------------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = _meta(obj)
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return ObjectKey(
        group, str(obj.get("kind", "")), str(meta.get("namespace") or ""), str(meta.get("name", ""))
    )


def place_namespaces(
    docs: Iterable[Mapping[str, Any]], *, namespaced: Callable[[str, str], bool]
) -> tuple[dict[str, Any], ...]:
    """Rendered objects with the namespace the API server gives them: a namespaced object without
    one lands in ``default`` (as with ``kubectl apply`` and Argo CD), a cluster-scoped one has none."""
    placed = []
    for doc in docs:
        meta = dict(_meta(doc))
        if namespaced(str(doc.get("apiVersion", "")), str(doc.get("kind", ""))):
            meta["namespace"] = meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        placed.append({**doc, "metadata": meta})
    return tuple(placed)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    annotations = _meta(obj).get("annotations")
    return annotations if isinstance(annotations, Mapping) else {}


def belongs_to(obj: Mapping[str, Any], *, app: str, application: str | None = None) -> bool:
    """Whether a live object is the app's: its app label, or Argo CD's tracking id of its Application."""
    if _labels(obj).get(APP_LABEL) == app:
        return True
    tracking = _annotations(obj).get(TRACKING_ANNOTATION)
    return application is not None and isinstance(tracking, str) and tracking.startswith(f"{application}:")


def list_scopes(desired: Iterable[Mapping[str, Any]], *, app: str) -> tuple[ListScope, ...]:
    """One LIST per (kind, namespace) of the desired set. Label-selected when every desired object
    there carries the app label, so no desired object can be filtered out by the selector."""
    groups: dict[tuple[str, str, str], bool] = {}
    for doc in desired:
        key = (
            str(doc.get("apiVersion", "")),
            str(doc.get("kind", "")),
            str(_meta(doc).get("namespace") or ""),
        )
        groups[key] = groups.get(key, True) and _labels(doc).get(APP_LABEL) == app
    return tuple(
        sorted(
            ListScope(av, kind, ns, f"{APP_LABEL}={app}" if labelled else "")
            for (av, kind, ns), labelled in groups.items()
        )
    )


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity (``500m``, ``1Gi``, ``2``, ``1e3``) as a number; None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        return None
    try:
        number = Decimal(match[1]) * (Decimal(10) ** int(match[2] or 0))
    except InvalidOperation:
        return None
    return number * _SUFFIX[match[3] or ""]


def _scalars_equal(desired: Any, live: Any, *, quantity: bool) -> bool:
    if isinstance(desired, bool) or isinstance(live, bool):
        return type(desired) is type(live) and desired == live
    if desired == live:
        return True
    if quantity:
        a, b = parse_quantity(desired), parse_quantity(live)
        if a is not None and b is not None:
            return a == b
    # IntOrString fields (ports, targetPort, maxSurge) come back as the server stored them: 8080 vs "8080".
    if (
        isinstance(desired, int)
        and isinstance(live, str)
        or isinstance(desired, str)
        and isinstance(live, int)
    ):
        return str(desired).strip() == str(live).strip()
    return False


def _empty(value: Any) -> bool:
    """Values the API server drops on the floor (omitempty): set in a manifest, absent when read."""
    return (
        value is None
        or value == {}
        or value == []
        or value == ""
        or value is False
        or (isinstance(value, int) and not isinstance(value, bool) and value == 0)
    )


def default_pull_policy(image: str) -> str:
    """The API server's imagePullPolicy default: Always for ``:latest`` or no tag, else IfNotPresent."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.rpartition(":")[2] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _defaults(kind: str, keys: tuple[str, ...], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Server defaults of the fields of the mapping at ``keys``, for fields a manifest may omit."""
    if keys[-1:] in (("containers",), ("initContainers",)):
        image = desired.get("image")
        return {
            "imagePullPolicy": default_pull_policy(image) if isinstance(image, str) else None,
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        }
    if keys[-1:] == ("ports",):
        return {"protocol": "TCP"}
    if keys[-2:] == ("template", "spec") or (kind == "Pod" and keys == ("spec",)):
        return {
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
        }
    if kind == "Service" and keys == ("spec",):
        return {"type": "ClusterIP", "sessionAffinity": "None"}
    return {}


def show(value: Any) -> str:
    """A value as the findings table shows it: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _segment(key: str) -> str:
    return f".{key}" if _PLAIN_KEY.match(key) else f'["{key}"]'


# --------------------------------------------------------------------------------------------------
# Comparison of one object
# --------------------------------------------------------------------------------------------------

Difference = tuple[str, str, str]  # (path, desired, live)


@dataclass(frozen=True)
class _Walk:
    kind: str

    def value(self, path: str, keys: tuple[str, ...], desired: Any, live: Any) -> list[Difference]:
        if isinstance(desired, Mapping):
            if not isinstance(live, Mapping):
                return [(path, show(desired), show(live))]
            return self.mapping(path, keys, desired, live)
        if isinstance(desired, list):
            if not isinstance(live, list):
                return [(path, show(desired), show(live))]
            return self.sequence(path, keys, desired, live)
        quantity = bool(keys) and (
            keys[-1] in _QUANTITY_KEYS or (len(keys) > 1 and keys[-2] in _QUANTITY_PARENTS)
        )
        if _scalars_equal(desired, live, quantity=quantity):
            return []
        return [(path, show(desired), show(live))]

    def mapping(
        self, path: str, keys: tuple[str, ...], desired: Mapping[str, Any], live: Mapping[str, Any]
    ) -> list[Difference]:
        out: list[Difference] = []
        for key, want in desired.items():
            sub = f"{path}{_segment(key)}" if path else key
            if key not in live:
                if not _empty(want):
                    out.append((sub, show(want), ABSENT))
                continue
            if want is None:  # `key: null` in a manifest means "unset": nothing to hold the cluster to
                continue
            out += self.value(sub, (*keys, key), want, live[key])
        for key, default in _defaults(self.kind, keys, desired).items():
            if (
                key not in desired
                and key in live
                and default is not None
                and not _scalars_equal(default, live[key], quantity=False)
            ):
                out.append((f"{path}{_segment(key)}", f"{show(default)} (server default)", show(live[key])))
        return out

    def sequence(
        self, path: str, keys: tuple[str, ...], desired: list[Any], live: list[Any]
    ) -> list[Difference]:
        key = _list_key(desired, live)
        if key is None:
            if len(desired) != len(live):
                return [(path, show(desired), show(live))]
            out: list[Difference] = []
            for i, (want, have) in enumerate(zip(desired, live, strict=True)):
                out += self.value(f"{path}[{i}]", keys, want, have)
            return out
        by_key = {str(item[key]): item for item in live}
        out = []
        for want in desired:
            sub = f"{path}[{key}={want[key]}]"
            have = by_key.pop(str(want[key]), None)
            out += [(sub, show(want), ABSENT)] if have is None else self.value(sub, keys, want, have)
        # The list is a field the desired object sets: an element added by hand is drift.
        out += [(f"{path}[{key}={k}]", ABSENT, show(v)) for k, v in by_key.items()]
        return out


def _list_key(desired: list[Any], live: list[Any]) -> str | None:
    items = desired + live
    if not items or not all(isinstance(i, Mapping) for i in items):
        return None
    for key in _LIST_KEYS:
        if (
            all(key in i for i in items)
            and len({str(i[key]) for i in desired}) == len(desired)
            and len({str(i[key]) for i in live}) == len(live)
        ):
            return key
    return None


def compare_object(desired: Mapping[str, Any], live: Mapping[str, Any]) -> list[Difference]:
    """The fields where ``live`` differs from what ``desired`` sets, after normalisation."""
    walk = _Walk(str(desired.get("kind", "")))
    out: list[Difference] = []
    for part in ("labels", "annotations"):
        want = {k: v for k, v in (_meta(desired).get(part) or {}).items() if k not in IGNORED_ANNOTATIONS}
        have = _meta(live).get(part) or {}
        out += walk.mapping(f"metadata.{part}", ("metadata", part), want, have)
    secret = desired.get("apiVersion") == "v1" and desired.get("kind") == "Secret"
    body = {k: v for k, v in desired.items() if k not in _SKIPPED_TOP_LEVEL and not (secret and k == "data")}
    out += walk.mapping("", (), body, live)
    if secret:
        out += _secret_data(desired.get("data"), live.get("data"))
    return out


def _secret_data(desired: Any, live: Any) -> list[Difference]:
    """Secret ``data`` compared key by key; findings show fingerprints, never a value (they are
    published: Prefect artifacts, chat)."""
    if not isinstance(desired, Mapping):
        return []
    have = live if isinstance(live, Mapping) else {}
    out: list[Difference] = []
    for key, want in desired.items():
        if want is None:
            continue
        path = f"data{_segment(key)}"
        if key not in have or have[key] is None:
            out.append((path, secret_fingerprint(want), ABSENT))
        elif _secret_bytes(want) != _secret_bytes(have[key]):
            out.append((path, secret_fingerprint(want), secret_fingerprint(have[key])))
    return out


def _secret_bytes(value: Any) -> bytes:
    """A Secret data value (base64) decoded; a value that is not base64 stays as its text."""
    text = str(value)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return text.encode()


def secret_fingerprint(value: Any) -> str:
    """How a Secret value is shown: ``sha256:`` and the first 12 hex digits of its decoded bytes."""
    return "sha256:" + hashlib.sha256(_secret_bytes(value)).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# One app on one cluster; cloud vs cloud
# --------------------------------------------------------------------------------------------------


def compare_app(
    *,
    app: str,
    cluster: str,
    desired: Iterable[Mapping[str, Any]],
    live: Iterable[Mapping[str, Any]],
    application: str | None = None,
) -> tuple[DriftItem, ...]:
    """Missing, modified and unexpected findings of one app on one cluster.

    ``desired`` must have its namespaces placed (``place_namespaces``); ``live`` is what the lists
    of ``list_scopes`` returned.
    """
    wanted = {object_key(d): d for d in desired}
    have = {object_key(obj): obj for obj in live}
    items: list[DriftItem] = []
    for key, want in wanted.items():
        found = have.get(key)
        if found is None:
            items.append(DriftItem(app, cluster, key.kind, key.namespace, key.name, Drift.MISSING))
            continue
        items += [
            DriftItem(app, cluster, key.kind, key.namespace, key.name, Drift.MODIFIED, path, d, lv)
            for path, d, lv in compare_object(want, found)
        ]
    for key, obj in have.items():
        if key not in wanted and belongs_to(obj, app=app, application=application):
            items.append(DriftItem(app, cluster, key.kind, key.namespace, key.name, Drift.UNEXPECTED))
    return tuple(sorted(items, key=lambda i: i.fields))


def image_identity(image: str) -> str:
    """What must agree across clouds: the digest when pinned; else the image without its registry
    (each cloud pulls from its own registry, so the host legitimately differs)."""
    if "@" in image:
        return image.rpartition("@")[2]
    first, _, rest = image.partition("/")
    return rest if rest and ("." in first or ":" in first or first == "localhost") else image


def workload_states(
    *, app: str, cluster: str, desired: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]]
) -> tuple[WorkloadState, ...]:
    """The live state of the app's desired workloads on one cluster (the input of ``find_skew``)."""
    wanted = {object_key(d) for d in desired if str(d.get("kind")) in _POD_SPEC_PATHS}
    states = []
    for obj in live:
        key = object_key(obj)
        if key not in wanted:
            continue
        node: Any = obj
        for part in _POD_SPEC_PATHS[key.kind]:
            node = node.get(part) if isinstance(node, Mapping) else None
        containers = node.get("containers") if isinstance(node, Mapping) else None
        images = tuple(
            sorted(
                (str(c.get("name")), image_identity(str(c.get("image", ""))))
                for c in containers or []
                if isinstance(c, Mapping)
            )
        )
        spec = obj.get("spec")
        replicas = spec.get("replicas") if isinstance(spec, Mapping) and key.kind != "DaemonSet" else None
        states.append(
            WorkloadState(
                app,
                cluster,
                key.kind,
                key.namespace,
                key.name,
                images,
                replicas if isinstance(replicas, int) else None,
            )
        )
    return tuple(states)


def serving_in_git(
    rendered: Mapping[str, Mapping[str, Iterable[Mapping[str, Any]]]], app: str
) -> frozenset[str]:
    """The clusters where git says ``app`` serves: its rendered overlay scales no workload to zero
    (``components/standby`` does). After a failover this is the topology, not the file's default."""
    serving = set()
    for cluster, apps in rendered.items():
        workloads = [
            o
            for o in apps.get(app, ())
            if o.get("kind") in ("Deployment", "StatefulSet") and isinstance(o.get("spec"), Mapping)
        ]
        if workloads and all(o["spec"].get("replicas", 1) != 0 for o in workloads):
            serving.add(cluster)
    return frozenset(serving)


def find_skew(states: Iterable[WorkloadState], *, serving: Collection[str]) -> tuple[DriftItem, ...]:
    """Cloud vs cloud: for each workload on more than one cluster, the image digests must agree
    everywhere (a standby on an older digest would fail over to old code), and the replica intent
    must agree between the clusters that serve (a standby scaled to zero is by design)."""
    by_workload: dict[tuple[str, str, str, str], list[WorkloadState]] = {}
    for s in states:
        by_workload.setdefault((s.app, s.kind, s.namespace, s.name), []).append(s)
    items = []
    for (app, kind, namespace, name), group in sorted(by_workload.items()):
        if len(group) < 2:
            continue
        group.sort(key=lambda s: s.cluster)
        containers = sorted({c for s in group for c, _ in s.images})
        for container in containers:
            seen = {s.cluster: dict(s.images).get(container, ABSENT) for s in group}
            if len(set(seen.values())) > 1:
                items.append(
                    DriftItem(
                        app,
                        ",".join(seen),
                        kind,
                        namespace,
                        name,
                        Drift.SKEW,
                        f"spec.template.spec.containers[name={container}].image",
                        "the same digest on every cluster",
                        "; ".join(f"{c}={v}" for c, v in seen.items()),
                    )
                )
        serving_group = [s for s in group if s.cluster in serving and s.replicas is not None]
        if len(serving_group) > 1 and len({s.replicas for s in serving_group}) > 1:
            items.append(
                DriftItem(
                    app,
                    ",".join(s.cluster for s in serving_group),
                    kind,
                    namespace,
                    name,
                    Drift.SKEW,
                    "spec.replicas",
                    "the same replicas on every serving cluster",
                    "; ".join(f"{s.cluster}={s.replicas}" for s in serving_group),
                )
            )
    return tuple(items)


# --------------------------------------------------------------------------------------------------
# Between runs: fingerprint, what appeared and cleared; report rows
# --------------------------------------------------------------------------------------------------


def fingerprint(items: Iterable[DriftItem]) -> str:
    """Stable over order and duplicates: the same findings always give the same fingerprint."""
    lines = sorted({"\x1f".join(i.fields) for i in items})
    return "sha256:" + hashlib.sha256("\x1e".join(lines).encode()).hexdigest()


def diff_findings(
    previous: Iterable[DriftItem], current: Iterable[DriftItem]
) -> tuple[tuple[DriftItem, ...], tuple[DriftItem, ...]]:
    """(appeared, cleared): findings new in ``current``, and findings of ``previous`` now gone.
    A value that changed (one wrong digest replaced by another) is one cleared and one appeared."""
    before, now = set(previous), set(current)
    return (
        tuple(sorted(now - before, key=lambda i: i.fields)),
        tuple(sorted(before - now, key=lambda i: i.fields)),
    )


ROW_COLUMNS = ("app", "cluster", "resource", "finding", "field", "desired", "live")


def to_row(item: DriftItem) -> dict[str, str]:
    """A findings-table row (the columns of ``ROW_COLUMNS``); ``from_row`` reads it back exactly."""
    return dict(
        zip(
            ROW_COLUMNS,
            (item.app, item.cluster, item.resource, item.finding.value, item.path, item.desired, item.live),
            strict=True,
        )
    )


def from_row(row: Mapping[str, Any]) -> DriftItem:
    # Kinds, namespaces and names never contain "/": Kind/namespace/name or Kind/name.
    parts = str(row["resource"]).split("/")
    kind, namespace, name = (parts[0], "", parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])
    return DriftItem(
        str(row["app"]),
        str(row["cluster"]),
        kind,
        namespace,
        name,
        Drift(row["finding"]),
        str(row["field"]),
        str(row["desired"]),
        str(row["live"]),
    )


def _cell(text: str, limit: int = 120) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(
    items: Sequence[DriftItem],
    *,
    revision: str,
    clusters: Sequence[str],
    checked: Mapping[str, tuple[int, int]],
) -> str:
    """The run's summary: per cluster and finding, counts; ``checked`` maps cluster → (objects, calls)."""
    lines = [f"# Drift check at {revision[:12]}", ""]
    if not items:
        lines.append("No drift: every cluster runs what the manifests say, and the clouds agree.")
    else:
        lines += [
            f"**{len(items)} finding(s)**",
            "",
            "| cluster | missing | modified | unexpected | skew |",
            "|---|---|---|---|---|",
        ]
        for cluster in [*clusters, *sorted({i.cluster for i in items if i.finding is Drift.SKEW})]:
            counts = [sum(1 for i in items if i.cluster == cluster and i.finding is d) for d in Drift]
            if any(counts) or cluster in clusters:
                lines.append(f"| {cluster} | " + " | ".join(str(c) for c in counts) + " |")
    lines += ["", "| cluster | live objects read | API calls |", "|---|---|---|"]
    lines += [f"| {c} | {checked[c][0]} | {checked[c][1]} |" for c in clusters if c in checked]
    return "\n".join(lines) + "\n"


def changes_markdown(appeared: Sequence[DriftItem], cleared: Sequence[DriftItem], *, revision: str) -> str:
    """What changed since the last run: the text a notifier sends."""
    lines = [f"# Drift changed (manifests at {revision[:12]})", ""]
    for title, group in (("Appeared", appeared), ("Cleared", cleared)):
        lines.append(f"## {title} ({len(group)})")
        lines += [f"- {_cell(str(i), 300)}" for i in group] or ["- none"]
        lines.append("")
    return "\n".join(lines)


def compare_cluster(read: ClusterRead, applications: Mapping[str, str | None]) -> ClusterCheck:
    """Desired against live for every app read on one cluster; ``applications`` names the Argo CD
    Application that owns each app there (None: no Argo CD)."""
    items: list[DriftItem] = []
    workloads: list[WorkloadState] = []
    for a in read.apps:
        items += compare_app(
            app=a.app,
            cluster=read.cluster,
            desired=a.desired,
            live=a.live,
            application=applications.get(a.app),
        )
        workloads += workload_states(app=a.app, cluster=read.cluster, desired=a.desired, live=a.live)
    return ClusterCheck(read.cluster, tuple(items), tuple(workloads), read.objects, read.lists, read.calls)


def state_slug(source: str) -> str:
    """Names the drift state of one environment file (two files never share their findings).

    Prefect artifact keys allow lowercase letters, digits and dashes; Variable names also allow
    underscores: the slug fits both.
    """
    stem = re.sub(r"[^a-z0-9]+", "-", PurePath(source).stem.lower()).strip("-") or "env"
    return f"{stem}-{hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]}"
