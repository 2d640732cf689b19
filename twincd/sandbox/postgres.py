"""PostgreSQL for the local stack's Prefect server (``prefect.database: postgresql``).

Prefect's server keeps its state in SQLite by default; with more than a few workers and webhook
bursts, Prefect documents PostgreSQL as the database for production (`PREFECT_API_DATABASE_
CONNECTION_URL=postgresql+asyncpg://…`). The stack runs the real one (Debian ``postgresql``): a
cluster of its own (``initdb``), listening on 127.0.0.1:<port> only with trust authentication
for the ``prefect`` role (loopback only, a sandbox), its socket in its data directory, started and
stopped by PID like every other service.

PostgreSQL refuses to run as root ("cannot be run as root"); as root the server runs as the
``postgres`` system user (``runuser``), and its data directory is outside the state dir, whose
parents may not be traversable by that user (a test's ``mkdtemp`` dir is mode 700): a directory of
its own under the system's temp dir, named after the state dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from twincd.errors import PermanentError
from twincd.sandbox import procs

NAME = "postgres"
USER = "prefect"
DATABASE = "prefect"


def _bin(tool: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    on_path = shutil.which(tool)
    if on_path is None:
        raise PermanentError(
            f"PostgreSQL's {tool} is not installed: `apt-get install postgresql` (scripts/setup.sh)"
        )
    return on_path


def _as_root() -> bool:
    return os.geteuid() == 0


def data_dir(state_dir: Path) -> Path:
    if not _as_root():
        return state_dir / "postgres"
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"twincd-postgres-{tag}"


def _argv(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if _as_root() else list(argv)


def url(port: int) -> str:
    """The connection URL Prefect's server takes (no password: trust on loopback)."""
    return f"postgresql+asyncpg://{USER}@127.0.0.1:{port}/{DATABASE}"


def _ready(port: int) -> bool:
    done = subprocess.run(
        [_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER], check=False
    )
    return done.returncode == 0


def start_postgres(state_dir: Path, port: int) -> str:
    """Start the server on 127.0.0.1:``port`` (idempotent) with the ``prefect`` database; its URL."""
    data = data_dir(state_dir)
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, mode=0o700)
        if _as_root():
            shutil.chown(data, "postgres", "postgres")
        init = subprocess.run(
            _argv(
                _bin("initdb"),
                "-D",
                str(data),
                "--auth=trust",
                f"--username={USER}",
                "-E",
                "UTF8",
                "--no-instructions",
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise PermanentError(f"initdb {data} failed: {init.stderr.strip()[-500:]}")
    procs.start_daemon(
        NAME,
        _argv(
            _bin("postgres"),
            *("-D", str(data), "-p", str(port), "-k", str(data)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"),
        ),
        state_dir=state_dir,
        ready=lambda: _ready(port),
        timeout=60,
    )
    exists = subprocess.run(
        [_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", "postgres", "-tAc",
         f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    if exists != "1":
        subprocess.run(
            [_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE], check=True
        )
    return url(port)
