"""A small in-memory Kubernetes API server for the local stack and tests.

No kube-apiserver, k3s, kind or envtest binary can run on the project's machines, and kmock lacks
the write semantics a cluster needs (resourceVersion, optimistic locking, status subresource,
generation, selectors, watch resume; see PLATFORM-NOTES "Sandbox clusters"). So this module owns
them. The official ``kubernetes`` client and ``kubectl get`` talk to it over real HTTP.

The module has two layers:

* the store (``Store`` and the pure helpers above it): objects, metadata stamping, selectors,
  patches, the event ring buffer. No HTTP in it.
* the HTTP layer (``create_app`` and below): URL parsing, discovery, Tables for kubectl, watch
  streams, serving in a thread or from the command line.

Deliberate simplifications, each chosen because the sandbox's clients do not depend on them:
deletion is immediate (no finalizers, no Terminating phase that lingers), owner-reference garbage
collection is synchronous, ``continue`` tokens page over live state instead of a snapshot, there
is no admission, defaulting, schema validation or dry run (the last answers 400 rather than
pretending). Server-side apply is reduced to what a single field manager needs: the applied fields
are merged onto the live object like a merge patch (lists replace), the manager gets one
``managedFields`` entry, and there is no field ownership, so no apply conflicts (``force`` is moot).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from twincd.sandbox.serving import ServedApp, serve_asgi

JSON = dict[str, Any]
PatchType = Literal["json", "merge", "strategic"]

# --------------------------------------------------------------------------------------------------
# Resource table
# --------------------------------------------------------------------------------------------------


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
_REPLICATED_KINDS = frozenset({"Deployment", "StatefulSet", "ReplicaSet"})
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

# --------------------------------------------------------------------------------------------------
# Errors: the real server's Status bodies
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A failed request, carried to the HTTP layer as a ``kind: Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body

    @classmethod
    def about(cls, code: int, reason: str, rt: ResourceType, name: str, message: str) -> ApiError:
        return cls(code, reason, message, {"name": name, "group": rt.group, "kind": rt.plural})


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError.about(404, "NotFound", rt, name, f'{rt.qualified} "{name}" not found')


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(rt: ResourceType, name: str, message: str) -> ApiError:
    return ApiError.about(422, "Invalid", rt, name, f'{rt.kind} "{name}" is invalid: {message}')


def _conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError.about(
        409, "Conflict", rt, name, f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}'
    )


_STALE = "the object has been modified; please apply your changes to the latest version and try again"

# --------------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------------

_LABEL_KEY = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_SET_TERM = re.compile(r"(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)")
_FIELDS: dict[str, Callable[[JSON], str]] = {
    "metadata.name": lambda obj: str(obj["metadata"].get("name", "")),
    "metadata.namespace": lambda obj: str(obj["metadata"].get("namespace", "")),
}


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector; ``op`` is one of = != in notin exists !exists."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return present
            case "!exists":
                return not present
            case "=" | "in":
                return value in self.values
            case _:  # "!=" and "notin" match objects without the label, as upstream does
                return value not in self.values


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` has two terms)."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


def _parse_requirement(term: str) -> Requirement:
    if match := _SET_TERM.fullmatch(term):
        key, op = match["key"], match["op"]
        values = frozenset(value.strip() for value in match["values"].split(",") if value.strip())
    elif term.startswith("!"):
        key, op, values = term[1:].strip(), "!exists", frozenset()
    elif "=" in term:
        op = "!=" if "!=" in term else "="
        key, _, value = term.replace("==", "=").replace("!=", "=").partition("=")
        key, values = key.strip(), frozenset([value.strip()])
    else:
        key, op, values = term, "exists", frozenset()
    if not _LABEL_KEY.fullmatch(key) or not all(_LABEL_VALUE.fullmatch(value) for value in values):
        raise _bad_request(f'unable to parse requirement: invalid label selector term "{term}"')
    return Requirement(key, op, values)


@dataclass(frozen=True)
class Selection:
    """Which objects a list or watch sees: a namespace (None = all) plus label and field selectors."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()  # (field, "=" or "!=", value)

    @classmethod
    def parse(cls, namespace: str | None, label_selector: str = "", field_selector: str = "") -> Selection:
        fields = []
        for term in _split_top_level(field_selector):
            op = "!=" if "!=" in term else "="
            name, _, value = term.replace("==", "=").replace("!=", "=").partition("=")
            if name.strip() not in _FIELDS:
                raise _bad_request(f'field label not supported: "{name.strip()}"')
            fields.append((name.strip(), op, value.strip()))
        labels = tuple(_parse_requirement(term) for term in _split_top_level(label_selector))
        return cls(namespace, labels, tuple(fields))

    def matches(self, obj: JSON) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(requirement.matches(labels) for requirement in self.labels):
            return False
        return all((_FIELDS[name](obj) == value) == (op == "=") for name, op, value in self.fields)


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# The merge keys of the Kubernetes list fields the sandbox's clients patch (from the
# ``patchMergeKey`` tags of k8s.io/api). Lists not named here are replaced, as upstream does for
# lists without a merge strategy.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def _merge_key(field_name: str, items: list[Any]) -> str | None:
    if field_name == "ports":  # container ports merge on containerPort, Service ports on port
        return "containerPort" if any(isinstance(i, dict) and "containerPort" in i for i in items) else "port"
    return _MERGE_KEYS.get(field_name)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, reduced to what clients send in practice.

    A merge patch, except that lists with a known merge key merge element by element (a patch with
    one container must not drop the others), ``$patch: delete`` removes such an element,
    ``$patch: replace`` replaces a map, and kubectl's ordering directives are ignored.
    """
    if not isinstance(patch, dict):
        return patch
    if patch.get("$patch") == "replace":
        return {key: value for key, value in patch.items() if key != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        merge_key = _merge_key(key, value) if isinstance(value, list) else None
        if value is None:
            result.pop(key, None)
        elif merge_key is not None and isinstance(value, list):
            result[key] = _merge_list(result.get(key) or [], value, merge_key)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(current: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    merged = list(current)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise _bad_request(f"strategic merge patch: list element without merge key {merge_key!r}")
        position = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, dict) and old.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del merged[position]
        elif position is None:
            merged.append(strategic_merge_patch({}, item))
        else:
            merged[position] = strategic_merge_patch(merged[position], item)
    return merged


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc


def _json_patch_add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if not 0 <= index <= len(parent):
            raise IndexError(f"index {index} out of range")
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _json_patch_remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise KeyError("cannot remove the whole document")
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    return parent.pop(int(last) if isinstance(parent, list) else last)


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; ``doc`` is modified in place and returned."""
    if not isinstance(operations, list):
        raise _bad_request("json patch must be a list of operations")
    for operation in operations:
        try:
            op, tokens = operation["op"], _pointer(operation["path"])
            match op:
                case "add":
                    doc = _json_patch_add(doc, tokens, operation["value"])
                case "remove":
                    _json_patch_remove(doc, tokens)
                case "replace":
                    _walk(doc, tokens)  # the target must exist, unlike for add
                    if tokens:
                        _json_patch_remove(doc, tokens)
                    doc = _json_patch_add(doc, tokens, operation["value"])
                case "move" | "copy":
                    source = _pointer(operation["from"])
                    value = _json_patch_remove(doc, source) if op == "move" else _copy(_walk(doc, source))
                    doc = _json_patch_add(doc, tokens, value)
                case "test":
                    if _walk(doc, tokens) != operation["value"]:
                        raise ValueError(f"test failed at {operation['path']}")
                case _:
                    raise ValueError(f"unknown operation {op!r}")
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise ApiError(422, "Invalid", f"the json patch could not be applied: {error!r}") from error
    return doc


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # upstream's: no vowels, no look-alikes


def _copy(obj: Any) -> Any:
    """Deep copy; the JSON round trip is also what makes stored objects independent of callers."""
    return json.loads(json.dumps(obj))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    resource_version: int
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    resource: ResourceType
    object: JSON  # shared with the store and other watchers: never mutate
    old: JSON | None = None  # the previous state of a MODIFIED object

    def seen_through(self, selection: Selection) -> tuple[str, JSON] | None:
        """The event as a watcher with ``selection`` sees it, or None if it does not see it.

        Like the real watch cache, an object modified into the selection arrives as ADDED and one
        modified out of it as DELETED, so a filtered watcher's view stays consistent.
        """
        now = selection.matches(self.object)
        before = self.old is not None and selection.matches(self.old)
        if self.type != "MODIFIED" or now == before:
            return (self.type, self.object) if now else None
        return ("ADDED" if now else "DELETED"), self.object


Subscriber = Callable[[WatchEvent | None], None]  # None: the stream must end (server stopping)


@dataclass
class ListResult:
    items: list[JSON]
    resource_version: str
    continue_token: str = ""
    remaining: int = 0


class Store:
    """Objects of every resource type, with the write semantics of a real API server.

    All methods are thread-safe and copy objects in and out, so in-process callers cannot alias
    stored state. Every write takes the next value of one global resourceVersion counter and
    appends one event to a ring buffer, which is what lets a watch resume from any recent version.
    """

    def __init__(self, *, event_buffer: int = 10000) -> None:
        self._lock = threading.RLock()
        self._objects: dict[ResourceType, dict[tuple[str, str], JSON]] = {rt: {} for rt in RESOURCES}
        self._revision = 0
        self._events: deque[WatchEvent] = deque(maxlen=event_buffer)
        self._evicted_upto = 0  # the newest resourceVersion dropped from the buffer
        self._subscribers: dict[int, Subscriber] = {}
        self._subscriber_tokens = itertools.count()
        self._closed = False
        for name in INITIAL_NAMESPACES:
            self.create(NAMESPACES, None, {"metadata": {"name": name}})

    @property
    def resource_version(self) -> str:
        return str(self._revision)

    # ------------------------------------------------------------------------------ reads

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> JSON:
        with self._lock:
            return _copy(self._stored(rt, namespace, name))  # type: ignore[no-any-return]

    def list_objects(
        self, rt: ResourceType, selection: Selection, *, limit: int = 0, continue_token: str = ""
    ) -> ListResult:
        with self._lock:
            keys = sorted(key for key, obj in self._objects[rt].items() if selection.matches(obj))
            revision = self.resource_version
            if continue_token:
                after = _decode_continue(continue_token)
                keys = [key for key in keys if key > after]
            page = keys[:limit] if limit > 0 else keys
            items = [_copy(self._objects[rt][key]) for key in page]
        remaining = len(keys) - len(page)
        token = _encode_continue(page[-1]) if remaining else ""
        return ListResult(items, revision, token, remaining)

    # ------------------------------------------------------------------------------ writes

    def create(
        self, rt: ResourceType, namespace: str | None, body: JSON, *, managed_fields: list[JSON] | None = None
    ) -> JSON:
        obj: JSON = _copy(body)
        meta = self._checked_metadata(rt, obj)
        self._check_typed_fields(rt, obj)
        with self._lock:
            namespace = self._target_namespace(rt, namespace, meta)
            if namespace and ("", namespace) not in self._objects[NAMESPACES]:
                raise _not_found(NAMESPACES, namespace)
            name = meta.get("name") or self._generate_name(rt, namespace, meta.get("generateName"))
            if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
                raise _invalid(rt, str(name), "metadata.name: must be a lowercase RFC 1123 subdomain")
            if (namespace, name) in self._objects[rt]:
                raise ApiError.about(
                    409, "AlreadyExists", rt, name, f'{rt.qualified} "{name}" already exists'
                )
            for system_field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
                meta.pop(system_field, None)
            if managed_fields:
                meta["managedFields"] = managed_fields
            meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            if namespace:
                meta["namespace"] = namespace
            if rt.status_subresource:  # status is the controllers' to write, not the creator's
                obj["status"] = dict(rt.initial_status)
            return self._commit(rt, (namespace, name), obj, None)

    def replace(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: JSON,
        *,
        subresource: str | None = None,
    ) -> JSON:
        obj: JSON = _copy(body)
        meta = self._checked_metadata(rt, obj)
        if meta.get("name") != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        with self._lock:
            self._target_namespace(rt, namespace, meta)
            current = self._stored(rt, namespace, name)
            return self._update(rt, current, obj, subresource)

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch_type: PatchType,
        patch: Any,
        *,
        subresource: str | None = None,
    ) -> JSON:
        if patch_type == "strategic" and not rt.builtin:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json (strategic merge patch "
                f"is not supported for {rt.qualified})",
            )
        with self._lock:
            current = self._stored(rt, namespace, name)
            match patch_type:
                case "json":
                    patched = json_patch(_copy(current), _copy(patch))
                case "merge":
                    patched = merge_patch(current, _copy(patch))
                case "strategic":
                    patched = strategic_merge_patch(current, _copy(patch))
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise _invalid(rt, name, "the patched object has no metadata")
            # The patch may not rename or move the object; a resourceVersion it carries is a
            # precondition, checked in _update like a PUT's.
            patched["metadata"] = {**patched["metadata"], "name": name}
            if namespace:
                patched["metadata"]["namespace"] = namespace
            return self._update(rt, current, _copy(patched), subresource)

    def apply(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        manager: str,
        subresource: str | None = None,
    ) -> tuple[JSON, bool]:
        """Server-side apply of ``body`` by ``manager``: the object and whether it was created.

        A missing object is created from the applied configuration; an existing one gets the applied
        fields merged on like a merge patch, and ``manager``'s ``managedFields`` entry replaced.
        Re-applying the same configuration is a no-op (no new resourceVersion, no watch event), as
        on a real server.
        """
        obj: JSON = _copy(body)
        if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
            # The real server cannot decode an applied configuration without its type.
            raise _bad_request("apply patches must set apiVersion and kind")
        meta = self._checked_metadata(rt, obj)
        if meta.get("name", name) != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        meta.pop("managedFields", None)
        meta["name"] = name
        applied = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind")}
        applied["metadata"] = {key: value for key, value in meta.items() if key not in ("name", "namespace")}
        entry: JSON = {
            "manager": manager,
            "operation": "Apply",
            "apiVersion": rt.api_version,
            "time": _now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": _fields_v1(applied),
        }
        if subresource is not None:
            entry["subresource"] = subresource
        with self._lock:
            current = self._objects[rt].get(((namespace or "") if rt.namespaced else "", name))
            if current is None:
                if subresource is not None:
                    raise _not_found(rt, name)
                return self.create(rt, namespace, obj, managed_fields=[entry]), True
            merged = merge_patch(current, obj)
            self._target_namespace(rt, namespace, merged["metadata"])
            entries = list(current["metadata"].get("managedFields") or [])
            mine = next(
                (
                    i
                    for i, e in enumerate(entries)
                    if e.get("manager") == manager
                    and e.get("operation") == "Apply"
                    and e.get("subresource") == subresource
                ),
                None,
            )
            if mine is None:
                entries.append(entry)
            elif entries[mine].get("fieldsV1") != entry["fieldsV1"]:
                entries[mine] = entry  # an unchanged entry keeps its time, so a re-apply stays a no-op
            merged["metadata"]["managedFields"] = entries
            return self._update(rt, current, _copy(merged), subresource), False

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        preconditions: JSON | None = None,
        orphan_dependents: bool = False,
    ) -> JSON:
        with self._lock:
            current = self._stored(rt, namespace, name)
            for field_name in ("uid", "resourceVersion"):
                wanted = (preconditions or {}).get(field_name)
                actual = current["metadata"].get(field_name)
                if wanted is not None and wanted != actual:
                    raise _conflict(
                        rt,
                        name,
                        f"Precondition failed: {field_name} in precondition: {wanted}, "
                        f"{field_name} in object meta: {actual}",
                    )
            if rt is NAMESPACES:  # the namespace controller's job, done at once
                for other, objects in self._objects.items():
                    for key in [key for key in objects if other.namespaced and key[0] == name]:
                        self._remove(other, key)
            deleted = self._remove(rt, (namespace or "", name))
            if not orphan_dependents:  # the garbage collector's job, done at once
                self._delete_dependents(deleted["metadata"]["uid"])
            return _copy(deleted)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------------------ watch

    def watch(
        self, rt: ResourceType, selection: Selection, resource_version: str, subscriber: Subscriber
    ) -> tuple[list[tuple[str, JSON]], Callable[[], None]]:
        """Register ``subscriber`` for later events; return the backlog and an unsubscribe function.

        The backlog is synthetic ADDED events for the current objects when ``resource_version`` is
        empty or "0", else the buffered events after it. Both are taken under the same lock as the
        registration, so no event falls between backlog and stream.
        """
        with self._lock:
            if self._closed:
                raise ApiError(503, "ServiceUnavailable", "the apiserver is shutting down")
            if resource_version in ("", "0"):
                backlog = [
                    ("ADDED", _copy(self._objects[rt][key]))
                    for key in sorted(self._objects[rt])
                    if selection.matches(self._objects[rt][key])
                ]
            else:
                try:
                    since = int(resource_version)
                except ValueError as error:
                    raise _bad_request(f"invalid resource version {resource_version!r}") from error
                if since < self._evicted_upto:
                    raise ApiError(
                        410, "Expired", f"too old resource version: {since} ({self._evicted_upto + 1})"
                    )
                seen = (
                    event.seen_through(selection)
                    for event in self._events
                    if event.resource is rt and event.resource_version > since
                )
                backlog = [(kind, _copy(obj)) for kind, obj in filter(None, seen)]
            token = next(self._subscriber_tokens)
            self._subscribers[token] = subscriber

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(token, None)

        return backlog, unsubscribe

    def close_watches(self) -> None:
        """End every watch stream and refuse new ones, so the HTTP server can stop promptly."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers.values())
        for subscriber in subscribers:
            subscriber(None)

    # ------------------------------------------------------------------------------ internals

    def _stored(self, rt: ResourceType, namespace: str | None, name: str) -> JSON:
        obj = self._objects[rt].get(((namespace or "") if rt.namespaced else "", name))
        if obj is None:
            raise _not_found(rt, name)
        return obj

    @staticmethod
    def _checked_metadata(rt: ResourceType, obj: Any) -> JSON:
        if not isinstance(obj, dict):
            raise _bad_request("the request body must be a JSON object")
        for key, expected in (("apiVersion", rt.api_version), ("kind", rt.kind)):
            if obj.get(key, expected) != expected:
                raise _bad_request(
                    f"the {key} in the data ({obj[key]}) does not match the expected {key} ({expected})"
                )
        obj.update(apiVersion=rt.api_version, kind=rt.kind)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        return meta

    @staticmethod
    def _check_typed_fields(rt: ResourceType, obj: JSON) -> None:
        """The few typed fields the sandbox's own controllers read, decoded as the real server does.

        A real API server decodes built-in kinds into Go structs and answers 400 for a wrong type
        (so `replicas: two` never reaches a controller); a sandbox that stored it would crash its
        Deployment controller instead of failing the sync the way Argo CD reports it.
        """
        spec = obj.get("spec")
        if rt.builtin and rt.kind in _REPLICATED_KINDS and isinstance(spec, dict) and "replicas" in spec:
            replicas = spec["replicas"]
            if not isinstance(replicas, int) or isinstance(replicas, bool):
                got = type(replicas).__name__.replace("str", "string")
                raise _bad_request(
                    f"json: cannot unmarshal {got} into Go struct field "
                    f"{rt.kind}Spec.spec.replicas of type int32"
                )

    @staticmethod
    def _target_namespace(rt: ResourceType, namespace: str | None, meta: JSON) -> str:
        if not rt.namespaced:
            meta.pop("namespace", None)
            return ""
        if not namespace:
            raise _bad_request(f"{rt.qualified} is namespaced: the request must name a namespace")
        if meta.get("namespace", namespace) != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        return namespace

    def _generate_name(self, rt: ResourceType, namespace: str, prefix: Any) -> str:
        if not prefix or not isinstance(prefix, str):
            raise _invalid(rt, "", "metadata.name: Required value: name or generateName is required")
        for _ in range(8):  # upstream tries once and answers AlreadyExists; retrying costs nothing here
            name = prefix + "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            if (namespace, name) not in self._objects[rt]:
                return name
        raise ApiError.about(409, "AlreadyExists", rt, prefix, f"no free name for generateName {prefix!r}")

    def _update(self, rt: ResourceType, current: JSON, obj: JSON, subresource: str | None) -> JSON:
        meta, old_meta = obj["metadata"], current["metadata"]
        name = old_meta["name"]
        wanted = meta.get("resourceVersion")
        if wanted not in (None, "") and wanted != old_meta["resourceVersion"]:
            raise _conflict(rt, name, _STALE)
        if subresource == "status":  # only status changes through /status
            new = {**current, "status": obj.get("status", {})}
        else:
            self._check_typed_fields(rt, obj)
            new = obj
            if rt.status_subresource:  # ...and never through the object itself
                new["status"] = current.get("status", {})
            system = ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion")
            new["metadata"] = {**meta, **{key: old_meta[key] for key in system if key in old_meta}}
        new = _copy(new)
        if new == current:  # a no-op write neither bumps resourceVersion nor wakes watchers
            return _copy(current)  # type: ignore[no-any-return]
        if _generation_part(rt, new) != _generation_part(rt, current):
            new["metadata"]["generation"] = old_meta.get("generation", 0) + 1
        return self._commit(rt, (old_meta.get("namespace", ""), name), new, current)

    def _commit(self, rt: ResourceType, key: tuple[str, str], obj: JSON, old: JSON | None) -> JSON:
        obj["metadata"]["resourceVersion"] = self._next_revision()
        self._objects[rt][key] = obj
        self._publish(WatchEvent(self._revision, "ADDED" if old is None else "MODIFIED", rt, obj, old))
        return _copy(obj)  # type: ignore[no-any-return]

    def _remove(self, rt: ResourceType, key: tuple[str, str]) -> JSON:
        # Upstream gives the DELETED event its own resourceVersion; a watch resuming from the
        # version before the delete must still see it.
        obj = self._objects[rt].pop(key)
        deleted = {**obj, "metadata": {**obj["metadata"], "resourceVersion": self._next_revision()}}
        self._publish(WatchEvent(self._revision, "DELETED", rt, deleted))
        return deleted

    def _delete_dependents(self, owner_uid: str) -> None:
        dependents = [
            (rt, key)
            for rt, objects in self._objects.items()
            for key, obj in objects.items()
            if any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]
        for rt, key in dependents:
            if key in self._objects[rt]:  # an earlier cascade may have removed it already
                uid = self._remove(rt, key)["metadata"]["uid"]
                self._delete_dependents(uid)

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _publish(self, event: WatchEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self._evicted_upto = self._events[0].resource_version
        self._events.append(event)
        for subscriber in list(self._subscribers.values()):
            subscriber(event)


def _fields_v1(value: Any) -> Any:
    """A FieldsV1 set for an applied configuration: ``f:<key>`` per map key, lists as leaves.

    Upstream names list elements too (``k:{"name":"hello"}``); nothing in the sandbox reads them.
    """
    if isinstance(value, dict):
        return {f"f:{key}": _fields_v1(item) for key, item in value.items()}
    return {}


def _generation_part(rt: ResourceType, obj: JSON) -> Any:
    """What a generation bump tracks: spec for types with a status subresource; for the others
    (custom resources without one, like Argo CD's Application), everything but metadata."""
    if rt.status_subresource:
        return obj.get("spec")
    return {key: value for key, value in obj.items() if key != "metadata"}


def _encode_continue(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_continue(token: str) -> tuple[str, str]:
    try:
        namespace, name = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(namespace), str(name)
    except (ValueError, TypeError, binascii.Error) as error:
        raise _bad_request("invalid continue token") from error


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([^}]+)\}")
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
_APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply: YAML, or JSON (which is YAML)
_PATCH_TYPES: dict[str, PatchType] = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
}


def _respond(body: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code, media_type="application/json")


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _age(timestamp: str | None) -> str:
    """kubectl's short age format (``45s``, ``12m``, ``5h``, ``3d``)."""
    if not timestamp:
        return "<unknown>"
    seconds = int(
        time.time() - datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    )
    for unit, size, limit in (("s", 1, 120), ("m", 60, 3 * 3600), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{max(seconds, 0) // size}{unit}"
    return f"{seconds // 86400}d"


def _cell(column: Column, obj: JSON) -> str:
    def fill(match: re.Match[str]) -> str:
        value = _lookup(obj, match[1])
        return column.default if value is None else str(value)

    return _PLACEHOLDER.sub(fill, column.template)


def _table(
    rt: ResourceType,
    objects: list[JSON],
    resource_version: str,
    include_object: str,
    continue_token: str = "",
) -> JSON:
    """A meta.k8s.io/v1 Table, which is what ``kubectl get`` asks for (``as=Table``)."""
    columns = [Column("Name", "{metadata.name}"), *rt.columns]
    definitions = [
        {
            "name": column.name,
            "type": "string",
            "format": "name" if i == 0 else "",
            "description": "",
            "priority": 0,
        }
        for i, column in enumerate(columns)
    ]
    definitions.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
    rows = []
    for obj in objects:
        cells = [_cell(column, obj) for column in columns]
        row: JSON = {"cells": [*cells, _age(obj["metadata"].get("creationTimestamp"))]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        rows.append(row)
    metadata = {
        "resourceVersion": resource_version,
        **({"continue": continue_token} if continue_token else {}),
    }
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": definitions,
        "rows": rows,
    }


@dataclass(frozen=True)
class _Target:
    resource: ResourceType
    namespace: str | None  # None: cluster-scoped, or a namespaced type listed across namespaces
    name: str | None
    subresource: str | None


@dataclass
class _Api:
    name: str
    store: Store
    kubernetes_version: str
    by_group_version: dict[tuple[str, str], dict[str, ResourceType]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rt in RESOURCES:
            self.by_group_version.setdefault((rt.group, rt.version), {})[rt.plural] = rt

    # ------------------------------------------------------------------------------ discovery

    async def version(self, request: Request) -> Response:
        major, minor, *_ = self.kubernetes_version.split(".")
        # The official client rejects a VersionInfo missing any of these fields.
        return _respond(
            {
                "major": major,
                "minor": minor,
                "gitVersion": f"v{self.kubernetes_version}",
                "gitCommit": f"twincd-sandbox-{self.name}",
                "gitTreeState": "clean",
                "buildDate": "1970-01-01T00:00:00Z",
                "goVersion": "none",
                "compiler": "none",
                "platform": "linux/amd64",
            }
        )

    async def core_versions(self, request: Request) -> Response:
        return _respond(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.netloc}
                ],
            }
        )

    async def groups(self, request: Request) -> Response:
        return _respond(
            {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._group(group) for group in self._group_names()],
            }
        )

    def _group_names(self) -> list[str]:
        return sorted({group for group, _ in self.by_group_version if group})

    def _group(self, group: str) -> JSON:
        versions = [
            {"groupVersion": f"{group}/{version}", "version": version}
            for g, version in self.by_group_version
            if g == group
        ]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def _resource_list(self, group: str, version: str) -> JSON:
        resources = []
        for rt in self.by_group_version[(group, version)].values():
            entry: JSON = {
                "name": rt.plural,
                "singularName": rt.kind.lower(),
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": _VERBS,
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            if rt.status_subresource:
                resources.append(
                    {
                        "name": f"{rt.plural}/status",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        group_version = f"{group}/{version}" if group else version
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    # ------------------------------------------------------------------------------ resources

    # The client asks for "/api/" and "/apis/" with a trailing slash, which routes here.
    async def core(self, request: Request) -> Response:
        if not request.path_params["path"].strip("/"):
            return await self.core_versions(request)
        return await self._serve(request, "", request.path_params["path"].split("/"))

    async def named_group(self, request: Request) -> Response:
        if not request.path_params["path"].strip("/"):
            return await self.groups(request)
        group, *segments = request.path_params["path"].split("/")
        return await self._serve(request, group, segments)

    async def _serve(self, request: Request, group: str, segments: list[str]) -> Response:
        try:
            segments = [segment for segment in segments if segment]
            if group and not segments:
                if group not in self._group_names():
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return _respond({"kind": "APIGroup", "apiVersion": "v1", **self._group(group)})
            version, rest = segments[0], segments[1:]
            if (group, version) not in self.by_group_version:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if not rest:
                return _respond(self._resource_list(group, version))
            target = self._target(self.by_group_version[(group, version)], rest)
            return await self._dispatch(request, target)
        except ApiError as error:
            return _respond(error.status(), error.code)

    @staticmethod
    def _target(resources: dict[str, ResourceType], rest: list[str]) -> _Target:
        namespace: str | None = None
        namespaced_type = resources.get(rest[2]) if len(rest) >= 3 and rest[0] == "namespaces" else None
        if namespaced_type is not None and namespaced_type.namespaced:
            namespace, rest = rest[1], rest[2:]
        rt = resources.get(rest[0])
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if (
            rt is None
            or len(rest) > 3
            or (rt.namespaced and name is not None and namespace is None)
            or (subresource is not None and (subresource != "status" or not rt.status_subresource))
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _Target(rt, namespace, name, subresource)

    async def _dispatch(self, request: Request, target: _Target) -> Response:
        rt, namespace, name = target.resource, target.namespace, target.name
        query = request.query_params
        if "dryRun" in query and request.method != "GET":
            raise _bad_request("dry run is not supported by the twincd sandbox")
        if name is None:
            if request.method == "GET":
                selection = Selection.parse(
                    namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
                )
                if query.get("watch") in ("true", "1"):
                    return self._watch(rt, selection, query)
                return self._list(request, rt, selection)
            if request.method == "POST" and (namespace is not None or not rt.namespaced):
                return _respond(self.store.create(rt, namespace, await _body(request)), 201)
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on this collection")
        match request.method:
            case "GET":
                obj = self.store.get(rt, namespace, name)
                if "as=Table" in request.headers.get("accept", ""):
                    table = _table(
                        rt, [obj], obj["metadata"]["resourceVersion"], query.get("includeObject", "")
                    )
                    return _respond(table)
                return _respond(obj)
            case "PUT":
                return _respond(
                    self.store.replace(
                        rt, namespace, name, await _body(request), subresource=target.subresource
                    )
                )
            case "PATCH":
                content_type = request.headers.get("content-type", "").split(";")[0].strip()
                if content_type == _APPLY_PATCH:
                    manager = query.get("fieldManager", "")
                    if not manager:
                        raise ApiError(
                            422,
                            "Invalid",
                            'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                            "Required value: is required for apply patch",
                        )
                    obj, created = self.store.apply(
                        rt,
                        namespace,
                        name,
                        _load_yaml(await request.body()),
                        manager=manager,
                        subresource=target.subresource,
                    )
                    return _respond(obj, 201 if created else 200)
                if content_type not in _PATCH_TYPES:
                    raise ApiError(
                        415, "UnsupportedMediaType", f"the sandbox does not support {content_type!r} patches"
                    )
                return _respond(
                    self.store.patch(
                        rt,
                        namespace,
                        name,
                        _PATCH_TYPES[content_type],
                        _loads(await request.body()),
                        subresource=target.subresource,
                    )
                )
            case "DELETE":
                raw = await request.body()
                options = _loads(raw) if raw else {}
                policy = query.get("propagationPolicy") or options.get("propagationPolicy")
                return _respond(
                    self.store.delete(
                        rt,
                        namespace,
                        name,
                        preconditions=options.get("preconditions"),
                        orphan_dependents=policy == "Orphan",
                    )
                )
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on this object")

    def _list(self, request: Request, rt: ResourceType, selection: Selection) -> Response:
        query = request.query_params
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as error:
            raise _bad_request("limit must be an integer") from error
        result = self.store.list_objects(rt, selection, limit=limit, continue_token=query.get("continue", ""))
        if "as=Table" in request.headers.get("accept", ""):
            return _respond(
                _table(
                    rt,
                    result.items,
                    result.resource_version,
                    query.get("includeObject", ""),
                    result.continue_token,
                )
            )
        metadata: JSON = {"resourceVersion": result.resource_version}
        if result.continue_token:
            metadata.update({"continue": result.continue_token, "remainingItemCount": result.remaining})
        return _respond(
            {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.api_version,
                "metadata": metadata,
                "items": result.items,
            }
        )

    def _watch(self, rt: ResourceType, selection: Selection, query: Any) -> Response:
        try:
            timeout = float(query.get("timeoutSeconds") or 0)
        except ValueError as error:
            raise _bad_request("timeoutSeconds must be a number") from error
        resource_version = query.get("resourceVersion", "")
        if resource_version and not resource_version.isdigit():
            raise _bad_request(f"invalid resource version {resource_version!r}")
        return StreamingResponse(
            self._stream(rt, selection, resource_version, timeout), media_type="application/json"
        )

    async def _stream(
        self, rt: ResourceType, selection: Selection, resource_version: str, timeout: float
    ) -> AsyncIterator[bytes]:
        # Subscribing here, inside the generator, ties the subscription to the finally below: a
        # client gone before the first byte never starts the generator, so it never subscribes.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

        def deliver(event: WatchEvent | None) -> None:
            # Writers may run on other threads; a write racing the server's shutdown finds the
            # loop closed, and that watcher is gone anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            backlog, unsubscribe = self.store.watch(rt, selection, resource_version, deliver)
        except ApiError as error:  # like the real server: 200, then one ERROR event (410 Expired)
            yield _event_line("ERROR", error.status())
            return
        deadline = loop.time() + timeout if timeout > 0 else None
        try:
            for kind, obj in backlog:
                yield _event_line(kind, obj)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if event is None:
                    return
                seen = event.seen_through(selection) if event.resource is rt else None
                if seen is not None:
                    yield _event_line(*seen)
        finally:
            unsubscribe()


def _event_line(kind: str, obj: JSON) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as error:
        raise _bad_request(f"the request body is not valid JSON: {error}") from error


class _ApplyLoader(yaml.SafeLoader):
    """YAML as the API server reads it: an unquoted date stays a string (PyYAML would make it a
    datetime, which is not JSON)."""


_ApplyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(raw: bytes) -> Any:
    try:
        return yaml.load(raw, Loader=_ApplyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as error:
        raise _bad_request(f"the request body is not valid YAML: {error}") from error


async def _body(request: Request) -> Any:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type != "application/json":
        raise ApiError(
            415, "UnsupportedMediaType", f"the sandbox accepts application/json bodies, not {content_type}"
        )
    return _loads(await request.body())


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(name: str, *, event_buffer: int = 10000, kubernetes_version: str = "1.32.0") -> Starlette:
    """A fresh, empty cluster (bar the initial namespaces) named ``name``.

    The store is at ``app.state.store``; ``kubernetes_version`` is what ``/version`` reports, so
    tests can give twin clusters different versions.
    """
    api = _Api(name, Store(event_buffer=event_buffer), kubernetes_version)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(
        routes=[
            Route("/version", api.version),
            Route("/healthz", _ok),
            Route("/readyz", _ok),
            Route("/livez", _ok),
            Route("/api", api.core_versions),
            Route("/apis", api.groups),
            Route("/api/{path:path}", api.core, methods=methods),
            Route("/apis/{path:path}", api.named_group, methods=methods),
        ]
    )
    app.state.store = api.store
    return app


# --------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------


class RunningServer:
    """A server started by ``serve_in_thread``."""

    def __init__(self, served: ServedApp, store: Store) -> None:
        self.url, self.port = served.url, served.port
        self._served, self._store = served, store

    def stop(self, timeout: float = 10.0) -> None:
        # uvicorn waits for open responses before it exits; watch streams would never end.
        self._served.stop(timeout, before_join=self._store.close_watches)


def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve ``app`` (from ``create_app``) on a daemon thread; port 0 picks a free port."""
    return RunningServer(serve_asgi(app, host=host, port=port, name="sandbox-apiserver"), app.state.store)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an in-memory sandbox Kubernetes API server.")
    parser.add_argument("--name", required=True, help="the cluster's name, e.g. eks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6441)
    parser.add_argument("--event-buffer", type=int, default=10000, help="watch events kept for resuming")
    parser.add_argument("--kubernetes-version", default="1.32.0", help="what /version reports")
    args = parser.parse_args(argv)
    app = create_app(args.name, event_buffer=args.event_buffer, kubernetes_version=args.kubernetes_version)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
