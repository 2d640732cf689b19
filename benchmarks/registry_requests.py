"""Count the registry requests one deploy run made on the local stack, from the registry's own logs.

    .venv/bin/python benchmarks/registry_requests.py [FLOW_RUN_ID]   (default: the latest deploy run)

Reads docker-registry's log (every request: ``response completed`` lines, and a warning for each
401 challenge) and the stack token service's log (one line per token issued) within the run's
start and end, and groups them by client: twincd's reads (user agent ``twincd/…``), the sandbox
clusters' pulls (``twincd-sandbox-kubelet``) and the engine's push (anything else). A challenge
is answered by one token request; a read that carried a cached token gets none.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from uuid import UUID

from twincd.config import load_environment

os.environ["PREFECT_API_URL"] = load_environment().prefect.api_url

# Imported after PREFECT_API_URL is set: Prefect reads its settings on import.
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort

_TIME = re.compile(r'time="([^"]+)"')
_FIELD = re.compile(r'([a-z.]+)=("(?:[^"\\]|\\.)*"|\S+)')
_ISSUED = re.compile(r"^(\S+) issued user=(\S+) scopes=(\S+) agent=(.*)$")


def _client(agent: str) -> str:
    if agent.startswith("twincd-sandbox-kubelet"):
        return "clusters (kubelet pulls)"
    if agent.startswith("twincd/"):
        return "twincd (digest and label reads)"
    return "engine (push)"


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.rstrip("Z")[:26].rstrip(".") + "+00:00")


def _count(logs: Path, start: datetime, end: datetime) -> tuple[Counter[tuple[str, str]], Counter[str]]:
    """(client, status) → requests, and client → tokens issued, between ``start`` and ``end``."""
    requests: Counter[tuple[str, str]] = Counter()
    for line in (logs / "registry.log").read_text().splitlines():
        stamp = _TIME.search(line)
        if not stamp or not (start <= _when(stamp.group(1)) <= end):
            continue
        fields = {k: v.strip('"') for k, v in _FIELD.findall(line)}
        if "http.request.method" not in fields:
            continue
        if "response completed" in line:
            status = fields.get("http.response.status", "?")
        elif "error authorizing context" in line:
            status = "401"
        else:
            continue
        requests[(_client(fields.get("http.request.useragent", "")), status)] += 1
    tokens: Counter[str] = Counter()
    for line in (logs / "registry-auth.log").read_text().splitlines():
        m = _ISSUED.match(line)
        if m and start <= _when(m.group(1)) <= end:
            tokens[_client(m.group(4))] += 1
    return requests, tokens


def main() -> None:
    logs = load_environment().state_path / "logs"
    if not (logs / "registry.log").exists():
        sys.exit("no registry log: start the stack with `twincd up` and run a deploy first")
    with get_client(sync_client=True) as client:
        if len(sys.argv) > 1:
            run = client.read_flow_run(UUID(sys.argv[1]))
        else:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["deploy"])),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            if not runs:
                sys.exit("no deploy run on this Prefect server")
            run = runs[0]
    if run.start_time is None or run.end_time is None:
        sys.exit(f"{run.name} has not finished")
    start, end = run.start_time, run.end_time
    requests, tokens = _count(logs, start, end)
    print(f"{run.name}: {run.state_name}, {start:%H:%M:%S}–{end:%H:%M:%S}")
    print(f"  {'client':<34} {'requests':>8} {'2xx/3xx':>8} {'401':>5} {'other':>6} {'tokens':>7}")
    for who in sorted({w for w, _ in requests} | set(tokens)):
        counts = {s: n for (w, s), n in requests.items() if w == who}
        ok = sum(n for s, n in counts.items() if s[:1] in "23")
        denied = counts.get("401", 0)
        other = sum(counts.values()) - ok - denied
        total = sum(counts.values())
        print(f"  {who:<34} {total:>8} {ok:>8} {denied:>5} {other:>6} {tokens.get(who, 0):>7}")


if __name__ == "__main__":
    main()
