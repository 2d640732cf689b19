"""One change at a time: one release of an app, one failover of an environment.

Two releases of one app edit the same ``digest:`` lines: the later one's branch, built on the
target before the earlier merged, would conflict with it (or, merged the other way round, roll
the app back). So a run takes its turn:

- While it runs, it holds a slot of the Prefect global concurrency limit named after its lock
  (``release-<app>``, ``failover``; limit 1, created on first use, visible in the UI's
  Concurrency page). The slot is a lease the holder renews (prefect.concurrency.sync), so a run
  whose process dies frees it when the lease runs out.
- A run that waits for a person is suspended and holds nothing: the slot is released as the
  suspension (Prefect's ``Pause``) leaves the ``concurrency`` block. A later run of the same lock
  therefore does not trust the slot alone: holding it, it looks for earlier runs of the same lock
  that have not ended (waiting for a person, queued, or running) and, by ``rollout.later_release``:
  ``wait`` (the default): suspends itself, queued behind the latest of them, until that one ends;
  ``supersede``: answers the earlier releases of other tags that wait for a person "refused:
  superseded by …" (they close their MR and end Cancelled, nothing reverted, since nothing was
  merged), cancels the earlier ones still queued, and goes on, queued only behind one running.
- A run that ends (whatever its state) marks itself ended (a flow run input, ``ENDED``: its final
  state is set only after its flow function returns) and resumes the runs queued behind it; the
  watch-waits reconciliation resumes those whose run ahead ended without doing so (a killed
  process).

A run started without a deployment (``--auto-approve`` runs in the CLI's own process) cannot be
suspended: it refuses to start while an earlier run of its lock has not ended, and says which.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.concurrency.sync import concurrency
from prefect.exceptions import Pause
from prefect.flow_runs import suspend_flow_run

from flows.landing import deadline, suspendable, this_run
from twincd.adapters import waits
from twincd.config import Environment
from twincd.domain import Waiting
from twincd.errors import PermanentError

_ENDED = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]
_QUEUE_DAYS = 30  # a queued run's own deadline: the run ahead of it has approval deadlines of its own


class Busy(PermanentError):
    """An earlier run of the same lock has not ended, and this one cannot queue."""


@contextmanager
def one_at_a_time(
    environment: Environment, lock: str, flow_name: str, same: Callable[[FlowRun], bool]
) -> Iterator[None]:
    """Hold ``lock`` for the body; first queue behind (or supersede) earlier runs that hold it.

    ``same``: whether a run of ``flow_name`` takes the same lock (the same app's release; a
    failover that is not a dry run).
    """
    run = this_run()
    if run is None:  # not in a flow run (a test calling the flow function's body)
        yield
        return
    _ensure_limit(lock)
    waits.note_beat(run.id)  # how often its process beats: how long a silence means it died
    ended = False
    try:
        # A lease renewal that fails once (the server restarting) must not cancel a release
        # between its merge and its verification: only the holder's death frees the slot.
        with concurrency(lock, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
            ahead = _earlier(run, flow_name, same)
            if ahead and environment.rollout.later_release == "supersede":
                ahead = _supersede(run, ahead)
            if ahead:
                _queue(environment, run, lock, ahead[-1])  # suspends: the slot is released
            yield
        ended = True
    except Pause:
        raise  # suspended (waiting for a person or a turn): the runs behind keep waiting
    except BaseException:
        ended = True
        raise
    finally:
        if ended:
            _resume_next(run)


def _ensure_limit(name: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    # An existing limit (made by an earlier run) is kept as it is: people may have raised it.
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _earlier(run: FlowRun, flow_name: str, same: Callable[[FlowRun], bool]) -> list[FlowRun]:
    """Runs of the same lock created before ``run`` that have not ended, oldest first."""
    with get_client(sync_client=True) as client:
        runs: list[FlowRun] = waits.every_page(
            lambda offset: client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=_ENDED))
                ),
                offset=offset,
                limit=waits.PAGE,
            )
        )
        mine = (run.created, str(run.id))
        earlier = sorted(
            (
                r
                for r in runs
                if r.id != run.id and same(r) and r.created and run.created and (r.created, str(r.id)) < mine
            ),
            key=lambda r: (r.created, str(r.id)),
        )
        # One that returned from its flow function but whose final state is not set yet ended.
        return [r for r in earlier if not (r.state and r.state.is_running() and waits.ended(client, r.id))]


def _supersede(run: FlowRun, ahead: list[FlowRun]) -> list[FlowRun]:
    """Refuse the earlier releases waiting for a person ("superseded"), cancel the queued ones;
    those running, and runs of the same tag (the same branch and MR), stay ahead."""
    from prefect.states import Cancelled

    async def answer() -> list[FlowRun]:
        remaining = []
        async with get_client() as client:
            waiting = {w.id: w for w in await waits.waiting_runs(client)}
            for earlier in ahead:
                found = waiting.get(earlier.id)
                same_release = earlier.parameters.get("tag") == run.parameters.get("tag")
                if found is None or same_release:
                    remaining.append(earlier)
                    continue
                why = f"superseded by {run.name}"
                if found.waiting.behind:  # queued: it never opened anything
                    await client.set_flow_run_state(earlier.id, Cancelled(message=why), force=True)
                else:
                    refused = await waits.resume(
                        client, earlier.id, waits.answer(approved=False, approver="twincd", comment=why)
                    )
                    if refused:
                        remaining.append(earlier)
                        why = refused
                get_run_logger().info("%s: %s", earlier.name, why)
        return remaining

    return asyncio.run(answer())


def _queue(environment: Environment, run: FlowRun, lock: str, ahead: FlowRun) -> None:
    """Suspend until ``ahead`` ends (it resumes this run; so does the reconciliation)."""
    if not suspendable(run):
        raise Busy(
            f"{ahead.name} ({lock}) has not ended ({ahead.state_name}): this run, started without a "
            "deployment, cannot wait for its turn. Approve, refuse or cancel that one first, or start "
            "this one from the deployment (`twincd deploy` without --auto-approve) to queue behind it"
        )
    # A fresh pause key for every wait: a key that fired would let the run through at once.
    fired = set(run.empirical_policy.pause_keys or ())
    state = ahead.state_id or ahead.id
    prefix = f"{waits.TURN}{str(state)[:8]}-"  # twincd approve and the CLI tell these waits apart
    key = next(f"{prefix}{i}" for i in range(1, 1000) if f"{prefix}{i}" not in fired)
    waits.record(
        run.id,
        key,
        Waiting(
            None,
            environment.source,
            deadline(timedelta(days=_QUEUE_DAYS).total_seconds()),
            lock=lock,
            behind=str(ahead.id),
        ),
    )
    get_run_logger().info("%s waits for its turn behind %s (%s)", run.name, ahead.name, lock)
    suspend_flow_run(timeout=int(timedelta(days=_QUEUE_DAYS).total_seconds()), key=key)


def _resume_next(run: FlowRun) -> None:
    """Mark ``run`` ended and resume the runs queued behind it."""

    async def resume() -> None:
        async with get_client() as client:
            await waits.mark_ended(client, run.id)
            for queued in await waits.waiting_runs(client):
                if queued.waiting.behind == str(run.id):
                    why = await waits.resume(client, queued.id, {})
                    get_run_logger().info("%s: %s", queued.name, why or "its turn: resumed")

    try:
        asyncio.run(resume())
    except Exception as e:  # noqa: BLE001 - the reconciliation resumes it later; never fail the run for it
        get_run_logger().warning("could not resume the runs queued behind %s: %s", run.name, type(e).__name__)
