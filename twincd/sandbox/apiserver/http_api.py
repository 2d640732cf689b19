"""The HTTP layer: URL parsing, discovery, Tables for kubectl, watch streams, the Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from twincd.sandbox.apiserver.errors import ApiError, bad_request
from twincd.sandbox.apiserver.patches import PatchType
from twincd.sandbox.apiserver.resources import JSON, RESOURCES, Column, ResourceType
from twincd.sandbox.apiserver.selectors import Selection
from twincd.sandbox.apiserver.store import Store, WatchEvent

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
        if "dryRun" in request.query_params and request.method != "GET":
            raise bad_request("dry run is not supported by the twincd sandbox")
        if target.name is None:
            return await self._collection(request, target)
        return await self._object(request, target, target.name)

    async def _collection(self, request: Request, target: _Target) -> Response:
        rt, namespace, query = target.resource, target.namespace, request.query_params
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

    async def _object(self, request: Request, target: _Target, name: str) -> Response:
        rt, namespace, query = target.resource, target.namespace, request.query_params
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
                return await self._patch(request, target, name)
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

    async def _patch(self, request: Request, target: _Target, name: str) -> Response:
        rt, namespace = target.resource, target.namespace
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type == _APPLY_PATCH:
            manager = request.query_params.get("fieldManager", "")
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

    def _list(self, request: Request, rt: ResourceType, selection: Selection) -> Response:
        query = request.query_params
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as error:
            raise bad_request("limit must be an integer") from error
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
            raise bad_request("timeoutSeconds must be a number") from error
        resource_version = query.get("resourceVersion", "")
        if resource_version and not resource_version.isdigit():
            raise bad_request(f"invalid resource version {resource_version!r}")
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
        raise bad_request(f"the request body is not valid JSON: {error}") from error


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
        raise bad_request(f"the request body is not valid YAML: {error}") from error


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
