"""Value types shared by the core, the adapters, the tasks and the flows.

Frozen dataclasses: they cross Prefect task boundaries as results and must not change there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from twincd.errors import PermanentError

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


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
    def ok(self) -> bool:
        return not self.errors


class Phase(str, Enum):
    PROGRESSING = "progressing"  # not done yet: keep waiting
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # will not get better by waiting: stop at once


@dataclass(frozen=True)
class RolloutVerdict:
    """The state of a rollout on one cluster, as ``kubectl rollout status`` and Argo CD see it."""

    cluster: str
    phase: Phase
    message: str
    details: tuple[str, ...] = field(default=())
