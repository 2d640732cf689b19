"""Images and pulls: where a container runtime would pull an image from, and a HEAD that plays the pull."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from twincd.adapters.registry import OciRegistry, RegistryDenied, RegistryError, RegistryUnavailable
from twincd.adapters.secrets import Secret

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


# Everything the local stack runs binds to loopback: these registries are the stack's, and pulls
# from them are checked for real.
SERVED_HOSTS = ("127.0.0.1", "localhost", "[::1]")
KUBELET_AGENT = "twincd-sandbox-kubelet"  # in the registry's log, the cluster's pulls, not twincd's


def _hostname(host: str) -> str:
    """``127.0.0.1:5000`` → ``127.0.0.1``; ``[::1]:5000`` → ``[::1]``; a host without a port as is."""
    return host[: host.index("]") + 1] if host.startswith("[") else host.split(":", 1)[0]


def check_image_pull(image: str, *, auths: Mapping[str, tuple[str, Secret]] | None = None) -> PullResult:
    """Resolve the image's manifest the way a runtime does before pulling layers.

    With the registry's challenge answered like a kubelet with an ``imagePullSecret`` (``auths``:
    registry host → username and password, a ``.dockerconfigjson``'s content): through the registry
    adapter's token flow, so a registry that requires tokens is pulled from as it really is.
    """
    where = parse_image(image)
    if where is None or _hostname(where.host) not in SERVED_HOSTS:
        # The sandbox reaches only the registries the stack serves (on loopback); a real cluster
        # would pull from Docker Hub (short names such as ``nginx:1.27``), ghcr.io, quay.io or a
        # team's registry, so such images are treated as present rather than failing every
        # third-party sidecar (README: "What the sandbox checks").
        return PullResult(ok=True, image_id=image)
    login = (auths or {}).get(where.host)
    # Plain HTTP: the sandbox registries are "insecure" local ones (deployments/local.yaml).
    registry = OciRegistry(
        url=where.host,
        insecure=True,
        username=login[0] if login else "",
        password=login[1] if login else None,
        docker_config=False,
        timeout=3.0,
        user_agent=KUBELET_AGENT,
    )
    try:
        digest = registry.digest(where.repository, where.reference)
    except RegistryDenied:
        # The kubelet's words for a 401/403 (ErrImagePull).
        return PullResult(
            ok=False,
            message=f"failed to authorize: pull access denied for {where.host}/{where.repository}, "
            "repository does not exist or may require authorization",
        )
    except (RegistryUnavailable, RegistryError) as e:
        return PullResult(ok=False, message=f"failed to resolve reference {image!r}: {e}")
    if digest is None:
        return PullResult(ok=False, message=f"failed to resolve reference {image!r}: {image}: not found")
    return PullResult(ok=True, image_id=f"{where.host}/{where.repository}@{digest}")


def load_pull_secret(path: Path) -> dict[str, tuple[str, Secret]]:
    """A ``.dockerconfigjson`` (``{"auths": {host: {"username", "password"} or {"auth": b64}}}``)."""
    data = json.loads(path.read_text())
    auths: dict[str, tuple[str, Secret]] = {}
    for host, entry in (data.get("auths") or {}).items():
        if "auth" in entry:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        else:
            user, password = str(entry.get("username", "")), str(entry.get("password", ""))
        auths[str(host)] = (user, Secret(password))
    return auths
