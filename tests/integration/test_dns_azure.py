"""The Azure DNS adapter: the real azure-mgmt-dns client against an HTTP-level fake of ARM (tests/fakes)."""

from __future__ import annotations

import pickle
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

from tests.fakes.azure_dns import FakeAzureDns, StaticTokenCredential
from twincd.adapters.dns import AzureDns, DnsConfigError, DnsRefused, DnsUnavailable
from twincd.config import DEFAULT_ENV, DnsAzure, load_environment
from twincd.errors import ConfigError
from twincd.sandbox.procs import free_port

pytestmark = pytest.mark.integration

SUB, RG, ZONE = "00000000-0000-0000-0000-0000000000aa", "rg-dns", "example.test"
EKS, AKS, OTHER = "127.0.0.11", "127.0.0.12", "127.0.0.99"
# Entra ID access tokens are JWTs; these are shaped like one so that nothing treats them as special.
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.eyJzdWIiOiJ0d2luY2QtdGVzdCJ9.c2VjcmV0LXNpZ25hdHVyZQ"
READER = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.eyJzdWIiOiJyZWFkZXIifQ.cmVhZGVyLXNpZ25hdHVyZQ"
WRONG = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.eyJzdWIiOiJzb21lb25lLWVsc2UifQ.d3Jvbmctc2lnbmF0dXJl"


@pytest.fixture
def fake() -> Iterator[FakeAzureDns]:
    with FakeAzureDns(
        token=TOKEN, reader_token=READER, subscription_id=SUB, resource_group=RG, zones=(ZONE,)
    ) as server:
        server.set_record(ZONE, "web", (EKS, AKS), ttl=60)
        yield server


def adapter(
    fake: FakeAzureDns, *, token: str = TOKEN, zone: str = ZONE, resource_group: str = RG, **kwargs: Any
) -> AzureDns:
    return AzureDns(
        subscription_id=SUB,
        resource_group=resource_group,
        zone=zone,
        credential=StaticTokenCredential(token),
        base_url=fake.url,
        **kwargs,
    )


def assert_no_secret(error: BaseException, *secrets: str) -> None:
    """Neither the message, the repr, a printed traceback nor a pickle (a Prefect state) holds a token."""
    assert (
        error.__cause__ is None and error.__context__ is None
    )  # the SDK error holds the Authorization header
    texts = [str(error), repr(error), "".join(traceback.format_exception(error))]
    blob = pickle.dumps(error)
    for secret in secrets:
        assert all(secret not in text for text in texts)
        assert secret.encode() not in blob


def test_replace_reads_back_the_whole_new_set(fake: FakeAzureDns) -> None:
    port = adapter(fake)
    assert port.managed and port.description == f"azure zone {ZONE} (resource group {RG}, subscription {SUB})"
    assert port.read("web").ips == {EKS, AKS}
    port.replace_a("web", [AKS], ttl=60)
    assert port.read("web").ips == {AKS}
    port.replace_a("web", {EKS, AKS}, ttl=60)
    assert port.read("web").ips == {EKS, AKS}
    assert port.read("nothing-here").ips == frozenset()
    # The zone apex and fully qualified names map to Azure's relative names.
    port.replace_a("@", [EKS], ttl=60)
    assert port.read(f"{ZONE}.").ips == {EKS} and fake.record(ZONE, "@") is not None
    assert port.read(f"web.{ZONE}").ips == {EKS, AKS}


def test_ttl_from_the_caller_is_what_azure_holds(fake: FakeAzureDns) -> None:
    port = adapter(fake)
    port.replace_a("web", [AKS], ttl=30)
    record = fake.record(ZONE, "web")
    assert record is not None and record.ttl == 30 and record.ips == (AKS,)
    port.replace_a("web", [AKS], ttl=300)
    assert fake.record(ZONE, "web").ttl == 300  # type: ignore[union-attr]
    assert [body["properties"]["TTL"] for body in fake.put_bodies] == [30, 300]
    assert port.read("web").ttl == 300  # the TTL the failover's wait reads back
    assert port.read("nothing-here").ttl is None


def test_several_ips_per_cluster_are_written_and_read_as_one_set(fake: FakeAzureDns) -> None:
    port = adapter(fake)
    front_ends = ["127.0.0.12", "127.0.0.22"]  # two load balancer front ends on aks
    port.replace_a("web", [EKS, *front_ends], ttl=60)
    assert port.read("web").ips == {EKS, *front_ends}
    record = fake.record(ZONE, "web")
    assert record is not None and sorted(record.ips) == sorted([EKS, *front_ends])


def test_one_put_replaces_the_whole_set_guarded_by_the_etag_just_read(fake: FakeAzureDns) -> None:
    before = fake.record(ZONE, "web")
    assert before is not None
    fake.set_record(ZONE, "web", (EKS, AKS), ttl=60).metadata.update({"owner": "platform"})
    etag = fake.record(ZONE, "web").etag  # type: ignore[union-attr]
    adapter(fake).replace_a("web", [AKS, OTHER], ttl=60)
    puts = fake.calls("PUT")
    assert len(puts) == 1 and puts[0].if_match == etag and puts[0].status == 200
    assert fake.put_bodies[0]["properties"]["ARecords"] == [{"ipv4Address": AKS}, {"ipv4Address": OTHER}]
    assert fake.put_bodies[0]["properties"]["metadata"] == {"owner": "platform"}  # people's tags survive
    assert [c.method for c in fake.calls()] == ["GET", "PUT", "GET"]  # read (etag), write, read back
    # A record set that did not exist is created only if nobody created it meanwhile.
    adapter(fake).replace_a("new", [EKS], ttl=60)
    created = fake.calls("PUT")[-1]
    assert created.if_none_match == "*" and created.if_match is None and created.status == 201


def test_a_concurrent_change_between_read_and_write_is_transient_and_not_overwritten(
    fake: FakeAzureDns,
) -> None:
    port = adapter(fake)
    fake.change_before_next_put((OTHER,))
    with pytest.raises(
        DnsUnavailable, match="someone changed the record set between twincd's read and its write"
    ):
        port.replace_a("web", [AKS], ttl=60)
    assert fake.calls("PUT")[-1].status == 412
    assert port.read("web").ips == {OTHER}  # the other writer's change stands
    # What the task retry does: read again (new etag) and write.
    port.replace_a("web", [AKS], ttl=60)
    assert port.read("web").ips == {AKS}
    # Same for a record set someone creates while twincd creates it.
    fake.change_before_next_put((OTHER,))
    with pytest.raises(DnsUnavailable, match="etag mismatch, 412"):
        port.replace_a("fresh", [AKS], ttl=60)


def test_a_token_azure_rejects_is_refused_naming_the_role_and_never_showing_the_token(
    fake: FakeAzureDns,
) -> None:
    fake.echo_tokens = True  # a badly behaved endpoint quotes the token back
    with pytest.raises(DnsRefused) as e:
        adapter(fake, token=WRONG).replace_a("web", [AKS], ttl=60)
    message = str(e.value)
    assert "401 InvalidAuthenticationToken" in message and "'DNS Zone Contributor'" in message
    assert f"zone {ZONE}" in message and f"resource group {RG}" in message
    assert_no_secret(e.value, WRONG, TOKEN)
    assert fake.calls("PUT") == [] and fake.record(ZONE, "web").ips == (EKS, AKS)  # type: ignore[union-attr]


def test_an_identity_without_write_permission_gets_403_naming_the_role(fake: FakeAzureDns) -> None:
    port = adapter(fake, token=READER)
    assert port.read("web").ips == {EKS, AKS}
    with pytest.raises(
        DnsRefused,
        match=r"403 AuthorizationFailed: .*grant it: the identity needs the "
        r"'DNS Zone Contributor' role on zone example.test in resource group rg-dns",
    ) as e:
        port.replace_a("web", [AKS], ttl=60)
    assert_no_secret(e.value, READER)
    assert fake.record(ZONE, "web").ips == (EKS, AKS)  # type: ignore[union-attr]


class _NoLogin:
    """A TokenCredential that cannot get a token, as DefaultAzureCredential on a machine without login."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        raise ClientAuthenticationError(
            "DefaultAzureCredential failed to retrieve a token (client secret s3cr3t)"
        )


def test_no_credential_available_is_refused_without_its_text(fake: FakeAzureDns) -> None:
    port = AzureDns(
        subscription_id=SUB, resource_group=RG, zone=ZONE, credential=_NoLogin(), base_url=fake.url
    )
    with pytest.raises(
        DnsRefused, match="no Azure token .ClientAuthenticationError.; sign in with `az login`"
    ) as e:
        port.read("web")
    assert "DNS Zone Contributor" in str(e.value)
    assert_no_secret(e.value, "s3cr3t")
    assert fake.calls() == []


def test_unknown_zone_or_group_is_a_config_error(fake: FakeAzureDns) -> None:
    with pytest.raises(
        DnsConfigError, match="404 ParentResourceNotFound: .*Parent resource 'other.test' not found"
    ):
        adapter(fake, zone="other.test").read("web")
    with pytest.raises(DnsConfigError, match="ParentResourceNotFound"):
        adapter(fake, zone="other.test").replace_a("web", [EKS], ttl=60)
    with pytest.raises(DnsConfigError, match="404 ResourceGroupNotFound.*check dns.zone, dns.resource_group"):
        adapter(fake, resource_group="rg-elsewhere").read("web")
    assert fake.calls("PUT") == []


def test_bad_input_is_refused_before_sending(fake: FakeAzureDns) -> None:
    port = adapter(fake)
    with pytest.raises(DnsConfigError, match="empty set"):
        port.replace_a("web", [], ttl=60)
    with pytest.raises(DnsConfigError, match="not an IPv4 address"):
        port.replace_a("web", ["::1"], ttl=60)
    with pytest.raises(DnsConfigError, match="not a record name"):
        port.read("web/../../other")
    with pytest.raises(DnsConfigError, match="must be https"):
        AzureDns(
            subscription_id=SUB,
            resource_group=RG,
            zone=ZONE,
            credential=StaticTokenCredential(TOKEN),
            base_url="http://management.example.test",
        )
    assert fake.calls() == []


def test_a_500_is_retried_by_the_sdk_and_a_lasting_one_is_transient(fake: FakeAzureDns) -> None:
    fake.fail_next(500, 1)
    port = adapter(fake)
    port.replace_a("web", [AKS], ttl=60)
    assert port.read("web").ips == {AKS}
    assert [c.status for c in fake.calls()][:2] == [500, 200]
    fake.fail_next(500, 10)
    with pytest.raises(DnsUnavailable, match="500 InternalServerError"):
        adapter(fake, retries=1).replace_a("web", [EKS], ttl=60)
    assert fake.record(ZONE, "web").ips == (AKS,)  # type: ignore[union-attr]


def test_429_waits_for_retry_after_then_succeeds_and_lasting_throttling_is_transient(
    fake: FakeAzureDns,
) -> None:
    fake.fail_next(429, 1, retry_after="1")
    t0 = time.monotonic()
    assert adapter(fake).read("web").ips == {EKS, AKS}
    assert time.monotonic() - t0 >= 0.9
    fake.fail_next(429, 5, retry_after="0")
    with pytest.raises(DnsUnavailable, match="429 TooManyRequests"):
        adapter(fake, retries=0).read("web")


def test_endpoint_down_is_transient() -> None:
    port = AzureDns(
        subscription_id=SUB,
        resource_group=RG,
        zone=ZONE,
        credential=StaticTokenCredential(TOKEN),
        base_url=f"http://127.0.0.1:{free_port()}",
        retries=0,
        timeout=1,
    )
    with pytest.raises(DnsUnavailable, match="ServiceRequestError .the ARM endpoint did not answer.") as e:
        port.read("web")
    assert_no_secret(e.value, TOKEN)


def test_environment_file_selects_the_azure_adapter(fake: FakeAzureDns, tmp_path: Path) -> None:
    from twincd.wiring import dns as dns_port

    raw = yaml.safe_load(DEFAULT_ENV.read_text())
    raw["dns"] = {
        "type": "azure",
        "subscription_id": SUB,
        "resource_group": RG,
        "zone": ZONE,
        "record": "web",
        "base_url": fake.url,
    }
    (tmp_path / "azure.yaml").write_text(yaml.safe_dump(raw))
    env = load_environment(tmp_path / "azure.yaml")
    assert isinstance(env.dns, DnsAzure) and env.dns.ttl == 60
    port = dns_port(env)  # DefaultAzureCredential is built, and asked for nothing until a request
    assert isinstance(port, AzureDns) and port.base_url == fake.url and port.zone == ZONE
    assert fake.calls() == []
    # Credentials come from the Azure chain; the file has no place for a secret.
    raw["dns"]["client_secret"] = "s3cr3t"
    (tmp_path / "azure.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="dns.azure.client_secret: Extra inputs are not permitted") as e:
        load_environment(tmp_path / "azure.yaml")
    assert "s3cr3t" not in str(e.value)
