"""Images and pulls: where a container runtime would pull an image from, and a HEAD that plays the pull."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

# The Accept list a container runtime sends. A Docker-only Accept gets MANIFEST_UNKNOWN for an
# OCI manifest, and podman pushes OCI manifests (docs/platform.md, "OCI registry").
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
)


@dataclass(frozen=True)
class ImageLocation:
    """Where a runtime would pull an image from: ``http://<host>/v2/<repository>/manifests/<reference>``."""

    host: str  # "127.0.0.1:5000"
    repository: str  # "hello" or "team/hello"
    reference: str  # a digest "sha256:..." or a tag

    @property
    def manifest_url(self) -> str:
        # Plain HTTP: the sandbox registries are "insecure" local ones (deployments/local.yaml).
        return f"http://{self.host}/v2/{self.repository}/manifests/{self.reference}"


def parse_image(image: str) -> ImageLocation | None:
    """Split an image reference; ``None`` when it names no registry host (Docker Hub short names).

    As in the Docker reference grammar, the first path component is a host when it contains a
    ``.`` or a ``:`` or is ``localhost``. A digest wins over a tag; no tag means ``latest``.
    """
    first, sep, rest = image.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        return None
    name, at, digest = rest.partition("@")
    if at:
        repository = name.rsplit(":", 1)[0] if ":" in name else name
        return ImageLocation(first, repository, digest)
    if ":" in name:
        repository, tag = name.rsplit(":", 1)
        return ImageLocation(first, repository, tag)
    return ImageLocation(first, name, "latest")


@dataclass(frozen=True)
class PullResult:
    """The outcome of "pulling" one image: ``image_id`` is ``host/repo@sha256:...`` when it worked."""

    ok: bool
    image_id: str = ""
    message: str = ""


def check_image_pull(client: httpx.Client, image: str) -> PullResult:
    """HEAD the image's manifest the way a runtime resolves it before pulling layers."""
    where = parse_image(image)
    if where is None:
        # The sandbox has no route to Docker Hub, so short names (``nginx:1.27``) cannot be
        # checked; treat them as pullable rather than failing every third-party image.
        return PullResult(ok=True, image_id=image)
    try:
        response = client.head(where.manifest_url, headers={"Accept": MANIFEST_ACCEPT})
    except httpx.HTTPError as e:
        return PullResult(ok=False, message=f"failed to resolve reference {image!r}: {type(e).__name__}: {e}")
    if response.status_code == 200:
        digest = response.headers.get("Docker-Content-Digest") or where.reference
        return PullResult(ok=True, image_id=f"{where.host}/{where.repository}@{digest}")
    if response.status_code == 404:
        return PullResult(ok=False, message=f"failed to resolve reference {image!r}: {image}: not found")
    return PullResult(
        ok=False, message=f"failed to resolve reference {image!r}: unexpected status {response.status_code}"
    )
