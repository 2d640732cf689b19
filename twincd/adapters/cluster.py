"""Cluster adapter: the official ``kubernetes`` client, one per kubeconfig context.

SDK types and errors stay in here: callers get plain dicts (the objects as ``kubectl get -o json``
prints them), RolloutVerdicts, and ClusterError subclasses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from twincd.domain import Phase, RolloutVerdict
from twincd.errors import PermanentError, TransientError
from twincd.rollout import application_verdict, combine, workload_verdict

REQUEST_TIMEOUT = (3.0, 10.0)  # connect, read: a cluster that is down must not hang a deploy


class ClusterError(TransientError):
    """The API server could not be reached or answered 5xx/429."""


class ClusterDenied(PermanentError):
    """401/403, or a kubeconfig/context that does not exist."""


@dataclass(frozen=True)
class ClusterRef:
    name: str
    context: str
    kubeconfig: str | None = None


def api_client(ref: ClusterRef) -> k8s.ApiClient:
    cfg = k8s.Configuration()
    try:
        k8s_config.load_kube_config(config_file=ref.kubeconfig, context=ref.context, client_configuration=cfg)
    except (ConfigException, FileNotFoundError) as e:
        raise ClusterDenied(f"cluster {ref.name}: cannot load kubeconfig context {ref.context!r}: {e}") from e
    # One attempt per call: our own loop owns retries and deadlines (urllib3 would retry silently).
    cfg.retries = 0
    return k8s.ApiClient(cfg)


def _translate(ref: ClusterRef, what: str, e: Exception) -> Exception:
    if isinstance(e, ApiException):
        if e.status in (401, 403):
            return ClusterDenied(f"cluster {ref.name}: {what}: access denied ({e.status} {e.reason}); "
                                 f"check the credentials of context {ref.context!r}")
        return ClusterError(f"cluster {ref.name}: {what}: HTTP {e.status} {e.reason}")
    return ClusterError(f"cluster {ref.name}: {what}: API server unreachable ({type(e).__name__})")


def _get(ref: ClusterRef, api: k8s.ApiClient, what: str, call: Callable[..., Any]) -> dict[str, Any] | None:
    try:
        resp = call(_preload_content=False, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as e:
        if e.status == 404:
            return None
        raise _translate(ref, what, e) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(ref, what, e) from e
    data: dict[str, Any] = json.loads(resp.data)
    return data


_WORKLOAD_READERS = {
    "Deployment": "read_namespaced_deployment",
    "StatefulSet": "read_namespaced_stateful_set",
    "DaemonSet": "read_namespaced_daemon_set",
}


def read_workload(ref: ClusterRef, api: k8s.ApiClient, *, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    reader = getattr(k8s.AppsV1Api(api), _WORKLOAD_READERS[kind])
    return _get(ref, api, f"read {kind} {namespace}/{name}", lambda **kw: reader(name, namespace, **kw))


def read_application(ref: ClusterRef, api: k8s.ApiClient, *, namespace: str, name: str) -> dict[str, Any] | None:
    objs = k8s.CustomObjectsApi(api)
    return _get(ref, api, f"read Application {namespace}/{name}",
                lambda **kw: objs.get_namespaced_custom_object("argoproj.io", "v1alpha1", namespace,
                                                               "applications", name, **kw))


@dataclass(frozen=True)
class RolloutTarget:
    """What one cluster must show for a release to be verified there."""

    cluster: ClusterRef
    argocd: ClusterRef | None  # where the Application lives (one Argo CD may manage both clusters)
    application: str | None
    argocd_namespace: str
    kind: str
    namespace: str
    name: str
    revision: str  # the merge commit
    digest: str | None = None  # None: any image (e.g. a failover only changes replicas)


def observe(target: RolloutTarget, clients: dict[str, k8s.ApiClient]) -> RolloutVerdict:
    """One look at the cluster (and its Argo CD): the verdict as of now."""
    name = target.cluster.name
    workload = read_workload(target.cluster, clients["cluster"], kind=target.kind,
                             namespace=target.namespace, name=target.name)
    if workload is None:
        w = RolloutVerdict(name, Phase.PROGRESSING, f"{target.kind} {target.namespace}/{target.name} not found yet")
    else:
        w = workload_verdict(workload, cluster=name, digest=target.digest)
    if target.argocd is None or target.application is None:
        return w
    app = read_application(target.argocd, clients["argocd"], namespace=target.argocd_namespace,
                           name=target.application)
    if app is None:
        a = RolloutVerdict(name, Phase.PROGRESSING,
                           f"Application {target.argocd_namespace}/{target.application} not found yet")
    else:
        a = application_verdict(app, cluster=name, revision=target.revision)
    return combine(a, w)


def verify_rollout(target: RolloutTarget, *, timeout: float, interval: float = 0.5) -> RolloutVerdict:
    """Wait until the rollout succeeded or failed, or the deadline passed.

    An unreachable API is retried until the deadline, then reported as the cluster's failure with
    the reason; a permanent error (denied, bad kubeconfig) fails at once.
    """
    deadline = time.monotonic() + timeout
    clients = {"cluster": api_client(target.cluster)}
    if target.argocd is not None:
        clients["argocd"] = api_client(target.argocd)
    last: RolloutVerdict | None = None
    last_error: ClusterError | None = None
    try:
        while True:
            try:
                last = observe(target, clients)
                last_error = None
                if last.phase is not Phase.PROGRESSING:
                    return last
            except ClusterError as e:
                last_error = e
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
    finally:
        for c in clients.values():
            c.close()
    if last_error is not None:
        return RolloutVerdict(target.cluster.name, Phase.FAILED, str(last_error))
    assert last is not None
    return RolloutVerdict(target.cluster.name, Phase.FAILED,
                          f"not rolled out after {timeout:.0f}s: {last.message}", last.details)
