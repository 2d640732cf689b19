"""The local stack registry's token service: the real distribution token protocol, as GitLab runs it.

Debian's ``docker-registry`` (distribution 2.8) with ``auth: token`` answers every request without a
valid token with ``401`` and ``WWW-Authenticate: Bearer realm="<this service>/token",
service="…",scope="repository:<name>:pull"`` (distribution docs/spec/auth/token.md). A client then
asks this service for a token, with HTTP Basic credentials or none, and retries with it. This is
what GitLab's registry, Harbor, Docker Hub and GHCR do; the registry checks the token itself: a
JWT signed RS256 with the key whose certificate its ``rootcertbundle`` trusts, the certificate in
the header's ``x5c``, claims ``iss``, ``aud`` (the service), ``exp``/``nbf``/``iat``, ``jti`` and
``access`` (docs/platform.md, "OCI registry").

Like GitLab's token service: the stack's user with the right password gets what it asks for
(pull, push, delete); an anonymous request gets a token with no access (the registry then answers
401, insufficient scope); a wrong password gets 401 from here.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hmac
import json
import re
import secrets
import time
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from twincd.sandbox.serving import basic_credentials

NAME = "registry-auth"
USERNAME = "twincd"
PASSWORD_ENV = "TWINCD_REGISTRY_PASSWORD"
SERVICE = "twincd-registry"
ISSUER = "twincd-token-issuer"
TOKEN_SECONDS = 300
_SCOPE = re.compile(r"^repository:([a-z0-9._/-]+):([a-z*,]+)$")


def auth_dir(state: Path) -> Path:
    return state / "registry-auth"


def password_path(state: Path) -> Path:
    return auth_dir(state) / "password"


def ensure_keys(state: Path) -> tuple[Path, Path, Path]:
    """The signing key, its self-signed certificate and the stack user's password (made once)."""
    root = auth_dir(state)
    root.mkdir(parents=True, exist_ok=True)
    key_file, cert_file, password = root / "key.pem", root / "cert.pem", password_path(state)
    if not key_file.exists() or not cert_file.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if not password.exists():
        password.touch(mode=0o600)
        password.write_text(secrets.token_urlsafe(24) + "\n")
    return key_file, cert_file, password


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _user(header: str, password: bytes) -> str | None:
    """ "" for an anonymous request, the username for right credentials, None for wrong ones."""
    if not header:
        return ""
    found = basic_credentials(header)
    ok = found is not None and found[0] == USERNAME and hmac.compare_digest(found[1].encode(), password)
    return found[0] if found and ok else None


def create_app(key_file: Path, cert_file: Path, password: str, *, lifetime: int = TOKEN_SECONDS) -> Starlette:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(serialization.Encoding.DER)
    header = _b64(
        json.dumps({"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(der).decode()]}).encode()
    )
    expected = password.encode()

    def sign(claims: dict[str, object]) -> str:
        payload = f"{header}.{_b64(json.dumps(claims).encode())}"
        return f"{payload}.{_b64(key.sign(payload.encode(), padding.PKCS1v15(), hashes.SHA256()))}"

    async def token(request: Request) -> JSONResponse:
        user = _user(request.headers.get("authorization", ""), expected)
        if user is None:
            return JSONResponse(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                401,
                {"WWW-Authenticate": 'Basic realm="twincd registry"'},
            )
        access = []
        for scope in request.query_params.getlist("scope"):
            m = _SCOPE.match(scope)
            if m and user:  # anonymous: a token with no access, as GitLab's service gives
                access.append({"type": "repository", "name": m.group(1), "actions": m.group(2).split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": request.query_params.get("service", SERVICE),
            "exp": now + lifetime,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signed = sign(claims)
        # One line per token, as a token service's audit log has (never the token itself).
        print(
            f"{dt.datetime.now(dt.UTC).isoformat()} issued user={user or '(anonymous)'} "
            f"scopes={' '.join(request.query_params.getlist('scope')) or '-'} "
            f"agent={request.headers.get('user-agent', '-')}",
            flush=True,
        )
        issued = dt.datetime.fromtimestamp(now, dt.UTC).isoformat()
        return JSONResponse(
            {"token": signed, "access_token": signed, "expires_in": lifetime, "issued_at": issued}
        )

    return Starlette(routes=[Route("/token", token, methods=["GET"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--lifetime", type=int, default=TOKEN_SECONDS)
    args = parser.parse_args(argv)
    key_file, cert_file, password = ensure_keys(args.state)
    app = create_app(key_file, cert_file, password.read_text().strip(), lifetime=args.lifetime)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
