"""Runs suspended until a person answers, kept by the Prefect server itself.

A run that waits for a person (an approval in the Prefect UI, a merge on GitLab) or for its turn
behind an earlier change of the same app is *suspended* (``prefect.flow_runs.suspend_flow_run``):
its process exits and no worker slot is held; resuming it (``resume_flow_run`` with the run input
its form asks for) makes the server schedule it again, and a worker or ``twincd serve`` runs it
from the top, where every step before the wait finds its work already done. What it waits for is
written beside it as a flow run input named after the wait's pause key (``POST
/flow_runs/{id}/input``; the suspended state carries the key), so whoever learns the answer, the
webhook's Merge Request Hook or the reconciliation, finds the run of an MR without a database of
its own.

Prefect's server only allows a suspension of a run that has a deployment and no parent
(core_policy.HandlePausingFlows: "Cannot suspend subflows", "Cannot suspend flows without a
deployment"), so the flows ask for a person in the parent run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from twincd.domain import MergeRequest, Waiting

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

T = TypeVar("T")

PREFIX = "twincd-waiting-"  # + the wait's pause key
TURN = "turn-"  # the pause keys of a run queued behind an earlier change (flows/turns.py)
ENDED = "twincd-ended"  # a run's own mark that it returned from its flow function (flows/turns.py)
# The Prefect server answers at most PREFECT_SERVER_API_DEFAULT_LIMIT (200) runs per request.
PAGE = 200
# The state names of a run that waits: "Suspended" (prefect.states.Suspended: a Paused state that
# reschedules, no process), "Paused" (a blocking pause of a run started without a deployment).
WAITING_STATES = ("Suspended", "Paused")


def answer(
    *,
    approved: bool = False,
    approver: str = "",
    comment: str = "",
    timed_out: bool = False,
    seen_on_forge: bool = False,
) -> dict[str, Any]:
    """The run input of the approval form (flows.landing.Approval) that resumes a waiting run.

    ``seen_on_forge``: not a person's answer but "look at the forge" (a Merge Request Hook, the
    reconciliation): the run reads the MR and decides.
    """
    return {
        "approved": approved,
        "approver": approver,
        "comment": comment,
        "timed_out": timed_out,
        "seen_on_forge": seen_on_forge,
    }


def to_json(waiting: Waiting) -> str:
    return json.dumps(asdict(waiting))


def from_json(text: str) -> Waiting:
    raw = json.loads(text)
    mr = raw.pop("mr")
    if mr is not None:
        mr["approved_by"] = tuple(mr.get("approved_by", ()))
    return Waiting(mr=MergeRequest(**mr) if mr is not None else None, **raw)


def _write_once(run_id: UUID, key: str, value: str) -> None:
    """The flow run input ``key`` of ``run_id``, written unless it exists (the first write stays)."""
    import httpx
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.create_flow_run_input(run_id, key, value)
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 409:  # 409: "A flow run input with this key already exists."
                raise


def record(run_id: UUID, pause_key: str, waiting: Waiting) -> None:
    """Write what ``run_id`` waits for at ``pause_key`` (once: a resumed run keeps the first)."""
    _write_once(run_id, PREFIX + pause_key, to_json(waiting))


@dataclass(frozen=True)
class WaitingRun:
    id: UUID
    name: str
    waiting: Waiting


def every_page(read: Callable[[int], list[T]]) -> list[T]:
    """Every item of a paged listing: ``read(offset)`` until a short page."""
    items: list[T] = []
    while True:
        page = read(len(items))
        items.extend(page)
        if len(page) < PAGE:
            return items


async def runs_in(
    client: PrefectClient, states: Sequence[str], *, flows: Sequence[str] = (), top_level: bool = False
) -> list[FlowRun]:
    """Every run in one of ``states`` (of ``flows``, without a parent: when given), oldest first."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    runs: list[FlowRun] = []
    while True:
        page = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(name=FlowRunFilterStateName(any_=list(states))),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True) if top_level else None,
            ),
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(flows))) if flows else None,
            sort=FlowRunSort.START_TIME_ASC,
            offset=len(runs),
            limit=PAGE,
        )
        runs.extend(page)
        if len(page) < PAGE:
            return runs


async def waiting_runs(client: PrefectClient) -> list[WaitingRun]:
    """Every waiting run that recorded what it waits for (oldest first)."""
    from prefect.exceptions import ObjectNotFound

    found = []
    for run in await runs_in(client, WAITING_STATES):
        pause_key = run.state.state_details.pause_key if run.state else None
        try:
            text = await client.read_flow_run_input(run.id, PREFIX + (pause_key or ""))
        except ObjectNotFound:
            continue  # suspended by something else than twincd's waits
        found.append(WaitingRun(run.id, run.name, from_json(text)))
    return found


async def mark_ended(client: PrefectClient, run_id: UUID) -> None:
    import httpx

    try:
        await client.create_flow_run_input(run_id, ENDED, "true")
    except httpx.HTTPStatusError as e:
        if e.response.status_code != 409:  # already marked
            raise


def ended(client: SyncPrefectClient, run_id: UUID) -> bool:
    """Whether ``run_id`` marked itself ended (its final state may not be set yet)."""
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_flow_run_input(run_id, ENDED)
    except ObjectNotFound:
        return False
    return True


def overdue(waiting: Waiting, now: datetime | None = None) -> bool:
    return (now or datetime.now(UTC)) >= datetime.fromisoformat(waiting.deadline)


async def resume(client: PrefectClient, run_id: UUID, run_input: dict[str, Any]) -> str:
    """Resume ``run_id`` with ``run_input``; "" when done, else why not (no longer suspended, expired).

    What prefect.flow_runs.aresume_flow_run does, through the caller's client: the server checks
    the input against the form's schema and refuses a run that is no longer paused, so two
    resumers (a hook and the reconciliation, a hook redelivered) resume it once.
    """
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus

    run = await client.read_flow_run(run_id)
    if run.state is None or not run.state.is_paused():
        return f"{run.name} is {run.state.name if run.state else 'without state'}, not waiting"
    result = await client.resume_flow_run(run_id, run_input=run_input)
    if result.status == SetStateStatus.ACCEPT:
        return ""
    if result.state is not None and result.state.type == StateType.FAILED:
        return f"{run.name} waited past its timeout and can no longer resume"
    return f"{run.name} cannot be resumed: {getattr(result.details, 'reason', None) or 'refused'}"


# A run's process sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect
# >= 3.1.8; 180 by default in 3.9, at least 30; prefect/flow_engine.py `_send_heartbeats`, which
# sends the first one as the run starts). A run that missed this many beats lost its process
# (killed, OOM, machine gone): it would stay Running forever (and hold its app's turn).
MISSED_BEATS = 3
# A run's beat interval is its process's setting, never the reader's: recorded beside the run as it
# starts (``note_beat``), else read from its last two heartbeats since its state began, else
# Prefect's default.
DEFAULT_BEAT = 180.0
BEAT = "twincd-heartbeat-seconds"


def note_beat(run_id: UUID) -> None:
    """Record this process's heartbeat interval beside ``run_id`` (once: the setting of its workers)."""
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency
    if frequency is not None:
        _write_once(run_id, BEAT, str(frequency))


# The top-level flows of twincd (prefect.yaml): only their runs are judged by their heartbeats.
FLOWS = ("deploy", "failover", "drift-check", "watch-waits")


async def dead(client: PrefectClient, run: FlowRun, now: datetime | None = None) -> str:
    """Why ``run``'s process is dead ("" when it is alive or cannot be judged): no heartbeat for
    ``MISSED_BEATS`` of its own beat intervals. A run that never sent one (heartbeats off where it
    runs) is never judged."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
    from prefect.exceptions import ObjectNotFound

    now = now or datetime.now(UTC)
    # Since its state began (a run resumed after a wait beats anew: the gap is no interval), less a
    # little: its process's first beat and its Running state are sent about together.
    began = (run.state.timestamp if run.state else None) or run.start_time or now - timedelta(days=30)
    since = began - timedelta(seconds=10)
    page = await client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter.model_validate({"since": since, "until": now}),
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        ),  # newest first (EventFilter.order defaults to DESC)
        limit=2,
    )
    beats = [e.occurred for e in page.events]
    if not beats:
        return ""
    try:
        interval = float(await client.read_flow_run_input(run.id, BEAT))
    except ObjectNotFound:
        interval = (beats[0] - beats[1]).total_seconds() if len(beats) > 1 else DEFAULT_BEAT
    silent = (now - beats[0]).total_seconds()
    if silent <= MISSED_BEATS * max(interval, 1.0):
        return ""
    return (
        f"no heartbeat from its process for {silent:.0f} s (it beat every {interval:.0f} s): the process "
        "died (killed, out of memory, its machine gone)"
    )


async def crash_the_dead(client: PrefectClient) -> list[str]:
    """Mark Crashed every running (or in-process paused) run of twincd's flows whose process is dead.

    This is the check of Prefect's "detect zombie flows" guide (docs.prefect.io/v3/advanced/
    detect-zombie-flows), made here rather than as the guide's proactive automation: that one also
    fires on a run that *suspends* when its last heartbeat races the suspension, and would crash a
    release waiting days for its approval. A suspended run has no process by design and is never
    touched. The server does not guard the change (Running → Crashed is always accepted), so the
    run is read again just before: one that moved on meanwhile is left alone.
    """
    from prefect.states import Crashed

    crashed = []
    for run in await runs_in(client, ("Running", "Paused"), flows=FLOWS, top_level=True):
        why = await dead(client, run)
        if not why:
            continue
        now = await client.read_flow_run(run.id)
        if now.state_id != run.state_id:
            continue
        message = f"{why}. Marked Crashed by twincd watch-waits; re-run it: the steps already done are kept"
        await client.set_flow_run_state(run.id, Crashed(message=message))
        crashed.append(f"{run.name}: {message}")
    return crashed
