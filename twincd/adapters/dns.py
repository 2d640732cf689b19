"""DNS adapter: one port, the A record set of one name, read from and replaced at the authority.

Providers:

- ``Rfc2136``: dynamic updates (RFC 2136) signed with a TSIG key, over TCP, through dnspython;
  works with BIND, Knot, PowerDNS and the many providers that accept them.
- ``Route53``: boto3; the whole set read across pages, written in one change batch (an UPSERT of
  a simple set; a multivalue-answer name keeps one set per IP).
- ``AzureDns``: azure-mgmt-dns, one PUT of the whole record set guarded by its etag (If-Match).
- ``NoDns``: DNS is not managed by twincd; it reads and writes nothing and says so.

Every replace swaps the whole record set in one atomic operation (one UPDATE message, one change
batch, one PUT), so resolvers never see a half-changed set. Callers read back afterwards. SDK
errors are translated here; the TSIG secret and Azure bearer tokens never appear in a message, a
repr or a log line.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from twincd.domain import ARecords
from twincd.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.exceptions import AzureError
    from azure.mgmt.dns.models import RecordSet

TIMEOUT = 5.0


class DnsUnavailable(TransientError):
    """The DNS server or API did not answer in time, refused the connection, or is throttling."""


class DnsRefused(PermanentError):
    """The server refused the change: bad or missing key, no permission, not authoritative."""


class DnsConfigError(PermanentError):
    """A key, zone or address in the configuration cannot be used."""


def _checked_ips(name: str, ips: Iterable[str]) -> list[str]:
    values = sorted(set(ips))
    if not values:
        # Deleting the record set is never what a failover wants: it would take the name offline.
        raise DnsConfigError(f"refusing to replace the A records of {name!r} with an empty set")
    for ip in values:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise DnsConfigError(f"{ip!r} is not an IPv4 address (A records of {name!r})") from None
    return values


@dataclass(frozen=True)
class Tsig:
    """A TSIG key. ``repr`` hides the secret, so the key can cross Prefect boundaries safely."""

    name: str
    algorithm: str
    secret: str = field(repr=False)

    @classmethod
    def parse(cls, value: str) -> Tsig:
        """``[algorithm:]name:secret``, the ``nsupdate -y`` / ``dig -y`` syntax; default hmac-sha256."""
        parts = value.strip().split(":")
        if len(parts) == 2:
            parts.insert(0, "hmac-sha256")
        if len(parts) != 3 or not all(parts):
            # Never echo the value: it is the secret.
            raise DnsConfigError("the TSIG key must look like [algorithm:]name:base64-secret")
        return cls(name=parts[1], algorithm=parts[0], secret=parts[2])


def _server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        return server, 53
    return host.strip("[]"), int(port)


class Rfc2136:
    """Dynamic updates to an authoritative server, signed with a TSIG key."""

    managed = True

    def __init__(self, *, server: str, zone: str, key: Tsig | None, timeout: float = TIMEOUT) -> None:
        self.host, self.port = _server(server)
        self.zone = dns.name.from_text(zone)
        self.key = key
        self.timeout = timeout
        self.keyring: dict[dns.name.Name, dns.tsig.Key] | None = None
        if key is not None:
            try:
                self.keyring = dns.tsigkeyring.from_text({key.name: (key.algorithm, key.secret)})
            except Exception as e:  # noqa: BLE001 - bad base64 or unknown algorithm; the text may hold the secret
                raise DnsConfigError(
                    f"the TSIG key {key.name!r} cannot be used ({type(e).__name__})"
                ) from None

    @property
    def description(self) -> str:
        return f"rfc2136 {self.host}:{self.port} zone {self.zone.to_text(omit_final_dot=True)}"

    def _fqdn(self, name: str) -> dns.name.Name:
        return dns.name.from_text(name, origin=self.zone)

    def _send(self, message: dns.message.Message, what: str) -> dns.message.Message:
        try:
            return dns.query.tcp(message, self.host, port=self.port, timeout=self.timeout)
        except dns.tsig.PeerBadSignature:
            raise DnsRefused(
                f"{self.description}: {what}: BADSIG, the server does not accept the signature "
                "of the TSIG key (wrong secret or algorithm in dns.key)"
            ) from None
        except dns.tsig.PeerBadKey:
            raise DnsRefused(
                f"{self.description}: {what}: BADKEY, the server does not know the key named "
                f"{self.key.name if self.key else '?'!r}"
            ) from None
        except dns.tsig.PeerBadTime:
            raise DnsRefused(
                f"{self.description}: {what}: BADTIME, the clocks of twincd and the server "
                "differ by more than the TSIG fudge"
            ) from None
        except dns.exception.Timeout:
            raise DnsUnavailable(f"{self.description}: {what}: no answer within {self.timeout:g} s") from None
        except (OSError, EOFError, dns.exception.DNSException) as e:
            raise DnsUnavailable(f"{self.description}: {what}: {type(e).__name__}") from None

    def read(self, name: str) -> ARecords:
        fqdn = self._fqdn(name)
        response = self._send(dns.message.make_query(fqdn, dns.rdatatype.A), f"read A {fqdn}")
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return ARecords(frozenset(), None)
        if rcode != dns.rcode.NOERROR:
            raise _rcode_error(rcode, f"{self.description}: read A {fqdn}")
        # The authoritative answer carries the TTL as configured (a resolver's would count down).
        sets = [r for r in response.answer if r.rdtype == dns.rdatatype.A and r.name == fqdn]
        return ARecords(
            frozenset(str(rr) for rrset in sets for rr in rrset),
            max((rrset.ttl for rrset in sets), default=None),
        )

    def replace_a(self, name: str, ips: Iterable[str], *, ttl: int) -> None:
        values = _checked_ips(name, ips)
        update = dns.update.UpdateMessage(self.zone, keyring=self.keyring)
        # One message deletes the old set and adds the new: the server applies it atomically.
        update.replace(name, ttl, dns.rdatatype.A, *values)
        what = f"replace A {self._fqdn(name)} with {', '.join(values)}"
        response = self._send(update, what)
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise _rcode_error(rcode, f"{self.description}: {what}", signed=self.keyring is not None)


def _rcode_error(
    rcode: dns.rcode.Rcode, what: str, *, signed: bool = True
) -> TransientError | PermanentError:
    text = dns.rcode.to_text(rcode)
    if rcode == dns.rcode.SERVFAIL:
        return DnsUnavailable(f"{what}: SERVFAIL (the server could not process it now)")
    hints = {
        dns.rcode.REFUSED: "the server refused the update"
        + (
            "; the key may lack the permission (update-policy)"
            if signed
            else "; no TSIG key was sent (set dns.key)"
        ),
        dns.rcode.NOTAUTH: "the server is not authoritative for the zone, or the key was not accepted",
        dns.rcode.NOTZONE: "the name is outside the zone",
    }
    return DnsRefused(f"{what}: {text}, {hints.get(rcode, 'the server rejected the request')}")


# Route 53 error codes that a retry may cure; every other client error is permanent.
_AWS_TRANSIENT = {
    "Throttling",
    "ThrottlingException",
    "PriorRequestNotComplete",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
    "RequestLimitExceeded",
}


# Route 53 routing policies twincd does not manage (each set carries one of these keys); multivalue
# answer (MultiValueAnswer) and simple sets it does.
_ROUTING_POLICIES = {
    "Weight",
    "Region",
    "Failover",
    "GeoLocation",
    "GeoProximityLocation",
    "CidrRoutingConfig",
}


def _multivalue_changes(
    fqdn: str, current: list[dict[str, Any]], values: list[str], ttl: int
) -> list[dict[str, Any]]:
    """One change batch that leaves one multivalue-answer set per IP in ``values``; empty when the
    name already holds exactly that.

    A set already holding one wanted IP stays, with its health check (Route 53 answers a multivalue
    record without a health check as always healthy): only its TTL is changed (an UPSERT of the set
    as read). Every other set is deleted as read (Route 53 deletes only an exact match) and the
    missing IPs are created. The batch is applied atomically.
    """
    keep: dict[str, dict[str, Any]] = {}
    changes: list[dict[str, Any]] = []
    for rrset in current:
        held = [r["Value"] for r in rrset.get("ResourceRecords", [])]
        if len(held) == 1 and held[0] in values and held[0] not in keep:
            keep[held[0]] = rrset
            if rrset.get("TTL") != ttl:
                changes.append({"Action": "UPSERT", "ResourceRecordSet": {**rrset, "TTL": ttl}})
        else:
            changes.append({"Action": "DELETE", "ResourceRecordSet": rrset})
    for ip in values:
        if ip not in keep:
            created = {
                "Name": fqdn,
                "Type": "A",
                "SetIdentifier": f"twincd-{ip}",
                "MultiValueAnswer": True,
                "TTL": ttl,
                "ResourceRecords": [{"Value": ip}],
            }
            changes.append({"Action": "CREATE", "ResourceRecordSet": created})
    # DELETEs first: replacing a set by a DELETE and a CREATE in one batch is how Route 53's
    # ChangeResourceRecordSets docs replace a record.
    return sorted(changes, key=lambda c: c["Action"] != "DELETE")


class Route53:
    """Amazon Route 53 through boto3; credentials from the standard AWS chain (env, profile, IRSA)."""

    managed = True

    def __init__(
        self,
        *,
        zone: str,
        hosted_zone_id: str | None = None,
        region: str = "us-east-1",
        page_size: int = 100,
    ) -> None:
        import boto3  # here, so the other providers work without boto3 installed

        self.page_size = page_size

        self.zone = zone.rstrip(".") + "."
        self.client: Any = boto3.client("route53", region_name=region)
        self._zone_id = hosted_zone_id

    @property
    def description(self) -> str:
        return f"route53 zone {self.zone.rstrip('.')}"

    def _call(self, what: str, method: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            result: dict[str, Any] = getattr(self.client, method)(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            message = e.response.get("Error", {}).get("Message", "")
            error = DnsUnavailable if code in _AWS_TRANSIENT else DnsRefused
            raise error(f"{self.description}: {what}: {code}: {message}"[:500]) from None
        except NoCredentialsError:
            raise DnsRefused(f"{self.description}: {what}: no AWS credentials found") from None
        except BotoCoreError as e:
            raise DnsUnavailable(f"{self.description}: {what}: {type(e).__name__}") from None
        return result

    def zone_id(self) -> str:
        if self._zone_id is None:
            found = self._call(
                "find hosted zone", "list_hosted_zones_by_name", DNSName=self.zone, MaxItems="1"
            )
            zones = [z for z in found.get("HostedZones", []) if z["Name"] == self.zone]
            if not zones:
                raise DnsRefused(f"{self.description}: no hosted zone named {self.zone} in this account")
            self._zone_id = str(zones[0]["Id"]).rsplit("/", 1)[-1]
        return self._zone_id

    def _fqdn(self, name: str) -> str:
        return f"{name}.{self.zone}" if name not in ("@", "") else self.zone

    def _sets(self, fqdn: str) -> list[dict[str, Any]]:
        """Every A record set of ``fqdn``, across pages.

        A simple record set holds all its values in one set, but a multivalue-answer (or weighted,
        latency, ...) name has one set per SetIdentifier, and a page may end in the middle of them:
        ListResourceRecordSets then says IsTruncated with NextRecordName/Type/Identifier.
        """
        sets: list[dict[str, Any]] = []
        start: dict[str, str] = {"StartRecordName": fqdn, "StartRecordType": "A"}
        while True:
            page = self._call(
                f"read A {fqdn}",
                "list_resource_record_sets",
                HostedZoneId=self.zone_id(),
                MaxItems=str(self.page_size),
                **start,
            )
            listed = page.get("ResourceRecordSets", [])
            sets += [r for r in listed if r["Name"] == fqdn and r["Type"] == "A"]
            more = page.get("IsTruncated") and page.get("NextRecordName") == fqdn
            if not more or page.get("NextRecordType") != "A":
                return sets
            after = page.get("NextRecordIdentifier")
            if not after or after == start.get("StartRecordIdentifier"):
                # The same name and type continue on the next page only through a SetIdentifier; a
                # page that does not move on would be read forever (moto 5 omits the identifier).
                raise DnsUnavailable(f"{self.description}: read A {fqdn}: the listing did not advance")
            start = {"StartRecordName": fqdn, "StartRecordType": "A", "StartRecordIdentifier": after}

    def read(self, name: str) -> ARecords:
        sets = self._sets(self._fqdn(name))
        ips = frozenset(r["Value"] for rrset in sets for r in rrset.get("ResourceRecords", []))
        return ARecords(ips, max((int(r["TTL"]) for r in sets if "TTL" in r), default=None))

    def replace_a(self, name: str, ips: Iterable[str], *, ttl: int) -> None:
        values = _checked_ips(name, ips)
        fqdn = self._fqdn(name)
        what = f"replace A {fqdn} with {', '.join(values)}"
        current = self._sets(fqdn)
        for rrset in current:
            if "AliasTarget" in rrset:
                raise DnsConfigError(
                    f"{self.description}: {what}: an alias record; twincd manages plain A sets"
                )
            policy = sorted(set(rrset) & _ROUTING_POLICIES)
            if policy:
                raise DnsConfigError(
                    f"{self.description}: {what}: a {policy[0]} routing policy; twincd manages simple "
                    "and multivalue-answer A records"
                )
        if any(r.get("MultiValueAnswer") for r in current):
            changes = _multivalue_changes(fqdn, current, values, ttl)
            if not changes:
                return  # already exactly that (a batch must hold at least one change)
        else:
            # One UPSERT replaces the whole simple set; Route 53 applies a change batch atomically.
            simple = {
                "Name": fqdn,
                "Type": "A",
                "TTL": ttl,
                "ResourceRecords": [{"Value": ip} for ip in values],
            }
            changes = [{"Action": "UPSERT", "ResourceRecordSet": simple}]
        change = self._call(
            what,
            "change_resource_record_sets",
            HostedZoneId=self.zone_id(),
            ChangeBatch={"Comment": "twincd failover", "Changes": changes},
        )
        # The API lists the new set at once, while the change is still PENDING on the name servers:
        # a read-back proves nothing until the change is INSYNC.
        self._wait_insync(str(change["ChangeInfo"]["Id"]), fqdn)

    def _wait_insync(self, change_id: str, fqdn: str, *, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self._call(f"wait for {fqdn}", "get_change", Id=change_id)["ChangeInfo"]["Status"] != "INSYNC":
            if time.monotonic() > deadline:
                raise DnsUnavailable(
                    f"{self.description}: change {change_id} of {fqdn} not INSYNC after {timeout:.0f} s"
                )
            time.sleep(2)


# The role that grants read and write on record sets of a zone (built-in Azure RBAC role).
AZURE_DNS_ROLE = "DNS Zone Contributor"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_AZURE_RECORD_NAME = re.compile(r"^(@|[A-Za-z0-9_*]([A-Za-z0-9_-]*)(\.[A-Za-z0-9_-]+)*)$")
_ARM_CODE = re.compile(r"^[A-Za-z0-9_.]{1,80}$")
# Bearer tokens are JWTs (three base64url parts, the first starting "eyJ"); a server may echo one.
_TOKEN_LIKE = re.compile(r"(?i:bearer\s+)\S+|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.?[A-Za-z0-9_-]*")


class AzureDns:
    """Azure DNS through azure-mgmt-dns; credentials from the standard Azure chain.

    ``DefaultAzureCredential`` (environment variables, workload or managed identity, ``az login``)
    unless a ``TokenCredential`` is given. The identity needs the "DNS Zone Contributor" role on
    the zone (or its resource group). ``base_url`` points at another ARM endpoint (sovereign
    clouds, Azure Stack, a local fake); plain http is only accepted for a loopback host.

    A replace reads the record set, then PUTs the whole new set with ``If-Match: <etag>`` (or
    ``If-None-Match: *`` when there was none), so a concurrent writer makes it fail with 412
    instead of being overwritten silently; then it reads the record set back.
    """

    managed = True

    def __init__(
        self,
        *,
        subscription_id: str,
        resource_group: str,
        zone: str,
        credential: TokenCredential | None = None,
        base_url: str | None = None,
        timeout: float = TIMEOUT,
        retries: int = 3,
    ) -> None:
        from azure.mgmt.dns import DnsManagementClient  # here, so importing this module stays cheap

        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.zone = zone.rstrip(".")
        self.base_url = base_url
        # Passed with every operation: azure-core's BearerTokenCredentialPolicy refuses to send a
        # token over plain http unless the request option enforce_https=False is given.
        self._options: dict[str, Any] = {}
        if base_url is not None:
            url = urlsplit(base_url)
            if url.scheme == "http" and url.hostname in _LOOPBACK:
                self._options["enforce_https"] = False
            elif url.scheme != "https" or not url.hostname:
                raise DnsConfigError(
                    f"dns.base_url {base_url!r}: the ARM endpoint must be https "
                    "(plain http only on a loopback address)"
                )
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        self.credential = credential
        # The SDK retries 408/429/5xx and connection errors itself (honouring Retry-After); keep
        # it short, the Prefect task retries transient failures again with a fresh read.
        self.client = DnsManagementClient(
            credential,
            subscription_id,
            base_url=base_url,
            connection_timeout=timeout,
            read_timeout=timeout,
            retry_total=retries,
            retry_backoff_factor=0.5,
            retry_backoff_max=8,
            timeout=max(30.0, 6 * timeout),
        )

    @property
    def description(self) -> str:
        return (
            f"azure zone {self.zone} (resource group {self.resource_group}, "
            f"subscription {self.subscription_id})"
        )

    def _relative(self, name: str) -> str:
        relative = name.rstrip(".")
        if relative in ("", "@", self.zone):
            return "@"
        relative = relative.removesuffix(f".{self.zone}")
        if not _AZURE_RECORD_NAME.match(relative):
            raise DnsConfigError(f"{name!r} is not a record name in zone {self.zone}")
        return relative

    def _get(self, relative: str, what: str) -> RecordSet | None:
        from azure.core.exceptions import AzureError

        error: DnsUnavailable | PermanentError
        try:
            return self.client.record_sets.get(self.resource_group, self.zone, relative, "A", **self._options)
        except AzureError as e:
            if _status(e) == 404 and _arm_code(e) in ("NotFound", "ResourceNotFound"):
                # The record set does not exist; zone and group do (else ParentResourceNotFound, ...).
                return None
            error = self._translate(e, what)
        # Raised outside the handler on purpose: the SDK exception holds the request, whose
        # Authorization header carries the bearer token; chained (from e, or implicitly as
        # __context__) it would travel with our error into logs, pickled task states and reports.
        raise error

    def read(self, name: str) -> ARecords:
        relative = self._relative(name)
        found = self._get(relative, f"read A {relative}")
        if found is None:
            return ARecords(frozenset(), None)
        return ARecords(
            frozenset(a.ipv4_address for a in (found.a_records or []) if a.ipv4_address), found.ttl
        )

    def replace_a(self, name: str, ips: Iterable[str], *, ttl: int) -> None:
        from azure.core.exceptions import AzureError
        from azure.mgmt.dns.models import ARecord, RecordSet

        values = _checked_ips(name, ips)
        relative = self._relative(name)
        what = f"replace A {relative} with {', '.join(values)}"
        current = self._get(relative, what)
        if current is not None and current.target_resource is not None and current.target_resource.id:
            raise DnsConfigError(
                f"{self.description}: {what}: the record set is an alias of "
                f"{current.target_resource.id}; twincd manages plain A record sets only"
            )
        record_set = RecordSet(
            ttl=ttl,
            a_records=[ARecord(ipv4_address=ip) for ip in values],
            metadata=current.metadata if current is not None else None,
        )
        # If-Match with the etag just read (If-None-Match: * when there was no record set): the PUT
        # fails with 412 if anyone changed the record set in between, instead of overwriting them.
        guard: dict[str, str] = (
            {"if_match": current.etag} if current is not None and current.etag else {"if_none_match": "*"}
        )
        error: DnsUnavailable | PermanentError
        try:
            self.client.record_sets.create_or_update(
                self.resource_group, self.zone, relative, "A", record_set, **guard, **self._options
            )
        except AzureError as e:
            error = self._translate(e, what)
        else:
            written = self._get(relative, f"read back A {relative}")
            shown = sorted(a.ipv4_address or "" for a in (written.a_records or [])) if written else []
            if written is None or shown != values or written.ttl != ttl:
                error = DnsUnavailable(
                    f"{self.description}: {what}: read back shows {', '.join(shown) or 'no A records'}"
                    f" (TTL {written.ttl if written else '-'}); someone changed it right after twincd's write"
                )
            else:
                return
        raise error  # outside the handler: see _get

    def _translate(self, e: AzureError, what: str) -> DnsUnavailable | PermanentError:
        """An SDK error as ours, carrying only the status, the ARM error code and a cleaned message."""
        from azure.core.exceptions import (
            ClientAuthenticationError,
            ServiceRequestError,
            ServiceResponseError,
            ServiceResponseTimeoutError,
        )

        where = f"{self.description}: {what}"
        status, code, message = _status(e), _arm_code(e), _arm_message(e)
        detail = f"{status} {code}".strip() + (f": {message}" if message else "")
        role = (
            f"the identity needs the {AZURE_DNS_ROLE!r} role on zone {self.zone} in resource group "
            f"{self.resource_group} (or on the group)"
        )
        if isinstance(e, ClientAuthenticationError) and status is None:
            # The credential could not get a token. Its text lists what it tried; only the type is
            # shown, as a credential's own errors are not ours to vouch for.
            return DnsRefused(
                f"{where}: no Azure token ({type(e).__name__}); sign in with `az login`, set "
                f"AZURE_CLIENT_ID/AZURE_TENANT_ID/... or use a managed identity; {role}"
            )
        if status == 401:
            return DnsRefused(
                f"{where}: {detail}; Azure did not accept the token (expired, another tenant or "
                f"cloud?); {role}"
            )
        if status == 403:
            return DnsRefused(f"{where}: {detail}; grant it: {role}")
        if status == 412:
            return DnsUnavailable(
                f"{where}: someone changed the record set between twincd's read and its write "
                "(etag mismatch, 412); read it again and retry"
            )
        if status == 404:
            return DnsConfigError(
                f"{where}: {detail}; check dns.zone, dns.resource_group and dns.subscription_id"
            )
        if status == 400:
            return DnsConfigError(f"{where}: {detail}")
        if status in (408, 429) or (status is not None and status >= 500):
            return DnsUnavailable(f"{where}: {detail}")
        if status is not None:
            return DnsRefused(f"{where}: {detail}")
        if isinstance(e, (ServiceRequestError, ServiceResponseError, ServiceResponseTimeoutError)):
            return DnsUnavailable(f"{where}: {type(e).__name__} (the ARM endpoint did not answer)")
        return DnsUnavailable(f"{where}: {type(e).__name__}")


def _status(e: AzureError) -> int | None:
    status = getattr(e, "status_code", None)
    return status if isinstance(status, int) else None


def _arm_code(e: AzureError) -> str:
    error = getattr(e, "error", None)
    code = getattr(error, "code", None)
    return code if isinstance(code, str) and _ARM_CODE.match(code) else ""


def _arm_message(e: AzureError) -> str:
    """The ARM error message from the response body, one line, trimmed, anything token-like removed."""
    error = getattr(e, "error", None)
    message = getattr(error, "message", None)
    if not isinstance(message, str):
        return ""
    return _TOKEN_LIKE.sub("[redacted]", " ".join(message.split()))[:300].rstrip(".")


class NoDns:
    """``dns: none``: twincd does not manage the record; the plan tells people to change it themselves."""

    managed = False
    description = "none (DNS is not managed by twincd)"

    def read(self, name: str) -> ARecords:
        return ARecords(frozenset(), None)

    def replace_a(self, name: str, ips: Iterable[str], *, ttl: int) -> None:
        raise DnsConfigError(
            "dns: none; twincd does not change DNS records (set dns.type in the environment)"
        )
