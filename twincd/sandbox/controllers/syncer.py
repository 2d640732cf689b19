"""The Argo-CD-like syncer: manifests repo → one cluster, plus one Application per app in Argo CD's.

It polls the manifests repo's ``main``, renders ``overlays/<cluster>/<app>`` with ``kubectl
kustomize``, applies by GET + PUT of whole objects, and publishes one ``argoproj.io/v1alpha1``
``Application`` per app in the Argo CD cluster.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import yaml

from twincd.drift import place_namespaces
from twincd.errors import PermanentError, TransientError
from twincd.sandbox.controllers.health import (
    MISSING,
    Health,
    ResourceKey,
    SyncOutcome,
    application_health,
    application_status,
    deployment_health,
)
from twincd.sandbox.controllers.kube import KUBE_ERRORS, Conflict, Kube, apply_object
from twincd.sandbox.controllers.rollout_steps import Obj, format_time, template_images

log = logging.getLogger(__name__)


def _git(*args: str, cwd: str | None = None) -> bytes:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    if result.returncode != 0:
        raise TransientError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def remote_head(repo: str, branch: str = "main") -> str:
    """The commit ``branch`` points at, without fetching anything (``git ls-remote``)."""
    out = _git("ls-remote", repo, f"refs/heads/{branch}").decode().split()
    if not out:
        raise TransientError(f"{repo}: branch {branch!r} not found")
    return out[0]


# kubectl 1.32 reports through klog: `E1126 02:23:23.020304 9071 run.go:72] "command failed" err="..."`.
_KLOG_ERR = re.compile(r'err=(".*")\s*$')


def kubectl_message(stderr: str, root: Path) -> str:
    """kubectl's own error text, without the klog header and with paths relative to the repo."""
    text = stderr.strip()
    match = _KLOG_ERR.search(text)
    if match:
        with contextlib.suppress(ValueError):
            text = str(json.loads(match.group(1)))  # Go's %q quoting is JSON-compatible here
    return text.replace(f"{root}/", "")


def render_overlay(directory: Path, root: Path) -> list[Obj]:
    """``kubectl kustomize`` the directory; a failure raises with kubectl's own message."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise PermanentError(
            kubectl_message(result.stderr, root) or f"kubectl kustomize exited {result.returncode}"
        )
    return [d for d in yaml.safe_load_all(result.stdout) if isinstance(d, dict)]


def apply_order(objects: Sequence[Obj]) -> list[Obj]:
    """Namespaces (and CRDs) first, then everything in kustomize's output order."""
    first = ("Namespace", "CustomResourceDefinition")
    return [o for o in objects if o.get("kind") in first] + [o for o in objects if o.get("kind") not in first]


_OVERLAY_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


class ManifestsSyncer:
    """Polls ``main`` of the manifests repo and syncs ``overlays/<cluster>/*`` to one cluster,
    publishing an Application ``<app>-<cluster>`` per app in the Argo CD cluster.

    Like Argo CD with automated sync and no retry policy, a revision is synced once: a failed sync
    stays Failed until the next commit. It does not prune objects that left the manifests, nor
    Applications whose overlay was removed.
    """

    def __init__(
        self,
        *,
        cluster: str,
        repo: str,
        api_url: str,
        argocd_api_url: str,
        stop: threading.Event,
        interval: float = 1.0,
        branch: str = "main",
        argocd_namespace: str = "argocd",
    ) -> None:
        self.cluster = cluster
        self.repo = repo
        self.branch = branch
        self.target = Kube(api_url, cluster)
        self.argocd = Kube(argocd_api_url, "argocd")
        self.namespace = argocd_namespace
        self.stop = stop
        self.interval = interval
        self._head = ""
        self._repo_error = ""
        self._outcomes: dict[str, SyncOutcome] = {}
        self._published: dict[str, Obj] = {}  # app -> last status written (without reconciledAt)

    def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix=f"twincd-syncer-{self.cluster}-") as work:
            cache = os.path.join(work, "cache.git")
            _git("init", "--bare", "-q", cache)
            try:
                while True:
                    self.poll_once(work, cache)
                    if self.stop.wait(self.interval):
                        break
            finally:
                self.target.close()
                self.argocd.close()

    def poll_once(self, work: str, cache: str) -> None:
        try:
            head = remote_head(self.repo, self.branch)
            self._repo_error = ""
        except TransientError as e:
            # Said once, not every interval: an empty repo before its first push is normal.
            if str(e) != self._repo_error:
                log.warning("syncer %s: %s", self.cluster, e)
            self._repo_error = str(e)
            head = self._head
        if head and head != self._head:
            try:
                self._sync(head, work, cache)
                self._head = head
            except TransientError as e:  # the repo moved or vanished mid-fetch: try again next poll
                log.warning("syncer %s: %s", self.cluster, e)
        for app in list(self._outcomes):
            try:
                self._publish(app)
            except KUBE_ERRORS as e:
                log.warning("application %s-%s: %s", app, self.cluster, e)

    def _export(self, head: str, work: str, cache: str) -> Path:
        _git("--git-dir", cache, "fetch", "-q", self.repo, f"+{head}:refs/heads/synced")
        tree = Path(work) / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir()
        archive = _git("--git-dir", cache, "archive", "--format=tar", head)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        return tree

    def _sync(self, head: str, work: str, cache: str) -> None:
        tree = self._export(head, work, cache)
        overlay_root = tree / "overlays" / self.cluster
        apps = sorted(
            d.name
            for d in (overlay_root.iterdir() if overlay_root.is_dir() else ())
            if d.is_dir() and any((d / f).is_file() for f in _OVERLAY_FILES)
        )
        for app in apps:
            started = format_time(datetime.now(UTC))
            previous = self._outcomes.get(app)
            self._outcomes[app] = SyncOutcome(
                revision=head,
                phase="Running",
                message="one or more tasks are running",
                started_at=started,
                resources=previous.resources if previous else (),
                images=previous.images if previous else (),
            )
            self._publish(app, quiet=True)
            self._outcomes[app] = self._sync_app(app, tree, head, started, previous)
            log.info("synced %s-%s at %s: %s", app, self.cluster, head[:12], self._outcomes[app].phase)

    def _sync_app(
        self, app: str, root: Path, head: str, started: str, previous: SyncOutcome | None
    ) -> SyncOutcome:
        path = f"overlays/{self.cluster}/{app}"
        directory = root / path
        keep = previous.resources if previous else ()
        keep_images = previous.images if previous else ()
        try:
            rendered = apply_order(render_overlay(directory, root))
        except PermanentError as e:
            # Argo CD's wording around the tool's own stderr, so people recognise both.
            message = f"`kustomize build {path}` failed: {e}"
            return SyncOutcome(
                head, "Failed", message, started, format_time(datetime.now(UTC)), keep, keep_images
            )
        images = tuple(
            sorted({i for o in rendered if o.get("kind") == "Deployment" for i in template_images(o)})
        )
        keys: tuple[ResourceKey, ...] = keep
        try:
            # Namespaced objects without a namespace go to ``default``, as with ``kubectl apply``.
            objects = place_namespaces(rendered, namespaced=self.target.namespaced)
            placed = tuple(ResourceKey.of(o) for o in objects)
            for key in placed:  # every kind is served, before anything is applied
                self.target.path(key.api_version, key.kind)
            keys = placed
            for obj in objects:
                # Argo CD's ``CreateNamespace=true`` option: a missing destination namespace is created.
                self.target.ensure_namespace(obj["metadata"].get("namespace", ""))
                apply_object(self.target, self._tracked(obj, app))
        except KUBE_ERRORS as e:
            return SyncOutcome(
                head, "Failed", f"one or more objects failed to apply: {e}", started,
                format_time(datetime.now(UTC)), keys, images,
            )  # fmt: skip
        return SyncOutcome(
            head, "Succeeded", "successfully synced (all tasks run)", started,
            format_time(datetime.now(UTC)), keys, images,
        )  # fmt: skip

    def _tracked(self, obj: Obj, app: str) -> Obj:
        """Argo CD 3's default resource tracking: an annotation naming the owning Application."""
        key = ResourceKey.of(obj)
        meta = dict(obj.get("metadata", {}))
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            "argocd.argoproj.io/tracking-id": (
                f"{app}-{self.cluster}:{key.group}/{key.kind}:{key.namespace}/{key.name}"
            ),
        }
        return {**obj, "metadata": meta}

    def _health(self, outcome: SyncOutcome) -> tuple[Health, dict[ResourceKey, Health]]:
        if not outcome.resources and outcome.phase != "Succeeded":
            # Nothing was ever rendered and applied: Argo CD shows such an app as Missing.
            return Health(MISSING, "no resources synced yet"), {}
        per: dict[ResourceKey, Health] = {}
        for key in outcome.resources:
            if key.kind == "Deployment":
                per[key] = deployment_health(self.target.get(key))
        return application_health(list(per.values())), per

    def _publish(self, app: str, quiet: bool = False) -> None:
        """Write the Application when its status changed (health is re-read on every call)."""
        outcome = self._outcomes[app]
        path = f"overlays/{self.cluster}/{app}"
        try:
            health, per = self._health(outcome)
        except KUBE_ERRORS as e:
            health, per = Health("Unknown", str(e)), {}
        status = application_status(outcome, health, per, self.repo, path, "")
        if self._published.get(app) == status:
            return
        stamped = {**status, "reconciledAt": format_time(datetime.now(UTC))}
        try:
            self._write_application(app, path, stamped)
        except KUBE_ERRORS as e:
            if not quiet:
                raise
            log.warning("application %s-%s: %s", app, self.cluster, e)
            return
        self._published[app] = status

    def _write_application(self, app: str, path: str, status: Obj) -> None:
        name = f"{app}-{self.cluster}"
        self.argocd.ensure_namespace(self.namespace)
        desired: Obj = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"twincd.io/app": app, "twincd.io/cluster": self.cluster},
            },
            "spec": {
                "project": "default",
                "source": {"repoURL": self.repo, "path": path, "targetRevision": self.branch},
                "destination": {"name": self.cluster},
                "syncPolicy": {"automated": {"prune": False, "selfHeal": False}},
            },
            "status": status,
        }
        key = ResourceKey.of(desired)
        for _ in range(5):
            live = self.argocd.get(key)
            try:
                if live is None:
                    written = self.argocd.create(desired)
                else:
                    body = copy.deepcopy(desired)
                    body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
                    written = self.argocd.replace(body)
                # Argo CD's own CRD has no status subresource (status is written with the object),
                # but a server that splits it off ignores status on the main resource.
                if written.get("status") != status:
                    self.argocd.replace({**written, "status": status}, subresource="status")
                return
            except Conflict:
                continue
        raise Conflict(f"cluster argocd: Application {self.namespace}/{name}: still conflicting")
