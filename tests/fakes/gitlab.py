"""An HTTP-level fake of the GitLab v4 endpoints twincd uses, backed by a real bare git repo.

The real ``python-gitlab`` client talks to it over HTTP (nothing in the SDK is patched). Merging
really merges: ``PUT .../merge`` makes a ``--no-ff`` merge commit in the bare repo and reports it
as ``merge_commit_sha``, so what the deploy flow verifies afterwards is a real commit.

Served endpoints (``:id`` is the numeric id or the URL-encoded path, as on GitLab):

    GET  /api/v4/projects/:id
    GET  /api/v4/projects/:id/merge_requests            ?source_branch= &target_branch= &state=
    POST /api/v4/projects/:id/merge_requests            409 when an open MR has the source branch
    GET  /api/v4/projects/:id/merge_requests/:iid
    PUT  /api/v4/projects/:id/merge_requests/:iid       labels, add_labels, remove_labels, state_event
    PUT  /api/v4/projects/:id/merge_requests/:iid/merge
    GET  /api/v4/projects/:id/merge_requests/:iid/notes
    POST /api/v4/projects/:id/merge_requests/:iid/notes

Knobs: ``fail_next(status, count, retry_after=...)`` answers the next requests with 429/5xx;
``complete_merges_after(gets, shown_state=...)`` makes API merges asynchronous, as merge trains are;
``requests`` records every request (method, path, status) so tests can count API calls.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tests.fakes import ServedFake
from twincd.adapters import git as gitrepo
from twincd.errors import PermanentError


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeMergeRequest:
    id: int
    iid: int
    source_branch: str
    target_branch: str
    title: str
    description: str
    labels: list[str]
    state: str = "opened"
    merge_commit_sha: str | None = None
    sha: str | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)
    # An asynchronous merge in progress: how many more GETs show `pending_state` and no merge commit.
    pending_gets: int = 0
    pending_state: str = "opened"
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: str | None


class FakeGitlab(ServedFake):
    """One GitLab project (``project``, numeric id ``project_id``) whose repository is ``repo``."""

    _name = "fake-gitlab"

    def __init__(
        self,
        *,
        repo: Path,
        token: str,
        project: str = "infra/manifests",
        project_id: int = 42,
        read_only_token: str | None = None,
    ) -> None:
        self.repo = repo
        self.project = project
        self.project_id = project_id
        self.token = token
        self.read_only_token = read_only_token
        self.mrs: dict[int, FakeMergeRequest] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._faults: list[_Fault] = []
        self._hidden: dict[int, int] = {}  # iid -> how many more list answers leave it out
        self._merge_delay: tuple[int, str] = (0, "merged")  # (GETs until a merge shows, state shown before)
        self._lock = threading.Lock()

    # ---- knobs for tests -------------------------------------------------------------------

    def fail_next(self, status: int, count: int = 1, *, retry_after: str | None = None) -> None:
        """Answer the next ``count`` API requests with ``status`` (429 or 5xx), then behave again."""
        with self._lock:
            self._faults.append(_Fault(status, count, retry_after))

    def hide_from_lists(self, iid: int, count: int = 1) -> None:
        """Leave MR ``iid`` out of the next ``count`` list answers, as a lagging read replica does.

        This is how two attempts race on GitLab: both list, see nothing, and both create; the
        second create gets the 409 "Another open merge request already exists".
        """
        with self._lock:
            self._hidden[iid] = count

    def complete_merges_after(self, gets: int, *, shown_state: str = "opened") -> None:
        """Merges through the API complete asynchronously: the merge PUT and the next GETs of the MR
        show ``shown_state`` ("opened": a merge train; "merged": a merge commit not written yet) with
        ``merge_commit_sha`` null; the ``gets``-th GET of the MR after the PUT is the first to show it
        merged with its merge commit. The merge commit itself is made at once in the bare repo.
        """
        with self._lock:
            self._merge_delay = (gets, shown_state)

    def calls(self, method: str | None = None) -> list[tuple[str, str, int]]:
        with self._lock:
            return [r for r in self.requests if method is None or r[0] == method]

    def merge(self, iid: int) -> str:
        """Merge as a person does in the UI; returns the merge commit."""
        with self._lock:
            mr = self.mrs[iid]
        return self._merge(mr)

    def close(self, iid: int) -> None:
        """Close without merging, as a reviewer who refuses the release does."""
        with self._lock:
            self.mrs[iid].state = "closed"

    def notes(self, iid: int) -> list[str]:
        with self._lock:
            return [n["body"] for n in self.mrs[iid].notes]

    # ---- serving ---------------------------------------------------------------------------

    # ---- HTTP ------------------------------------------------------------------------------

    _ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
        ("GET", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)$"), "_get_project"),
        ("GET", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests$"), "_list_mrs"),
        ("POST", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests$"), "_create_mr"),
        ("GET", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests/(?P<iid>\d+)$"), "_get_mr"),
        ("PUT", re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests/(?P<iid>\d+)$"), "_update_mr"),
        (
            "PUT",
            re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests/(?P<iid>\d+)/merge$"),
            "_merge_mr",
        ),
        (
            "GET",
            re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests/(?P<iid>\d+)/notes$"),
            "_list_notes",
        ),
        (
            "POST",
            re.compile(r"^/api/v4/projects/(?P<pid>[^/]+)/merge_requests/(?P<iid>\d+)/notes$"),
            "_create_note",
        ),
    )

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        # Route on the raw path: a project path is sent URL-encoded (infra%2Fmanifests) and the
        # decoded path would have an extra slash in it.
        raw_path = scope.get("raw_path", scope["path"].encode()).decode().split("?", 1)[0]
        response = await self._dispatch(request, raw_path)
        with self._lock:
            self.requests.append((request.method, raw_path, response.status_code))
        await response(scope, receive, send)

    async def _dispatch(self, request: Request, raw_path: str) -> Response:
        fault = self._take_fault()
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            message = "Retry later" if fault.status == 429 else "500 Internal Server Error"
            return JSONResponse({"message": message}, status_code=fault.status, headers=headers)
        token = request.headers.get("private-token") or request.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        if token not in (self.token, self.read_only_token) or not token:
            return _error(401, "401 Unauthorized")
        for method, pattern, handler in self._ROUTES:
            match = pattern.match(raw_path)
            if match is None or method != request.method:
                continue
            if unquote(match["pid"]) not in (self.project, str(self.project_id)):
                return _error(404, "404 Project Not Found")
            if method != "GET" and token == self.read_only_token:
                return _error(403, "403 Forbidden")
            body: dict[str, Any] = {}
            if method != "GET":
                raw = await request.body()
                body = json.loads(raw) if raw else {}
            query = {k: v[-1] for k, v in parse_qs(request.url.query).items()}
            args = {k: v for k, v in match.groupdict().items() if k != "pid"}
            result: Response = getattr(self, handler)(body=body, query=query, **args)
            return result
        return _error(404, "404 Not Found")

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            while self._faults and self._faults[0].remaining <= 0:
                self._faults.pop(0)
            if not self._faults:
                return None
            self._faults[0].remaining -= 1
            return self._faults[0]

    # ---- handlers --------------------------------------------------------------------------

    def _project_json(self) -> dict[str, Any]:
        return {
            "id": self.project_id,
            "path_with_namespace": self.project,
            "default_branch": "main",
            "web_url": f"{self.url}/{self.project}",
        }

    def _mr_json(self, mr: FakeMergeRequest) -> dict[str, Any]:
        pending = mr.pending_gets > 0
        return {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": self.project_id,
            "title": mr.title,
            "description": mr.description,
            "state": mr.pending_state if pending else mr.state,
            "source_branch": mr.source_branch,
            "target_branch": mr.target_branch,
            "labels": list(mr.labels),
            "sha": mr.sha,
            "merge_commit_sha": None if pending else mr.merge_commit_sha,
            "squash_commit_sha": None,
            "web_url": f"{self.url}/{self.project}/-/merge_requests/{mr.iid}",
            "references": {"short": f"!{mr.iid}", "full": f"{self.project}!{mr.iid}"},
            "created_at": mr.created_at,
            "updated_at": mr.updated_at,
        }

    def _find(self, iid: str) -> FakeMergeRequest | None:
        with self._lock:
            return self.mrs.get(int(iid))

    def _get_project(self, **_: Any) -> Response:
        return JSONResponse(self._project_json())

    def _list_mrs(self, *, query: dict[str, str], **_: Any) -> Response:
        with self._lock:
            mrs = sorted(self.mrs.values(), key=lambda m: m.iid, reverse=True)  # GitLab: newest first
            hidden = {iid for iid, n in self._hidden.items() if n > 0}
            self._hidden = {iid: n - 1 for iid, n in self._hidden.items() if n > 1}
        mrs = [m for m in mrs if m.iid not in hidden]
        for key in ("source_branch", "target_branch"):
            if key in query:
                mrs = [m for m in mrs if getattr(m, key) == query[key]]
        if query.get("state", "all") != "all":
            mrs = [m for m in mrs if m.state == query["state"]]
        return JSONResponse([self._mr_json(m) for m in mrs])

    def _create_mr(self, *, body: dict[str, Any], **_: Any) -> Response:
        missing = [k for k in ("source_branch", "target_branch", "title") if not body.get(k)]
        if missing:
            return _error(400, f"{missing[0]} is missing")
        source, target = str(body["source_branch"]), str(body["target_branch"])
        head = gitrepo.branch_head(repo_url=str(self.repo), branch=source)
        if head is None:
            return _error(404, f"404 Source branch {source!r} Not Found")
        if gitrepo.branch_head(repo_url=str(self.repo), branch=target) is None:
            return _error(404, f"404 Target branch {target!r} Not Found")
        with self._lock:
            clash = next(
                (m for m in self.mrs.values() if m.source_branch == source and m.state == "opened"), None
            )
            if clash is not None:
                # GitLab's body for this 409 is a list of messages.
                return JSONResponse(
                    {
                        "message": [
                            (
                                f"Another open merge request already exists for this source "
                                f"branch: !{clash.iid}"
                            )
                        ]
                    },
                    status_code=409,
                )
            iid = len(self.mrs) + 1
            mr = FakeMergeRequest(
                id=1000 + iid,
                iid=iid,
                source_branch=source,
                target_branch=target,
                title=str(body["title"]),
                description=str(body.get("description") or ""),
                labels=_labels(body.get("labels")),
                sha=head,
            )
            self.mrs[iid] = mr
        return JSONResponse(self._mr_json(mr), status_code=201)

    def _get_mr(self, *, iid: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        with self._lock:
            mr.pending_gets = max(0, mr.pending_gets - 1)
            return JSONResponse(self._mr_json(mr))

    def _update_mr(self, *, iid: str, body: dict[str, Any], **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        with self._lock:
            if "labels" in body:
                mr.labels = _labels(body["labels"])
            for label in _labels(body.get("add_labels")):
                if label not in mr.labels:
                    mr.labels.append(label)
            removed = set(_labels(body.get("remove_labels")))
            mr.labels = [label for label in mr.labels if label not in removed]
            for key in ("title", "description"):
                if key in body:
                    setattr(mr, key, str(body[key]))
            event = body.get("state_event")
            if event == "close" and mr.state == "opened":
                mr.state = "closed"
            elif event == "reopen" and mr.state == "closed":
                mr.state = "opened"
            mr.updated_at = _now()
        return JSONResponse(self._mr_json(mr))

    def _merge_mr(self, *, iid: str, body: dict[str, Any], **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        if mr.state != "opened":
            return _error(405, "405 Method Not Allowed")
        try:
            self._merge(mr, message=body.get("merge_commit_message"))
        except PermanentError as e:
            return _error(406, f"Branch cannot be merged: {e}")
        with self._lock:
            mr.pending_gets, mr.pending_state = self._merge_delay
            return JSONResponse(self._mr_json(mr))

    def _merge(self, mr: FakeMergeRequest, *, message: str | None = None) -> str:
        default = (
            f"Merge branch '{mr.source_branch}' into '{mr.target_branch}'\n\n{mr.title}\n\n"
            f"See merge request {self.project}!{mr.iid}"
        )
        sha = gitrepo.merge_branch(
            repo_url=str(self.repo),
            source=mr.source_branch,
            target=mr.target_branch,
            message=message or default,
        )
        with self._lock:
            mr.state, mr.merge_commit_sha, mr.updated_at = "merged", sha, _now()
        return sha

    def _list_notes(self, *, iid: str, **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        with self._lock:
            return JSONResponse(list(reversed(mr.notes)))  # GitLab: newest first

    def _create_note(self, *, iid: str, body: dict[str, Any], **_: Any) -> Response:
        mr = self._find(iid)
        if mr is None:
            return _error(404, "404 Not found")
        if not body.get("body"):
            return _error(400, "body is missing")
        with self._lock:
            note = {
                "id": 5000 + sum(len(m.notes) for m in self.mrs.values()),
                "body": str(body["body"]),
                "system": False,
                "created_at": _now(),
                "noteable_iid": mr.iid,
            }
            mr.notes.append(note)
        return JSONResponse(note, status_code=201)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


def _labels(value: object) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(i).strip() for i in items if str(i).strip()]
