"""The store: objects of every resource type with a real API server's write semantics, no HTTP.

Metadata stamping, optimistic locking on resourceVersion, the status split, generation bumps,
owner-reference garbage collection, and the event ring buffer a watch resumes from.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from twincd.domain import Severity
from twincd.sandbox.apiserver.errors import STALE, ApiError, bad_request, conflict, invalid, not_found
from twincd.sandbox.apiserver.patches import PatchType, json_patch, merge_patch, strategic_merge_patch
from twincd.sandbox.apiserver.resources import (
    INITIAL_NAMESPACES,
    JSON,
    NAMESPACES,
    RESOURCES,
    ResourceType,
    copy_json,
)
from twincd.sandbox.apiserver.selectors import Selection
from twincd.validate import SchemaValidator

# The OpenAPI schemas `twincd validate` checks against, compiled once per kind on first use.
_SCHEMAS = SchemaValidator()


def _check_schema(rt: ResourceType, obj: JSON) -> None:
    """A built-in object the real API server would refuse: 422 Invalid, one cause per field.

    A real server decodes built-in kinds into typed structs and validates them, so a wrong type,
    a missing required field or an out-of-range enum never reaches a controller (``kind: Status``
    with ``details.causes``, reason ``FieldValueInvalid``; apimachinery's field.ErrorList). Unknown
    fields are kept, as with the server's default ``fieldValidation=Warn`` (a real server drops
    them silently; ``Strict``, which kubectl asks for, is not modelled). Status is the controllers'.
    """
    body = {key: value for key, value in obj.items() if key != "status"}
    errors = [
        f
        for f in _SCHEMAS.check(body, overlay="")
        if f.severity is Severity.ERROR and "was unexpected" not in f.message
    ]
    if not errors:
        return
    name = str(_metadata_name(obj))
    error = invalid(
        rt, name, ", ".join(f"{f.path or '(object)'}: Invalid value: {f.message}" for f in errors)
    )
    assert error.details is not None
    error.details["causes"] = [
        {"reason": "FieldValueInvalid", "message": f"Invalid value: {f.message}", "field": f.path}
        for f in errors
    ]
    raise error


def _metadata_name(obj: JSON) -> object:
    meta = obj.get("metadata")
    return meta.get("name", "") if isinstance(meta, dict) else ""


_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # upstream's: no vowels, no look-alikes
# The kinds whose spec.replicas the sandbox's own controllers read (see _check_typed_fields).
_REPLICATED_KINDS = frozenset({"Deployment", "StatefulSet", "ReplicaSet"})


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
            return copy_json(self._stored(rt, namespace, name))  # type: ignore[no-any-return]

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
            items = [copy_json(self._objects[rt][key]) for key in page]
        remaining = len(keys) - len(page)
        token = _encode_continue(page[-1]) if remaining else ""
        return ListResult(items, revision, token, remaining)

    # ------------------------------------------------------------------------------ writes

    def create(
        self, rt: ResourceType, namespace: str | None, body: JSON, *, managed_fields: list[JSON] | None = None
    ) -> JSON:
        obj: JSON = copy_json(body)
        meta = self._checked_metadata(rt, obj)
        self._check_typed_fields(rt, obj)
        with self._lock:
            namespace = self._target_namespace(rt, namespace, meta)
            if namespace and ("", namespace) not in self._objects[NAMESPACES]:
                raise not_found(NAMESPACES, namespace)
            name = meta.get("name") or self._generate_name(rt, namespace, meta.get("generateName"))
            if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
                raise invalid(rt, str(name), "metadata.name: must be a lowercase RFC 1123 subdomain")
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
        obj: JSON = copy_json(body)
        meta = self._checked_metadata(rt, obj)
        if meta.get("name") != name:
            raise bad_request(
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
                    patched = json_patch(copy_json(current), copy_json(patch))
                case "merge":
                    patched = merge_patch(current, copy_json(patch))
                case "strategic":
                    patched = strategic_merge_patch(current, copy_json(patch))
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise invalid(rt, name, "the patched object has no metadata")
            # The patch may not rename or move the object; a resourceVersion it carries is a
            # precondition, checked in _update like a PUT's.
            patched["metadata"] = {**patched["metadata"], "name": name}
            if namespace:
                patched["metadata"]["namespace"] = namespace
            return self._update(rt, current, copy_json(patched), subresource)

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
        obj: JSON = copy_json(body)
        if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
            # The real server cannot decode an applied configuration without its type.
            raise bad_request("apply patches must set apiVersion and kind")
        meta = self._checked_metadata(rt, obj)
        if meta.get("name", name) != name:
            raise bad_request(
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
                    raise not_found(rt, name)
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
            return self._update(rt, current, copy_json(merged), subresource), False

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
                    raise conflict(
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
            return copy_json(deleted)  # type: ignore[no-any-return]

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
                    ("ADDED", copy_json(self._objects[rt][key]))
                    for key in sorted(self._objects[rt])
                    if selection.matches(self._objects[rt][key])
                ]
            else:
                try:
                    since = int(resource_version)
                except ValueError as error:
                    raise bad_request(f"invalid resource version {resource_version!r}") from error
                if since < self._evicted_upto:
                    raise ApiError(
                        410, "Expired", f"too old resource version: {since} ({self._evicted_upto + 1})"
                    )
                seen = (
                    event.seen_through(selection)
                    for event in self._events
                    if event.resource is rt and event.resource_version > since
                )
                backlog = [(kind, copy_json(obj)) for kind, obj in filter(None, seen)]
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
            raise not_found(rt, name)
        return obj

    @staticmethod
    def _checked_metadata(rt: ResourceType, obj: Any) -> JSON:
        if not isinstance(obj, dict):
            raise bad_request("the request body must be a JSON object")
        for key, expected in (("apiVersion", rt.api_version), ("kind", rt.kind)):
            if obj.get(key, expected) != expected:
                raise bad_request(
                    f"the {key} in the data ({obj[key]}) does not match the expected {key} ({expected})"
                )
        obj.update(apiVersion=rt.api_version, kind=rt.kind)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
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
                raise bad_request(
                    f"json: cannot unmarshal {got} into Go struct field "
                    f"{rt.kind}Spec.spec.replicas of type int32"
                )
        if rt.builtin:
            _check_schema(rt, obj)

    @staticmethod
    def _target_namespace(rt: ResourceType, namespace: str | None, meta: JSON) -> str:
        if not rt.namespaced:
            meta.pop("namespace", None)
            return ""
        if not namespace:
            raise bad_request(f"{rt.qualified} is namespaced: the request must name a namespace")
        if meta.get("namespace", namespace) != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        return namespace

    def _generate_name(self, rt: ResourceType, namespace: str, prefix: Any) -> str:
        if not prefix or not isinstance(prefix, str):
            raise invalid(rt, "", "metadata.name: Required value: name or generateName is required")
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
            raise conflict(rt, name, STALE)
        if subresource == "status":  # only status changes through /status
            new = {**current, "status": obj.get("status", {})}
        else:
            self._check_typed_fields(rt, obj)
            new = obj
            if rt.status_subresource:  # ...and never through the object itself
                new["status"] = current.get("status", {})
            system = ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion")
            new["metadata"] = {**meta, **{key: old_meta[key] for key in system if key in old_meta}}
        new = copy_json(new)
        if new == current:  # a no-op write neither bumps resourceVersion nor wakes watchers
            return copy_json(current)  # type: ignore[no-any-return]
        if _generation_part(rt, new) != _generation_part(rt, current):
            new["metadata"]["generation"] = old_meta.get("generation", 0) + 1
        return self._commit(rt, (old_meta.get("namespace", ""), name), new, current)

    def _commit(self, rt: ResourceType, key: tuple[str, str], obj: JSON, old: JSON | None) -> JSON:
        obj["metadata"]["resourceVersion"] = self._next_revision()
        self._objects[rt][key] = obj
        self._publish(WatchEvent(self._revision, "ADDED" if old is None else "MODIFIED", rt, obj, old))
        return copy_json(obj)  # type: ignore[no-any-return]

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
        raise bad_request("invalid continue token") from error
