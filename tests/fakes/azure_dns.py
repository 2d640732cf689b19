"""An HTTP-level fake of the Azure Resource Manager endpoints of Azure DNS record sets (api 2018-05-01).

The real ``azure-mgmt-dns`` client talks to it over HTTP (nothing in the SDK is patched); the
credential is ``StaticTokenCredential``, a real implementation of azure-core's ``TokenCredential``
protocol that hands out one fixed token.

Served (paths are case-insensitive, as on ARM; ``api-version`` is required):

    GET /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/dnsZones/{zone}/A/{name}
    PUT the same path
        body ``{"properties": {"TTL": n, "ARecords": [{"ipv4Address": ...}], "metadata": {}}}``

Behaviour copied from Azure: every record set has an etag (a GUID, new on every change); ``If-Match``
with another etag (or on a record set that does not exist) and ``If-None-Match: *`` on one that does
answer 412 PreconditionFailed; a missing or unknown bearer token is 401 with a ``WWW-Authenticate``
challenge; a token of ``reader_token`` may read but gets 403 AuthorizationFailed on writes; an
unknown subscription, resource group or zone is 404 SubscriptionNotFound / ResourceGroupNotFound /
ParentResourceNotFound; a missing record set is 404 NotFound. A PUT answers 201 when it created the
record set and 200 when it replaced it.

Knobs: ``fail_next(status, count, retry_after=...)`` answers the next requests with 429/5xx;
``change_before_next_put(ips)`` plays a concurrent writer who changes the record set between a
client's read and its write; ``echo_tokens`` makes 401 messages quote the token they got (a badly
behaved proxy), to prove clients never pass such text on. ``requests`` records every request
(method, path, status, If-Match, If-None-Match) and ``put_bodies`` the JSON of every PUT.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from azure.core.credentials import AccessToken
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tests.fakes import ServedFake

API_VERSION = "2018-05-01"


class StaticTokenCredential:
    """A ``TokenCredential`` that always returns the same bearer token (valid for an hour)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.calls = 0

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.calls += 1
        return AccessToken(self._token, int(time.time()) + 3600)


@dataclass
class FakeRecordSet:
    ips: tuple[str, ...]
    ttl: int
    etag: str = field(default_factory=lambda: str(uuid.uuid4()))
    metadata: dict[str, str] = field(default_factory=dict)


class Call(NamedTuple):
    method: str
    path: str
    status: int
    if_match: str | None
    if_none_match: str | None


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: str | None


_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
    r"dnsZones/(?P<zone>[^/]+)/(?P<type>[^/]+)/(?P<name>[^/]+)$",
    re.IGNORECASE,
)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _fault_response(fault: _Fault) -> JSONResponse:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    if fault.status == 429:
        return _error(429, "TooManyRequests", "Too many requests, retry later.", headers)
    return _error(fault.status, "InternalServerError", "Encountered internal server error.", headers)


class FakeAzureDns(ServedFake):
    """Azure DNS zones ``zones`` in one resource group of one subscription, served over HTTP."""

    _name = "fake-azure-dns"

    def __init__(
        self,
        *,
        token: str,
        subscription_id: str,
        resource_group: str,
        zones: tuple[str, ...],
        reader_token: str | None = None,
    ) -> None:
        self.token = token
        self.reader_token = reader_token
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.zones: dict[str, dict[str, FakeRecordSet]] = {z.lower(): {} for z in zones}
        self.requests: list[Call] = []
        self.put_bodies: list[dict[str, Any]] = []
        self.echo_tokens = False
        self._faults: list[_Fault] = []
        self._concurrent: list[tuple[str, ...]] = []
        self._lock = threading.Lock()

    # ---- knobs for tests -------------------------------------------------------------------

    def set_record(self, zone: str, name: str, ips: tuple[str, ...], ttl: int = 60) -> FakeRecordSet:
        """Create or replace a record set as someone else would (a new etag)."""
        with self._lock:
            record = FakeRecordSet(tuple(ips), ttl)
            self.zones[zone.lower()][name.lower()] = record
            return record

    def record(self, zone: str, name: str) -> FakeRecordSet | None:
        with self._lock:
            return self.zones[zone.lower()].get(name.lower())

    def fail_next(self, status: int, count: int = 1, *, retry_after: str | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (429 or 5xx), then behave again."""
        with self._lock:
            self._faults.append(_Fault(status, count, retry_after))

    def change_before_next_put(self, ips: tuple[str, ...]) -> None:
        """When the next PUT arrives, first set the record set to ``ips`` (new etag): a concurrent writer."""
        with self._lock:
            self._concurrent.append(tuple(ips))

    def calls(self, method: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self.requests if method is None or c.method == method]

    # ---- serving ---------------------------------------------------------------------------

    # ---- HTTP ------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._dispatch(request)
        with self._lock:
            self.requests.append(
                Call(
                    request.method,
                    request.url.path,
                    response.status_code,
                    request.headers.get("if-match"),
                    request.headers.get("if-none-match"),
                )
            )
        await response(scope, receive, send)

    async def _dispatch(self, request: Request) -> Response:
        fault = self._take_fault()
        if fault is not None:
            return _fault_response(fault)
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        match = _PATH.match(request.url.path)
        if match is None or request.method not in ("GET", "PUT"):
            return _error(404, "NotFound", "No HTTP resource was found that matches the request URI.")
        if request.query_params.get("api-version") != API_VERSION:
            return _error(400, "InvalidApiVersionParameter", f"api-version must be {API_VERSION}.")
        if match["sub"].lower() != self.subscription_id.lower():
            return _error(
                404, "SubscriptionNotFound", f"The subscription '{match['sub']}' could not be found."
            )
        if match["rg"].lower() != self.resource_group.lower():
            return _error(404, "ResourceGroupNotFound", f"Resource group '{match['rg']}' could not be found.")
        zone = match["zone"].lower()
        if zone not in self.zones:
            return _error(
                404,
                "ParentResourceNotFound",
                "Can not perform requested operation on nested resource. "
                f"Parent resource '{match['zone']}' not found.",
            )
        if match["type"].upper() != "A":
            return _error(400, "BadRequest", "This fake serves A record sets only.")
        name = match["name"].lower()
        if request.method == "PUT":
            if self._bearer(request) == self.reader_token:
                return _error(
                    403,
                    "AuthorizationFailed",
                    "The client 'reader' does not have authorization to "
                    "perform action 'Microsoft.Network/dnsZones/A/write' over scope "
                    f"'{request.url.path}' or the scope is invalid.",
                )
            return self._put(request, zone, name, await request.body())
        return self._get(zone, name)

    def _get(self, zone: str, name: str) -> Response:
        with self._lock:
            record = self.zones[zone].get(name)
            if record is None:
                return _error(
                    404,
                    "NotFound",
                    f"The resource record '{name}' does not exist in resource group "
                    f"'{self.resource_group}' of subscription '{self.subscription_id}'.",
                )
            return self._record_response(200, zone, name, record)

    @staticmethod
    def _bearer(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None

    def _authenticate(self, request: Request) -> Response | None:
        token = self._bearer(request)
        challenge = {
            "WWW-Authenticate": 'Bearer authorization_uri="https://login.windows.net/", '
            'error="invalid_token", error_description="The authentication failed."'
        }
        if token is None:
            return _error(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
                challenge,
            )
        if token not in (self.token, self.reader_token):
            quoted = f" '{token}'" if self.echo_tokens else ""
            return _error(
                401, "InvalidAuthenticationToken", f"The access token{quoted} is invalid.", challenge
            )
        return None

    def _put(self, request: Request, zone: str, name: str, raw: bytes) -> Response:
        try:
            body = json.loads(raw)
            props = body["properties"]
            ttl = props["TTL"]
            ips = tuple(str(ipaddress.IPv4Address(a["ipv4Address"])) for a in props.get("ARecords") or [])
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, "BadRequest", f"The request body is invalid ({type(e).__name__}).")
        if not isinstance(ttl, int) or not 0 <= ttl <= 2147483647:
            return _error(400, "BadRequest", "TTL must be an integer between 0 and 2147483647.")
        with self._lock:
            self.put_bodies.append(body)
            if self._concurrent:
                self.zones[zone][name] = FakeRecordSet(self._concurrent.pop(0), 60)
            current = self.zones[zone].get(name)
            if_match, if_none_match = request.headers.get("if-match"), request.headers.get("if-none-match")
            stale = (if_match is not None and (current is None or if_match not in ("*", current.etag))) or (
                if_none_match == "*" and current is not None
            )
            if stale:
                return _error(
                    412,
                    "PreconditionFailed",
                    "The condition specified using HTTP conditional header(s) is not met.",
                )
            record = FakeRecordSet(ips, ttl, metadata=dict(props.get("metadata") or {}))
            self.zones[zone][name] = record
            return self._record_response(201 if current is None else 200, zone, name, record)

    def _record_response(self, status: int, zone: str, name: str, record: FakeRecordSet) -> Response:
        rid = (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.Network/dnszones/{zone}/A/{name}"
        )
        fqdn = f"{zone}." if name == "@" else f"{name}.{zone}."
        return JSONResponse(
            {
                "id": rid,
                "name": name,
                "type": "Microsoft.Network/dnszones/A",
                "etag": record.etag,
                "properties": {
                    "metadata": record.metadata,
                    "TTL": record.ttl,
                    "fqdn": fqdn,
                    "provisioningState": "Succeeded",
                    "targetResource": {},
                    "ARecords": [{"ipv4Address": ip} for ip in record.ips],
                },
            },
            status_code=status,
            headers={"ETag": record.etag},
        )

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            while self._faults and self._faults[0].remaining <= 0:
                self._faults.pop(0)
            if not self._faults:
                return None
            self._faults[0].remaining -= 1
            return self._faults[0]
