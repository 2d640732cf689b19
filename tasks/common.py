"""What every twincd task shares: retry only transient failures, with backoff; fresh reads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
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


def once_per_run(key: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Task options that keep its result for the rest of its flow run, by ``key(parameters)``.

    A run that waited (for a person, for its turn) resumes from the top
    (prefect.flow_runs.suspend_flow_run), and the steps before the wait must come out as they
    did: the branch and MR made before the wait are what it merges (writing the branch again
    after a person merged it on the forge would find the change already on the target and lose
    the release's MR; opening again after a person closed it would open a new one), and a stage
    verified or baked before the wait is not verified again (its clusters may have moved on: a
    revert merged meanwhile). The result is persisted and reused by the same run only, never by
    another one; the key names what identifies the step (the branch, the cluster and revision),
    not inputs that differ between attempts (whether the image was pushed or found). Workers on
    several machines need shared result storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK); results
    expire after 30 days, longer than any wait.
    """

    def cache_key(context: Any, parameters: dict[str, Any]) -> str:
        raw = f"{context.task_run.flow_run_id}\0{context.task.name}\0{key(parameters)}"
        return hashlib.sha256(raw.encode()).hexdigest()

    return {"cache_key_fn": cache_key, "persist_result": True, "cache_expiration": timedelta(days=30)}


def _branch_name(parameters: dict[str, Any]) -> str:
    branch = parameters["branch"]
    return str(getattr(branch, "branch", branch))


def _cluster_revision(parameters: dict[str, Any]) -> str:
    # The app too: a failover's switch applies (verifies) several apps on one cluster at one revision.
    return f"{parameters.get('app', '')}:{parameters['cluster_name']}@{parameters['revision']}"


# Each branch written, and its MR opened, once per run.
ONCE_PER_BRANCH = once_per_run(_branch_name)
# Each app on each cluster verified (baked, applied) at a revision once per run.
ONCE_PER_CLUSTER_REVISION = once_per_run(_cluster_revision)


def untraced(value: T) -> T:
    """A task argument that draws no edge in the run graph (configuration, the story so far).

    Prefect traces task inputs by object identity, one level into every result (a MergeRequest's
    ``target_branch`` *is* the environment's ``manifests.branch`` string), and visits every field
    of every argument; so an environment handed to every task would tie each task to every result
    that quotes a config value. ``quote`` tells Prefect not to trace an argument
    (prefect.utilities.annotations.quote); the task still receives the value itself.
    """
    return cast(T, quote(value))
