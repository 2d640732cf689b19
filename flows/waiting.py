"""The watch-waits flow: resume the waiting runs whose answer is already known.

A release that waits for a merge on GitLab is resumed by the Merge Request Hook (``twincd
webhook``). A hook can be lost (the receiver down, GitLab's delivery given up), and a merge can
happen while nothing listens; a run left waiting past its deadline must still close its MR or
tell the team. This flow, scheduled every 10 minutes (prefect.yaml, ``twincd serve``), reads the
forge for every waiting run's MR and resumes the run when the MR was merged or closed, or when
its deadline passed; and a run queued behind an earlier change of its app (flows/turns.py) whose
run ahead ended without resuming it (its process was killed). The resumed run reads the MR, or
looks for its turn, itself again: this flow decides nothing.

It also marks Crashed the runs whose process died: no heartbeat for three beats
(``waits.crash_the_dead``); a run queued behind one gets its turn in the same sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import PrefectClient, get_client

from tasks.common import untraced
from tasks.deploy import read_merge_request
from twincd import wiring
from twincd.adapters import waits
from twincd.config import Environment, load_environment
from twincd.errors import TwincdError


@flow(name="watch-waits", log_prints=True)
async def watch_waits() -> list[str]:
    """Resume every waiting run whose MR was merged or closed, whose turn came, or whose deadline passed."""
    environments: dict[str, Environment | None] = {}
    done: list[str] = []
    async with get_client() as client:
        # First the runs whose process died, so that the runs queued behind them get their turn below.
        try:
            for crashed in await waits.crash_the_dead(client):
                print(crashed)
                done.append(crashed)
        except Exception as e:  # noqa: BLE001 - the waiting runs below must be resumed all the same
            get_run_logger().warning("could not look for runs whose process died: %s", type(e).__name__)
        for run in await waits.waiting_runs(client):
            waiting = run.waiting
            if waiting.env not in environments:
                environments[waiting.env] = _load(run.name, waiting.env)
            run_input = await _answer(client, run, environments[waiting.env])
            if run_input is None:
                continue
            why = await waits.resume(client, run.id, run_input)
            outcome = f"{run.name}: {why or 'resumed (' + run_input['comment'] + ')'}"
            print(outcome)
            done.append(outcome)
    return done


def _load(name: str, source: str) -> Environment | None:
    try:
        return load_environment(source)
    except TwincdError as e:
        get_run_logger().warning("%s waits with environment %s, which does not load: %s", name, source, e)
        return None


async def _answer(
    client: PrefectClient, run: waits.WaitingRun, environment: Environment | None
) -> dict[str, Any] | None:
    """The input that resumes ``run`` now, or None while it must go on waiting."""
    waiting = run.waiting
    if waiting.behind:  # queued: its turn comes when the run ahead of it ended
        ahead = await client.read_flow_run(UUID(waiting.behind))
        if ahead.state is not None and ahead.state.is_final():
            return waits.answer(approved=False, comment=f"{ahead.name} ended ({ahead.state.name})")
    elif (
        environment is not None and waiting.mr is not None and wiring.forge_type(environment).merged_by_people
    ):
        try:
            mr = read_merge_request(untraced(environment), waiting.mr)
        except TwincdError as e:  # one forge's trouble must not hold the other runs
            get_run_logger().warning("%s: could not read %s: %s", run.name, waiting.mr.ref, e)
        else:
            if mr.state == "merged":
                return waits.answer(approver=mr.merged_by, comment="merged (watch-waits)", seen_on_forge=True)
            if mr.state == "closed":
                return waits.answer(comment="closed (watch-waits)", seen_on_forge=True)
    if waits.overdue(waiting, datetime.now(UTC)):
        return waits.answer(approved=False, timed_out=True, comment=f"no answer by {waiting.deadline}")
    return None
