"""The failover health probe against an HTTPS "ingress" that routes by SNI and Host (tests/ingress.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ingress import CertAuthority, Ingress, make_ca, serve_ingress
from twincd.adapters.http_probe import HttpProbe

pytestmark = pytest.mark.integration

HOST = "web.example.test"
IP = "127.0.0.11"


def free_port_on(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls(tmp_path: Path) -> tuple[CertAuthority, tuple[Path, Path], tuple[Path, Path]]:
    ca = make_ca(tmp_path)
    return ca, ca.issue(tmp_path, HOST), ca.issue(tmp_path, "ingress.local")


@pytest.fixture
def ingress(tls: tuple[CertAuthority, tuple[Path, Path], tuple[Path, Path]]) -> Iterator[tuple[Ingress, int]]:
    _, cert, default = tls
    port, ingress = free_port_on(IP), Ingress(HOST)
    with serve_ingress([IP], port, ingress, cert=cert, default=default):
        yield ingress, port


def test_the_app_through_the_ingress_ip_with_its_name_as_host_and_sni(
    tls: tuple[CertAuthority, tuple[Path, Path], tuple[Path, Path]], ingress: tuple[Ingress, int]
) -> None:
    ca, _, _ = tls
    _, port = ingress
    ok, seen = HttpProbe().check(f"https://{IP}:{port}/healthz", host=HOST, ca_file=str(ca.pem))
    assert ok and seen == f"GET https://{IP}:{port}/healthz as {HOST}: HTTP 200"


def test_a_redirect_is_not_healthy(
    tls: tuple[CertAuthority, tuple[Path, Path], tuple[Path, Path]], ingress: tuple[Ingress, int]
) -> None:
    ca, _, _ = tls
    state, port = ingress
    state.status = 308  # ingress-nginx's ssl-redirect answer: the app was never reached
    ok, seen = HttpProbe().check(f"https://{IP}:{port}/healthz", host=HOST, ca_file=str(ca.pem))
    assert (
        not ok and "HTTP 308 (a redirect to https://web.example.test/healthz does not reach the app)" in seen
    )


def test_a_certificate_for_another_name_fails(
    tls: tuple[CertAuthority, tuple[Path, Path], tuple[Path, Path]], ingress: tuple[Ingress, int]
) -> None:
    ca, _, _ = tls
    _, port = ingress
    # Asking for a name the ingress has no certificate for: it presents its default one.
    other = "shop.example.test"
    ok, seen = HttpProbe().check(f"https://{IP}:{port}/healthz", host=other, ca_file=str(ca.pem))
    assert not ok and f"certificate verification failed for {other}" in seen and "Hostname mismatch" in seen


def test_a_certificate_from_an_untrusted_ca_fails(ingress: tuple[Ingress, int], tmp_path: Path) -> None:
    _, port = ingress
    stranger = make_ca(tmp_path, "another CA")
    ok, seen = HttpProbe().check(f"https://{IP}:{port}/healthz", host=HOST, ca_file=str(stranger.pem))
    assert (
        not ok
        and "certificate verification failed" in seen
        and "unable to get local issuer certificate" in seen
    )
    # Without a CA file the system trust store is used, which does not hold the test CA either.
    ok, _ = HttpProbe().check(f"https://{IP}:{port}/healthz", host=HOST)
    assert not ok


def test_nothing_listening_is_unhealthy() -> None:
    port = free_port_on(IP)
    ok, seen = HttpProbe(timeout=2).check(f"https://{IP}:{port}/healthz", host=HOST)
    assert not ok and seen == f"GET https://{IP}:{port}/healthz as {HOST}: ConnectError"
