"""Print each step's duration of one deploy run, as Prefect recorded it.

    .venv/bin/python benchmarks/deploy_steps.py [FLOW_RUN_ID]   (default: the latest deploy run)

Reads the Prefect server of deployments/local.yaml (the local stack).
"""

from __future__ import annotations

import os
import sys
from uuid import UUID

from twincd.config import load_environment

os.environ["PREFECT_API_URL"] = load_environment().prefect.api_url

# Imported after PREFECT_API_URL is set: Prefect reads its settings on import.
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort


def main() -> None:
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
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    print(f"{run.name}: {run.state_name}, {run.total_run_time.total_seconds():.2f} s run time")
    for t in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time):
        seconds = t.total_run_time.total_seconds()
        print(f"  {t.name:<28} {seconds:7.2f} s  {t.state_name}")


if __name__ == "__main__":
    main()
