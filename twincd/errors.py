"""The error hierarchy of twincd.

Every failure is either permanent (retrying cannot help: fix the input, the config or the
repository) or transient (network, 5xx, 429: a retry may succeed). Prefect tasks retry only
transient ones (see ``tasks/common.py``). Adapters subclass these with their own small types
and translate SDK errors inside the adapter with ``raise ... from e``.
"""

from __future__ import annotations


class TwincdError(Exception):
    """Base of every error twincd raises on purpose. The message says what to fix."""


class PermanentError(TwincdError):
    """Retrying cannot help: bad input, bad config, a refused permission, a missing object."""


class TransientError(TwincdError):
    """May succeed on retry: connection refused, timeouts, HTTP 5xx and 429."""


class ConfigError(PermanentError):
    """The environment file is invalid. The message names the file, the key and what was expected."""


class TargetMoved(PermanentError):
    """The target branch moved while a merge was made: its compare-and-swap lost, nothing landed.

    Permanent for the step that raised it (retrying the same merge cannot succeed); the landing
    starts over from the new target: catch up, validate the result again, merge again.
    """
