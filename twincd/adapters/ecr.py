"""Amazon ECR registry credentials: ``GetAuthorizationToken`` through boto3.

ECR registries answer with a ``Basic`` challenge and take the user ``AWS`` with a password from
``ecr:GetAuthorizationToken``, valid 12 hours (the AWS CLI's ``aws ecr get-login-password``). The
token is fetched with the standard AWS credential chain (environment, profile, instance or pod
role), cached per region and registry until shortly before ``expiresAt``, and never logged.
"""

from __future__ import annotations

import base64
import logging
import threading
from datetime import UTC, datetime, timedelta

import boto3
import botocore.exceptions

from twincd.adapters.registry import Credentials, RegistryDenied, RegistryError, RegistryUnavailable
from twincd.adapters.secrets import Secret

_RENEW_BEFORE = timedelta(minutes=5)
# botocore logs whole response bodies at DEBUG, GetAuthorizationToken's password included.
logging.getLogger("botocore.parsers").setLevel(logging.INFO)
_cache: dict[tuple[str, str], tuple[Credentials, datetime]] = {}
_lock = threading.Lock()
SOURCE = "ECR GetAuthorizationToken (the AWS credentials chain)"


class EcrLogin:
    """The credentials of one ECR registry (``<account>.dkr.ecr.<region>.amazonaws.com``)."""

    def __init__(self, *, region: str, registry_id: str = "") -> None:
        self._region = region
        self._registry_id = registry_id

    def __call__(self) -> Credentials:
        key = (self._region, self._registry_id)
        with _lock:
            cached = _cache.get(key)
            if cached is not None and cached[1] > datetime.now(UTC):
                return cached[0]
        where = f"ECR in {self._region}" + (f" (registry {self._registry_id})" if self._registry_id else "")
        try:
            client = boto3.client("ecr", region_name=self._region)
            kwargs = {"registryIds": [self._registry_id]} if self._registry_id else {}
            data = client.get_authorization_token(**kwargs)["authorizationData"][0]
        except botocore.exceptions.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"):
                raise RegistryDenied(
                    f"{where}: GetAuthorizationToken refused ({code}): the AWS identity needs "
                    "ecr:GetAuthorizationToken (and ecr:BatchGetImage, ecr:PutImage… on the repository)"
                ) from None
            if code in ("ThrottlingException", "ServerException"):
                raise RegistryUnavailable(f"{where}: GetAuthorizationToken: {code}") from None
            raise RegistryError(f"{where}: GetAuthorizationToken failed ({code})") from None
        except botocore.exceptions.NoCredentialsError:
            raise RegistryDenied(
                f"{where}: no AWS credentials found (environment, profile or role)"
            ) from None
        except botocore.exceptions.BotoCoreError as e:
            raise RegistryUnavailable(f"{where}: {type(e).__name__}") from None
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        creds = Credentials(user, Secret(password), SOURCE)
        expires = data.get("expiresAt")
        until = (expires - _RENEW_BEFORE) if isinstance(expires, datetime) else datetime.now(UTC)
        with _lock:
            _cache[key] = (creds, until)
        return creds
