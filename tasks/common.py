"""What every twincd task shares: retry only transient failures, with backoff; fresh reads."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar, cast

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from twincd.errors import TransientError


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry network trouble, 5xx and 429; never a permanent error."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is permanent: do not retry
        return False
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": transient_only,
}

T = TypeVar("T")

# Reads must see the world as it is now, and writes must happen: never a cached answer.
FRESH: dict[str, Any] = {"cache_policy": NO_CACHE}


def _branch_of_this_run(context: Any, parameters: dict[str, Any]) -> str:
    """The cache key of a task writing or opening a branch's change: the flow run and the branch."""
    branch = parameters["branch"]
    key = f"{context.task_run.flow_run_id}\0{context.task.name}\0{getattr(branch, 'branch', branch)}"
    return hashlib.sha256(key.encode()).hexdigest()


# The branch and MR made before the run waited for a person are what it merges when it is
# resumed: a run resumes from the top (prefect.flow_runs.suspend_flow_run), and writing the branch
# again after a person merged it on the forge would find the change already on the target branch
# and lose the release's MR; opening again after a person closed it would open a new MR. So a run
# writes each branch and opens its MR once: the result is kept (persisted) and reused by the same
# run, never by another one (other inputs, e.g. whether the image was pushed or found, differ
# between the attempts). Workers on several machines need shared result storage
# (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK).
ONCE_PER_RUN: dict[str, Any] = {"cache_key_fn": _branch_of_this_run, "persist_result": True}


def untraced(value: T) -> T:
    """A task argument that draws no edge in the run graph (configuration, the story so far).

    Prefect traces task inputs by object identity, one level into every result (a MergeRequest's
    ``target_branch`` *is* the environment's ``manifests.branch`` string), and visits every field
    of every argument; so an environment handed to every task would tie each task to every result
    that quotes a config value. ``quote`` tells Prefect not to trace an argument
    (prefect.utilities.annotations.quote); the task still receives the value itself.
    """
    return cast(T, quote(value))
