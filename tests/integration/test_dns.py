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
    assert port.read_a("web") == {EKS, AKS}
    port.replace_a("web", [AKS], ttl=30)
    assert port.read_a("web") == {AKS}
    port.replace_a("web", {EKS, AKS}, ttl=60)
    assert port.read_a("web") == {EKS, AKS}
    assert port.read_a("nothing-here") == frozenset()


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
    assert Rfc2136(server=server, zone=ZONE, key=key).read_a("web") == {EKS, AKS}  # unchanged


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
        port.read_a("web")
    with pytest.raises(DnsUnavailable):
        port.replace_a("web", [EKS], ttl=60)


def test_none_reads_nothing_and_refuses_to_write() -> None:
    port = NoDns()
    assert not port.managed and port.read_a("web") == frozenset()
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
        assert port.read_a("web") == frozenset()
        port.replace_a("web", [EKS, AKS], ttl=60)
        assert port.read_a("web") == {EKS, AKS}
        port.replace_a("web", [AKS], ttl=60)
        assert port.read_a("web") == {AKS}
        with pytest.raises(DnsRefused, match="no hosted zone named other.test."):
            Route53(zone="other.test").read_a("web")
        with pytest.raises(DnsRefused, match="NoSuchHostedZone"):
            Route53(zone=ZONE, hosted_zone_id="ZNOTHERE").replace_a("web", [EKS], ttl=60)
