"""Process control for the local stack's daemons (registry, build service, ...), tracked by PID file.

Each daemon runs detached in its own session, logs to ``<state_dir>/logs/<name>.log`` and is recorded
in ``<state_dir>/run/<name>.pid`` together with its start time from ``/proc/<pid>/stat``. A PID alone
is not an identity: after a reboot or a crash the kernel may give the same PID to an unrelated
process, and signalling it would kill a stranger. A process counts as ours only if both match.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from twincd.errors import TransientError

_POLL_SECONDS = 0.1


class DaemonNotReady(TransientError):
    """A daemon did not come up in time; the message names it and the log file to read."""


class DaemonExited(DaemonNotReady):
    """A daemon exited while we waited for it to become ready (bad config, port taken, ...)."""


class DaemonStuck(TransientError):
    """A daemon survived SIGKILL (stuck in uninterruptible I/O)."""


def log_path(name: str, *, state_dir: Path) -> Path:
    return state_dir / "logs" / f"{name}.log"


def pid_path(name: str, *, state_dir: Path) -> Path:
    return state_dir / "run" / f"{name}.pid"


def write_config(path: Path, text: str) -> bool:
    """Write a daemon's config file; True if its content changed (a running daemon must restart)."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, log: Path | None = None) -> None:
    """Poll ``predicate`` until it is true; raise DaemonNotReady naming ``what`` (and ``log``) if not."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            hint = f"; see {log}" if log is not None else ""
            raise DaemonNotReady(f"{what} did not come up within {timeout:g} s{hint}")
        time.sleep(_POLL_SECONDS)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it; another process may race us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, *, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_daemon(
    name: str,
    argv: Sequence[str],
    *,
    state_dir: Path,
    env: Mapping[str, str] | None = None,
    ready: Callable[[], bool],
    timeout: float,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` as daemon ``name`` unless it already runs; wait until ``ready()``; return its PID.

    ``env`` is added to the current environment. If the daemon exits or is not ready within ``timeout``
    it is stopped (nothing is left behind) and DaemonNotReady / DaemonExited is raised.
    """
    log = log_path(name, state_dir=state_dir)
    running = daemon_status(name, state_dir=state_dir)
    if running is not None:
        # Already started (by us or by an earlier `twincd up`): wait for readiness, start nothing.
        wait_until(ready, timeout, f"daemon {name!r} (pid {running})", log=log)
        return running

    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile = pid_path(name, state_dir=state_dir)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        # A new session makes the daemon its own process group leader (pgid == pid), so stop_daemon
        # can signal it with its children, and a Ctrl-C in our terminal does not reach it.
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    start_time = _start_time(proc.pid)
    record = {"pid": proc.pid, "start_time": start_time, "argv": list(argv)}
    tmp = pidfile.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(pidfile)  # atomic: a reader never sees half a PID file

    def up() -> bool:
        code = proc.poll()
        if code is not None:
            raise DaemonExited(f"daemon {name!r} exited with code {code} while starting; see {log}")
        return ready()

    try:
        wait_until(up, timeout, f"daemon {name!r} (pid {proc.pid})", log=log)
    except DaemonNotReady:
        stop_daemon(name, state_dir=state_dir)
        raise
    return proc.pid


def daemon_status(name: str, *, state_dir: Path) -> int | None:
    """The PID of daemon ``name`` if it runs and is the very process we started, else None."""
    pidfile = pid_path(name, state_dir=state_dir)
    try:
        record = json.loads(pidfile.read_text())
        pid, start_time = int(record["pid"]), int(record["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _start_time(pid) != start_time:
        return None
    return pid


def stop_daemon(name: str, *, state_dir: Path, grace: float = 10.0) -> bool:
    """Stop daemon ``name``: SIGTERM its process group, SIGKILL after ``grace`` seconds.

    Returns True if it was running. A stale PID file (the process is gone, or its PID now belongs to
    another process) is removed without signalling anything.
    """
    pidfile = pid_path(name, state_dir=state_dir)
    pid = daemon_status(name, state_dir=state_dir)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    start_time = _start_time(pid)
    try:
        own_group = os.getpgid(pid) == pid
    except ProcessLookupError:  # exited since daemon_status looked
        own_group = False

    def gone() -> bool:
        # The leader's exit is not enough: its children (uvicorn workers, conmon, ...) may still hold
        # the ports a restart wants, so the whole process group must be gone.
        return _start_time(pid) != start_time and not (own_group and _group_alive(pid))

    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal(pid, sig, group=own_group)
        deadline = time.monotonic() + grace
        while not gone() and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
        if gone():
            pidfile.unlink(missing_ok=True)
            return True
    # Only a process stuck in the kernel (state D) survives SIGKILL; a later retry may find it gone.
    raise DaemonStuck(f"daemon {name!r} (pid {pid}) did not exit after SIGKILL")


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    try:
        # The daemon leads its own group unless it moved itself elsewhere: then signal only it.
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count: PID 1 may never reap
    them on this kind of machine)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _start_time(pid: int) -> int | None:
    """Start time (clock ticks after boot) of a live process, or None if gone or a zombie.

    A daemon we spawned stays a zombie until reaped; reap it here when it is our child, so it never
    counts as running.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_time = fields[0], int(fields[19])
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):  # reaped only if it is our child
            os.waitpid(pid, os.WNOHANG)
        return None
    return start_time


def flow_run_processes(run_id: str = "") -> list[int]:
    """The processes executing flow run ``run_id`` (any flow run when ""): a runner or worker
    starts each with PREFECT__FLOW_RUN_ID in its environment (prefect/runner/_starter_engine.py)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if any(v.startswith(b"PREFECT__FLOW_RUN_ID=") and v.endswith(run_id.encode()) for v in variables):
            found.append(int(environ.parent.name))
    return found
