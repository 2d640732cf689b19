"""OCI distribution API client: what a registry holds under a tag, authenticated as registries ask.

The HTTP API (https://github.com/opencontainers/distribution-spec) with the authentication every
real registry uses (distribution's token spec, docs/spec/auth/token.md): a request answered
``401`` with ``WWW-Authenticate: Bearer realm="…",service="…",scope="…"`` is retried with a token
from ``realm`` (asked with ``service`` and ``scope``, anonymously or with Basic credentials); a
``Basic realm="…"`` challenge (``auth: htpasswd``) is retried with Basic credentials. Docker Hub
and GHCR answer even anonymous pulls that way; the GitLab Container Registry and Harbor are the
same Bearer flow with a path-based repository (``registry.gitlab.example.com/group/app`` +
``hello`` → ``/v2/group/app/hello/…``). Tokens are cached per (registry, scope, credentials) until
they expire (``expires_in``, 60 s when the issuer does not say, per the spec) and are never logged.

Credentials: the environment file's registry entry (``username`` + ``password``, secret
references), else the docker config and its credential helpers (``docker.auth``, the docker SDK's
own resolution, as ``docker push`` finds them), else anonymous. Errors name the registry, the
repository and where the credentials came from, never a credential.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import docker.auth
import docker.errors
import httpx

from twincd.adapters.secrets import Secret
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
REVISION_LABEL = "org.opencontainers.image.revision"
_INDEX_TYPES = (MANIFEST_MEDIA_TYPES[1], MANIFEST_MEDIA_TYPES[3])
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The spec's default token lifetime, and how long before its expiry a token is renewed.
_DEFAULT_EXPIRES = 60.0
_RENEW_BEFORE = 10.0


class RegistryError(PermanentError):
    """The registry refused the request for a reason a retry cannot fix (e.g. an invalid name)."""


class RegistryUnavailable(TransientError):
    """Connection refused, timeout, HTTP 5xx or 429: the registry may answer later."""


class RegistryDenied(PermanentError):
    """HTTP 401/403: credentials are missing, wrong, or lack the permission."""


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


def split_registry(registry_url: str) -> tuple[str, str]:
    """``registry.gitlab.example.com/group/app`` → (``registry.gitlab.example.com``, ``group/app``).

    Image references name a registry host and a repository path; a registry "URL" with a path is
    a host plus the first part of every repository's name in the API (``/v2/<path>/<name>/…``).
    """
    scheme, sep, rest = registry_url.partition("://")
    if not sep:
        scheme, rest = "", registry_url
    host, _, path = rest.partition("/")
    return (f"{scheme}://{host}" if scheme else host), path.strip("/")


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="https://auth/token",service="reg",scope="repository:a/b:pull"`` → its parts."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("bearer", "basic"):
        return None
    return Challenge(scheme.lower(), dict(_CHALLENGE.findall(rest)))


@dataclass(frozen=True)
class Credentials:
    username: str
    password: Secret
    source: str  # where they came from, for messages: "the environment file", "the docker config"


# Registries log the user agent of every request: operators can tell twincd's reads apart.
USER_AGENT = "twincd/0.1"
_tokens: dict[tuple[str, str, str], tuple[Secret, float]] = {}
_tokens_lock = threading.Lock()


class OciRegistry:
    """One registry (the ``Registry`` port): digests and labels of tags, authenticated as asked."""

    def __init__(
        self,
        *,
        url: str,
        insecure: bool = False,
        username: str = "",
        password: Secret | None = None,
        docker_config: bool = True,
        login: Callable[[], Credentials] | None = None,
        timeout: float = 10.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._url = url
        self._headers = {"User-Agent": user_agent}
        self._insecure = insecure
        host, self._prefix = split_registry(url)
        self._host = host
        self._base = base_url(host, insecure=insecure)
        self._timeout = timeout
        self._explicit = (
            Credentials(username, password, "the environment file's registry entry")
            if password is not None
            else None
        )
        self._docker_config = docker_config
        self._login = login  # a cloud's token exchange (ECR), asked when the file names no password
        self._from_docker: tuple[Credentials | None] | None = None  # looked up once, after a 401

    @property
    def url(self) -> str:
        return self._url

    @property
    def insecure(self) -> bool:
        return self._insecure

    def credentials(self) -> Credentials | None:
        """The environment file's, else the cloud's (ECR), else the docker config's (and its
        credential helpers'), else none."""
        if self._explicit is not None:
            return self._explicit
        if self._login is not None:
            return self._login()
        if not self._docker_config:
            return None
        if self._from_docker is None:
            self._from_docker = (self._docker_credentials(),)
        return self._from_docker[0]

    def _docker_credentials(self) -> Credentials | None:
        try:
            found = docker.auth.resolve_authconfig(docker.auth.load_config(), self._host.split("://")[-1])
        except docker.errors.DockerException:
            return None  # an unreadable docker config or a failing helper: anonymous, said on a 401
        # The config file's entries use lower case; credential helpers answer `Username`/`Secret`,
        # which the SDK hands back as `Username`/`Password`.
        found = {str(k).lower(): v for k, v in (found or {}).items()}
        if not found.get("password"):
            return None
        return Credentials(
            str(found.get("username", "")), Secret(str(found["password"])), "the docker config"
        )

    def push_credentials(self) -> tuple[str, str] | None:
        creds = self.credentials()
        return (creds.username, creds.password.reveal()) if creds else None

    def repository(self, name: str) -> str:
        """The repository's name in the API: the registry URL's path, then the image name."""
        return f"{self._prefix}/{name}" if self._prefix else name

    def digest(self, repository: str, reference: str) -> str | None:
        repo = self.repository(repository)
        where = f"{display_name(self._url)}/{repository}:{reference}"
        with httpx.Client(timeout=self._timeout, verify=not self._insecure, headers=self._headers) as client:
            response = self._send(client, "HEAD", f"/v2/{repo}/manifests/{reference}", repo, where)
            if response.status_code == 404:
                return None
            digest = str(response.headers.get("Docker-Content-Digest", ""))
            if not digest:
                # The header is optional in the spec: the digest is the SHA-256 of the manifest bytes.
                body = self._send(client, "GET", f"/v2/{repo}/manifests/{reference}", repo, where)
                if body.status_code == 404:
                    return None
                digest = "sha256:" + hashlib.sha256(body.content).hexdigest()
        if not _DIGEST.match(digest):
            raise RegistryError(f"registry {where} returned an unexpected digest {digest[:80]!r}")
        return digest

    def labels(self, repository: str, reference: str) -> dict[str, str] | None:
        """The image config's labels (``org.opencontainers.image.revision`` among them); None: no such tag."""
        repo = self.repository(repository)
        where = f"{display_name(self._url)}/{repository}:{reference}"
        # Blobs are often served by a redirect to object storage (ECR and Harbor to S3, GitLab to its
        # object store): follow it. httpx drops Authorization on a redirect to another host.
        with httpx.Client(
            timeout=self._timeout, verify=not self._insecure, follow_redirects=True, headers=self._headers
        ) as client:
            manifest = self._json(client, f"/v2/{repo}/manifests/{reference}", repo, where)
            if manifest is None:
                return None
            if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
                # A multi-platform index: the labels of its first image (one build, same labels).
                first = (manifest.get("manifests") or [{}])[0].get("digest", "")
                manifest = self._json(client, f"/v2/{repo}/manifests/{first}", repo, where) or {}
            config_digest = str((manifest.get("config") or {}).get("digest", ""))
            if not _DIGEST.match(config_digest):
                return {}
            config = self._json(client, f"/v2/{repo}/blobs/{config_digest}", repo, where) or {}
        found = (config.get("config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in found.items()}

    def _json(self, client: httpx.Client, path: str, repo: str, where: str) -> dict[str, Any] | None:
        response = self._send(client, "GET", path, repo, where)
        if response.status_code == 404:
            return None
        try:
            data = json.loads(response.content)
        except ValueError:
            raise RegistryError(f"registry {where}: {path.rsplit('/', 2)[-2]} is not JSON") from None
        return data if isinstance(data, dict) else {}

    # ---- authentication (distribution token spec) ------------------------------------------

    def _send(self, client: httpx.Client, method: str, path: str, repo: str, where: str) -> httpx.Response:
        scope = f"repository:{repo}:pull"
        headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
        # Credentials are looked up only when a registry asks (a credential helper is a process),
        # but a token cached for them is sent at once.
        creds = self._explicit
        key = self._key(scope, creds)
        cached = self._cached(key)
        if cached is not None:
            headers["Authorization"] = f"Bearer {cached.reveal()}"
        response = self._request(client, method, path, headers, where)
        if response.status_code == 401:
            creds = self.credentials()
            key = self._key(scope, creds)
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if challenge is None:
                raise self._denied(where, 401, creds, "no WWW-Authenticate challenge to answer")
            if challenge.scheme == "basic":
                if creds is None:
                    raise self._denied(where, 401, creds, "the registry asks for a username and password")
                headers["Authorization"] = _basic(creds)
            else:
                token = self._token(client, challenge, scope, creds, where, key)
                headers["Authorization"] = f"Bearer {token.reveal()}"
            response = self._request(client, method, path, headers, where)
        if response.status_code in (401, 403):
            raise self._denied(where, response.status_code, creds, "")
        if response.status_code == 429 or response.status_code >= 500:
            raise RegistryUnavailable(f"registry {where}: HTTP {response.status_code}")
        if response.status_code >= 400 and response.status_code != 404:
            raise RegistryError(f"registry {where}: HTTP {response.status_code}")
        return response

    def _request(
        self, client: httpx.Client, method: str, path: str, headers: dict[str, str], where: str
    ) -> httpx.Response:
        try:
            return client.request(method, f"{self._base}{path}", headers=headers)
        except httpx.TransportError as e:
            raise RegistryUnavailable(f"registry {where}: {type(e).__name__}: cannot reach it") from None

    def _token(
        self,
        client: httpx.Client,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
        where: str,
        key: tuple[str, str, str],
    ) -> Secret:
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {where}: the Bearer challenge names no token realm")
        # Several scopes in one challenge are space-separated; the token request repeats `scope`.
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", s) for s in (challenge.params.get("scope") or scope).split()
        ]
        if "service" in challenge.params:
            params.append(("service", challenge.params["service"]))
        if creds and realm.startswith("http://") and not self._insecure:
            # The challenge may name any realm; a password never goes there in the clear.
            raise RegistryError(
                f"registry {where}: the token realm {display_name(realm)} is plain HTTP; credentials "
                "are not sent there (set `insecure: true` on the registry entry for a local registry)"
            )
        headers = {"Authorization": _basic(creds)} if creds else {}
        try:
            answer = client.get(realm, params=params, headers=headers)
        except httpx.TransportError as e:
            raise RegistryUnavailable(
                f"registry {where}: token service {display_name(realm)}: {type(e).__name__}"
            ) from None
        if answer.status_code in (401, 403):
            raise self._denied(
                where, answer.status_code, creds, f"the token service {display_name(realm)} refused"
            )
        if answer.status_code == 429 or answer.status_code >= 500:
            raise RegistryUnavailable(f"registry {where}: token service answered HTTP {answer.status_code}")
        try:
            body = answer.json()
            # "token", or "access_token" (OAuth 2.0 style); both mean the same (token spec).
            token = Secret(str(body.get("token") or body["access_token"]))
            expires = float(body.get("expires_in") or _DEFAULT_EXPIRES)
        except (ValueError, KeyError, TypeError):
            raise RegistryError(
                f"registry {where}: the token service {display_name(realm)} gave no token"
            ) from None
        with _tokens_lock:
            _tokens[key] = (token, time.monotonic() + max(expires - _RENEW_BEFORE, 1.0))
        return token

    def _key(self, scope: str, creds: Credentials | None) -> tuple[str, str, str]:
        """Tokens are per registry, scope and credentials: a rotated password never reuses one."""
        who = (
            hashlib.sha256(f"{creds.username}:{creds.password.reveal()}".encode()).hexdigest()
            if creds
            else ""
        )
        return (self._base, scope, who)

    @staticmethod
    def _cached(key: tuple[str, str, str]) -> Secret | None:
        with _tokens_lock:
            found = _tokens.get(key)
            if found is None or found[1] <= time.monotonic():
                _tokens.pop(key, None)
                return None
            return found[0]

    def _denied(self, where: str, code: int, creds: Credentials | None, detail: str) -> RegistryDenied:
        who = (
            f"as {creds.username or '(token)'} with credentials from {creds.source}"
            if creds
            else "anonymously (no credentials in the environment file's registry entry or the docker config)"
        )
        return RegistryDenied(
            f"registry {where}: access denied (HTTP {code}) {who}{': ' + detail if detail else ''}; "
            "check the registry entry's username/password (or `docker login`) and the pull permission"
        )


def _basic(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password.reveal()}".encode()).decode()


def manifest_digest(
    *, registry_url: str, insecure: bool, repository: str, reference: str, timeout: float = 10.0
) -> str | None:
    """The digest of ``<repository>:<reference>`` in the registry, or None if it holds no such tag."""
    return OciRegistry(url=registry_url, insecure=insecure, timeout=timeout).digest(repository, reference)
