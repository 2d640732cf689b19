"""The sandbox's Argo CD for one destination cluster: an ApplicationSet-like generator and an
application controller, both clients of the Kubernetes API like the real ones.

What it does as Argo CD does (argo-cd ``controller/appcontroller.go``, ``controller/state.go``,
``docs/operator-manual/argocd-cm.yaml``), so that twincd is tested against Argo CD's timing and not
a kinder one:

- **Applications.** One ``Application`` per app directory under the cluster's configured overlay
  path (the environment file's ``overlay:``, any layout), named by its ``application`` template,
  created as an ApplicationSet git directory generator would (``<overlay>/*``) with an automated
  sync policy. The generator looks at git at the same slow pace as the controller. An existing
  Application's spec is never overwritten, so people (and tests) may make it manual by removing
  ``spec.syncPolicy.automated``. Any Application whose ``spec.destination.name`` is this cluster is
  reconciled, whoever created it.
- **When it looks at git.** Every Application is compared with git every ``timeout.reconciliation``
  (180 s, Argo CD 2.x's default; 3.x documents 120 s) plus a random jitter of up to
  ``timeout.reconciliation.jitter`` (60 s), and at once when it carries the
  ``argocd.argoproj.io/refresh`` annotation (removed once the comparison is written), when its
  ``spec.source`` changed, or when a sync ``operation`` is requested. The Applications are listed
  every ``tick`` (half a second; Argo CD's informer sees them at once).
- **Comparison.** ``targetRevision`` is resolved with ``git ls-remote``; an Application is rendered
  again only when the commits since its last render touch a path its overlay reads (Argo CD's
  ``manifest-generate-paths`` idea, with the paths found by following the kustomization's
  references), so one commit to a monorepo of 100 apps renders one app. A render failure is a
  ``ComparisonError`` condition with kustomize's own message and ``sync.status: Unknown``.
- **Sync.** Automated: when OutOfSync, once per revision; a failed attempt is not retried at the same
  revision and shows as a ``SyncError`` condition. Manual: only when an ``operation`` asks (as
  ``argocd app sync`` writes it); ``operationState`` goes Running → Succeeded/Failed and the
  ``operation`` is removed when it ends. Objects are applied by GET + PUT of whole objects, tracked by
  Argo CD 3's annotation; nothing is pruned.
- **Health** is re-read on every tick (Argo CD's cluster cache watches the objects).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import yaml

from twincd.drift import place_namespaces
from twincd.errors import PermanentError, TransientError
from twincd.kustomize import OVERLAY_FILES, UNKNOWN, kustomize_inputs, touches
from twincd.rollout import automated
from twincd.sandbox.controllers.health import (
    MISSING,
    Comparison,
    Health,
    ResourceKey,
    SyncOutcome,
    application_health,
    application_status,
    deployment_health,
    is_in_sync,
    sync_error,
)
from twincd.sandbox.controllers.kube import KUBE_ERRORS, Conflict, Kube, apply_object
from twincd.sandbox.controllers.rollout_steps import Obj, format_time, template_images

log = logging.getLogger(__name__)

REFRESH = "argocd.argoproj.io/refresh"
REFRESH_TIMESTAMP = "argocd.argoproj.io/refresh-timestamp"
RECONCILE_SECONDS = 180.0  # timeout.reconciliation
JITTER_SECONDS = 60.0  # timeout.reconciliation.jitter
_SHA = re.compile(r"^[0-9a-f]{40}$")


def _git(*args: str, cwd: str | None = None) -> bytes:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    if result.returncode != 0:
        raise TransientError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def remote_head(repo: str, branch: str = "main") -> str:
    """The commit ``branch`` points at, without fetching anything (``git ls-remote``)."""
    ref = "HEAD" if branch == "HEAD" else f"refs/heads/{branch}"
    out = _git("ls-remote", repo, ref).decode().split()
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


class _Repo:
    """A bare cache of the manifests repo: trees by commit, changed files between commits."""

    def __init__(self, url: str, work: Path) -> None:
        self.url = url
        self.work = work
        self.cache = str(work / "cache.git")
        _git("init", "--bare", "-q", self.cache)
        self._trees: dict[str, Path] = {}
        self._changed: dict[tuple[str, str], frozenset[str]] = {}

    def _have(self, commit: str) -> bool:
        result = subprocess.run(
            ["git", "--git-dir", self.cache, "cat-file", "-e", f"{commit}^{{commit}}"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def fetch(self, commit: str) -> None:
        if not self._have(commit):
            _git("--git-dir", self.cache, "fetch", "-q", self.url, f"+{commit}:refs/synced/{commit}")

    def tree(self, commit: str) -> Path:
        """The tree of ``commit`` on disk (the last few are kept)."""
        if commit not in self._trees:
            self.fetch(commit)
            tree = self.work / "trees" / commit
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir(parents=True)
            archive = _git("--git-dir", self.cache, "archive", "--format=tar", commit)
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(tree, filter="data")
            while len(self._trees) >= 4:
                shutil.rmtree(self._trees.pop(next(iter(self._trees))), ignore_errors=True)
            self._trees[commit] = tree
        return self._trees[commit]

    def changed(self, old: str, new: str) -> frozenset[str]:
        if (old, new) not in self._changed:
            self.fetch(old)
            self.fetch(new)
            out = _git("--git-dir", self.cache, "diff", "--name-only", "--no-renames", old, new)
            self._changed[(old, new)] = frozenset(out.decode().split("\n")) - {""}
        return self._changed[(old, new)]

    def overlays(self, commit: str, overlay: str) -> list[str]:
        """The app directories under ``overlay`` at ``commit``: those holding a kustomization."""
        self.fetch(commit)
        out = _git("--git-dir", self.cache, "ls-tree", "-r", "--name-only", commit, "--", f"{overlay}/")
        apps = set()
        for name in out.decode().splitlines():
            parts = name[len(overlay) + 1 :].split("/")
            if len(parts) == 2 and parts[1] in OVERLAY_FILES:
                apps.add(parts[0])
        return sorted(apps)


@dataclass(frozen=True)
class _Render:
    """One Application's manifests at a commit, and the paths they were made from."""

    path: str
    commit: str
    inputs: frozenset[str]
    objects: tuple[Obj, ...] = ()
    error: str = ""


@dataclass
class _Tracked:
    """What the controller keeps per Application between ticks (Argo CD keeps it in the status and
    its caches)."""

    next_compare: float = 0.0  # monotonic; 0: at once
    comparison: Comparison | None = None
    operation: SyncOutcome | None = None
    conditions: tuple[tuple[str, str], ...] = ()
    written: Obj = field(default_factory=dict)  # the last status written
    reconciled_at: str = ""


def operation_of(status: Obj) -> SyncOutcome | None:
    """The last sync operation as ``status.operationState`` holds it."""
    state = status.get("operationState")
    if not isinstance(state, dict):
        return None
    operation = state.get("operation") or {}
    result = state.get("syncResult") or {}
    return SyncOutcome(
        revision=str(result.get("revision") or (operation.get("sync") or {}).get("revision") or ""),
        phase=str(state.get("phase", "")),
        message=str(state.get("message", "")),
        started_at=str(state.get("startedAt", "")),
        finished_at=str(state.get("finishedAt", "")),
        username=str((operation.get("initiatedBy") or {}).get("username", "")),
    )


def _path_of(app: Obj) -> str:
    return str(((app.get("spec") or {}).get("source") or {}).get("path", ""))


class ManifestsSyncer:
    """Argo CD's application controller (and an ApplicationSet generator) for one cluster."""

    def __init__(
        self,
        *,
        cluster: str,
        repo: str,
        api_url: str,
        argocd_api_url: str,
        stop: threading.Event,
        overlay: str | None = None,
        application: str = "{app}-{cluster}",
        reconcile_seconds: float = RECONCILE_SECONDS,
        jitter_seconds: float = JITTER_SECONDS,
        tick: float = 0.5,
        branch: str = "main",
        argocd_namespace: str = "argocd",
    ) -> None:
        self.cluster = cluster
        self.repo = repo
        self.branch = branch
        self.overlay = (overlay or f"overlays/{cluster}").strip("/")
        self.application = application
        self.target = Kube(api_url, cluster)
        self.argocd = Kube(argocd_api_url, "argocd")
        self.namespace = argocd_namespace
        self.stop = stop
        self.reconcile_seconds = reconcile_seconds
        self.jitter_seconds = jitter_seconds
        self.tick = tick
        self._git: _Repo | None = None
        self._next_generate = 0.0
        self._renders: dict[str, _Render] = {}
        self._apps: dict[str, _Tracked] = {}
        self._said = ""

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix=f"twincd-argocd-{self.cluster}-") as work:
            self._git = _Repo(self.repo, Path(work))
            try:
                while True:
                    self.reconcile_once()
                    if self.stop.wait(self.tick):
                        break
            finally:
                self.target.close()
                self.argocd.close()

    def _say_once(self, message: str) -> None:
        """Warn once per distinct message, not every tick (an empty repo before its first push)."""
        if message != self._said:
            log.warning("argocd %s: %s", self.cluster, message)
        self._said = message

    def _next(self) -> float:
        return time.monotonic() + self.reconcile_seconds + random.uniform(0, self.jitter_seconds)

    def reconcile_once(self) -> None:
        heads: dict[str, str] = {}  # targetRevision -> commit, resolved once per tick
        try:
            if time.monotonic() >= self._next_generate:
                self._generate(self._resolve(self.branch, heads))
                self._next_generate = self._next()
            listed = self.argocd.list("argoproj.io/v1alpha1", "Application", self.namespace)
        except (TransientError, *KUBE_ERRORS) as e:
            self._say_once(str(e))
            return
        self._said = ""
        for app in listed.get("items") or []:
            if ((app.get("spec") or {}).get("destination") or {}).get("name") != self.cluster:
                continue
            name = str(app["metadata"]["name"])
            try:
                self._reconcile(app, heads)
            except (TransientError, *KUBE_ERRORS) as e:  # the next tick tries again
                log.warning("application %s: %s", name, e)

    def _resolve(self, revision: str, heads: dict[str, str]) -> str:
        if _SHA.match(revision):
            return revision
        if revision not in heads:
            heads[revision] = remote_head(self.repo, revision)
        return heads[revision]

    # --- the ApplicationSet generator -------------------------------------------------------------

    def _generate(self, head: str) -> None:
        assert self._git is not None
        for app in self._git.overlays(head, self.overlay):
            name = self.application.format(app=app, cluster=self.cluster)
            key = ResourceKey("argoproj.io/v1alpha1", "Application", self.namespace, name)
            if self.argocd.get(key) is not None:
                continue
            self.argocd.ensure_namespace(self.namespace)
            with contextlib.suppress(Conflict):  # created in between
                self.argocd.create(
                    {
                        "apiVersion": "argoproj.io/v1alpha1",
                        "kind": "Application",
                        "metadata": {
                            "name": name,
                            "namespace": self.namespace,
                            "labels": {"twincd.io/app": app, "twincd.io/cluster": self.cluster},
                        },
                        "spec": {
                            "project": "default",
                            "source": {
                                "repoURL": self.repo,
                                "path": f"{self.overlay}/{app}",
                                "targetRevision": self.branch,
                            },
                            "destination": {"name": self.cluster},
                            "syncPolicy": {"automated": {"prune": False, "selfHeal": False}},
                        },
                    }
                )
                log.info("created Application %s (path %s/%s)", name, self.overlay, app)

    # --- the application controller ---------------------------------------------------------------

    def _reconcile(self, app: Obj, heads: dict[str, str]) -> None:
        meta = app["metadata"]
        key = f"{meta['name']}/{meta.get('uid', '')}"  # a re-created Application starts afresh
        tracked = self._apps.setdefault(key, _Tracked())
        spec, status = app.get("spec") or {}, app.get("status") or {}
        # The status is the truth, as for Argo CD: a sync request clears operationState.
        tracked.operation = operation_of(status)
        source = spec.get("source") or {}
        target_revision = str(source.get("targetRevision", self.branch))
        refresh = REFRESH in (meta.get("annotations") or {})
        operation = app.get("operation")
        compared = ((status.get("sync") or {}).get("comparedTo") or {}).get("source")
        if isinstance(operation, dict) and isinstance(operation.get("sync"), dict):
            revision = str(operation["sync"].get("revision") or target_revision)
            username = str((operation.get("initiatedBy") or {}).get("username", "")) or "admin"
            self._sync(app, key, tracked, self._resolve(revision, heads), username)
            self._compare(app, key, tracked, target_revision, heads)
            self._write(app, tracked, drop_refresh=refresh, drop_operation=True)
        elif refresh or time.monotonic() >= tracked.next_compare or compared != source:
            self._compare(app, key, tracked, target_revision, heads)
            comparison = tracked.comparison
            if automated(app) and comparison is not None and comparison.status == "OutOfSync":
                self._auto_sync(app, key, tracked, comparison.revision)
            self._write(app, tracked, drop_refresh=refresh)
        else:
            self._write(app, tracked)  # health only

    def _render(self, key: str, path: str, commit: str) -> _Render:
        """The Application's manifests at ``commit``: rendered again only when a commit since the
        last render touched a path the overlay reads (a failed render is always tried again: the
        fix may add a path it could not read)."""
        assert self._git is not None
        last = self._renders.get(key)
        if last is not None and last.path == path and last.commit == commit:
            return last
        if (
            last is not None
            and last.path == path
            and not last.error
            and UNKNOWN not in last.inputs
            and not touches(self._git.changed(last.commit, commit), last.inputs)
        ):
            kept = replace(last, commit=commit)
        else:
            tree = self._git.tree(commit)
            inputs = kustomize_inputs(tree, path)
            if not (tree / path).is_dir():
                kept = _Render(path, commit, inputs, error=f"{path}: app path does not exist")
            else:
                try:
                    kept = _Render(
                        path, commit, inputs, tuple(apply_order(render_overlay(tree / path, tree)))
                    )
                except PermanentError as e:
                    kept = _Render(
                        path, commit, inputs, error=f"`kustomize build {path}` failed exit status 1: {e}"
                    )
            log.info("rendered %s at %s", key.partition("/")[0], commit[:12])
        self._renders[key] = kept
        return kept

    def _placed(self, render: _Render, app: Obj) -> tuple[Obj, ...]:
        """The rendered objects as the cluster holds them: namespaced, tracked by the Application."""
        name = str(app["metadata"]["name"])
        objects = place_namespaces(render.objects, namespaced=self.target.namespaced)
        return tuple(self._tracked(o, name) for o in objects)

    def _compare(
        self, app: Obj, key: str, tracked: _Tracked, target_revision: str, heads: dict[str, str]
    ) -> None:
        """Argo CD's CompareAppState: ``reconciledAt`` is when it started; a render that fails shows
        the unresolved ``targetRevision`` (controller/state.go: ``syncStatus.Revision = revisions[0]``)."""
        tracked.reconciled_at = format_time(datetime.now(UTC))
        tracked.next_compare = self._next()
        head = self._resolve(target_revision, heads)
        render = self._render(key, _path_of(app), head)
        previous = tracked.comparison
        if render.error:
            # Argo CD keeps showing the resources it knew, with the error as a condition.
            message = (
                "Failed to load target state: failed to generate manifest for source 1 of 1: "
                f"rpc error: code = Unknown desc = {render.error}"
            )
            tracked.comparison = Comparison(
                target_revision,
                "Unknown",
                previous.resources if previous else (),
                previous.images if previous else (),
                message,
            )
            tracked.conditions = (("ComparisonError", message),)
            return
        objects = self._placed(render, app)
        in_sync = all(is_in_sync(o, self.target.get(ResourceKey.of(o))) for o in objects)
        images = {i for o in objects if o.get("kind") == "Deployment" for i in template_images(o)}
        tracked.comparison = Comparison(
            head,
            "Synced" if in_sync else "OutOfSync",
            tuple(ResourceKey.of(o) for o in objects),
            tuple(sorted(images)),
        )
        tracked.conditions = ()

    def _auto_sync(self, app: Obj, key: str, tracked: _Tracked, revision: str) -> None:
        last = tracked.operation
        if last is not None and last.revision == revision and last.phase != "Running":
            # Argo CD's alreadyAttemptedSync (operationState's revision, whoever started it): one
            # attempt per revision without selfHeal, so an Application that stays OutOfSync is not
            # synced in a loop; a failed one says so and waits for a new commit.
            if last.phase != "Succeeded":
                tracked.conditions = (("SyncError", sync_error(last)),)
            return
        self._sync(app, key, tracked, revision, "")
        self._compare(app, key, tracked, revision, {})
        if tracked.operation is not None and tracked.operation.phase != "Succeeded":
            tracked.conditions = (*tracked.conditions, ("SyncError", sync_error(tracked.operation)))

    def _sync(self, app: Obj, key: str, tracked: _Tracked, revision: str, username: str) -> None:
        """One sync operation at ``revision``: Running is written first, as Argo CD does."""
        started = format_time(datetime.now(UTC))
        tracked.operation = SyncOutcome(
            revision, "Running", "one or more tasks are running", started, "", username
        )
        self._write(app, tracked)
        render = self._render(key, _path_of(app), revision)

        def ended(phase: str, message: str) -> SyncOutcome:
            return SyncOutcome(revision, phase, message, started, format_time(datetime.now(UTC)), username)

        if render.error:
            tracked.operation = ended("Failed", f"ComparisonError: {render.error}")
            return
        try:
            for obj in self._placed(render, app):
                # Argo CD's ``CreateNamespace=true`` option: a missing destination namespace is created.
                self.target.ensure_namespace(obj["metadata"].get("namespace", ""))
                apply_object(self.target, obj)
        except KUBE_ERRORS as e:
            tracked.operation = ended("Failed", f"one or more objects failed to apply, reason: {e}")
        else:
            tracked.operation = ended("Succeeded", "successfully synced (all tasks run)")
        log.info("synced %s at %s: %s", app["metadata"]["name"], revision[:12], tracked.operation.phase)

    def _tracked(self, obj: Obj, application: str) -> Obj:
        """Argo CD 3's default resource tracking: an annotation naming the owning Application."""
        key = ResourceKey.of(obj)
        meta = dict(obj.get("metadata", {}))
        tracking = f"{application}:{key.group}/{key.kind}:{key.namespace}/{key.name}"
        meta["annotations"] = {**(meta.get("annotations") or {}), "argocd.argoproj.io/tracking-id": tracking}
        return {**obj, "metadata": meta}

    def _health(self, comparison: Comparison | None) -> tuple[Health, dict[ResourceKey, Health]]:
        if comparison is None or not comparison.resources:
            return Health(MISSING, "no resources synced yet"), {}
        per: dict[ResourceKey, Health] = {}
        for key in comparison.resources:
            if key.kind == "Deployment":
                per[key] = deployment_health(self.target.get(key))
        return application_health(list(per.values())), per

    def _write(
        self, app: Obj, tracked: _Tracked, *, drop_refresh: bool = False, drop_operation: bool = False
    ) -> None:
        """Write the Application's status when it changed (health is re-read on every call); the
        refresh annotation is removed once a comparison is written, the ``operation`` once it ran.

        Argo CD's CRD declares no status subresource: status is written with the object, by PUT at
        the read resourceVersion; on a conflict the Application is read again, and a refresh
        annotation set in between stays for the next tick."""
        if tracked.comparison is None:
            return
        try:
            health, per = self._health(tracked.comparison)
        except KUBE_ERRORS as e:
            health, per = Health("Unknown", str(e)), {}
        source = (app.get("spec") or {}).get("source") or {}
        status = application_status(
            tracked.comparison,
            tracked.operation,
            health,
            per,
            source,
            tracked.conditions,
            tracked.reconciled_at,
        )
        if status == tracked.written and not (drop_refresh or drop_operation):
            return
        seen_stamp = (app["metadata"].get("annotations") or {}).get(REFRESH_TIMESTAMP)
        key = ResourceKey.of(app)
        live: Obj | None = app
        for _ in range(5):
            if live is None:
                return  # deleted meanwhile
            body = copy.deepcopy(live)
            annotations = body["metadata"].get("annotations") or {}
            if drop_refresh and annotations.get(REFRESH_TIMESTAMP) == seen_stamp:
                # Both go, unless a new request (a new timestamp) came while this one was handled.
                annotations.pop(REFRESH, None)
                annotations.pop(REFRESH_TIMESTAMP, None)
            if drop_operation:
                body.pop("operation", None)
            body["status"] = status
            try:
                self.argocd.replace(body)
            except Conflict:
                live = self.argocd.get(key)
                continue
            tracked.written = status
            return
        raise Conflict(f"cluster argocd: Application {key.namespace}/{key.name}: still conflicting")
