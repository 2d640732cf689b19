"""What every twincd task shares: retry only transient failures, with backoff; fresh reads."""

from __future__ import annotations

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


def untraced(value: T) -> T:
    """A task argument that draws no edge in the run graph (configuration, the story so far).

    Prefect traces task inputs by object identity, one level into every result (a MergeRequest's
    ``target_branch`` *is* the environment's ``manifests.branch`` string), and visits every field
    of every argument; so an environment handed to every task would tie each task to every result
    that quotes a config value. ``quote`` tells Prefect not to trace an argument
    (prefect.utilities.annotations.quote); the task still receives the value itself.
    """
    return cast(T, quote(value))
