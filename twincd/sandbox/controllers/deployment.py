"""The Deployment controller: a simplified kube-controller-manager Deployment controller.

It "pulls" images with a HEAD on the registry's manifest endpoint, keeps Pods named
``<deployment>-<pod-template-hash>-<suffix>`` and moves ``status`` through the ``/status``
subresource, one :func:`next_rollout_step` per tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from twincd.adapters.cluster import ClusterError
from twincd.adapters.secrets import Secret
from twincd.rollout import label_selector
from twincd.sandbox.controllers.health import ResourceKey
from twincd.sandbox.controllers.kube import KUBE_ERRORS, Conflict, Expired, Kube
from twincd.sandbox.controllers.pulls import PullResult, check_image_pull
from twincd.sandbox.controllers.rollout_steps import (
    Obj,
    next_rollout_step,
    random_suffix,
    rollout_settled,
    template_images,
)

log = logging.getLogger(__name__)


def _rv(obj: Mapping[str, Any]) -> int:
    value = str(obj.get("metadata", {}).get("resourceVersion") or "0")
    return int(value) if value.isdigit() else 0


class DeploymentController:
    """Reconciles every Deployment of one cluster: a watch thread keeps a cache, a tick loop steps
    each unsettled rollout every ``tick`` seconds."""

    def __init__(
        self,
        api_url: str,
        stop: threading.Event,
        tick: float = 0.2,
        *,
        pull_auths: Mapping[str, tuple[str, Secret]] | None = None,
    ) -> None:
        self.api = Kube(api_url)
        self._watch_api = Kube(api_url)
        self.stop = stop
        self.tick = tick
        self._cache: dict[tuple[str, str], Obj] = {}
        self._lock = threading.Lock()
        self._pull_auths = dict(pull_auths or {})  # the cluster's imagePullSecret
        # Pull results per image. Digests are immutable, so a success is kept; failures are
        # retried after a back-off, as the kubelet does.
        self._pulls: dict[str, tuple[PullResult, float]] = {}

    def run(self) -> None:
        # The watch has its own client: one blocking stream must not hold up the tick loop's calls.
        watcher = threading.Thread(target=self._watch_loop, name="deployment-watch", daemon=True)
        watcher.start()
        try:
            while not self.stop.wait(self.tick):
                with self._lock:
                    deployments = list(self._cache.values())
                for d in deployments:
                    if rollout_settled(d):
                        continue
                    try:
                        self._reconcile(d)
                    except Exception as e:  # noqa: BLE001 - one bad object must not stop the controller
                        log.warning(
                            "deployment %s/%s: %s", d["metadata"].get("namespace"), d["metadata"]["name"], e
                        )
        finally:
            self.api.close()

    def _store(self, obj: Obj) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        with self._lock:
            # The tick loop stores what its writes return while the watch thread stores events: an
            # older copy must never replace a newer one, or a spec change that arrived in between is
            # lost and the rollout is never stepped. (The sandbox's resourceVersions are a counter.)
            cached = self._cache.get(key)
            if cached is None or _rv(obj) >= _rv(cached):
                self._cache[key] = obj

    def _watch_loop(self) -> None:
        try:
            self._follow()
        finally:
            self._watch_api.close()

    def _follow(self) -> None:
        resource_version = ""
        while not self.stop.is_set():
            try:
                if not resource_version:
                    listing = self._watch_api.list("apps/v1", "Deployment")
                    with self._lock:
                        self._cache = {
                            (d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
                            for d in listing.get("items", [])
                        }
                    resource_version = str(listing["metadata"]["resourceVersion"])
                for event in self._watch_api.watch("apps/v1", "Deployment", resource_version, self.stop):
                    kind, obj = event.get("type"), event.get("object", {})
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            resource_version = ""  # too old: relist
                            break
                        raise ClusterError(str(obj.get("message", "watch error")))
                    resource_version = str(obj["metadata"]["resourceVersion"])
                    if kind == "DELETED":
                        self._forget(obj)
                    elif kind in ("ADDED", "MODIFIED"):
                        self._store(obj)
            except Expired:
                resource_version = ""
            except KUBE_ERRORS as e:
                log.warning("deployment watch: %s", e)
                self.stop.wait(1.0)

    def _forget(self, deployment: Obj) -> None:
        # Its pods go with it: the API server's owner-reference garbage collection removes them.
        meta = deployment["metadata"]
        with self._lock:
            self._cache.pop((meta.get("namespace", ""), meta["name"]), None)

    def _owned_pods(self, deployment: Mapping[str, Any]) -> list[Obj]:
        meta = deployment["metadata"]
        selector = label_selector(deployment["spec"].get("selector") or {})
        listing = self.api.list("v1", "Pod", meta.get("namespace", "default"), label_selector=selector)
        return [
            p
            for p in listing.get("items", [])
            if any(o.get("uid") == meta.get("uid") for o in p["metadata"].get("ownerReferences", []))
        ]

    def _pull(self, image: str) -> PullResult:
        cached = self._pulls.get(image)
        if cached is not None and (cached[0].ok or time.monotonic() - cached[1] < 2.0):
            return cached[0]
        result = check_image_pull(image, auths=self._pull_auths)
        self._pulls[image] = (result, time.monotonic())
        return result

    def _reconcile(self, deployment: Obj) -> None:
        pulls = {image: self._pull(image) for image in template_images(deployment)}
        pods = self._owned_pods(deployment)
        step = next_rollout_step(deployment, pods, pulls, datetime.now(UTC), random_suffix())
        for name in step.delete:
            self.api.delete(
                ResourceKey("v1", "Pod", deployment["metadata"].get("namespace", "default"), name)
            )
        for pod in step.create:
            created = self.api.create(pod)
            # A POSTed Pod's status is reset by the API server; the kubelet reports it via /status.
            self.api.replace({**created, "status": pod["status"]}, subresource="status")
        for pod in step.update:
            self.api.replace(pod, subresource="status")
        if step.status != deployment.get("status") or step.progressed:
            try:
                written = self.api.replace({**deployment, "status": step.status}, subresource="status")
            except Conflict:
                # The spec (or status) moved under us: take the fresh object and retry next tick.
                fresh = self.api.get(
                    ResourceKey.of({**deployment, "apiVersion": "apps/v1", "kind": "Deployment"})
                )
                if fresh is not None:
                    self._store(fresh)
                return
            self._store(written)
