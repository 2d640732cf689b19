"""The ports: what the flows need from each external system, as typing Protocols.

Core: no Prefect, no SDK. Each adapter in ``twincd.adapters`` implements one of these, and
``twincd.wiring`` is the one place that picks the adapter an environment file asks for; its
return types are these ports, and every adapter is returned by one of its functions, so
``mypy --strict`` proves every adapter fits its port. Kargo's ``gitprovider.Interface`` and
argocd-image-updater's ``PullRequestService`` are the models (DESIGN.md, rule 11).

Errors: every method raises only ``twincd.errors`` subclasses (the adapter's own small hierarchy);
transient ones are retried by the tasks, permanent ones end the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Protocol

from twincd.domain import (
    ApplyResult,
    ARecords,
    BuiltImage,
    CaughtUp,
    ComponentChange,
    ImageChange,
    MergeRequest,
    PushedImage,
    ReleaseBranch,
    Role,
    RolloutTarget,
    RolloutVerdict,
    Timeline,
    ValidationReport,
)
from twincd.drift import ClusterRead

# An edit reads the files of a work tree and returns {relative path: new text} plus its record.
Edit = Callable[[Path], tuple[dict[str, str], tuple[ImageChange | ComponentChange, ...]]]


class Forge(Protocol):
    """Merge requests on the manifests repo (GitLab, or the local forge of the local stack)."""

    # True: people review and merge on the forge and twincd waits for them (GitLab).
    # False: twincd merges once a person approved in the Prefect UI (the local forge).
    # A class attribute, so a flow can ask without building the adapter (no secret read, no session).
    merged_by_people: ClassVar[bool]
    name: ClassVar[str]  # for people: "GitLab"; recorded as the merger when people merge there

    def open(
        self, *, source_branch: str, target_branch: str, title: str, description: str, head: str = ""
    ) -> MergeRequest:
        """Open the MR; an open one for the branch, or one merged at ``head``, is reused."""
        ...

    def get(self, mr: MergeRequest) -> MergeRequest:
        """The MR as the forge shows it now (a merged one with ``merge_commit``, ``merged_by``, approvers)."""
        ...

    def post_validation(self, mr: MergeRequest, report: ValidationReport) -> None:
        """Put the validation result where reviewers see it (once, however often retried)."""
        ...

    def merge(self, mr: MergeRequest, *, approved_by: str, onto: str | None = None) -> MergeRequest:
        """Merge it at its validated head ``mr.sha`` (an already merged MR is returned as it is),
        with ``merge_commit`` set. ``onto``: the target commit the validated head was brought up
        to; where the forge can, the merge is a compare-and-swap on it (TargetMoved otherwise)."""
        ...

    def close(self, mr: MergeRequest, *, reason: str) -> MergeRequest:
        """Close without merging, saying why; the branch stays for inspection."""
        ...


class Delivery(Protocol):
    """What a notifier reports: a failure is data, never an exception (a notifier never fails a deploy)."""

    @property
    def ok(self) -> bool: ...

    @property
    def error(self) -> str:
        """What failed, free of secrets; "" when ok."""
        ...


class Notifier(Protocol):
    """Tells the team (Slack, the Prefect log + artifacts)."""

    @property
    def name(self) -> str:
        """For messages about the notifier itself, e.g. "slack"."""
        ...

    def publish(self, timeline: Timeline, clusters: Sequence[str]) -> Delivery:
        """A release's (or failover's) story so far: the summary and the replies not told yet."""
        ...

    def announce(self, text: str) -> Delivery:
        """One standalone message (drift changes)."""
        ...


class Dns(Protocol):
    """The A record set of names in one zone, as the authoritative server holds it."""

    @property
    def description(self) -> str:
        """Where records live, for plans and messages (never holds a secret)."""
        ...

    @property
    def managed(self) -> bool:
        """False when twincd does not manage DNS (``dns: none``)."""
        ...

    def read(self, name: str) -> ARecords:
        """The whole A record set of ``name`` (relative to the zone) and its TTL, as the authority
        holds it; no addresses (and no TTL) when there is none."""
        ...

    def replace_a(self, name: str, ips: Iterable[str], *, ttl: int) -> None:
        """Make ``name`` hold exactly ``ips`` (one atomic change); an empty set is refused."""
        ...


class Registry(Protocol):
    """An OCI distribution registry, as images are pushed to and pulled from it."""

    @property
    def url(self) -> str:
        """``host[:port][/path]`` as in image references."""
        ...

    @property
    def insecure(self) -> bool:
        """Reached over plain HTTP (the local stack's registry)."""
        ...

    def digest(self, repository: str, reference: str) -> str | None:
        """The digest of ``<repository>:<reference>``, or None when the registry has no such tag."""
        ...

    def labels(self, repository: str, reference: str) -> dict[str, str] | None:
        """The image config's labels (its provenance), or None when the registry has no such tag."""
        ...

    def push_credentials(self) -> tuple[str, str] | None:
        """(username, password) for a push through the builder; None: anonymous. Never logged."""
        ...


class Builder(Protocol):
    """Builds an app's image from a tagged commit and pushes it to the app's registries."""

    def build(self, *, repo_url: str, tag: str, commit: str, image: str) -> BuiltImage:
        """Build (or find in every registry: nothing is rebuilt under a release tag)."""
        ...

    def push(self, built: BuiltImage) -> PushedImage:
        """Push to every registry; the digests are read back from the registries."""
        ...


class AppSource(Protocol):
    """An app's git repository, where releases are tags."""

    def tag_commit(self, tag: str) -> str:
        """The commit ``tag`` points at (annotated tags peeled); GitRefNotFound when there is none."""
        ...


class Manifests(Protocol):
    """The Kustomize manifests monorepo and its target branch."""

    @property
    def name(self) -> str:
        """The repository as messages show it (no credentials)."""
        ...

    @property
    def branch(self) -> str:
        """The target branch Argo CD follows (``main``)."""
        ...

    def head(self) -> str:
        """The commit the target branch points at now."""
        ...

    def checkout(
        self, revision: str, *, overlays: Sequence[str] | None = None
    ) -> AbstractContextManager[Path]:
        """A throwaway work tree at ``revision`` (branch, tag or commit), as a plain directory;
        ``overlays``: only they and what they read need to be there (None: the whole tree)."""
        ...

    def write_branch(
        self, *, branch: str, edit: Edit, message: str, overlays: Sequence[str] | None = None
    ) -> ReleaseBranch:
        """Make ``branch`` hold the target plus ``edit`` and push it (nothing when already so);
        ``overlays``: the only files ``edit`` reads are theirs."""
        ...

    def write_revert(self, *, branch: str, merge_commits: Sequence[str]) -> ReleaseBranch:
        """Make ``branch`` hold a ``git revert -m 1`` of each merge commit, in the order given."""
        ...

    def catch_up(self, branch: ReleaseBranch) -> CaughtUp:
        """``branch`` with the target's head merged in and pushed (what merging it would land),
        and the target's commits that came in; unchanged when it already holds the target."""
        ...

    def merged_into(self, source: str) -> str | None:
        """The merge commit that brought ``source`` into the target, or None when it is not merged."""
        ...

    def ancestry(self, commit: str) -> AbstractContextManager[Callable[[str], bool]]:
        """A test "does revision ``rev`` contain ``commit``?" for the verification of a merge."""
        ...


class Cluster(Protocol):
    """One Kubernetes cluster, read through its API server (and written to in ``sync: apply`` mode)."""

    def workloads(self, refs: Sequence[tuple[str, str, str]]) -> list[Mapping[str, Any] | None]:
        """Each ``(kind, namespace, name)`` as the cluster holds it now (None: not found)."""
        ...

    def read(self, desired: Mapping[str, Iterable[Mapping[str, Any]]]) -> ClusterRead:
        """The live objects matching every app's desired objects: one LIST per kind and namespace."""
        ...

    def service(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """One Service as the cluster holds it now (None: not found)."""
        ...

    def apply(self, objects: Iterable[Mapping[str, Any]]) -> ApplyResult:
        """Server-side apply of rendered objects (clusters without Argo CD)."""
        ...


class Rollouts(Protocol):
    """Waits for a cluster (and the Argo CD that syncs it) to run a revision."""

    def verify(self, target: RolloutTarget, *, timeout: float) -> RolloutVerdict:
        """Until the target is rolled out (SUCCEEDED), cannot get there (FAILED), or ``timeout``."""
        ...

    def verify_role(self, target: RolloutTarget, *, role: Role, app: str, timeout: float) -> RolloutVerdict:
        """Rolled out, and at the replica count the role's component sets (active ≥ 1, standby 0)."""
        ...


class Probe(Protocol):
    """An HTTP check through a cluster's ingress, as a client of the app's public name reaches it."""

    def check(self, url: str, *, host: str, ca_file: str | None = None) -> tuple[bool, str]:
        """(healthy, what was seen) for one GET of ``url`` with ``host`` as Host and TLS SNI, the
        certificate verified for ``host`` (against ``ca_file`` or the system CAs): 2xx only."""
        ...
