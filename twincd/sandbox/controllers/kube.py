"""The controllers' Kubernetes client: the project's own, on the official ``kubernetes`` client.

No hand-written HTTP client: requests go through the cluster adapter's request helper
(``twincd.adapters.cluster._request``: the official ApiClient, one attempt per call) and its error
mapping, and kinds resolve to paths through ``twincd.adapters.kube_read.LiveReader`` (a static
table for built-in kinds, one discovery GET per group-version for the others). The controllers
are handed an API server's URL rather than a kubeconfig context, so the ApiClient is built on a
``Configuration`` with that host instead of by ``api_client``.

What is the controllers' own is thin: a 404 of a GET or DELETE is an answer, a 409 is a
:class:`Conflict` for the callers' retry loops (:func:`apply_object`, the status writes), and a
watch yields raw events until the server ends it (the callers relist on :class:`Expired`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.watch.watch import iter_resp_lines

from twincd.adapters.cluster import (
    REQUEST_TIMEOUT,
    ClusterDenied,
    ClusterError,
    ClusterRef,
    ClusterRefused,
    _request,
    _status_error,
)
from twincd.adapters.kube_read import LiveReader
from twincd.sandbox.controllers.health import ResourceKey, is_in_sync
from twincd.sandbox.controllers.rollout_steps import Obj


class Conflict(ClusterRefused):
    """409: the object changed since it was read (stale resourceVersion), or it exists already."""


class Expired(ClusterRefused):
    """410 Gone on a watch: the resourceVersion is older than the server keeps; relist."""


# Everything a request can raise: unreachable or 5xx (transient), 401/403, any other refusal.
KUBE_ERRORS = (ClusterError, ClusterDenied, ClusterRefused)


class Kube:
    """Just enough of the Kubernetes API for the controllers: get, list, create, replace, delete, watch.

    Not shared between threads: each loop that blocks on the server (a watch) has its own.
    """

    def __init__(self, url: str, name: str = "") -> None:
        config = k8s.Configuration(host=url.rstrip("/"))
        config.retries = 0  # as api_client sets it: the controllers' loops own retries
        self.api = k8s.ApiClient(config)
        self.ref = ClusterRef(name or url, context="")
        self._kinds = LiveReader(self.ref, api=self.api)

    def close(self) -> None:
        self.api.close()

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        missing_ok: bool = False,
    ) -> Obj | None:
        response = _request(self.ref, self.api, what, method, path, query=query, body=body)
        try:
            data = response.data
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ClusterError(
                f"cluster {self.ref.name}: {what}: connection lost ({type(e).__name__})"
            ) from e
        if 200 <= response.status <= 299:
            result: Obj = json.loads(data)
            return result
        if response.status == 404 and missing_ok:
            return None
        refused = Conflict if response.status == 409 else ClusterRefused
        raise _status_error(self.ref, what, response.status, response.reason, data, refused=refused)

    def _found(self, what: str, method: str, path: str, **kwargs: Any) -> Obj:
        result = self._call(what, method, path, **kwargs)
        assert result is not None  # only missing_ok calls answer None
        return result

    def namespaced(self, api_version: str, kind: str) -> bool:
        return self._kinds.namespaced(api_version, kind)

    def path(self, api_version: str, kind: str, namespace: str = "", name: str = "") -> str:
        info = self._kinds.kind(api_version, kind)
        if info is None:
            raise ClusterRefused(
                f'cluster {self.ref.name}: no matches for kind "{kind}" in version "{api_version}"'
            )
        root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        where = f"/namespaces/{namespace}" if info.namespaced and namespace else ""
        return f"{root}{where}/{info.plural}" + (f"/{name}" if name else "")

    def get(self, key: ResourceKey) -> Obj | None:
        path = self.path(key.api_version, key.kind, key.namespace, key.name)
        return self._call(f"get {key}", "GET", path, missing_ok=True)

    def list(self, api_version: str, kind: str, namespace: str = "", *, label_selector: str = "") -> Obj:
        query = (("labelSelector", label_selector),) if label_selector else ()
        where = f" in {namespace}" if namespace else ""
        return self._found(f"list {kind}{where}", "GET", self.path(api_version, kind, namespace), query=query)

    def create(self, obj: Mapping[str, Any]) -> Obj:
        key = ResourceKey.of(obj)
        path = self.path(key.api_version, key.kind, key.namespace)
        return self._found(f"create {key}", "POST", path, body=obj)

    def replace(self, obj: Mapping[str, Any], subresource: str = "") -> Obj:
        key = ResourceKey.of(obj)
        path = self.path(key.api_version, key.kind, key.namespace, key.name)
        if subresource:
            path += f"/{subresource}"
        return self._found(f"replace {key}{' ' + subresource if subresource else ''}", "PUT", path, body=obj)

    def delete(self, key: ResourceKey) -> None:
        path = self.path(key.api_version, key.kind, key.namespace, key.name)
        self._call(f"delete {key}", "DELETE", path, missing_ok=True)

    def ensure_namespace(self, name: str) -> None:
        """Create namespace ``name`` unless it exists (or ``name`` is empty)."""
        if name and self.get(ResourceKey("v1", "Namespace", "", name)) is None:
            with contextlib.suppress(Conflict):  # created in between
                self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def watch(
        self,
        api_version: str,
        kind: str,
        resource_version: str,
        stop: threading.Event,
        timeout_seconds: int = 30,
    ) -> Iterator[Obj]:
        """Watch events from ``resource_version`` until the server ends the stream or ``stop`` is set.

        Raises :class:`Expired` when the version is too old (relist), ClusterError when the stream
        breaks."""
        what = f"watch {kind}"
        query = (
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        )
        # A quiet watch sends nothing until the server ends it: the read timeout outlasts the request.
        timeout = (REQUEST_TIMEOUT[0], timeout_seconds + REQUEST_TIMEOUT[1])
        response = _request(
            self.ref, self.api, what, "GET", self.path(api_version, kind), query=query, timeout=timeout
        )
        try:
            if response.status == 410:
                raise Expired(f"cluster {self.ref.name}: {what}: too old resource version")
            if not 200 <= response.status <= 299:
                raise _status_error(self.ref, what, response.status, response.reason, response.data)
            for line in iter_resp_lines(response):
                if stop.is_set():
                    return
                if line.strip():
                    yield json.loads(line)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:  # ValueError: a line cut short
            raise ClusterError(f"cluster {self.ref.name}: {what}: stream broken ({type(e).__name__})") from e
        finally:
            # Closed, not just released: a connection with unread events must never be reused.
            response.close()
            response.release_conn()


def apply_object(kube: Kube, obj: Mapping[str, Any], attempts: int = 5) -> Obj:
    """Create ``obj`` or replace the live one by PUT of the whole object at the live resourceVersion.

    Returns the live object; an object already in sync is left alone. A 409 (someone wrote in between) is
    retried with the new resourceVersion, as ``kubectl replace`` users do by hand.
    """
    key = ResourceKey.of(obj)
    for _ in range(attempts):
        live = kube.get(key)
        if live is None:
            try:
                return kube.create(obj)
            except Conflict:  # created in between: replace it on the next attempt
                continue
        if is_in_sync(obj, live):
            return live
        body = copy.deepcopy(dict(obj))
        body.setdefault("metadata", {})["resourceVersion"] = live["metadata"]["resourceVersion"]
        try:
            return kube.replace(body)
        except Conflict:
            continue
    raise Conflict(f"cluster {kube.ref.name}: {key}: still conflicting after {attempts} attempts")
