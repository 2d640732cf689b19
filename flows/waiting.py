"""The watch-waits flow: resume the runs waiting for a person whose answer is already known.

A release that waits for a merge on GitLab is resumed by the Merge Request Hook (``twincd
webhook``). A hook can be lost (the receiver down, GitLab's delivery given up), and a merge can
happen while nothing listens; a run left waiting past its deadline must still close its MR or
tell the team. This flow, scheduled every 10 minutes (prefect.yaml, ``twincd serve``), reads the
forge for every waiting run's MR and resumes the run when the MR was merged or closed, or when
its deadline passed. The resumed run reads the MR itself again: this flow decides nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client

from tasks.common import untraced
from tasks.deploy import read_merge_request
from twincd import wiring
from twincd.adapters import waits
from twincd.config import Environment, load_environment
from twincd.errors import TwincdError


@flow(name="watch-waits", log_prints=True)
async def watch_waits() -> list[str]:
    """Resume every waiting run whose MR was merged or closed, or whose deadline passed."""
    logger = get_run_logger()
    environments: dict[str, Environment | None] = {}
    done: list[str] = []
    async with get_client() as client:
        for run in await waits.waiting_runs(client):
            waiting = run.waiting
            if waiting.env not in environments:
                try:
                    environments[waiting.env] = load_environment(waiting.env)
                except TwincdError as e:
                    logger.warning(
                        "%s waits with environment %s, which does not load: %s", run.name, waiting.env, e
                    )
                    environments[waiting.env] = None
            environment = environments[waiting.env]
            run_input = None
            if (
                environment is not None
                and waiting.mr is not None
                and wiring.forge_type(environment).merged_by_people
            ):
                try:
                    mr = read_merge_request(untraced(environment), waiting.mr)
                except TwincdError as e:  # one forge's trouble must not hold the other runs
                    logger.warning("%s: could not read %s: %s", run.name, waiting.mr.ref, e)
                else:
                    if mr.state == "merged":
                        run_input = waits.answer(
                            approved=True, approver=mr.merged_by, comment="merged (watch-waits)"
                        )
                    elif mr.state == "closed":
                        run_input = waits.answer(approved=False, comment="closed (watch-waits)")
            if run_input is None and waits.overdue(waiting, datetime.now(UTC)):
                run_input = waits.answer(
                    approved=False, timed_out=True, comment=f"no answer by {waiting.deadline}"
                )
            if run_input is None:
                continue
            why = await waits.resume(client, run.id, run_input)
            outcome = f"{run.name}: {why or 'resumed (' + run_input['comment'] + ')'}"
            print(outcome)
            done.append(outcome)
    return done
