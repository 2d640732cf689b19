"""Pure verdicts on rollouts: workload and Argo CD Application objects → RolloutVerdict.

The objects are plain dicts as ``kubectl get -o json`` prints them. Workload verdicts follow
``kubectl rollout status`` (kubectl/pkg/polymorphichelpers/rollout_status.go) check for check and
message for message, so what twincd reports matches what an operator sees in a terminal. Two
additions: when a digest is given, a template that does not carry it yet means the syncer has not
applied the release (progressing), and a Deployment scaled to zero is reported as standby.
``pods_verdict`` goes one step past kubectl: the running pods report the release's digest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from twincd.domain import Phase, RolloutVerdict, image_repository

# deploymentutil.TimedOutReason: the controller gave up after spec.progressDeadlineSeconds.
_TIMED_OUT = "ProgressDeadlineExceeded"


def _map(obj: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    for key in keys:
        value = obj.get(key)
        obj = value if isinstance(value, Mapping) else {}
    return obj


def _int(obj: Mapping[str, Any], key: str) -> int:
    """Go's zero value for absent counters: the API server omits zero fields from status."""
    value = obj.get(key)
    return value if isinstance(value, int) else 0


def _images(pod_spec: Mapping[str, Any]) -> Iterator[str]:
    for key in ("initContainers", "containers"):
        containers = pod_spec.get(key)
        for c in containers if isinstance(containers, list) else []:
            if isinstance(c, Mapping):
                yield str(c.get("image", ""))


def _stale_template(
    obj: Mapping[str, Any], digest: str | None, *, cluster: str, kind: str, repository: str | None
) -> RolloutVerdict | None:
    """Not yet at the release: a container of the app's image (``repository``; None: every
    container) without the digest. Sidecars and init containers from other images (a mesh proxy,
    an exporter, a migration) are not the release's and are ignored."""
    if digest is None:
        return None
    images = set(_images(_map(obj, "spec", "template", "spec")))
    name = _map(obj, "metadata").get("name", "?")
    ours = images if repository is None else {i for i in images if image_repository(i) == repository}
    if not ours:
        return RolloutVerdict(
            cluster,
            Phase.PROGRESSING,
            f'{kind} "{name}" template runs no {repository} image yet (not yet synced to {digest[:19]})',
            tuple(f"image {i}" for i in sorted(images)),
        )
    stale = sorted(i for i in ours if not i.endswith(f"@{digest}"))
    if not stale:
        return None
    return RolloutVerdict(
        cluster,
        Phase.PROGRESSING,
        f'{kind} "{name}" template still at old image (not yet synced to {digest[:19]})',
        tuple(f"image {i}" for i in stale),
    )


def deployment_verdict(
    obj: Mapping[str, Any], *, cluster: str, digest: str | None, repository: str | None = None
) -> RolloutVerdict:
    """``kubectl rollout status deployment/NAME``, plus the image check and the standby case."""
    stale = _stale_template(obj, digest, cluster=cluster, kind="deployment", repository=repository)
    if stale is not None:
        return stale
    name = _map(obj, "metadata").get("name", "?")
    status = _map(obj, "status")
    spec_replicas = _map(obj, "spec").get("replicas")
    replicas, updated = _int(status, "replicas"), _int(status, "updatedReplicas")
    available = _int(status, "availableReplicas")
    desired = "?" if spec_replicas is None else spec_replicas
    details = (f"replicas {desired} desired, {replicas} current, {updated} updated, {available} available",)

    def progressing(message: str) -> RolloutVerdict:
        return RolloutVerdict(cluster, Phase.PROGRESSING, message, details)

    if _int(_map(obj, "metadata"), "generation") > _int(status, "observedGeneration"):
        return progressing("Waiting for deployment spec update to be observed...")
    conditions = status.get("conditions")
    for cond in conditions if isinstance(conditions, list) else []:
        if (
            isinstance(cond, Mapping)
            and cond.get("type") == "Progressing"
            and cond.get("reason") == _TIMED_OUT
        ):
            message = f'deployment "{name}" exceeded its progress deadline'
            if cond.get("message"):
                message += f": {cond['message']}"
            return RolloutVerdict(cluster, Phase.FAILED, message, details)
    if isinstance(spec_replicas, int) and updated < spec_replicas:
        return progressing(
            f'Waiting for deployment "{name}" rollout to finish: '
            f"{updated} out of {spec_replicas} new replicas have been updated..."
        )
    if replicas > updated:
        return progressing(
            f'Waiting for deployment "{name}" rollout to finish: '
            f"{replicas - updated} old replicas are pending termination..."
        )
    if available < updated:
        return progressing(
            f'Waiting for deployment "{name}" rollout to finish: '
            f"{available} of {updated} updated replicas are available..."
        )
    if spec_replicas == 0:
        # kubectl says "successfully rolled out" here too; say why nothing runs (Active/Standby).
        return RolloutVerdict(
            cluster,
            Phase.SUCCEEDED,
            f'deployment "{name}" is scaled to zero (standby): template updated, no pods to roll',
            details,
        )
    return RolloutVerdict(cluster, Phase.SUCCEEDED, f'deployment "{name}" successfully rolled out', details)


def statefulset_verdict(
    obj: Mapping[str, Any], *, cluster: str, digest: str | None, repository: str | None = None
) -> RolloutVerdict:
    """``kubectl rollout status statefulset/NAME``, plus the image check."""
    stale = _stale_template(obj, digest, cluster=cluster, kind="statefulset", repository=repository)
    if stale is not None:
        return stale
    spec, status = _map(obj, "spec"), _map(obj, "status")
    strategy = _map(spec, "updateStrategy")
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        # kubectl exits with this error: waiting cannot change it (OnDelete needs a person).
        return RolloutVerdict(
            cluster, Phase.FAILED, "rollout status is only available for RollingUpdate strategy type"
        )
    observed = _int(status, "observedGeneration")
    if observed == 0 or _int(_map(obj, "metadata"), "generation") > observed:
        return RolloutVerdict(
            cluster, Phase.PROGRESSING, "Waiting for statefulset spec update to be observed..."
        )
    replicas = spec.get("replicas")
    ready, updated = _int(status, "readyReplicas"), _int(status, "updatedReplicas")
    if isinstance(replicas, int) and ready < replicas:
        return RolloutVerdict(
            cluster, Phase.PROGRESSING, f"Waiting for {replicas - ready} pods to be ready..."
        )
    # The API server defaults rollingUpdate.partition to 0, so live objects take this branch.
    partition = _map(strategy, "rollingUpdate").get("partition")
    if isinstance(strategy.get("rollingUpdate"), Mapping):
        if isinstance(replicas, int) and isinstance(partition, int) and updated < replicas - partition:
            return RolloutVerdict(
                cluster,
                Phase.PROGRESSING,
                f"Waiting for partitioned roll out to finish: {updated} out of "
                f"{replicas - partition} new pods have been updated...",
            )
        return RolloutVerdict(
            cluster,
            Phase.SUCCEEDED,
            f"partitioned roll out complete: {updated} new pods have been updated...",
        )
    update_rev, current_rev = status.get("updateRevision", ""), status.get("currentRevision", "")
    if update_rev != current_rev:
        return RolloutVerdict(
            cluster,
            Phase.PROGRESSING,
            f"waiting for statefulset rolling update to complete {updated} pods at revision {update_rev}...",
        )
    return RolloutVerdict(
        cluster,
        Phase.SUCCEEDED,
        f"statefulset rolling update complete {_int(status, 'currentReplicas')} pods "
        f"at revision {current_rev}...",
    )


def daemonset_verdict(
    obj: Mapping[str, Any], *, cluster: str, digest: str | None, repository: str | None = None
) -> RolloutVerdict:
    """``kubectl rollout status daemonset/NAME``, plus the image check."""
    stale = _stale_template(obj, digest, cluster=cluster, kind="daemon set", repository=repository)
    if stale is not None:
        return stale
    name = _map(obj, "metadata").get("name", "?")
    status = _map(obj, "status")
    if _map(obj, "spec", "updateStrategy").get("type", "RollingUpdate") != "RollingUpdate":
        return RolloutVerdict(
            cluster, Phase.FAILED, "rollout status is only available for RollingUpdate strategy type"
        )
    if _int(_map(obj, "metadata"), "generation") > _int(status, "observedGeneration"):
        return RolloutVerdict(
            cluster, Phase.PROGRESSING, "Waiting for daemon set spec update to be observed..."
        )
    desired, updated = _int(status, "desiredNumberScheduled"), _int(status, "updatedNumberScheduled")
    available = _int(status, "numberAvailable")
    if updated < desired:
        return RolloutVerdict(
            cluster,
            Phase.PROGRESSING,
            f'Waiting for daemon set "{name}" rollout to finish: '
            f"{updated} out of {desired} new pods have been updated...",
        )
    if available < desired:
        return RolloutVerdict(
            cluster,
            Phase.PROGRESSING,
            f'Waiting for daemon set "{name}" rollout to finish: '
            f"{available} of {desired} updated pods are available...",
        )
    return RolloutVerdict(cluster, Phase.SUCCEEDED, f'daemon set "{name}" successfully rolled out')


_WORKLOADS: dict[str, Callable[..., RolloutVerdict]] = {
    "Deployment": deployment_verdict,
    "StatefulSet": statefulset_verdict,
    "DaemonSet": daemonset_verdict,
}


def workload_verdict(
    obj: Mapping[str, Any], *, cluster: str, digest: str | None, repository: str | None = None
) -> RolloutVerdict:
    """The verdict for a Deployment, StatefulSet or DaemonSet, chosen by its ``kind``."""
    kind = str(obj.get("kind", ""))
    verdict = _WORKLOADS.get(kind)
    if verdict is None:
        return RolloutVerdict(
            cluster,
            Phase.FAILED,
            f"no rollout status for kind {kind!r}: only {', '.join(_WORKLOADS)} are supported",
        )
    return verdict(obj, cluster=cluster, digest=digest, repository=repository)


def _same_revision(a: str, b: str) -> bool:
    """Git revisions: equal, or one an abbreviation (7+ characters) of the other."""
    a, b = a.lower(), b.lower()
    return a == b or (min(len(a), len(b)) >= 7 and (a.startswith(b) or b.startswith(a)))


def _revisions(section: Mapping[str, Any]) -> list[str]:
    """``revision``, or ``revisions`` of a multi-source Application."""
    many = section.get("revisions")
    if isinstance(many, list):
        return [str(r) for r in many]
    one = section.get("revision")
    return [str(one)] if one else []


def _error_conditions(status: Mapping[str, Any]) -> list[str]:
    """Argo CD's error conditions (``ApplicationCondition.IsError``: the type ends in ``Error``:
    ComparisonError, InvalidSpecError, SyncError, UnknownError), as ``type: message``."""
    conditions = status.get("conditions")
    return [
        f"{c.get('type')}: {c.get('message', '')}"
        for c in (conditions if isinstance(conditions, list) else [])
        if isinstance(c, Mapping) and str(c.get("type", "")).endswith("Error")
    ]


def application_verdict(
    obj: Mapping[str, Any], *, cluster: str, revision: str, errors_current: bool = False
) -> RolloutVerdict:
    """An Argo CD Application against the merge commit it must run.

    Failure is decided only for ``revision``: a Degraded health or a failed sync of an older
    revision may well be what this release fixes, so it keeps the verdict progressing. Error
    conditions (a manifest that does not render, an invalid spec, a failed sync attempt) fail at
    once when they are current: the Application is at ``revision``, or ``errors_current`` (Argo
    CD has reconciled twincd's refresh request, made after the merge, so the conditions are
    about a tree that holds the release); an older error is waited out like an older health.
    """
    name = _map(obj, "metadata").get("name", "?")
    status = _map(obj, "status")
    sync, health, op = _map(status, "sync"), _map(status, "health"), _map(status, "operationState")
    synced_to = _revisions(sync)
    at_revision = any(_same_revision(r, revision) for r in synced_to)
    sync_status, health_status = sync.get("status", "Unknown"), health.get("status", "Unknown")
    op_revisions = _revisions(_map(op, "syncResult")) or _revisions(_map(op, "operation", "sync"))
    op_for_revision = any(_same_revision(r, revision) for r in op_revisions)
    conditions = status.get("conditions")
    messages = tuple(
        f"{c.get('type', 'Condition')}: {c.get('message', '')}"
        for c in (conditions if isinstance(conditions, list) else [])
        if isinstance(c, Mapping)
    )
    details = (
        f"sync {sync_status} at {', '.join(r[:7] for r in synced_to) or 'no revision'}",
        f"health {health_status}",
        *messages,
    )

    errors = _error_conditions(status)
    if errors and (at_revision or errors_current):
        return RolloutVerdict(
            cluster,
            Phase.FAILED,
            f'Application "{name}" cannot reach {revision[:7]}: {"; ".join(errors)}',
            details,
        )
    if op_for_revision and op.get("phase") in ("Failed", "Error"):
        return RolloutVerdict(
            cluster,
            Phase.FAILED,
            f'Application "{name}" sync of {revision[:7]} '
            f"{str(op['phase']).lower()}: {op.get('message') or '; '.join(messages)}",
            details,
        )
    # Degraded counts once the revision is applied (Synced): while its sync runs, health is still
    # that of the older revision's objects (seen with the sandbox syncer; Argo CD does the same).
    if at_revision and sync_status == "Synced" and health_status == "Degraded":
        why = health.get("message") or op.get("message") or "; ".join(messages) or "no message"
        return RolloutVerdict(
            cluster, Phase.FAILED, f'Application "{name}" is Degraded at {revision[:7]}: {why}', details
        )
    if at_revision and sync_status == "Synced" and health_status == "Healthy":
        return RolloutVerdict(
            cluster, Phase.SUCCEEDED, f'Application "{name}" Synced and Healthy at {revision[:7]}', details
        )
    if not at_revision:
        where = f"synced to {synced_to[0][:7]}" if synced_to else "not synced yet"
        awaited = f"{where}, waiting for {revision[:7]}"
    elif sync_status != "Synced":
        awaited = f"at {revision[:7]} but {sync_status}, waiting for Synced"
    else:
        awaited = f"Synced to {revision[:7]}, health {health_status}, waiting for Healthy"
    if op.get("phase") == "Running":
        awaited += f" (sync operation running: {op.get('message', '')})"
    return RolloutVerdict(cluster, Phase.PROGRESSING, f'Application "{name}" {awaited}', details)


def automated(app: Mapping[str, Any]) -> bool:
    """Whether Argo CD syncs the Application by itself (argo-cd ``IsAutomatedSyncEnabled``:
    ``spec.syncPolicy.automated`` present and not ``enabled: false``)."""
    policy = _map(app, "spec", "syncPolicy").get("automated")
    return isinstance(policy, Mapping) and policy.get("enabled", True) is not False


def synced_at(obj: Mapping[str, Any], revision: str) -> bool:
    """Whether an Application's live objects are those of ``revision`` (Synced there).

    Until then the workload on the cluster is an older revision's, and its state says nothing about
    this release: a previous release's ProgressDeadlineExceeded must not fail the next one.
    """
    sync = _map(obj, "status", "sync")
    return sync.get("status") == "Synced" and any(_same_revision(r, revision) for r in _revisions(sync))


def combine(app_verdict: RolloutVerdict, workload_verdict: RolloutVerdict) -> RolloutVerdict:
    """One verdict for a cluster: failed if either failed, succeeded only if both succeeded."""
    parts = (app_verdict, workload_verdict)
    for phase in (Phase.FAILED, Phase.PROGRESSING):
        hit = [v for v in parts if v.phase is phase]
        if hit:
            return RolloutVerdict(
                workload_verdict.cluster,
                phase,
                "; ".join(v.message for v in hit),
                app_verdict.details + workload_verdict.details,
            )
    return RolloutVerdict(
        workload_verdict.cluster,
        Phase.SUCCEEDED,
        f"{app_verdict.message}; {workload_verdict.message}",
        app_verdict.details + workload_verdict.details,
    )


def label_selector(selector: Mapping[str, Any]) -> str:
    """A workload's ``spec.selector`` as a ``labelSelector`` query (``metav1.FormatLabelSelector``)."""
    terms = [f"{key}={value}" for key, value in sorted(_map(selector, "matchLabels").items())]
    expressions = selector.get("matchExpressions")
    for expr in expressions if isinstance(expressions, list) else []:
        if not isinstance(expr, Mapping):
            continue
        key, op = str(expr.get("key", "")), expr.get("operator")
        values = expr.get("values")
        listed = ",".join(sorted(str(v) for v in (values if isinstance(values, list) else [])))
        match op:
            case "In":
                terms.append(f"{key} in ({listed})")
            case "NotIn":
                terms.append(f"{key} notin ({listed})")
            case "Exists":
                terms.append(key)
            case "DoesNotExist":
                terms.append(f"!{key}")
    return ",".join(terms)


# Per kind: the status counters of pods that are available and of pods at the current template.
_POD_COUNTERS = {
    "Deployment": ("availableReplicas", "updatedReplicas"),
    "StatefulSet": ("availableReplicas", "updatedReplicas"),
    "DaemonSet": ("numberAvailable", "updatedNumberScheduled"),
}


def _reported_image(status: Mapping[str, Any]) -> str:
    image_id = str(status.get("imageID", ""))
    return image_id if "@sha256:" in image_id else str(status.get("image", ""))


def _carries(pod: Mapping[str, Any], digest: str) -> bool:
    """A ready pod with a ready container whose runtime-reported image carries ``digest``.

    ``imageID`` is what the runtime resolved (containerd: ``repo@sha256:…``, Docker:
    ``docker-pullable://repo@sha256:…``); ``image`` is the fallback only for runtimes that put a
    local image ID (no ``@sha256:``) there. Readiness matters: a container stuck in
    ImagePullBackOff reports the pinned ``image`` too.
    """
    if _map(pod, "metadata").get("deletionTimestamp"):
        return False  # terminating: it no longer counts as running
    conditions = _map(pod, "status").get("conditions")
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in (conditions if isinstance(conditions, list) else [])
    )
    statuses = _map(pod, "status").get("containerStatuses")
    return ready and any(
        isinstance(s, Mapping) and s.get("ready") is True and digest in _reported_image(s)
        for s in (statuses if isinstance(statuses, list) else [])
    )


def _pod_summary(pod: Mapping[str, Any]) -> str:
    statuses = _map(pod, "status").get("containerStatuses")
    parts = []
    for s in statuses if isinstance(statuses, list) else []:
        if not isinstance(s, Mapping):
            continue
        waiting = _map(s, "state", "waiting").get("reason")
        parts.append(
            f"{s.get('name', '?')}={s.get('imageID') or s.get('image') or '?'}"
            + (f" ({waiting})" if waiting else "")
        )
    phase = _map(pod, "status").get("phase", "Unknown")
    return (
        f"pod {_map(pod, 'metadata').get('name', '?')} {phase}: {', '.join(parts) or 'no container status'}"
    )


def pods_verdict(
    workload: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], *, cluster: str, digest: str
) -> RolloutVerdict:
    """The running pods carry the release's digest, as the container runtime reports it.

    ``pods`` are the pods the workload's selector matches. As many ready pods must carry the
    digest as the workload counts available pods of its current template (``min(available,
    updated)``: a partitioned StatefulSet keeps older pods on purpose). A workload scaled to zero
    has nothing to check (standby).
    """
    kind = str(workload.get("kind", ""))
    name = _map(workload, "metadata").get("name", "?")
    available_key, updated_key = _POD_COUNTERS.get(kind, ("availableReplicas", "updatedReplicas"))
    status = _map(workload, "status")
    available = _int(status, available_key) or (_int(status, "readyReplicas") if kind == "StatefulSet" else 0)
    required = min(available, _int(status, updated_key))
    short = digest.removeprefix("sha256:")[:12]
    if required == 0:
        why = (
            "scaled to zero (standby)" if _map(workload, "spec").get("replicas") == 0 else "no available pods"
        )
        return RolloutVerdict(cluster, Phase.SUCCEEDED, f'{kind.lower()} "{name}" {why}: no pods to check')
    carrying = sorted(str(_map(p, "metadata").get("name", "?")) for p in pods if _carries(p, digest))
    if len(carrying) >= required:
        return RolloutVerdict(
            cluster,
            Phase.SUCCEEDED,
            f"{len(carrying)} running pods carry {short}",
            tuple(f"pod {p} runs {short}" for p in carrying),
        )
    others = tuple(_pod_summary(p) for p in pods if not _carries(p, digest))
    return RolloutVerdict(
        cluster,
        Phase.PROGRESSING,
        f'{len(carrying)} of {required} available pods of {kind.lower()} "{name}" run {short} so far',
        others,
    )
