"""Value types shared by the core, the adapters, the tasks and the flows.

Frozen dataclasses: they cross Prefect task boundaries as results and must not change there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from twincd.errors import PermanentError

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ARecords:
    """A name's whole A record set as the authoritative server holds it."""

    ips: frozenset[str]
    ttl: int | None  # seconds; None when there is no record set


@dataclass(frozen=True)
class ImageRef:
    """An image pinned by digest: ``registry/name@sha256:...``; the tag is kept for people."""

    name: str  # full repository, e.g. "127.0.0.1:5000/hello"
    digest: str  # "sha256:<64 hex>"
    tag: str = ""

    def __post_init__(self) -> None:
        if not _DIGEST.match(self.digest):
            raise PermanentError(f"image digest {self.digest!r} is not of the form sha256:<64 hex digits>")

    @property
    def pinned(self) -> str:
        return f"{self.name}@{self.digest}"

    @property
    def short_digest(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


def image_repository(image: str) -> str:
    """The repository of an image reference, normalized as container runtimes do (distribution's
    reference grammar, ``reference/normalize.go``): ``nginx:1.27`` → ``docker.io/library/nginx``,
    ``127.0.0.1:5000/hello@sha256:…`` → ``127.0.0.1:5000/hello``."""
    name = image.partition("@")[0]
    head, slash, tail = name.rpartition("/")
    if ":" in tail:  # a tag; a ':' before the last '/' is a registry port
        name = f"{head}{slash}{tail.partition(':')[0]}"
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{first}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


@dataclass(frozen=True)
class ImageChange:
    """One image entry rewritten in one kustomization file."""

    file: str  # path relative to the manifests repo root
    image: str  # the `name:` of the kustomization images entry
    old: str  # "newName@digest" / "newName:newTag" / "" when the entry was added
    new: str


@dataclass(frozen=True)
class EditResult:
    """What a pure edit did: the new text and a record of each change (empty when already done)."""

    text: str
    changes: tuple[ImageChange, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)


class Severity(str, Enum):
    ERROR = "error"
    UNCHECKED = "unchecked"  # e.g. custom resources without a schema: reported, not failing
    WARNING = "warning"  # e.g. an image twincd does not manage, pinned by tag: reported, not failing


@dataclass(frozen=True)
class Finding:
    """One validation finding in one rendered overlay."""

    overlay: str  # e.g. "overlays/eks"
    resource: str  # "Kind/namespace/name" or "Kind/name"
    message: str
    severity: Severity = Severity.ERROR
    path: str = ""  # JSON path inside the resource, when the schema names one

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.overlay}: {self.resource}{where}: {self.message}"


@dataclass(frozen=True)
class ValidationReport:
    overlays: tuple[str, ...]
    resources: int
    findings: tuple[Finding, ...] = ()

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def unchecked(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.UNCHECKED)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    @property
    def ok(self) -> bool:
        return not self.errors


class Phase(str, Enum):
    PROGRESSING = "progressing"  # not done yet: keep waiting
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # will not get better by waiting: stop at once


# Which Kustomize Component an app overlay references: it serves (active) or is scaled to 0.
Role = Literal["active", "standby", "unknown"]


@dataclass(frozen=True)
class RolloutVerdict:
    """The state of a rollout on one cluster, as ``kubectl rollout status`` and Argo CD see it."""

    cluster: str
    phase: Phase
    message: str
    details: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class MergeRequest:
    """A release's merge request on any forge."""

    ref: str  # forge-specific id, e.g. "!12"
    source_branch: str
    target_branch: str
    title: str
    state: str  # "opened" | "merged" | "closed"
    web_url: str
    merge_commit: str | None = None
    reused: bool = False  # True when an open MR for the branch already existed ("already done")
    sha: str = ""  # the source branch's head the MR was opened or merged with
    merged_by: str = ""  # who merged, as the forge tells it (GitLab's merged_by/merge_user username)
    approved_by: tuple[str, ...] = ()  # who approved on the forge (GitLab's approvals), when known


@dataclass(frozen=True)
class Waiting:
    """What a suspended run waits for: a person's answer (about ``mr``, if any) until ``deadline``,
    or its turn after the run ``behind`` (an earlier change of the same ``lock``)."""

    mr: MergeRequest | None  # None: an answer on the form only (a failover plan), or a turn
    env: str  # the environment file the run loaded: its forge holds the MR
    deadline: str  # ISO 8601, UTC: after it, the reconciliation resumes the run as timed out
    project: str = ""  # the forge's project (GitLab's path_with_namespace), to match its hooks
    lock: str = ""  # what only one run changes at a time: "release-<app>", "failover"
    behind: str = ""  # the flow run id it queues behind ("" when it waits for a person)


@dataclass(frozen=True)
class Event:
    """One entry of a release's timeline: what a notifier tells the team."""

    step: str  # build, push, set-image, merge-request, validate, merge, verify, result
    status: str  # ok | failed | waiting | skipped | cancelled
    text: str
    at: str  # ISO 8601, UTC
    cluster: str = ""
    # Optional details a notifier shows as links and short forms (issue 5); empty when unknown.
    url: str = ""  # e.g. the merge request's web URL
    digest: str = ""  # "sha256:<64 hex>" of the released image, on the push event
    actor: str = ""  # who acted, e.g. the approver on the merge event


@dataclass(frozen=True)
class Timeline:
    """The story of one release, rebuilt by the flow as steps finish (no hidden state)."""

    app: str
    tag: str
    events: tuple[Event, ...] = ()
    # The flow run it tells: a run resumed after waiting for a person tells its first steps again,
    # and they must be the same replies (twincd.notify.reply_key); "" outside a run.
    run: str = ""

    def add(self, event: Event) -> Timeline:
        return Timeline(self.app, self.tag, (*self.events, event), self.run)

    @property
    def key(self) -> str:
        """A Prefect artifact key: lowercase letters, digits and dashes only."""
        return "release-" + re.sub(r"[^a-z0-9]+", "-", f"{self.app}-{self.tag}".lower()).strip("-")

    def markdown(self) -> str:
        icons = {"ok": "✅", "failed": "❌", "waiting": "⏳", "skipped": "⏭️", "cancelled": "🚫"}
        rows = [
            f"# Release {self.app} {self.tag}",
            "",
            "| time (UTC) | step | cluster | status | details |",
            "|---|---|---|---|---|",
        ]
        for e in self.events:
            text = e.text.replace("|", "\\|").replace("\n", "<br>")
            rows.append(
                f"| {e.at[11:19]} | {e.step} | {e.cluster} | {icons.get(e.status, '')} {e.status} | {text} |"
            )
        return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Release:
    """A tagged release of an app, checked against the app's tag pattern and repository."""

    app: str
    tag: str
    commit: str  # the commit the tag points at

    @property
    def branch(self) -> str:
        return f"twincd/{self.app}/{self.tag}"


@dataclass(frozen=True)
class ComponentChange:
    """One Kustomize Component switched in one kustomization file.

    ``removed`` and ``added`` are component paths as written in ``components:``; a swap made in
    place (``../components/standby`` → ``../components/active``) has both, a plain removal or
    addition has the other one empty.
    """

    file: str  # path relative to the manifests repo root
    removed: str
    added: str


@dataclass(frozen=True)
class ComponentEditResult:
    """What a pure components edit did: the new text and each switch (empty when already done)."""

    text: str
    changes: tuple[ComponentChange, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class ReleaseBranch:
    """A branch of the manifests repo that holds one change (a release stage, a revert, a switch)."""

    branch: str
    head: str  # the branch's head commit after the write
    base: str  # the target branch's head the diff was computed against
    changes: tuple[ImageChange | ComponentChange, ...]  # what the branch changes against the target
    committed: bool  # False when the branch already held the edit ("already done")
    diff: str  # `git diff base...head`, for the MR description and the approval form


@dataclass(frozen=True)
class CaughtUp:
    """A branch brought up to its target's head (what merging it would now make), and what came in."""

    branch: ReleaseBranch  # head: the branch with the target merged in; base: the target's head
    commits: tuple[str, ...] = ()  # the target's new commits, "<sha12> <subject> (<author>)", newest first
    paths: tuple[str, ...] = ()  # the repo paths they changed

    @property
    def moved(self) -> bool:
        return bool(self.commits)


@dataclass(frozen=True)
class BuiltImage:
    """What a build produced: the image tagged locally for every registry, or found in all of them."""

    image: str  # repository name inside each registry, e.g. "hello"
    tag: str  # the git tag, reused as the image tag
    commit: str  # the commit the git tag points to
    registries: tuple[str, ...]  # e.g. ("127.0.0.1:5000",)
    image_id: str = ""  # local image ID; "" when reused (nothing was built)
    reused: bool = False  # every registry already held <image>:<tag>: no build, no push
    # What registries already hold <image>:<tag>: all of them when reused; some of them after an
    # earlier run pushed to part of the registries (then nothing was built: the builder's image
    # from that run is pushed to the rest, and must come out with the same digest).
    existing: tuple[ImageRef, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(f"{registry}/{self.image}:{self.tag}" for registry in self.registries)


@dataclass(frozen=True)
class PushedImage:
    """The image in every registry, pinned by the digest each registry reports after the push."""

    refs: tuple[ImageRef, ...]  # one per registry, in the order of BuiltImage.registries
    reused: bool = False  # nothing was pushed: the registries already held the tag

    @property
    def digest(self) -> str:
        """The digest in the first registry (the same everywhere unless a registry re-encodes)."""
        return self.refs[0].digest

    def ref_for(self, registry: str, image: str) -> ImageRef:
        """The image as registry ``registry`` (``host[:port][/path]``) holds it."""
        return next(r for r in self.refs if r.name == f"{registry}/{image}")


@dataclass(frozen=True)
class ClusterRef:
    """How to reach one cluster's API server: a kubeconfig context (and file)."""

    name: str
    context: str
    kubeconfig: str | None = None


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
    # The app's image repository on this cluster: its containers must carry ``digest``; other
    # containers (sidecars, init containers from other images) are not the release's.
    repository: str | None = None
    # Whether a later revision contains ``revision`` (the manifests monorepo moves on: another
    # app's release may land before Argo CD syncs ours, and then it syncs to that later commit).
    contains: Callable[[str], bool] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AppliedObject:
    api_version: str
    kind: str
    namespace: str  # "" for cluster-scoped objects
    name: str
    created: bool  # False: it existed and the applied fields were merged onto it

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


@dataclass(frozen=True)
class ApplyResult:
    """What one server-side apply of an overlay did, object by object, in the order applied."""

    cluster: str
    objects: tuple[AppliedObject, ...]

    @property
    def created(self) -> tuple[AppliedObject, ...]:
        return tuple(o for o in self.objects if o.created)
