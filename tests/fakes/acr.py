"""An HTTP-level fake of Azure Container Registry's AAD token flow, plus a managed-identity endpoint.

The real azure-identity client (``ManagedIdentityCredential``, App Service style: ``IDENTITY_ENDPOINT``
and ``IDENTITY_HEADER`` in the environment) gets its Entra ID token from ``/msi/token``; the real
twincd registry client does the rest. Behaviour as documented for ACR (github.com/Azure/acr,
docs/AAD-OAuth.md) and seen from ``az acr login``:

    GET  /msi/token?api-version=2019-08-01&resource=…   header X-IDENTITY-HEADER (App Service MI)
    POST /oauth2/exchange   form grant_type=access_token, service, access_token[, tenant]
                            → {"refresh_token": <JWT with exp>}; 401 for an unknown token or an
                            identity without a role on the registry
    GET  /oauth2/token?service=…&scope=…   Basic 00000000-0000-0000-0000-000000000000:<refresh>
    POST /oauth2/token      form grant_type=refresh_token, service, scope, refresh_token
                            → {"access_token": …}
    HEAD/GET /v2/<repo>/manifests/<ref>   Bearer access token, else 401 with ``Bearer
                            realm="<url>/oauth2/token",service="<host>",scope="repository:<repo>:pull"``

``images`` maps ``repo:tag`` to a digest; ``role`` False plays an identity with no AcrPull role;
``requests`` records (method, path, status) of every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.fakes import ServedFake

NULL_USER = "00000000-0000-0000-0000-000000000000"
_AUDIENCES = ("https://containerregistry.azure.net", "https://management.azure.com")
_ERR = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}


def _jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{secrets.token_urlsafe(16)}"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (starlette's own parser needs python-multipart)."""
    return {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}


class FakeAcr(ServedFake):
    _name = "fake-acr"

    def __init__(self, *, identity_header: str = "mi-header", refresh_lifetime: int = 3 * 3600) -> None:
        self.identity_header = identity_header
        self.refresh_lifetime = refresh_lifetime
        self.role = True
        self.images: dict[str, str] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.aad_tokens: dict[str, str] = {}  # token → the resource (audience) it was issued for
        self.refresh_tokens: set[str] = set()
        self.access_tokens: set[str] = set()

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    def push(self, repo: str, tag: str, content: bytes = b"{}") -> str:
        digest = "sha256:" + hashlib.sha256(content + repo.encode() + tag.encode()).hexdigest()
        self.images[f"{repo}:{tag}"] = digest
        return digest

    def seen(self, path: str) -> int:
        return sum(1 for _, p, _ in self.requests if p == path)

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._answer(request)
        self.requests.append((request.method, request.url.path, response.status_code))
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        path = request.url.path
        if path == "/msi/token":
            return self._identity(request)
        if path == "/oauth2/exchange" and request.method == "POST":
            return await self._exchange(request)
        if path == "/oauth2/token":
            return await self._token(request)
        if path.startswith("/v2/") and "/manifests/" in path:
            return self._manifest(request, path)
        return JSONResponse({"errors": [{"code": "NOT_FOUND"}]}, status_code=404)

    def _identity(self, request: Request) -> Response:
        if request.headers.get("x-identity-header") != self.identity_header:
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        token = secrets.token_urlsafe(24)
        self.aad_tokens[token] = request.query_params.get("resource", "")
        return JSONResponse(
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + 3600),
                "resource": request.query_params.get("resource", ""),
                "token_type": "Bearer",
            }
        )

    async def _exchange(self, request: Request) -> Response:
        form = await _form(request)
        if form.get("grant_type") != "access_token" or form.get("service") != self.host:
            return JSONResponse({"errors": [{"code": "BAD_REQUEST"}]}, status_code=400)
        # ACR takes Entra tokens issued for itself or for ARM (what `az acr login` sends).
        audience = self.aad_tokens.get(form.get("access_token", ""))
        if audience not in _AUDIENCES or not self.role:
            return JSONResponse(_ERR, status_code=401)
        refresh = _jwt({"exp": int(time.time()) + self.refresh_lifetime, "grant_type": "refresh_token"})
        self.refresh_tokens.add(refresh)
        return JSONResponse({"refresh_token": refresh})

    async def _token(self, request: Request) -> Response:
        refresh = ""
        if request.method == "POST":
            form = await _form(request)
            if form.get("grant_type") == "refresh_token":
                refresh = form.get("refresh_token", "")
        else:
            auth = request.headers.get("authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                refresh = password if user == NULL_USER else ""
        if refresh not in self.refresh_tokens:
            return JSONResponse(_ERR, status_code=401)
        access = secrets.token_urlsafe(24)
        self.access_tokens.add(access)
        return JSONResponse({"access_token": access})

    def _manifest(self, request: Request, path: str) -> Response:
        repo, _, ref = path[len("/v2/") :].partition("/manifests/")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.access_tokens:
            challenge = (
                f'Bearer realm="{self.url}/oauth2/token",service="{self.host}",scope="repository:{repo}:pull"'
            )
            return JSONResponse(_ERR, status_code=401, headers={"WWW-Authenticate": challenge})
        digest = self.images.get(f"{repo}:{ref}")
        if digest is None:
            return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status_code=404)
        return Response(
            b"" if request.method == "HEAD" else b"{}",
            headers={
                "Docker-Content-Digest": digest,
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            },
        )
