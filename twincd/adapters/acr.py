"""Azure Container Registry credentials: a Microsoft Entra token exchanged for an ACR refresh token.

ACR's documented AAD flow (github.com/Azure/acr, docs/AAD-OAuth.md; what ``az acr login`` does):

1. get an Entra ID access token for ACR (``https://containerregistry.azure.net/.default``) with
   azure-identity's ``DefaultAzureCredential`` (workload identity on AKS, managed identity, the
   environment's service principal, ``az login``…);
2. ``POST https://<registry>/oauth2/exchange`` with the form ``grant_type=access_token``,
   ``service=<registry>``, ``access_token=…`` (and ``tenant``), which answers ``{"refresh_token": …}``;
3. use the refresh token as the password of the user ``00000000-0000-0000-0000-000000000000``: the
   registry's Bearer challenge names ``https://<registry>/oauth2/token`` as realm, and the generic
   token flow (``OciRegistry``) asks it for a scoped access token with those Basic credentials,
   exactly as the docker CLI does after ``az acr login``.

The refresh token (a JWT, about 3 hours) is cached per registry until shortly before its ``exp``;
neither token is ever logged. A 401 from the exchange means the identity has no role on the
registry (``AcrPull``, and ``AcrPush`` to push).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import httpx
from azure.core.credentials import TokenCredential
from azure.core.exceptions import ClientAuthenticationError

from twincd.adapters.registry import (
    Credentials,
    RegistryDenied,
    RegistryError,
    RegistryUnavailable,
    base_url,
    split_registry,
)
from twincd.adapters.secrets import Secret

ACR_SCOPE = "https://containerregistry.azure.net/.default"
NULL_USER = "00000000-0000-0000-0000-000000000000"  # ACR's user for a refresh token (az acr login)
SOURCE = "ACR's /oauth2/exchange (an Entra ID token from azure-identity)"
_RENEW_BEFORE = 300.0
_DEFAULT_LIFETIME = 3 * 3600.0  # when the refresh token's `exp` cannot be read
_cache: dict[str, tuple[Credentials, float]] = {}
_lock = threading.Lock()


class AcrLogin:
    """The credentials of one ACR registry (``<name>.azurecr.io``)."""

    def __init__(
        self,
        *,
        registry_url: str,
        tenant: str = "",
        insecure: bool = False,
        credential: TokenCredential | None = None,
        timeout: float = 10.0,
    ) -> None:
        host, _ = split_registry(registry_url)
        self._service = host.split("://")[-1]
        self._base = base_url(host, insecure=insecure)
        self._tenant = tenant
        self._insecure = insecure
        self._credential = credential
        self._timeout = timeout

    def __call__(self) -> Credentials:
        with _lock:
            cached = _cache.get(self._base)
            if cached is not None and cached[1] > time.time():
                return cached[0]
        where = f"ACR {self._service}"
        aad = self._entra_token(where)
        form = {"grant_type": "access_token", "service": self._service, "access_token": aad}
        if self._tenant:
            form["tenant"] = self._tenant
        try:
            with httpx.Client(timeout=self._timeout, verify=not self._insecure) as client:
                answer = client.post(f"{self._base}/oauth2/exchange", data=form)
        except httpx.TransportError as e:
            raise RegistryUnavailable(f"{where}: /oauth2/exchange: {type(e).__name__}") from None
        if answer.status_code in (401, 403):
            raise RegistryDenied(
                f"{where}: /oauth2/exchange refused the Entra ID token (HTTP {answer.status_code}): "
                "the identity needs the AcrPull role on the registry (AcrPush to push)"
            )
        if answer.status_code == 429 or answer.status_code >= 500:
            raise RegistryUnavailable(f"{where}: /oauth2/exchange answered HTTP {answer.status_code}")
        try:
            refresh = str(answer.json()["refresh_token"])
        except (ValueError, KeyError, TypeError):
            raise RegistryError(
                f"{where}: /oauth2/exchange answered HTTP {answer.status_code} without a refresh token"
            ) from None
        creds = Credentials(NULL_USER, Secret(refresh), SOURCE)
        with _lock:
            _cache[self._base] = (creds, _expiry(refresh) - _RENEW_BEFORE)
        return creds

    def _entra_token(self, where: str) -> str:
        try:
            credential = self._credential
            if credential is None:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            return credential.get_token(ACR_SCOPE).token
        except ClientAuthenticationError as e:
            # azure-identity's message lists each credential it tried; it holds no token.
            first = str(e.message or e).splitlines()[0] if (e.message or str(e)) else type(e).__name__
            raise RegistryDenied(f"{where}: no Entra ID token for ACR: {first}") from None


def _expiry(jwt: str) -> float:
    """The refresh token's ``exp`` (read, not verified: the registry verifies it)."""
    try:
        payload = jwt.split(".")[1]
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return time.time() + _DEFAULT_LIFETIME
