"""Cluster adapter: the official ``kubernetes`` client, one per kubeconfig context.

SDK types and errors stay in here: callers get plain dicts (the objects as ``kubectl get -o json``
prints them), RolloutVerdicts, ApplyResults, and ClusterError subclasses.

Verification is list-then-watch, the informer pattern of client-go: each collection it looks at
(the workload, its pods, the Argo CD Application) is listed once, then watched from the list's
resourceVersion by a thread of its own; every change re-evaluates the verdict at once, so success
or failure is noticed as soon as the objects get there, not at the next poll.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from twincd.domain import AppliedObject as AppliedObject  # re-exported: the adapter's results
from twincd.domain import ApplyResult as ApplyResult
from twincd.domain import ClusterRef as ClusterRef
from twincd.domain import Phase, RolloutVerdict
from twincd.domain import RolloutTarget as RolloutTarget
from twincd.errors import PermanentError, TransientError, TwincdError
from twincd.rollout import (
    application_verdict,
    automated,
    combine,
    label_selector,
    pods_verdict,
    synced_at,
    workload_verdict,
)

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (3.0, 10.0)  # connect, read: a cluster that is down must not hang a deploy
# Server-side timeoutSeconds of one watch request. The stream then resumes from its last
# resourceVersion; the read timeout of the request is this plus REQUEST_TIMEOUT's, because a quiet
# watch sends nothing until the server ends it.
WATCH_SECONDS = 60
_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)  # seconds between attempts on an unreachable API server
_APPLY_PATCH = "application/apply-patch+yaml"


class ClusterError(TransientError):
    """The API server could not be reached or answered 5xx/429."""


class ClusterDenied(PermanentError):
    """401/403, or a kubeconfig/context that does not exist."""


class ClusterRefused(PermanentError):
    """The API server refused a request (4xx other than 401/403): retrying the same one cannot help."""


class ApplyRejected(ClusterRefused):
    """The API server refused an object of the overlay (invalid, or a kind it does not serve)."""


def api_client(ref: ClusterRef) -> k8s.ApiClient:
    cfg = k8s.Configuration()
    try:
        k8s_config.load_kube_config(config_file=ref.kubeconfig, context=ref.context, client_configuration=cfg)
    except (ConfigException, FileNotFoundError) as e:
        raise ClusterDenied(
            f"cluster {ref.name}: cannot load kubeconfig context {ref.context!r}: {e}"
        ) from None
    # One attempt per call: our own loop owns retries and deadlines (urllib3 would retry silently).
    cfg.retries = 0
    return k8s.ApiClient(cfg)


def _status_error(
    ref: ClusterRef,
    what: str,
    status: int,
    reason: str,
    body: bytes = b"",
    *,
    refused: type[ClusterRefused] = ClusterRefused,
) -> TwincdError:
    """The error for a non-2xx answer; the server's Status message is kept, trimmed."""
    if status in (401, 403):
        return ClusterDenied(
            f"cluster {ref.name}: {what}: access denied ({status} {reason}); "
            f"check the credentials of context {ref.context!r}"
        )
    if status == 429 or status >= 500:
        return ClusterError(f"cluster {ref.name}: {what}: HTTP {status} {reason}")
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = ""
    return refused(
        f"cluster {ref.name}: {what}: HTTP {status} {reason}" + (f": {message[:500]}" if message else "")
    )


def _request(
    ref: ClusterRef,
    api: k8s.ApiClient,
    what: str,
    method: str,
    path: str,
    *,
    query: Sequence[tuple[str, str]] = (),
    body: Any = None,
    content_type: str = "application/json",
    timeout: tuple[float, float] = REQUEST_TIMEOUT,
) -> Any:
    """One HTTP call through the client (its auth, TLS and exec plugins); the urllib3 response,
    unread, so a watch can stream it. Only an unreachable server raises here."""
    try:
        request = api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        return api.call_api(*request, _request_timeout=timeout).response
    except ApiException as e:  # the client's wrapper around TLS failures (status 0)
        raise ClusterError(f"cluster {ref.name}: {what}: API server unreachable ({e.reason})") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise ClusterError(
            f"cluster {ref.name}: {what}: API server unreachable ({type(e).__name__})"
        ) from None


def _read_json(
    ref: ClusterRef,
    api: k8s.ApiClient,
    what: str,
    method: str,
    path: str,
    *,
    refused: type[ClusterRefused] = ClusterRefused,
    **kw: Any,
) -> tuple[int, Any]:
    response = _request(ref, api, what, method, path, **kw)
    try:
        data = response.data
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise ClusterError(f"cluster {ref.name}: {what}: connection lost ({type(e).__name__})") from None
    if not 200 <= response.status <= 299:
        if response.status == 404:
            return 404, None
        raise _status_error(ref, what, response.status, response.reason, data, refused=refused)
    return response.status, json.loads(data)


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


_WORKLOAD_PLURALS = {"Deployment": "deployments", "StatefulSet": "statefulsets", "DaemonSet": "daemonsets"}


@dataclass(frozen=True)
class _Source:
    """One collection to list and watch on one cluster, narrowed by selectors."""

    key: str  # "workload", "pods" or "application"
    ref: ClusterRef
    what: str  # for messages, e.g. "Deployment hello/hello"
    path: str
    selectors: tuple[tuple[str, str], ...]  # ("fieldSelector", "metadata.name=hello"), ...


def _sources(target: RolloutTarget) -> list[_Source]:
    ns, name = target.namespace, target.name
    plural = _WORKLOAD_PLURALS.get(target.kind)
    if plural is None:
        raise PermanentError(
            f"cluster {target.cluster.name}: no rollout status for kind {target.kind!r}: "
            f"only {', '.join(_WORKLOAD_PLURALS)} are supported"
        )
    sources = [
        _Source(
            "workload",
            target.cluster,
            f"{target.kind} {ns}/{name}",
            f"/apis/apps/v1/namespaces/{ns}/{plural}",
            (("fieldSelector", f"metadata.name={name}"),),
        )
    ]
    if target.argocd is not None and target.application is not None:
        sources.append(
            _Source(
                "application",
                target.argocd,
                f"Application {target.argocd_namespace}/{target.application}",
                f"/apis/argoproj.io/v1alpha1/namespaces/{target.argocd_namespace}/applications",
                (("fieldSelector", f"metadata.name={target.application}"),),
            )
        )
    return sources


def _pods_source(target: RolloutTarget, workload: Mapping[str, Any]) -> _Source:
    spec = workload.get("spec")
    selector = spec.get("selector") if isinstance(spec, Mapping) else None
    query = label_selector(selector) if isinstance(selector, Mapping) else ""
    return _Source(
        "pods",
        target.cluster,
        f"pods of {target.kind} {target.namespace}/{target.name}",
        f"/api/v1/namespaces/{target.namespace}/pods",
        (("labelSelector", query),) if query else (),
    )


def _list(source: _Source, api: k8s.ApiClient) -> tuple[dict[str, dict[str, Any]], str]:
    """The objects by name, and the resourceVersion to watch from."""
    status, body = _read_json(
        source.ref, api, f"list {source.what}", "GET", source.path, query=source.selectors
    )
    if status == 404:
        raise ClusterDenied(
            f"cluster {source.ref.name}: list {source.what}: the API server does not serve "
            f"{source.path} (is the CRD installed?)"
        )
    items = body.get("items") or []
    return {str(o["metadata"]["name"]): o for o in items}, str(body["metadata"].get("resourceVersion", ""))


class _Expired(Exception):
    """410 Gone: the resourceVersion is older than the server keeps; relist."""


class _Dropped(Exception):
    """The watch connection broke mid-stream; resume from the last resourceVersion."""


@dataclass(frozen=True)
class _Seen:
    """What a stream reports: the objects it holds now, or the error it is retrying (or died of)."""

    key: str
    objects: tuple[dict[str, Any], ...] = ()
    error: TwincdError | None = None


class _Stream:
    """List once, then watch from the resourceVersion, forever: a dropped or timed-out watch resumes
    from the last version seen, a 410 relists, an unreachable server is retried with a backoff.

    Its own loop rather than ``kubernetes.watch.Watch.stream``: that one gives no sign that the watch
    connected (so a recovered server would stay reported as down until an event came), retries a
    410 by itself only once, and fails on ERROR events when not deserialising.
    """

    def __init__(
        self, source: _Source, api: k8s.ApiClient, out: queue.Queue[_Seen], *, watch_seconds: int
    ) -> None:
        self.source = source
        self._api = api
        self._out = out
        self._watch_seconds = watch_seconds
        self._stop = threading.Event()
        self._response: Any = None
        self._objects: dict[str, dict[str, Any]] = {}
        self._resource_version = ""
        self._failing = False
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"twincd-watch-{source.ref.name}-{source.key}"
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            # Unblocks a read waiting for the next event; the thread then sees the stop flag.
            with contextlib.suppress(Exception):
                response.shutdown()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the loop to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _report(self) -> None:
        self._failing = False
        self._out.put(_Seen(self.source.key, tuple(self._objects.values())))

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if not self._resource_version:
                    self._objects, self._resource_version = _list(self.source, self._api)
                    self._report()
                self._watch()
                failures = 0
            except _Expired:
                log.info(
                    "%s: watch from resourceVersion %s expired (410): relisting",
                    self.source.what,
                    self._resource_version,
                )
                self._resource_version = ""
            except _Dropped as e:
                log.info(
                    "%s: watch dropped (%s): resuming from resourceVersion %s",
                    self.source.what,
                    e,
                    self._resource_version,
                )
            except PermanentError as e:
                self._out.put(_Seen(self.source.key, error=e))
                return
            except TwincdError as e:
                if self._stop.is_set():
                    return
                self._failing = True
                self._out.put(_Seen(self.source.key, error=e))
                self._stop.wait(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                failures += 1

    def _watch(self) -> None:
        source = self.source
        query = (
            *source.selectors,
            ("watch", "true"),
            ("resourceVersion", self._resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self._watch_seconds)),
        )
        if self._stop.is_set():  # the verdict may have been reached on the list just reported
            return
        response = _request(
            source.ref,
            self._api,
            f"watch {source.what}",
            "GET",
            source.path,
            query=query,
            timeout=(REQUEST_TIMEOUT[0], self._watch_seconds + REQUEST_TIMEOUT[1]),
        )
        self._response = response
        try:
            if self._stop.is_set():  # stop() ran before there was a response for it to shut down
                return
            if response.status == 410:
                raise _Expired
            if not 200 <= response.status <= 299:
                raise _status_error(
                    source.ref, f"watch {source.what}", response.status, response.reason, response.data
                )
            log.debug("%s: watching from resourceVersion %s", source.what, self._resource_version)
            if self._failing:  # connected again: the verifier must stop counting this stream as down
                self._report()
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    return
                if line.strip():
                    try:
                        event = json.loads(line)
                    except ValueError:  # a line cut short by a breaking connection
                        raise _Dropped("unreadable event") from None
                    self._event(event)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            if not self._stop.is_set():
                raise _Dropped(type(e).__name__) from None
        finally:
            self._response = None
            # Closed, not just released: a connection with unread events must never be reused.
            response.close()
            response.release_conn()
        log.debug("%s: watch ended by the server at resourceVersion %s", source.what, self._resource_version)

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired
            raise ClusterError(
                f"cluster {self.source.ref.name}: watch {self.source.what}: "
                f"{obj.get('reason', 'error')}: {obj.get('message', '')}"
            )
        meta = obj.get("metadata") or {}
        self._resource_version = str(meta.get("resourceVersion", self._resource_version))
        log.debug("%s: %s at resourceVersion %s", self.source.what, kind, self._resource_version)
        if kind == "BOOKMARK":  # only moves the version forward, so a resume does not hit 410
            return
        if kind == "DELETED":
            self._objects.pop(str(meta.get("name")), None)
        else:
            self._objects[str(meta.get("name"))] = obj
        self._report()


def _evaluate(
    target: RolloutTarget,
    seen: Mapping[str, tuple[dict[str, Any], ...]],
    refreshed: Callable[[Mapping[str, Any]], bool] = lambda app: False,
) -> RolloutVerdict:
    """The verdict from what the streams hold now (a key is absent until its first list)."""
    name = target.cluster.name
    workloads = seen.get("workload")
    if not workloads:
        what = "being listed" if workloads is None else "not found yet"
        w = RolloutVerdict(name, Phase.PROGRESSING, f"{target.kind} {target.namespace}/{target.name} {what}")
    else:
        workload = {**workloads[0], "kind": target.kind}  # LIST items carry no kind
        w = workload_verdict(workload, cluster=name, digest=target.digest, repository=target.repository)
        spec = workload.get("spec")
        scaled_to_zero = isinstance(spec, Mapping) and spec.get("replicas") == 0
        if w.phase is Phase.SUCCEEDED and target.digest is not None and not scaled_to_zero:
            pods = seen.get("pods")
            p = (
                pods_verdict(workload, pods, cluster=name, digest=target.digest)
                if pods is not None
                else RolloutVerdict(name, Phase.PROGRESSING, "pods being listed")
            )
            w = combine(w, p)
    if target.argocd is None or target.application is None:
        return w
    apps = seen.get("application")
    if not apps:
        what = "being listed" if apps is None else "not found yet"
        return RolloutVerdict(
            name,
            Phase.PROGRESSING,
            f"Application {target.argocd_namespace}/{target.application} {what}",
            w.details,
        )
    revision = _effective_revision(apps[0], target)
    a = application_verdict(apps[0], cluster=name, revision=revision, errors_current=refreshed(apps[0]))
    if not synced_at(apps[0], revision):
        # The live workload is still an older revision's: its state cannot decide this release (nor
        # explain why Argo CD cannot reach it).
        return RolloutVerdict(name, a.phase, a.message, a.details + w.details)
    return combine(a, w)


def _effective_revision(app: Mapping[str, Any], target: RolloutTarget) -> str:
    """The synced revision of the Application when it is a later commit that holds the merge
    commit (never a branch name: Argo CD shows ``main`` while manifests fail to load), else the
    merge commit."""
    synced = app.get("status", {}).get("sync", {}).get("revision")
    if _holds(synced, target) and isinstance(synced, str) and not synced.startswith(target.revision[:7]):
        return synced
    return target.revision


# Argo CD's refresh request: the application controller compares the Application with the latest
# git revision at once (resolving the branch anew), then removes both annotations, the timestamp
# only if it is still the one it saw (argo-cd util/argo/argo.go RefreshApp, controller/
# appcontroller.go handleRefreshAnnotation). Without it Argo CD looks at git only every
# timeout.reconciliation (120-180 s, plus up to 60 s of jitter).
REFRESH_ANNOTATION = "argocd.argoproj.io/refresh"
REFRESH_TIMESTAMP = "argocd.argoproj.io/refresh-timestamp"
_MERGE_PATCH = "application/merge-patch+json"
SYNC_INITIATOR = "twincd"
_SYNC_REQUEST_SECONDS = 5.0  # at most one sync request per this while verifying


def _application_path(target: RolloutTarget) -> str:
    return (
        f"/apis/argoproj.io/v1alpha1/namespaces/{target.argocd_namespace}/applications/{target.application}"
    )


def _what(target: RolloutTarget) -> str:
    return f"Application {target.argocd_namespace}/{target.application}"


def request_refresh(target: RolloutTarget, api: k8s.ApiClient) -> str | None:
    """Ask Argo CD to compare the Application with git now, as ``argocd app get --refresh`` does (a
    merge patch of the refresh annotation and a unique timestamp; RBAC: ``patch``). Returns the
    timestamp (its removal says Argo CD reconciled the request), None when there is no such
    Application yet."""
    assert target.argocd is not None
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = {"metadata": {"annotations": {REFRESH_ANNOTATION: "normal", REFRESH_TIMESTAMP: stamp}}}
    status, _ = _read_json(
        target.argocd, api, f"refresh {_what(target)}", "PATCH", _application_path(target),
        body=body, content_type=_MERGE_PATCH,
    )  # fmt: skip
    return None if status == 404 else stamp


def _holds(revision: object, target: RolloutTarget) -> bool:
    """Whether a revision Argo CD reports is a commit that holds ``target.revision``. Argo CD reports
    the unresolved ``targetRevision`` (``main``) while manifests fail to load: that is no commit."""
    if not isinstance(revision, str) or not re.fullmatch(r"[0-9a-f]{40}", revision):
        return False
    if revision.startswith(target.revision.lower()):
        return True
    return target.contains is not None and target.contains(revision)


def sync_wanted(app: Mapping[str, Any], target: RolloutTarget) -> bool:
    """Whether twincd must request a sync: a manual Application, no operation in progress, not
    Synced at a commit that holds the release, and no sync of the release attempted yet (a failed
    one is the verdict's to report, not to retry)."""
    if automated(app) or app.get("operation") is not None:
        return False
    status = app.get("status") or {}
    sync = status.get("sync") or {}
    if sync.get("status") == "Synced" and _holds(sync.get("revision"), target):
        return False
    operation = (status.get("operationState") or {}).get("operation") or {}
    return not _holds((operation.get("sync") or {}).get("revision"), target)


def request_sync(target: RolloutTarget, api: k8s.ApiClient) -> str:
    """Request a sync of a manual Application to ``target.revision`` as ``argocd app sync`` does
    (argo-cd util/argo/argo.go ``SetAppOperation``: an update that sets ``operation`` and clears
    ``status.operationState``, left alone while another operation is in progress, read again on a
    conflict; the policy's sync options and retry go with it; RBAC: ``update``)."""
    assert target.argocd is not None
    ref, what, path = target.argocd, _what(target), _application_path(target)
    for _ in range(5):
        status, app = _read_json(ref, api, f"get {what}", "GET", path)
        if status == 404:
            return f"{what} not found"
        if not sync_wanted(app, target):
            return f"{what}: {'an operation is in progress' if app.get('operation') else 'no sync needed'}"
        policy = (app.get("spec") or {}).get("syncPolicy") or {}
        sync = {
            "revision": target.revision,
            **({"syncOptions": policy["syncOptions"]} if policy.get("syncOptions") else {}),
        }
        operation = {
            "sync": sync,
            "initiatedBy": {"username": SYNC_INITIATOR},
            **({"retry": policy["retry"]} if policy.get("retry") else {}),
        }
        kept = {k: v for k, v in (app.get("status") or {}).items() if k != "operationState"}
        body = {**app, "operation": operation, "status": kept}
        response = _request(ref, api, f"sync {what}", "PUT", path, body=body)
        if response.status == 409:  # Argo CD wrote the status in between: read it again
            continue
        if not 200 <= response.status <= 299:
            raise _status_error(ref, f"sync {what}", response.status, response.reason, response.data)
        return f"{what}: sync to {target.revision[:7]} requested (manual sync policy)"
    return f"{what}: the sync request kept conflicting; asking again at the next change"


class _ArgoCd:
    """What verification asks of Argo CD: a refresh first, then a sync whenever a manual Application
    needs one (another operation may be running when verification starts: asked again once it
    has ended)."""

    def __init__(self, target: RolloutTarget, clients: _Clients, *, refresh: bool) -> None:
        self.target = target
        self.api = clients[target.argocd] if target.argocd is not None else None
        self.enabled = refresh and self.api is not None and target.application is not None
        self.stamp: str | None = None
        self._next_sync = 0.0

    def refresh(self) -> None:
        if not self.enabled:
            return
        assert self.api is not None
        try:
            self.stamp = request_refresh(self.target, self.api)
        except TwincdError as e:
            # Not fatal: Argo CD still looks at git at its next poll (an automated Application syncs).
            log.warning(
                "cluster %s: %s; Argo CD will notice the merge at its next poll (grant patch on "
                "applications.argoproj.io to make it look at once)", self.target.cluster.name, e,
            )  # fmt: skip

    def refreshed(self, app: Mapping[str, Any]) -> bool:
        """Whether Argo CD reconciled twincd's refresh request: its timestamp is gone."""
        annotations = (app.get("metadata") or {}).get("annotations") or {}
        return self.stamp is not None and annotations.get(REFRESH_TIMESTAMP) != self.stamp

    def sync_if_wanted(self, seen: Mapping[str, Sequence[Mapping[str, Any]]]) -> RolloutVerdict | None:
        """Request the sync a manual Application needs; a FAILED verdict when Argo CD's cluster refuses."""
        apps = seen.get("application")
        if not self.enabled or not apps or not sync_wanted(apps[0], self.target):
            return None
        if time.monotonic() < self._next_sync:
            return None
        assert self.api is not None
        self._next_sync = time.monotonic() + _SYNC_REQUEST_SECONDS
        try:
            log.info("cluster %s: %s", self.target.cluster.name, request_sync(self.target, self.api))
        except ClusterError as e:  # unreachable: asked again at the next change
            log.warning("cluster %s: %s", self.target.cluster.name, e)
        except PermanentError as e:
            return RolloutVerdict(
                self.target.cluster.name,
                Phase.FAILED,
                f"{e}; twincd needs update on applications.argoproj.io in namespace "
                f"{self.target.argocd_namespace} to sync a manual Application",
            )
        return None


class _Clients:
    """One ApiClient per distinct (context, kubeconfig), shared by the streams on that cluster."""

    def __init__(self, refs: Iterable[ClusterRef]) -> None:
        self._by_context: dict[tuple[str, str | None], k8s.ApiClient] = {}
        try:
            for ref in refs:
                key = (ref.context, ref.kubeconfig)
                if key not in self._by_context:
                    self._by_context[key] = api_client(ref)
        except ClusterDenied:
            self.close()
            raise

    def __getitem__(self, ref: ClusterRef) -> k8s.ApiClient:
        return self._by_context[(ref.context, ref.kubeconfig)]

    def close(self) -> None:
        for api in self._by_context.values():
            api.close()


def verify_rollout(
    target: RolloutTarget, *, timeout: float, watch_seconds: int = WATCH_SECONDS, refresh: bool = True
) -> RolloutVerdict:
    """Wait until the rollout succeeded or failed, or the deadline passed; never raises for a cluster.

    With an Argo CD Application, Argo CD is first asked to refresh it, and to sync it whenever its
    policy is manual and it needs one (:class:`_ArgoCd`); ``refresh=False`` leaves Argo CD to its
    own polling
    (benchmarks/argocd_refresh.py compares the two). The verdict is re-evaluated on every watch
    event, so it is known as soon as the objects reach it. A permanent error (denied, bad
    kubeconfig, a collection the server does not serve) fails at once; an unreachable API server
    is retried until the deadline and then is the failure's reason. ``watch_seconds`` is the
    server-side length of one watch request (shorter in tests, to show that a watch resumes).
    """
    name = target.cluster.name
    deadline = time.monotonic() + timeout
    try:
        sources = _sources(target)
        clients = _Clients(s.ref for s in sources)
    except PermanentError as e:
        return RolloutVerdict(name, Phase.FAILED, str(e))
    argocd = _ArgoCd(target, clients, refresh=refresh)
    argocd.refresh()
    out: queue.Queue[_Seen] = queue.Queue()
    streams: dict[str, _Stream] = {}
    seen: dict[str, tuple[dict[str, Any], ...]] = {}
    errors: dict[str, TwincdError] = {}

    def start(source: _Source) -> None:
        streams[source.key] = _Stream(source, clients[source.ref], out, watch_seconds=watch_seconds)
        streams[source.key].start()

    last = RolloutVerdict(name, Phase.PROGRESSING, "nothing listed yet")
    try:
        for source in sources:
            start(source)
        while (batch := _next_batch(out, deadline)) is not None:
            denied = _absorb(batch, seen, errors)
            if denied is not None:
                return RolloutVerdict(name, Phase.FAILED, str(denied))
            if "pods" not in streams and target.digest is not None and seen.get("workload"):
                # The selector is known once the workload is: it is immutable in apps/v1.
                start(_pods_source(target, seen["workload"][0]))
            last = argocd.sync_if_wanted(seen) or _evaluate(target, seen, argocd.refreshed)
            if last.phase is not Phase.PROGRESSING:
                return last
    finally:
        for stream in streams.values():
            stream.stop()
        ended = [stream.join(1.0) for stream in streams.values()]
        if all(ended):
            clients.close()
        # Otherwise a stream is inside a request (a list, up to its read timeout): closing its client
        # under it would only turn the end of that request into an error; it ends on its own, as a
        # daemon thread, and the clients are collected with it.
    if errors:
        reason = "; ".join(str(e) for e in errors.values())
        return RolloutVerdict(
            name, Phase.FAILED, f"{reason} (still failing at the {timeout:.0f}s deadline)", last.details
        )
    return RolloutVerdict(
        name, Phase.FAILED, f"not rolled out after {timeout:.0f}s: {last.message}", last.details
    )


def _next_batch(out: queue.Queue[_Seen], deadline: float) -> list[_Seen] | None:
    """The updates queued by the streams, waiting for the first until ``deadline``; None after it."""
    try:
        batch = [out.get(timeout=max(0.0, deadline - time.monotonic()))]
    except queue.Empty:
        return None
    while not out.empty():  # judge the newest state, not every step on the way to it
        batch.append(out.get_nowait())
    return batch


def _absorb(
    batch: Iterable[_Seen], seen: dict[str, tuple[dict[str, Any], ...]], errors: dict[str, TwincdError]
) -> PermanentError | None:
    """Record ``batch`` in ``seen`` and ``errors``; the permanent error among them, if any."""
    for update in batch:
        if update.error is None:
            errors.pop(update.key, None)
            seen[update.key] = update.objects
        else:
            errors[update.key] = update.error
    return next((e for e in errors.values() if isinstance(e, PermanentError)), None)


# --------------------------------------------------------------------------------------------------
# sync: apply
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    plural: str
    namespaced: bool


class _Discovery:
    """kind → (plural, namespaced) per group-version, read from the server once per apply."""

    def __init__(self, ref: ClusterRef, api: k8s.ApiClient) -> None:
        self._ref, self._api = ref, api
        self._found: dict[str, dict[str, _Kind]] = {}

    def kind(self, api_version: str, kind: str) -> _Kind:
        if api_version not in self._found:
            path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
            _, body = _read_json(self._ref, self._api, f"discover {api_version}", "GET", path)
            self._found[api_version] = {
                str(r["kind"]): _Kind(str(r["name"]), bool(r.get("namespaced")))
                for r in (body or {}).get("resources", [])
                if "/" not in str(r["name"])
            }
        found = self._found[api_version].get(kind)
        if found is None:
            raise ApplyRejected(
                f"cluster {self._ref.name}: kind {kind} of {api_version} is not served "
                f"(is its CRD installed?)"
            )
        return found


# Applied first, as kubectl and Argo CD do: the objects of the other kinds may live in them or be of them.
_FIRST = ("Namespace", "CustomResourceDefinition")


def apply_overlay(
    ref: ClusterRef, objects: Iterable[Mapping[str, Any]], *, field_manager: str = "twincd"
) -> ApplyResult:
    """Server-side apply of every rendered object of an overlay, namespaces first.

    Each object is one PATCH ``application/apply-patch+yaml`` with ``force=true``: twincd owns the
    fields it applies, even if someone changed them with kubectl since (what ``sync: apply`` is
    for). A namespaced object without a namespace goes to ``default``, as with ``kubectl apply``.
    Idempotent: applying the same objects again changes nothing. Nothing is pruned.
    """
    docs = list(objects)
    ordered = [d for d in docs if d.get("kind") in _FIRST] + [d for d in docs if d.get("kind") not in _FIRST]
    api = api_client(ref)
    try:
        discovery = _Discovery(ref, api)
        applied = []
        for doc in ordered:
            api_version, kind = str(doc.get("apiVersion") or ""), str(doc.get("kind") or "")
            meta = dict(doc.get("metadata") or {})
            name = str(meta.get("name") or "")
            if not (api_version and kind and name):
                raise ApplyRejected(
                    f"cluster {ref.name}: cannot apply an object without apiVersion, kind and "
                    f"metadata.name ({kind or '?'}/{name or '?'})"
                )
            info = discovery.kind(api_version, kind)
            namespace = str(meta.get("namespace") or "default") if info.namespaced else ""
            if namespace:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
            path = (
                f"{root}/namespaces/{namespace}/{info.plural}/{name}"
                if namespace
                else f"{root}/{info.plural}/{name}"
            )
            what = f"apply {kind} {namespace + '/' if namespace else ''}{name}"
            status, _ = _read_json(
                ref,
                api,
                what,
                "PATCH",
                path,
                body={**doc, "metadata": meta},
                content_type=_APPLY_PATCH,
                refused=ApplyRejected,
                query=(("fieldManager", field_manager), ("force", "true")),
            )
            if status == 404:  # the namespace is neither there nor in the overlay
                raise ApplyRejected(
                    f"cluster {ref.name}: {what}: HTTP 404 (does namespace {namespace!r} exist?)"
                )
            applied.append(AppliedObject(api_version, kind, namespace, name, created=status == 201))
        return ApplyResult(ref.name, tuple(applied))
    finally:
        api.close()
