"""Builder: build an app's image from a tagged commit and push it, over the Docker Engine API.

Works with Docker or podman's Docker-compatible service (``podman system service``); API version
1.41 is pinned because podman 4 speaks it and version negotiation costs a round trip per client.
The build context is ``git archive`` of the tagged commit from a fresh clone, never a working tree,
so what is built is exactly what was tagged.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions

from twincd.adapters import git as gitrepo
from twincd.adapters.registry import RegistryDenied, manifest_digest
from twincd.domain import ImageRef
from twincd.errors import PermanentError, TransientError

API_VERSION = "1.41"
# Builds stream output, but a quiet RUN step can be silent for minutes; the socket read timeout
# must outlast it.
_BUILD_TIMEOUT_SECONDS = 1800
_BUILD_FILES = ("Containerfile", "Dockerfile")


class BuilderUnavailable(TransientError):
    """The Docker Engine API (Docker or podman service) cannot be reached."""


class SourceUnavailable(TransientError):
    """The app repository could not be read (network, server error)."""


class TagNotFound(PermanentError):
    """The app repository has no such tag."""


class SourceInvalid(PermanentError):
    """The app repository does not exist, or the tagged commit has no Containerfile/Dockerfile."""


class BuildFailed(PermanentError):
    """The build itself failed: the tagged commit does not build (fix it and tag again)."""


class PushFailed(TransientError):
    """A push to a registry failed or did not show up there; pushing again may work."""


class ImageNotBuilt(PermanentError):
    """The builder no longer holds the image to push (e.g. its storage was reset): build again."""


@dataclass(frozen=True)
class BuiltImage:
    """What build_image produced: the image tagged locally for every registry, or found in all of them."""

    image: str  # repository name inside each registry, e.g. "hello"
    tag: str  # the git tag, reused as the image tag
    commit: str  # the commit the git tag points to
    registries: tuple[str, ...]  # e.g. ("127.0.0.1:5000",)
    image_id: str = ""  # local image ID; "" when reused (nothing was built)
    reused: bool = False  # every registry already held <image>:<tag>: no build, no push
    existing: tuple[ImageRef, ...] = ()  # when reused: what each registry holds

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(f"{registry}/{self.image}:{self.tag}" for registry in self.registries)


@dataclass(frozen=True)
class PushedImage:
    """The image in every registry, pinned by the digest each registry reports after the push."""

    refs: tuple[ImageRef, ...]  # one per registry, in the order of BuiltImage.registries
    reused: bool = False  # nothing was pushed: the registries already held the tag

    @property
    def digest(self) -> str:
        """The digest in the first registry (the same everywhere unless a registry re-encodes)."""
        return self.refs[0].digest


def ping(base_url: str) -> bool:
    """Whether a Docker Engine API answers at ``base_url``."""
    try:
        with _client(base_url, timeout=5) as client:
            return bool(client.ping())
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return False


def build_image(
    *,
    repo_url: str,
    tag: str,
    image: str,
    registries: Sequence[str],
    base_url: str,
    insecure_registries: Collection[str] = frozenset(),
) -> BuiltImage:
    """Build ``repo_url`` at git tag ``tag`` and tag it ``<registry>/<image>:<tag>`` for each registry.

    If every registry already holds ``<image>:<tag>`` nothing is built (tags are immutable releases)
    and the result says ``reused=True``. ``insecure_registries`` are reached over plain HTTP.
    """
    if not registries:
        raise PermanentError(f"image {image!r}: no registry to build for")
    commit = _resolve_tag(repo_url, tag)
    existing = [
        manifest_digest(
            registry_url=registry,
            insecure=registry in insecure_registries,
            repository=image,
            reference=tag,
        )
        for registry in registries
    ]
    if all(existing):
        refs = tuple(
            ImageRef(name=f"{registry}/{image}", digest=digest, tag=tag)
            for registry, digest in zip(registries, existing)
            if digest is not None
        )
        return BuiltImage(image, tag, commit, tuple(registries), reused=True, existing=refs)

    built = BuiltImage(image, tag, commit, tuple(registries))
    with tempfile.TemporaryDirectory(prefix="twincd-build-") as tmp:
        context, build_file = _export_tree(repo_url, tag, Path(tmp))
        with _client(base_url, timeout=_BUILD_TIMEOUT_SECONDS) as client, open(context, "rb") as tar:
            image_id = _run_build(client, base_url, built, tar, build_file, source=gitrepo.redact_url(repo_url))
            for target in built.targets[1:]:
                repository, _, target_tag = target.rpartition(":")
                try:
                    client.api.tag(image_id, repository, target_tag)
                except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                    raise _daemon_error(base_url, e) from e
    return replace(built, image_id=image_id)


def push_image(
    *, built: BuiltImage, base_url: str, insecure_registries: Collection[str] = frozenset()
) -> PushedImage:
    """Push ``built`` to every registry; return the digests read back from the registries."""
    if built.reused:
        return PushedImage(refs=built.existing, reused=True)
    refs: list[ImageRef] = []
    with _client(base_url, timeout=_BUILD_TIMEOUT_SECONDS) as client:
        for registry, target in zip(built.registries, built.targets):
            repository, _, tag = target.rpartition(":")
            try:
                stream = client.api.push(repository, tag=tag, stream=True, decode=True)
            except docker.errors.NotFound as e:
                raise ImageNotBuilt(f"builder has no image {target}: build it again") from e
            except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                raise _daemon_error(base_url, e) from e
            # Push failures do not raise: the stream carries them as {"error": ...} items.
            for item in _consume(base_url, stream):
                if "error" in item:
                    message = str(item["error"])
                    if any(w in message.lower() for w in ("unauthorized", "denied", "authentication")):
                        raise RegistryDenied(f"push {target}: access denied: {message[:300]}")
                    raise PushFailed(f"push {target}: {message[:300]}")
            digest = manifest_digest(
                registry_url=registry,
                insecure=registry in insecure_registries,
                repository=built.image,
                reference=tag,
            )
            if digest is None:
                raise PushFailed(f"push {target} reported success but the registry has no such tag")
            refs.append(ImageRef(name=f"{registry}/{built.image}", digest=digest, tag=tag))
    return PushedImage(refs=tuple(refs))


@contextmanager
def _client(base_url: str, *, timeout: int) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=base_url, version=API_VERSION, timeout=timeout)
    try:
        yield client
    finally:
        client.close()


def _run_build(
    client: docker.DockerClient, base_url: str, built: BuiltImage, tar: BinaryIO, build_file: str, source: str
) -> str:
    labels = {
        # OCI annotation keys, so `podman inspect` shows people where an image came from.
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.revision": built.commit,
        "org.opencontainers.image.version": built.tag,
    }
    try:
        stream = client.api.build(
            fileobj=tar,
            custom_context=True,
            dockerfile=build_file,
            tag=built.targets[0],
            labels=labels,
            rm=True,
            forcerm=True,
            decode=True,
        )
    except (docker.errors.APIError, requests.exceptions.RequestException) as e:
        raise _daemon_error(base_url, e) from e
    image_id = ""
    log: list[str] = []
    for item in _consume(base_url, stream):
        if "error" in item:
            tail = "".join(log[-10:]).strip()
            raise BuildFailed(f"build of {built.targets[0]} failed: {item['error']}\n{tail}".strip())
        if "stream" in item:
            log.append(str(item["stream"]))
        aux = item.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
    if not image_id:
        raise BuildFailed(f"build of {built.targets[0]} ended without an image ID")
    return image_id


def _consume(base_url: str, stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Iterate a streamed API response, turning a dropped connection into BuilderUnavailable."""
    try:
        yield from stream
    except requests.exceptions.RequestException as e:
        raise BuilderUnavailable(f"builder at {base_url}: connection lost: {type(e).__name__}") from e


def _daemon_error(base_url: str, e: Exception) -> Exception:
    if isinstance(e, docker.errors.APIError) and not e.is_server_error():
        return BuildFailed(f"builder at {base_url} refused the request: {e.explanation or e}")
    if isinstance(e, docker.errors.APIError):
        return BuilderUnavailable(f"builder at {base_url}: HTTP {e.status_code}: {e.explanation or e}")
    return BuilderUnavailable(f"builder at {base_url} cannot be reached: {type(e).__name__}")


def _git(repo_url: str, what: str, *args: str, cwd: Path) -> str:
    """Run git; a failure is SourceUnavailable naming ``what``, with git's last line of stderr."""
    # GIT_TERMINAL_PROMPT=0: a missing credential must fail, not wait forever for a password.
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=False,  # the exit code is turned into SourceUnavailable below
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        timeout=600,
    )
    if result.returncode != 0:
        stderr = result.stderr.replace(repo_url, gitrepo.redact_url(repo_url))
        raise SourceUnavailable(f"{what} {gitrepo.redact_url(repo_url)}: {_last_line(stderr)}")
    return result.stdout


def _git_url(repo_url: str) -> str:
    """A local path becomes a file:// URL, so that ``--depth`` is honoured instead of ignored."""
    if "://" in repo_url or ("@" in repo_url and ":" in repo_url.split("@", 1)[1]):
        return repo_url
    path = Path(repo_url)
    if not path.exists():
        raise SourceInvalid(f"app repository {repo_url} does not exist")
    return path.resolve().as_uri()


def _resolve_tag(repo_url: str, tag: str) -> str:
    """The commit that ``tag`` points to (annotated tags peeled); TagNotFound if there is none."""
    try:
        return gitrepo.tag_commit(repo_url=repo_url, tag=tag)
    except gitrepo.GitRefNotFound as e:
        raise TagNotFound(f"app repository {gitrepo.redact_url(repo_url)} has no tag {tag!r}") from e
    except gitrepo.GitError as e:
        raise SourceUnavailable(f"cannot read app repository {gitrepo.redact_url(repo_url)}: {e}") from e


def _export_tree(repo_url: str, tag: str, tmp: Path) -> tuple[Path, str]:
    """``git archive`` of the tagged commit as a tar (the build context) and the build file's name."""
    clone, context = tmp / "src.git", tmp / "context.tar"
    what = f"cannot export tag {tag!r} of"
    url = _git_url(repo_url)
    _git(
        repo_url,
        what,
        "clone",
        "--quiet",
        "--bare",
        "--depth",
        "1",
        "--branch",
        tag,
        "--",
        url,
        str(clone),
        cwd=tmp,
    )
    _git(repo_url, what, "--git-dir", str(clone), "archive", "--format=tar", "-o", str(context), tag, cwd=tmp)
    names = set(
        _git(repo_url, what, "--git-dir", str(clone), "ls-tree", "--name-only", tag, cwd=tmp).splitlines()
    )
    build_file = next((name for name in _BUILD_FILES if name in names), None)
    if build_file is None:
        raise SourceInvalid(
            f"{gitrepo.redact_url(repo_url)} at tag {tag!r} has no Containerfile or Dockerfile at its root"
        )
    return context, build_file


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error output"
