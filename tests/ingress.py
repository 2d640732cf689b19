"""A stand-in for a cluster's ingress: an HTTPS server on an ingress IP that routes by SNI and Host,
with a certificate from a test CA, as ingress-nginx serves an app.

ingress-nginx answers a request for a host it has no rule for from its default backend (404) and,
with TLS, presents its default "Kubernetes Ingress Controller Fake Certificate"; a plain-HTTP request
for a TLS host gets a 308 redirect to https. This server does the same, so a health gate that does
not send the app's name as Host and SNI, or does not verify the certificate, fails here as it would
in front of a real ingress.
"""

from __future__ import annotations

import datetime
import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: Path  # the CA bundle a client trusts

    def issue(self, directory: Path, name: str) -> tuple[Path, Path]:
        """A server certificate for ``name`` (SAN dNSName), as cert-manager would issue it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


def make_ca(directory: Path, name: str = "twincd test CA") -> CertAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = directory / f"{name.replace(' ', '-')}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertAuthority(cert, key, pem)


def health_config(port: int, ca: CertAuthority) -> dict[str, object]:
    """An app's `health:` entry for an ingress served here: 2xx twice in a row, 0.2 s apart."""
    return {"path": "/healthz", "port": port, "ca_file": str(ca.pem), "successes": 2, "interval_seconds": 0.2}


@dataclass
class Ingress:
    """What the ingress answers for its host: ``status`` on ``path`` (e.g. 308 while misconfigured)."""

    host: str
    path: str = "/healthz"
    status: int = 200
    requests: int = 0


def _handler(ingress: Ingress) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ingress.requests += 1
            host = (self.headers.get("Host") or "").split(":")[0]
            if host != ingress.host:
                self.send_response(404)  # the default backend: no rule for this host
            elif self.path != ingress.path:
                self.send_response(404)
            else:
                self.send_response(ingress.status)
                if 300 <= ingress.status < 400:
                    self.send_header("Location", f"https://{ingress.host}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def serve_ingress(
    ips: list[str], port: int, ingress: Ingress, *, cert: tuple[Path, Path], default: tuple[Path, Path]
) -> Iterator[list[http.server.ThreadingHTTPServer]]:
    """Serve ``ingress`` over TLS on ``port`` of every IP: ``cert`` for SNI ``ingress.host``,
    ``default`` (the ingress's fallback certificate) for any other SNI or none."""
    app = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    app.load_cert_chain(*map(str, cert))
    fallback = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fallback.load_cert_chain(*map(str, default))

    def choose(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = app if server_name == ingress.host else fallback

    fallback.sni_callback = choose
    servers = []
    for ip in ips:
        server = http.server.ThreadingHTTPServer((ip, port), _handler(ingress))
        server.socket = fallback.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
