"""Render overlays, check them against the Kubernetes schemas and our policies → findings.

Schemas are kubernetes-validate's offline strict JSON schemas (unknown fields are errors, as
``kubectl apply --validate=strict`` makes them). kubernetes-validate itself re-reads and recompiles
the schema on every call (~50 resources/s); here one jsonschema-rs validator is compiled per
(apiVersion, kind) on first use and reused, which makes validation cheap next to YAML parsing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonschema_rs
import yaml

from twincd.domain import Finding, Severity, ValidationReport, image_repository
from twincd.errors import PermanentError, TransientError
from twincd.kustomize import inputs_digest
from twincd.yamlload import load_documents

_STDERR_LIMIT = 2000
_PINNED = re.compile(r"@sha256:[0-9a-f]{64}$")
_VERSION_DIR = re.compile(r"^v(\d+)\.(\d+)\.\d+-local-strict$")

# Where each pod-bearing kind keeps its pod spec.
_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class RenderError(PermanentError):
    """``kustomize build`` refused the overlay; carries its (trimmed) stderr."""

    def __init__(self, *, overlay: str, stderr: str) -> None:
        self.overlay = overlay
        self.stderr = stderr
        super().__init__(f"rendering {overlay} failed: {stderr}")


class RenderTimeout(TransientError):
    """``kustomize build`` did not finish in time (e.g. a slow remote base): worth a retry."""


class ManifestError(PermanentError):
    """Rendered output that is not a stream of YAML mappings."""


class SchemaError(PermanentError):
    """The schemas for the requested Kubernetes version are not available."""


def _trim(stderr: str) -> str:
    text = stderr.strip()
    # The end of kustomize's error chain names the file and the cause; keep that part.
    return text if len(text) <= _STDERR_LIMIT else "..." + text[-_STDERR_LIMIT:]


def render_overlay(repo_dir: Path, overlay: str, *, timeout: float = 120.0) -> str:
    """The rendered manifests of ``repo_dir/overlay``: ``kustomize build``, else ``kubectl kustomize``."""
    target = str(repo_dir / overlay)
    kustomize = shutil.which("kustomize")
    kubectl = shutil.which("kubectl")
    if kustomize is not None:
        command = [kustomize, "build", target]
    elif kubectl is not None:
        command = [kubectl, "kustomize", target]
    else:
        raise RenderError(overlay=overlay, stderr="neither kustomize nor kubectl is on PATH")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise RenderTimeout(f"rendering {overlay} took more than {timeout:.0f}s") from e
    if done.returncode != 0:
        raise RenderError(overlay=overlay, stderr=_trim(done.stderr) or f"exit status {done.returncode}")
    return done.stdout


def parse_documents(text: str, *, source: str = "rendered output") -> list[dict[str, Any]]:
    """The YAML documents of ``text`` (empty ones skipped); each must be a mapping."""
    try:
        docs = [d for d in load_documents(text) if d is not None]
    except (yaml.YAMLError, ValueError) as e:  # PyYAML's int() of a plain "0x_" raises ValueError
        raise ManifestError(f"{source}: not valid YAML: {e}") from e
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: document {i + 1} is a {type(doc).__name__}, not a mapping")
    return docs


def resource_id(doc: Mapping[str, Any]) -> str:
    """``Kind/namespace/name`` or ``Kind/name``, as findings name resources."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    parts = [
        str(doc.get("kind", "?")),
        str(meta["namespace"]) if meta.get("namespace") else "",
        str(meta.get("name", "?")),
    ]
    return "/".join(p for p in parts if p)


def _json_path(parts: Sequence[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _schema_dir(version: str) -> tuple[Path, str]:
    """kubernetes-validate's strict schema folder for ``version``: the newest not newer than it."""
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        raise SchemaError("the kubernetes-validate package (the offline schemas) is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "kubernetes-json-schema"
    wanted = tuple(int(x) for x in version.removeprefix("v").split(".")[:2])
    candidates = []
    for d in root.iterdir():
        m = _VERSION_DIR.match(d.name)
        if m and (int(m[1]), int(m[2])) <= wanted:
            candidates.append(((int(m[1]), int(m[2])), d))
    if not candidates:
        raise SchemaError(f"no offline schemas for Kubernetes {version} in {root}")
    (major, minor), folder = max(candidates)
    return folder, f"{major}.{minor}"


class SchemaValidator:
    """Strict Kubernetes schema checks for one Kubernetes version, compiled lazily and cached."""

    def __init__(self, *, kubernetes_version: str = "1.31") -> None:
        self._dir, self.kubernetes_version = _schema_dir(kubernetes_version)
        self._registry: jsonschema_rs.Registry | None = None
        # (apiVersion, kind) → validator, or None for kinds without a schema (custom resources).
        self._validators: dict[tuple[str, str], jsonschema_rs.Validator | None] = {}
        self._lock = threading.Lock()

    def _compile(self, api_version: str, kind: str) -> jsonschema_rs.Validator | None:
        group, _, version = api_version.rpartition("/")
        # kubernetes-validate's file naming: group shortened to its first label ("rbac", "apps").
        short = group.split(".")[0]
        name = f"{kind.lower()}-{short}-{version}.json" if group else f"{kind.lower()}-{version}.json"
        path = self._dir / name
        if not path.is_file():
            return None
        schema = json.loads(path.read_text())
        # The short name is ambiguous (networking.k8s.io vs networking.istio.io): the schema says
        # which group it is for, so a custom resource never borrows a built-in kind's schema.
        gvks = schema.get("x-kubernetes-group-version-kind", [])
        if not any(g.get("group", "") == group and g.get("kind") == kind for g in gvks):
            return None
        if self._registry is None:
            defs = json.loads((self._dir / "_definitions.json").read_text())
            self._registry = jsonschema_rs.Registry([(defs["$id"], defs)])
        return jsonschema_rs.validator_for(schema, registry=self._registry)

    def validator(self, api_version: str, kind: str) -> jsonschema_rs.Validator | None:
        key = (api_version, kind)
        try:
            return self._validators[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._validators:
                self._validators[key] = self._compile(api_version, kind)
            return self._validators[key]

    def check(self, doc: Mapping[str, Any], *, overlay: str) -> list[Finding]:
        """Schema findings for one resource: errors with their path, or one UNCHECKED finding."""
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
            return [Finding(overlay, resource_id(doc), "apiVersion and kind must both be set")]
        v = self.validator(api_version, kind)
        if v is None:
            message = (
                f"no schema for {api_version} {kind} in Kubernetes {self.kubernetes_version}: not checked"
            )
            return [Finding(overlay, resource_id(doc), message, Severity.UNCHECKED)]
        try:
            if v.is_valid(doc):
                return []
            return [
                Finding(overlay, resource_id(doc), e.message, path=_json_path(e.instance_path))
                for e in v.iter_errors(doc)
            ]
        except ValueError as e:
            # jsonschema-rs accepts JSON types only (a datetime or a set from a hand-made dict).
            return [Finding(overlay, resource_id(doc), f"cannot be checked: {e} (not a JSON value)")]


def _containers(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    path = _POD_SPEC_PATHS.get(str(doc.get("kind")))
    if path is None:
        return
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        return
    prefix = ".".join(path)
    for key in ("initContainers", "containers"):
        containers = node.get(key)
        for i, c in enumerate(containers if isinstance(containers, list) else []):
            if isinstance(c, Mapping):
                yield f"{prefix}.{key}[{i}]", c


@dataclass(frozen=True)
class ImagePolicy:
    """Which images must be pinned by digest.

    The images twincd manages (``managed``: the repositories it pushes the apps to and pins) always
    must be. Other images (a service mesh proxy, an exporter, a migration job's image), pinned by
    hand or not at all, follow ``unpinned``: ``require`` (an error), ``warn`` (reported on the MR
    and in the timeline, not failing) or ``allow-list`` (allowed when the repository is in
    ``allowed``, an error otherwise). ``managed=None``: every image is managed (the strictest).
    """

    managed: frozenset[str] | None = None
    unpinned: Literal["require", "warn", "allow-list"] = "warn"
    allowed: tuple[str, ...] = ()

    def finding(
        self, image: str, *, overlay: str, resource: str, container: str, path: str
    ) -> Finding | None:
        if _PINNED.search(image):
            return None
        repository = image_repository(image)
        pin = f"image {image!r} of container {container!r} is not pinned by digest (@sha256:<64 hex>)"
        if self.managed is None or repository in self.managed:
            return Finding(overlay, resource, pin, path=path)
        if self.unpinned == "warn":
            return Finding(
                overlay, resource, f"{pin}; twincd does not manage it", Severity.WARNING, path=path
            )
        if self.unpinned == "allow-list":
            if any(repository == a or repository.startswith(a.rstrip("/") + "/") for a in self.allowed):
                return None
            return Finding(overlay, resource, f"{pin} and is not in validation.allowed_unpinned", path=path)
        return Finding(overlay, resource, f"{pin} (validation.unpinned_images: require)", path=path)


STRICT = ImagePolicy()


def check_policies(doc: Mapping[str, Any], *, overlay: str, images: ImagePolicy = STRICT) -> list[Finding]:
    """Our rules on top of the schema: no plaintext Secret, images pinned by digest (``images``)."""
    findings = []
    if doc.get("kind") == "Secret" and doc.get("apiVersion") == "v1":
        findings.append(
            Finding(
                overlay, resource_id(doc), "plaintext Secret in the manifests: commit a SealedSecret instead"
            )
        )
    for where, c in _containers(doc):
        image = c.get("image")
        found = (
            images.finding(
                image,
                overlay=overlay,
                resource=resource_id(doc),
                container=str(c.get("name")),
                path=f"{where}.image",
            )
            if isinstance(image, str)
            else Finding(overlay, resource_id(doc), f"container {c.get('name')!r} has no image", path=where)
        )
        if found is not None:
            findings.append(found)
    return findings


def validate_documents(
    docs: Iterable[Mapping[str, Any]],
    *,
    overlay: str,
    validator: SchemaValidator,
    images: ImagePolicy = STRICT,
) -> tuple[Finding, ...]:
    """Schema and policy findings for rendered resources (pure, given the validator)."""
    findings: list[Finding] = []
    for doc in docs:
        findings += validator.check(doc, overlay=overlay)
        findings += check_policies(doc, overlay=overlay, images=images)
    return tuple(findings)


def validate_overlay(
    repo_dir: Path, overlay: str, *, validator: SchemaValidator, images: ImagePolicy = STRICT
) -> ValidationReport:
    """Render ``overlay`` of the manifests checkout and validate what it renders.

    An overlay that does not render is a finding like any other (reported on the MR and to the
    team), not a crash of the step; a render that timed out stays a transient error.
    """
    try:
        docs = parse_documents(render_overlay(repo_dir, overlay), source=overlay)
    except (RenderError, ManifestError) as e:
        return ValidationReport(
            overlays=(overlay,),
            resources=0,
            findings=(Finding(overlay=overlay, resource="kustomization.yaml", message=str(e)),),
        )
    return ValidationReport(
        overlays=(overlay,),
        resources=len(docs),
        findings=validate_documents(docs, overlay=overlay, validator=validator, images=images),
    )


def validate_overlays(
    repo_dir: Path, overlays: Sequence[str], *, validator: SchemaValidator, images: ImagePolicy = STRICT
) -> ValidationReport:
    """Every overlay rendered and checked, as one report."""
    resources = 0
    findings: list[Finding] = []
    for overlay in overlays:
        report = validate_overlay(repo_dir, overlay, validator=validator, images=images)
        resources += report.resources
        findings.extend(report.findings)
    return ValidationReport(tuple(overlays), resources, tuple(findings))


def _renderer_stamp() -> str:
    """Which kustomize renders (path and mtime): a new one makes new renders."""
    renderer = shutil.which("kustomize") or shutil.which("kubectl") or ""
    return f"{renderer}:{Path(renderer).stat().st_mtime_ns if renderer else 0}"


def _cached_render(repo_dir: Path, overlay: str, cache_dir: Path, stamp: str) -> str:
    """``render_overlay``, kept in ``cache_dir`` by the digest of what the overlay reads (and of the
    renderer, ``stamp``): a commit that does not touch an overlay's inputs does not render it
    again. An overlay with a remote base is always rendered."""
    inputs = inputs_digest(repo_dir, overlay)
    if inputs is None:
        return render_overlay(repo_dir, overlay)
    key = hashlib.sha256(f"{stamp}\0{inputs}".encode()).hexdigest()
    cached = cache_dir / f"{key}.yaml"
    if cached.is_file():
        return cached.read_text()
    text = render_overlay(repo_dir, overlay)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A file of its own, complete on disk before it takes the name: a concurrent render (another
    # thread or worker) or a crash never leaves a partial render under the name.
    descriptor, partial = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, cached)
    return text


def render_overlays(
    repo_dir: Path, overlays: Mapping[tuple[str, str], str], *, cache_dir: Path | None = None
) -> dict[str, dict[str, tuple[dict[str, Any], ...]]]:
    """Render (cluster, app) → overlay into cluster → app → objects.

    Overlays that do not exist mean the app does not run on that cluster. kustomize is a
    subprocess per overlay: they run side by side. With ``cache_dir``, renders are kept by the
    content they are made of (:func:`twincd.kustomize.inputs_digest`).
    """
    present = {k: o for k, o in overlays.items() if (repo_dir / o).is_dir()}

    stamp = _renderer_stamp() if cache_dir is not None else ""

    def render(overlay: str) -> tuple[dict[str, Any], ...]:
        if cache_dir is None:
            text = render_overlay(repo_dir, overlay)
        else:
            text = _cached_render(repo_dir, overlay, cache_dir, stamp)
        return tuple(parse_documents(text, source=overlay))

    with ThreadPoolExecutor(max_workers=4) as pool:
        rendered = dict(zip(present, pool.map(render, present.values()), strict=True))
    out: dict[str, dict[str, tuple[dict[str, Any], ...]]] = {}
    for (cluster, app), docs in rendered.items():
        out.setdefault(cluster, {})[app] = docs
    return out


MAX_FINDINGS_IN_NOTE = 50


def report_markdown(report: ValidationReport) -> str:
    """A validation result as reviewers read it on the merge request (Markdown)."""
    overlays = ", ".join(f"`{o}`" for o in report.overlays) or "none"
    if report.ok:
        lines = ["### ✅ twincd validation passed", "", f"{report.resources} resources valid in {overlays}."]
    else:
        lines = [
            "### ❌ twincd validation failed",
            "",
            (
                f"{len(report.errors)} error(s) in {report.resources} resources of {overlays}; "
                "the release will not wait for a merge."
            ),
            "",
        ]
        lines += [f"- {_md(str(f))}" for f in report.errors[:MAX_FINDINGS_IN_NOTE]]
        if len(report.errors) > MAX_FINDINGS_IN_NOTE:
            lines.append(f"- … and {len(report.errors) - MAX_FINDINGS_IN_NOTE} more")
    if report.warnings:
        lines += ["", f"{len(report.warnings)} warning(s):"]
        lines += [f"- ⚠️ {_md(str(f))}" for f in report.warnings[:MAX_FINDINGS_IN_NOTE]]
    if report.unchecked:
        lines += [
            "",
            f"{len(report.unchecked)} resource(s) unchecked (no schema): "
            + ", ".join(sorted({f"`{f.resource}`" for f in report.unchecked})),
        ]
    return "\n".join(lines)


def _md(text: str) -> str:
    # Findings quote user YAML; keep them from opening HTML or mentioning people.
    return text.replace("<", "&lt;").replace("@", "@\u200b")
