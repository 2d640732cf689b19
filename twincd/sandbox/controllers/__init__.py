"""Controllers that make a sandbox API server behave like a cluster with Argo CD.

Two loops, both clients of the standard Kubernetes API (so they run against
``twincd.sandbox.apiserver`` and would run against a real API server):

- :class:`DeploymentController` (``deployment``): a simplified kube-controller-manager Deployment
  controller. It "pulls" images with a HEAD on the registry's manifest endpoint (``pulls``), keeps
  Pods named ``<deployment>-<pod-template-hash>-<suffix>`` and moves ``status`` through the
  ``/status`` subresource with the conditions and messages Kubernetes uses, including
  ``ProgressDeadlineExceeded`` (``rollout_steps``).
- :class:`ManifestsSyncer` (``syncer``): the sandbox's Argo CD for one destination cluster. It
  creates one ``argoproj.io/v1alpha1`` ``Application`` per app directory under the cluster's overlay
  path, compares each with git every 180 s plus jitter or at once on a refresh request or a sync
  operation, renders with ``kubectl kustomize`` only what a commit touched, syncs automated
  Applications (and manual ones when asked), applies by GET + PUT of whole objects, and writes
  sync status, operation state, conditions and health as Argo CD does (``health``).

Both talk to the API server through ``kube``: the project's own request helper on the official
``kubernetes`` client. The state transitions are pure functions (:func:`next_rollout_step`,
:func:`deployment_health`, :func:`application_health`, :func:`is_in_sync`,
:func:`application_status`) so unit tests drive them with plain dicts and a clock.
"""

from twincd.sandbox.controllers.deployment import DeploymentController
from twincd.sandbox.controllers.health import (
    Comparison,
    Health,
    ResourceKey,
    SyncOutcome,
    application_health,
    application_status,
    deployment_health,
    is_in_sync,
)
from twincd.sandbox.controllers.kube import Conflict, Expired, Kube, apply_object
from twincd.sandbox.controllers.pulls import ImageLocation, PullResult, check_image_pull, parse_image
from twincd.sandbox.controllers.rollout_steps import (
    RolloutStep,
    next_rollout_step,
    pod_ready,
    rollout_settled,
    template_hash,
)
from twincd.sandbox.controllers.syncer import ManifestsSyncer, kubectl_message, remote_head, render_overlay

__all__ = [
    "Comparison",
    "Conflict",
    "DeploymentController",
    "Expired",
    "Health",
    "ImageLocation",
    "Kube",
    "ManifestsSyncer",
    "PullResult",
    "ResourceKey",
    "RolloutStep",
    "SyncOutcome",
    "application_health",
    "application_status",
    "apply_object",
    "check_image_pull",
    "deployment_health",
    "is_in_sync",
    "kubectl_message",
    "next_rollout_step",
    "parse_image",
    "pod_ready",
    "remote_head",
    "render_overlay",
    "rollout_settled",
    "template_hash",
]
