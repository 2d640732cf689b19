"""ECR's repository rule, in front of a real registry: a push never creates a repository.

Unlike distribution (docker-registry), GHCR or Docker Hub, Amazon ECR accepts a push only into a
repository someone created (``aws ecr create-repository``); any ``/v2/<name>/...`` request for
another name, authenticated, answers ``404`` with ``NAME_UNKNOWN: The repository with name '<name>'
does not exist in the registry with id '<account>'`` (seen in ECR users' reports, e.g.
aws-actions/amazon-ecr-login#166 and plexsystems/sinker#55; regclient/regclient#869 calls it the
expected ECR behaviour). Everything else, the Basic challenge included (ECR answers Basic, with
the user ``AWS``), is the real docker-registry's answer, forwarded as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ACCOUNT = "123456789012"
_REPOSITORY = re.compile(r"^/v2/(.+?)/(blobs|manifests|tags)/")
_HOP = {"host", "content-length", "transfer-encoding", "connection"}


def ecr_front(upstream: str, created: Iterable[str]) -> Starlette:
    """An ASGI app forwarding to ``upstream`` (``http://127.0.0.1:PORT``), with ECR's rule for
    repositories outside ``created``."""
    repositories = set(created)
    client = httpx.AsyncClient(base_url=upstream, timeout=30)

    async def forward(request: Request) -> Response:
        match = _REPOSITORY.match(request.url.path)
        if match and "authorization" in request.headers and match.group(1) not in repositories:
            name = match.group(1)
            message = f"The repository with name '{name}' does not exist in the registry with id '{ACCOUNT}'"
            return JSONResponse({"errors": [{"code": "NAME_UNKNOWN", "message": message}]}, status_code=404)
        answer = await client.request(
            request.method,
            request.url.path,
            params=request.query_params.multi_items(),
            headers=[(k, v) for k, v in request.headers.items() if k.lower() not in _HOP],
            content=await request.body(),
        )
        front = f"{request.url.scheme}://{request.url.netloc}"
        # A HEAD keeps the registry's Content-Length (clients read a blob's size from it).
        dropped = _HOP - {"content-length"} if request.method == "HEAD" else _HOP
        headers = {
            k: v.replace(upstream, front) if k.lower() == "location" else v
            for k, v in answer.headers.items()
            if k.lower() not in dropped | {"content-encoding"}
        }
        return Response(answer.content, status_code=answer.status_code, headers=headers)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])
