"""The DNS adapters against a real BIND (Debian bind9, TSIG-protected dynamic zone) and moto's Route 53."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from twincd.adapters.dns import DnsConfigError, DnsRefused, DnsUnavailable, NoDns, Rfc2136, Route53, Tsig
from twincd.sandbox import dns as sandbox_dns
from twincd.sandbox.procs import free_port

pytestmark = pytest.mark.integration

ZONE = "example.test"
EKS, AKS = "127.0.0.11", "127.0.0.12"


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Tsig, Path]]:
    state = tmp_path_factory.mktemp("bind")
    port = free_port()
    t0 = time.monotonic()
    key = sandbox_dns.start_dns(state, port, zone=ZONE, records={"web": (EKS, AKS)})
    print(f"named ready in {time.monotonic() - t0:.2f} s")
    try:
        yield f"127.0.0.1:{port}", Tsig.parse(key), state
    finally:
        sandbox_dns.stop_dns(state)


def test_replace_reads_back_the_whole_new_set(bind: tuple[str, Tsig, Path]) -> None:
    server, key, _ = bind
    port = Rfc2136(server=server, zone=ZONE, key=key)
    assert port.read("web").ips == {EKS, AKS}
    port.replace_a("web", [AKS], ttl=30)
    assert port.read("web").ips == {AKS}
    port.replace_a("web", {EKS, AKS}, ttl=60)
    assert port.read("web").ips == {EKS, AKS}
    assert port.read("nothing-here").ips == frozenset()


def test_key_files_are_private_and_the_secret_never_shows(bind: tuple[str, Tsig, Path]) -> None:
    _, key, state = bind
    for name in ("tsig.key", "tsig.secret"):
        assert (sandbox_dns.dns_dir(state) / name).stat().st_mode & 0o777 == 0o600
    assert key.secret not in repr(key)


def test_wrong_secret_is_badsig_and_permanent(bind: tuple[str, Tsig, Path]) -> None:
    server, key, _ = bind
    wrong = Tsig(key.name, key.algorithm, base64.b64encode(b"not the key at all, 32 bytes...!").decode())
    port = Rfc2136(server=server, zone=ZONE, key=wrong)
    with pytest.raises(DnsRefused, match="BADSIG") as e:
        port.replace_a("web", [EKS], ttl=60)
    assert wrong.secret not in str(e.value) and key.secret not in str(e.value)
    assert Rfc2136(server=server, zone=ZONE, key=key).read("web").ips == {EKS, AKS}  # unchanged


def test_unknown_key_name_is_badkey(bind: tuple[str, Tsig, Path]) -> None:
    server, key, _ = bind
    with pytest.raises(DnsRefused, match="BADKEY.*'someone-else'"):
        Rfc2136(server=server, zone=ZONE, key=Tsig("someone-else", key.algorithm, key.secret)).replace_a(
            "web", [EKS], ttl=60
        )


def test_no_key_is_refused(bind: tuple[str, Tsig, Path]) -> None:
    server, _, _ = bind
    with pytest.raises(DnsRefused, match="REFUSED.*no TSIG key was sent"):
        Rfc2136(server=server, zone=ZONE, key=None).replace_a("web", [EKS], ttl=60)


def test_zone_the_server_does_not_hold_is_notauth(bind: tuple[str, Tsig, Path]) -> None:
    server, key, _ = bind
    with pytest.raises(DnsRefused, match="NOTAUTH"):
        Rfc2136(server=server, zone="other.test", key=key).replace_a("web", [EKS], ttl=60)


def test_empty_set_and_bad_addresses_are_refused_before_sending(bind: tuple[str, Tsig, Path]) -> None:
    server, key, _ = bind
    port = Rfc2136(server=server, zone=ZONE, key=key)
    with pytest.raises(DnsConfigError, match="empty set"):
        port.replace_a("web", [], ttl=60)
    with pytest.raises(DnsConfigError, match="not an IPv4 address"):
        port.replace_a("web", ["::1"], ttl=60)
    with pytest.raises(DnsConfigError, match=r"\[algorithm:\]name:base64-secret"):
        Tsig.parse("just-a-secret")


def test_server_down_is_transient() -> None:
    port = Rfc2136(server=f"127.0.0.1:{free_port()}", zone=ZONE, key=None, timeout=1)
    with pytest.raises(DnsUnavailable, match="ConnectionRefusedError"):
        port.read("web")
    with pytest.raises(DnsUnavailable):
        port.replace_a("web", [EKS], ttl=60)


def test_none_reads_nothing_and_refuses_to_write() -> None:
    port = NoDns()
    assert not port.managed and port.read("web").ips == frozenset()
    with pytest.raises(DnsConfigError, match="dns: none"):
        port.replace_a("web", [EKS], ttl=60)


def test_route53_upsert_replaces_the_set_under_moto() -> None:
    # Imported here so that the BIND tests still run where boto3/moto are missing (this one fails then).
    import boto3
    import moto

    # mock_aws serves AWS in-process at the HTTP layer, with fake credentials of its own.
    with moto.mock_aws():
        boto3.client("route53", region_name="us-east-1").create_hosted_zone(
            Name=ZONE, CallerReference="twincd-test"
        )
        port = Route53(zone=ZONE)
        assert port.read("web").ips == frozenset()
        port.replace_a("web", [EKS, AKS], ttl=60)
        assert port.read("web").ips == {EKS, AKS}
        port.replace_a("web", [AKS], ttl=60)
        assert port.read("web").ips == {AKS}
        with pytest.raises(DnsRefused, match="no hosted zone named other.test."):
            Route53(zone="other.test").read("web")
        with pytest.raises(DnsRefused, match="NoSuchHostedZone"):
            Route53(zone=ZONE, hosted_zone_id="ZNOTHERE").replace_a("web", [EKS], ttl=60)


def test_bind_reads_the_whole_set_with_its_ttl_and_holds_several_ips_per_cluster(
    bind: tuple[str, Tsig, Path],
) -> None:
    server, key, _ = bind
    port = Rfc2136(server=server, zone=ZONE, key=key)
    nlb = ("127.0.0.11", "127.0.0.21", "127.0.0.31")  # one IP per availability zone
    port.replace_a("multi", [*nlb, AKS], ttl=7)
    found = port.read("multi")
    assert found.ips == {*nlb, AKS} and found.ttl == 7  # the authority's TTL, not a countdown
    port.replace_a("multi", nlb, ttl=7)
    assert port.read("multi").ips == set(nlb)
    assert port.read("nothing-here").ttl is None


def test_route53_reads_a_multivalue_name_across_pages_and_writes_it_whole_in_one_batch() -> None:
    import boto3
    import moto

    with moto.mock_aws():
        client = boto3.client("route53", region_name="us-east-1")
        zone_id = client.create_hosted_zone(Name=ZONE, CallerReference="twincd-multi")["HostedZone"]["Id"]
        fqdn = f"web.{ZONE}."
        ips = ["127.0.0.11", "127.0.0.21", "127.0.0.31", AKS]
        client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Changes": [
                    {
                        "Action": "CREATE",
                        "ResourceRecordSet": {
                            "Name": fqdn,
                            "Type": "A",
                            "SetIdentifier": f"az-{i}",
                            "MultiValueAnswer": True,
                            "TTL": 45,
                            "ResourceRecords": [{"Value": ip}],
                        },
                    }
                    for i, ip in enumerate(ips)
                ]
            },
        )
        # Route 53 continues a name's sets on the next page through NextRecordIdentifier, which moto 5
        # does not implement: the adapter refuses a listing that does not advance instead of looping.
        with pytest.raises(DnsUnavailable, match="the listing did not advance"):
            Route53(zone=ZONE, page_size=2).read("web")
        port = Route53(zone=ZONE)
        found = port.read("web")
        assert found.ips == set(ips) and found.ttl == 45
        # Narrowed to eks's three IPs: aks's set is deleted, the others stay as they were.
        port.replace_a("web", ips[:3], ttl=45)
        assert port.read("web").ips == set(ips[:3])
        sets = client.list_resource_record_sets(HostedZoneId=zone_id, StartRecordName=fqdn)[
            "ResourceRecordSets"
        ]
        kept = sorted(r["SetIdentifier"] for r in sets if r["Name"] == fqdn and r["Type"] == "A")
        assert kept == ["az-0", "az-1", "az-2"]
        port.replace_a("web", ips, ttl=45)  # aks back: one set created for it
        assert port.read("web").ips == set(ips)
        port.replace_a("web", ips, ttl=45)  # already so: nothing to change (a batch needs one change)

        def identifiers() -> list[tuple[str, int]]:
            listed = client.list_resource_record_sets(HostedZoneId=zone_id, StartRecordName=fqdn)
            return sorted(
                (r["SetIdentifier"], r["TTL"])
                for r in listed["ResourceRecordSets"]
                if r["Name"] == fqdn and r["Type"] == "A"
            )

        before = [name for name, _ in identifiers()]
        port.replace_a("web", ips, ttl=20)  # a TTL change keeps each set (and its health check)
        assert identifiers() == [(name, 20) for name in before] and port.read("web").ttl == 20


def test_route53_refuses_routing_policies_it_does_not_manage() -> None:
    import boto3
    import moto

    with moto.mock_aws():
        client = boto3.client("route53", region_name="us-east-1")
        zone_id = client.create_hosted_zone(Name=ZONE, CallerReference="twincd-weighted")["HostedZone"]["Id"]
        weighted = {
            "Name": f"web.{ZONE}.",
            "Type": "A",
            "SetIdentifier": "eks",
            "Weight": 50,
            "TTL": 60,
            "ResourceRecords": [{"Value": EKS}],
        }
        client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={"Changes": [{"Action": "CREATE", "ResourceRecordSet": weighted}]},
        )
        with pytest.raises(DnsConfigError, match="a Weight routing policy"):
            Route53(zone=ZONE).replace_a("web", [AKS], ttl=60)
        assert Route53(zone=ZONE).read("web").ips == {EKS}  # untouched
