"""A small in-memory Kubernetes API server for the local stack and tests.

No kube-apiserver, k3s, kind or envtest binary can run on the project's machines, and kmock lacks
the write semantics a cluster needs (resourceVersion, optimistic locking, status subresource,
generation, selectors, watch resume; see docs/platform.md, "Sandbox clusters"). So this package
owns them. The official ``kubernetes`` client and ``kubectl get`` talk to it over real HTTP.

Two layers, one module per part:

* the store, no HTTP in it: ``resources`` (the resource types served), ``errors`` (the real
  server's Status bodies), ``selectors`` (label and field selectors), ``patches`` (merge,
  strategic merge and JSON patch) and ``store`` (objects, metadata stamping, the event ring
  buffer);
* the HTTP layer: ``http_api`` (URL parsing, discovery, Tables for kubectl, watch streams) and
  ``serve`` (serving in a thread or from the command line, ``python -m twincd.sandbox.apiserver``).

Deliberate simplifications, each chosen because the sandbox's clients do not depend on them:
deletion is immediate (no finalizers, no Terminating phase that lingers), owner-reference garbage
collection is synchronous, ``continue`` tokens page over live state instead of a snapshot, there
is no admission, defaulting, schema validation or dry run (the last answers 400 rather than
pretending). Server-side apply is reduced to what a single field manager needs: the applied fields
are merged onto the live object like a merge patch (lists replace), the manager gets one
``managedFields`` entry, and there is no field ownership, so no apply conflicts (``force`` is moot).
"""

from twincd.sandbox.apiserver.errors import ApiError
from twincd.sandbox.apiserver.http_api import create_app
from twincd.sandbox.apiserver.patches import PatchType, json_patch, merge_patch, strategic_merge_patch
from twincd.sandbox.apiserver.resources import (
    INITIAL_NAMESPACES,
    JSON,
    NAMESPACES,
    RESOURCES,
    Column,
    ResourceType,
)
from twincd.sandbox.apiserver.selectors import Requirement, Selection
from twincd.sandbox.apiserver.serve import RunningServer, main, serve_in_thread
from twincd.sandbox.apiserver.store import ListResult, Store, WatchEvent

__all__ = [
    "INITIAL_NAMESPACES",
    "JSON",
    "NAMESPACES",
    "RESOURCES",
    "ApiError",
    "Column",
    "ListResult",
    "PatchType",
    "Requirement",
    "ResourceType",
    "RunningServer",
    "Selection",
    "Store",
    "WatchEvent",
    "create_app",
    "json_patch",
    "main",
    "merge_patch",
    "serve_in_thread",
    "strategic_merge_patch",
]
