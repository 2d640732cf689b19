"""OCI distribution API client: read what a registry holds under a tag.

Only the HTTP API (https://github.com/opencontainers/distribution-spec) is used, and only anonymously:
no credentials are sent and the Bearer token flow (a 401 with ``WWW-Authenticate``) is not implemented.
Supported: registries that answer anonymous reads, over HTTPS or plain HTTP (``insecure``), such as
the local stack's docker-registry / distribution. Registries that need a token, as ECR, ACR and
Harbor (for private projects) do, are not supported yet: their 401 becomes ``RegistryDenied``.
Errors name the registry and repository and never carry credentials.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

import httpx

from twincd.errors import PermanentError, TransientError

# Every manifest media type a push can produce. The Accept header must list them all: asked with
# Docker types only, a registry answers MANIFEST_UNKNOWN for an OCI manifest, and docker-registry 2.8
# asked with OCI types only serves a converted schema-1 manifest with a different digest.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(PermanentError):
    """The registry refused the request for a reason a retry cannot fix (e.g. an invalid name)."""


class RegistryUnavailable(TransientError):
    """Connection refused, timeout, HTTP 5xx or 429: the registry may answer later."""


class RegistryDenied(PermanentError):
    """HTTP 401/403: credentials are missing or lack the permission."""


def base_url(registry_url: str, *, insecure: bool) -> str:
    """``127.0.0.1:5000`` → ``http://127.0.0.1:5000`` (insecure) or ``https://...``; a scheme is kept."""
    if "://" in registry_url:
        return registry_url.rstrip("/")
    return f"{'http' if insecure else 'https'}://{registry_url.rstrip('/')}"


def display_name(registry_url: str) -> str:
    """The registry as messages show it: without any ``user:password@`` part."""
    if "://" not in registry_url:
        return registry_url.rsplit("@", 1)[-1]
    parts = urlsplit(registry_url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def manifest_digest(
    *, registry_url: str, insecure: bool, repository: str, reference: str, timeout: float = 10.0
) -> str | None:
    """The digest of ``<repository>:<reference>`` in the registry, or None if it holds no such tag."""
    where = f"{display_name(registry_url)}/{repository}:{reference}"
    url = f"{base_url(registry_url, insecure=insecure)}/v2/{repository}/manifests/{reference}"
    headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
    try:
        with httpx.Client(timeout=timeout, verify=not insecure) as client:
            response = client.head(url, headers=headers)
            _raise_for_status(response, where)
            if response.status_code == 404:
                return None
            digest = str(response.headers.get("Docker-Content-Digest", ""))
            if not digest:
                # The header is optional in the spec: the digest is the SHA-256 of the manifest bytes.
                body = client.get(url, headers=headers)
                _raise_for_status(body, where)
                if body.status_code == 404:
                    return None
                digest = "sha256:" + hashlib.sha256(body.content).hexdigest()
    except httpx.TransportError as e:
        raise RegistryUnavailable(f"registry {where}: {type(e).__name__}: cannot reach it") from e
    if not _DIGEST.match(digest):
        raise RegistryError(f"registry {where} returned an unexpected digest {digest[:80]!r}")
    return digest


def _raise_for_status(response: httpx.Response, where: str) -> None:
    code = response.status_code
    if code in (401, 403):
        raise RegistryDenied(f"registry {where}: HTTP {code}: access denied (check the credentials)")
    if code == 429 or code >= 500:
        raise RegistryUnavailable(f"registry {where}: HTTP {code}")
    if code >= 400 and code != 404:
        raise RegistryError(f"registry {where}: HTTP {code}")


class OciRegistry:
    """One registry (the ``Registry`` port): the digest of a tag, read with the distribution API."""

    def __init__(self, *, url: str, insecure: bool = False) -> None:
        self._url = url
        self._insecure = insecure

    @property
    def url(self) -> str:
        return self._url

    @property
    def insecure(self) -> bool:
        return self._insecure

    def digest(self, repository: str, reference: str) -> str | None:
        return manifest_digest(
            registry_url=self._url, insecure=self._insecure, repository=repository, reference=reference
        )
