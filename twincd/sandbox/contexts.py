"""Kubeconfig files pointing at sandbox API servers."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

# The sandbox accepts any bearer token; carrying one keeps clients on their ordinary auth path.
SANDBOX_TOKEN = "twincd-sandbox"


def _upsert(entries: list[dict[str, Any]], name: str, key: str, value: dict[str, Any]) -> None:
    for entry in entries:
        if entry.get("name") == name:
            entry[key] = value
            return
    entries.append({"name": name, key: value})


def write_kubeconfig(path: str | os.PathLike[str], contexts: dict[str, str]) -> Path:
    """Add or update one cluster, user and context per entry of ``contexts`` (name → server URL).

    An existing file is merged into, not replaced, so each sandbox cluster can register itself in
    a shared kubeconfig; entries of other names are kept. ``current-context`` is set only when the
    file has none. The file is locked while it is rewritten and replaced atomically, because two
    clusters starting at once may write it concurrently.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config: dict[str, Any] = {}
        if target.exists():
            config = yaml.safe_load(target.read_text()) or {}
        config.setdefault("apiVersion", "v1")
        config.setdefault("kind", "Config")
        config.setdefault("preferences", {})
        for name, server in contexts.items():
            _upsert(config.setdefault("clusters", []), name, "cluster", {"server": server})
            _upsert(config.setdefault("users", []), name, "user", {"token": SANDBOX_TOKEN})
            _upsert(config.setdefault("contexts", []), name, "context", {"cluster": name, "user": name})
        if not config.get("current-context") and contexts:
            config["current-context"] = next(iter(contexts))
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(descriptor, "w") as out:
            yaml.safe_dump(config, out, sort_keys=False)
        os.replace(temporary, target)
    return target
