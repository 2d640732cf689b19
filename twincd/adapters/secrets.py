"""Resolve secret references from the environment file: ``env:VAR`` or ``secret:NAME``.

A value only ever leaves this module wrapped in :class:`Secret`, whose ``repr`` and ``str`` are
``'***'``: a secret that ends up in an f-string, a log record, a Prefect result or a traceback's
locals shows as stars. Callers unwrap it with ``.reveal()`` at the one place it is sent (an HTTP
header). Errors name the reference, never the value.
"""

from __future__ import annotations

import os
from typing import Final

from twincd.errors import ConfigError

_MASK: Final = "***"


class SecretNotFound(ConfigError):
    """The reference points at nothing: an unset variable or a missing Prefect Secret block."""


class Secret:
    """A secret value whose ``repr``/``str`` never show it (cf. pydantic's ``SecretStr``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def mask(self, text: str) -> str:
        """``text`` with every occurrence of the value replaced by stars (for foreign error text)."""
        return text.replace(self._value, _MASK) if self._value else text

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Never pickled into a Prefect result or a cache: resolve the reference again instead.
        raise TypeError(
            "twincd.adapters.secrets.Secret cannot be pickled; pass the reference (env:/secret:) instead"
        )


def resolve_secret(ref: str) -> Secret:
    """The value behind ``env:VAR`` (process environment) or ``secret:NAME`` (Prefect Secret block)."""
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        # The text is not echoed: a literal pasted where a reference belongs may be the secret itself.
        raise ConfigError("a secret reference must be `env:VAR` or `secret:NAME`, not a literal value")
    if kind == "env":
        value = os.environ.get(name)
        if not value:
            raise SecretNotFound(
                f"secret reference env:{name}: environment variable {name} is not set or empty"
            )
        return Secret(value)
    if kind == "secret":
        return Secret(_load_prefect_secret(name))
    raise ConfigError(f"secret reference of unknown kind {kind!r}: use `env:VAR` or `secret:NAME`")


def _load_prefect_secret(name: str) -> str:
    # Imported here: the core stays importable (and fast) without Prefect.
    from prefect.blocks.system import Secret as SecretBlock

    try:
        block = SecretBlock.load(name)
    except ValueError:
        # Prefect raises ValueError("Unable to find block document named ...") for a missing block.
        raise SecretNotFound(
            f"secret reference secret:{name}: no Prefect Secret block named {name!r} "
            f"(create it with `prefect block create secret` or in the UI)"
        ) from None
    value = block.get()  # type: ignore[union-attr]
    if not isinstance(value, str) or not value:
        raise SecretNotFound(
            f"secret reference secret:{name}: the Prefect Secret block is empty or not a string"
        )
    return value
