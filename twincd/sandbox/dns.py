"""BIND for the local stack: an authoritative, TSIG-protected dynamic zone on 127.0.0.1.

The failover flow changes the ``web`` A record set through RFC 2136 dynamic updates, the same
protocol many DNS providers accept, so the sandbox runs the real thing (Debian ``bind9``) rather
than a fake. Files live under ``<state_dir>/dns/``:

- ``named.conf``: the server, listening on 127.0.0.1:<port> only, no recursion, no rndc;
- ``<zone>.zone``: written once; BIND keeps dynamic updates in ``<zone>.zone.jnl`` beside it, so
  a restart keeps the record as the last failover left it (as a real server would);
- ``tsig.key``: the key in BIND's syntax (``tsig-keygen`` output), included by named.conf;
- ``tsig.secret``: the same key as ``hmac-sha256:NAME:SECRET`` (``nsupdate -y`` / ``dig -y``
  syntax), what twincd reads through ``env:TWINCD_DNS_TSIG`` or a Prefect Secret block.

Both key files are mode 600 and never printed.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from twincd.errors import PermanentError
from twincd.sandbox import procs

NAME = "dns"
KEY_NAME = "twincd-failover"
ALGORITHM = "hmac-sha256"
SECRET_ENV = "TWINCD_DNS_TSIG"  # the variable the sandbox environment's `dns.key: env:...` names

_KEY_SECRET = re.compile(r'secret\s+"([A-Za-z0-9+/=]+)"')


class DnsSandboxError(PermanentError):
    """tsig-keygen or named is missing or failed (install Debian bind9 and bind9-utils)."""


def dns_dir(state_dir: Path) -> Path:
    return state_dir / NAME


def secret_path(state_dir: Path) -> Path:
    return dns_dir(state_dir) / "tsig.secret"


def _write_private(path: Path, text: str) -> None:
    """Write a key file readable by its owner only, created so from the start (no world-readable window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def ensure_key(state_dir: Path) -> str:
    """Generate the TSIG key once; return it as ``hmac-sha256:NAME:SECRET``."""
    key_file = dns_dir(state_dir) / "tsig.key"
    secret_file = secret_path(state_dir)
    if key_file.exists() and secret_file.exists():
        return secret_file.read_text().strip()
    try:
        out = subprocess.run(
            ["tsig-keygen", "-a", ALGORITHM, KEY_NAME], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise DnsSandboxError(f"tsig-keygen failed ({type(e).__name__}); install bind9-utils") from None
    found = _KEY_SECRET.search(out)
    if found is None:
        raise DnsSandboxError("tsig-keygen printed no secret")
    _write_private(key_file, out)
    value = f"{ALGORITHM}:{KEY_NAME}:{found.group(1)}"
    _write_private(secret_file, value + "\n")
    return value


def zone_text(
    *, zone: str, records: Mapping[str, tuple[str, ...]], ttl: int = 60, ttls: Mapping[str, int] | None = None
) -> str:
    """A minimal zone: SOA, NS (the server itself) and A record sets by relative name (``ttls``:
    a record's own TTL, else ``ttl``)."""
    lines = [
        f"$ORIGIN {zone.rstrip('.')}.",
        f"$TTL {ttl}",
        "@  IN SOA ns hostmaster 1 3600 600 86400 60",
        "@  IN NS  ns",
        "ns IN A   127.0.0.1",
    ]
    for name, ips in records.items():
        lines += [f"{name} {(ttls or {}).get(name, ttl)} IN A {ip}" for ip in ips]
    return "\n".join(lines) + "\n"


def named_conf(*, directory: Path, port: int, zone: str, zone_file: Path, key_file: Path) -> str:
    return f"""\
// Written by twincd (sandbox); the local stack's authoritative server for {zone}.
include "{key_file}";
options {{
    directory "{directory}";
    pid-file "{directory}/named.pid";
    session-keyfile "{directory}/session.key";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    allow-query {{ 127.0.0.1; }};
    notify no;
}};
controls {{ }};
zone "{zone}" {{
    type primary;
    file "{zone_file}";
    // Only holders of the key may change names in the zone (RFC 2136 with TSIG).
    update-policy {{ grant {KEY_NAME} zonesub ANY; }};
}};
"""


def soa_answers(*, port: int, zone: str, timeout: float = 1.0) -> bool:
    """Readiness: the server answers authoritatively for the zone (its SOA, rcode NOERROR)."""
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    try:
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return response.rcode() == dns.rcode.NOERROR and bool(response.answer)


def start_dns(
    state_dir: Path,
    port: int,
    *,
    zone: str = "example.test",
    records: Mapping[str, tuple[str, ...]] | None = None,
    ttl: int = 60,
    ttls: Mapping[str, int] | None = None,
) -> str:
    """Start named for ``zone`` on 127.0.0.1:``port`` (idempotent); return the TSIG key string.

    ``records`` seeds A record sets (e.g. ``{"web": ("127.0.0.11", "127.0.0.12")}``) when the zone
    file is first written; later starts keep what dynamic updates made of it.
    """
    directory = dns_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key = ensure_key(state_dir)
    zone_file = directory / f"{zone}.zone"
    if not zone_file.exists():
        zone_file.write_text(zone_text(zone=zone, records=records or {}, ttl=ttl, ttls=ttls))
    conf = directory / "named.conf"
    changed = procs.write_config(
        conf,
        named_conf(
            directory=directory, port=port, zone=zone, zone_file=zone_file, key_file=directory / "tsig.key"
        ),
    )
    if changed:
        procs.stop_daemon(NAME, state_dir=state_dir)  # a running server would keep the old port or zone
    # -g: foreground, logs to stderr (our log file); -u root: the sandbox runs as root and named
    # would otherwise switch to the `bind` user, which cannot write the journal under our state dir.
    procs.start_daemon(
        NAME,
        ["named", "-g", "-4", "-u", "root", "-c", str(conf)],
        state_dir=state_dir,
        ready=lambda: soa_answers(port=port, zone=zone),
        timeout=30,
    )
    return key


def stop_dns(state_dir: Path) -> bool:
    return procs.stop_daemon(NAME, state_dir=state_dir)
