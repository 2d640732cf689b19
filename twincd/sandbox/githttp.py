"""The local stack's git server: ``git http-backend`` behind HTTP Basic auth, as GitLab serves repos.

GitLab serves a private project's repository over smart HTTP and answers a request without valid
credentials with ``401`` and ``WWW-Authenticate: Basic realm="GitLab"`` (any username with a
project or personal access token as the password, or a deploy token's own username). This server
does the same for every repository under its root, so the local stack and the e2e tests reach
their repos through URLs and credentials, never through paths: git's own client negotiates,
sends ``http.extraHeader`` credentials, and fails with "Authentication failed" on a wrong token.

``git http-backend`` (shipped with git, git-http-backend(1)) is a CGI program: the request becomes
its environment (``GIT_PROJECT_ROOT``, ``PATH_INFO``, ``QUERY_STRING``, ``REQUEST_METHOD``,
``CONTENT_TYPE``, ``REMOTE_USER``) and stdin; its stdout is CGI headers (``Status:``) and the body.
Pushes are allowed because ``REMOTE_USER`` is set (http-backend refuses receive-pack otherwise).
Partial clones work: ``uploadpack.allowFilter`` is on, as on GitLab.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from twincd.sandbox.serving import basic_credentials

NAME = "git-http"
TOKEN_ENV = "TWINCD_GIT_TOKEN"
REALM = 'Basic realm="twincd git"'
# What upload-pack allows on GitLab too: filtered (partial) clones and fetching any reachable commit.
_SERVER_CONFIG = {"uploadpack.allowFilter": "true", "uploadpack.allowAnySHA1InWant": "true"}


def token_path(state: Path) -> Path:
    return state / "git" / "token"


def _user(header: str, token: bytes) -> str | None:
    """The Basic-auth username when the password is the token; None for anything else."""
    found = basic_credentials(header)
    # Constant time: a timing side channel must not reveal the token.
    ok = found is not None and hmac.compare_digest(found[1].encode(), token)
    return (found[0] or "git") if found and ok else None


def create_app(root: Path, token: str) -> Starlette:
    expected = token.encode()

    async def backend(request: Request) -> Response:
        user = _user(request.headers.get("authorization", ""), expected)
        if user is None:
            return Response("HTTP Basic: Access denied\n", 401, {"WWW-Authenticate": REALM})
        body = await request.body()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": request.url.path,
            "QUERY_STRING": request.url.query,
            "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": user,
            "REMOTE_ADDR": request.client.host if request.client else "",
            "GIT_CONFIG_COUNT": str(len(_SERVER_CONFIG)),
        }
        for i, (key, value) in enumerate(_SERVER_CONFIG.items()):
            env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
        # Protocol v2 and gzip-compressed requests reach http-backend as CGI's HTTP_* variables.
        for header in ("git-protocol", "content-encoding"):
            if header in request.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
        proc = await asyncio.create_subprocess_exec(
            "git",
            "http-backend",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await proc.communicate(body)
        head, sep, payload = out.partition(b"\r\n\r\n")
        if not sep:
            return Response(f"git http-backend failed: {err.decode(errors='replace')[-300:]}\n", 500)
        status, headers = 200, {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers[key.strip()] = value.strip()
        return Response(payload, status, headers)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/healthz", health, methods=["GET"]),
            Route("/{path:path}", backend, methods=["GET", "POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--token-file", required=True, type=Path)
    args = parser.parse_args(argv)
    app = create_app(args.root, args.token_file.read_text().strip())
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
