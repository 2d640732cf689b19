"""Builder: build an app's image from a tagged commit and push it, over the Docker Engine API.

Works with Docker or podman's Docker-compatible service (``podman system service``). The Engine
API version is negotiated by default (``auto``: one ``GET /version`` per client): Docker Engine 29
refuses clients below 1.44 while podman 4 speaks 1.41, so no pinned version serves both.
The build context is ``git archive`` of the tagged commit from a fresh clone, never a working tree,
so what is built is exactly what was tagged.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions

from twincd.adapters import git as gitrepo
from twincd.adapters.registry import REVISION_LABEL, OciRegistry, RegistryDenied, RegistryError, display_name
from twincd.domain import BuiltImage as BuiltImage  # re-exported: what a build yields
from twincd.domain import ImageRef
from twincd.domain import PushedImage as PushedImage
from twincd.errors import PermanentError, TransientError
from twincd.ports import Registry

API_VERSION = "auto"  # builder.api_version in the environment file overrides it
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


class TagConflict(PermanentError):
    """Some registries hold ``<image>:<tag>`` and the others cannot get that same image from the builder.

    Rebuilding would put a second image (another digest) under a release tag, so a person decides:
    copy the image between registries, or delete the tag where it exists.
    """


def ping(base_url: str, *, api_version: str = API_VERSION) -> bool:
    """Whether a Docker Engine API answers at ``base_url``."""
    try:
        with _client(base_url, timeout=5, api_version=api_version) as client:
            return bool(client.ping())
    except (BuilderUnavailable, docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return False


def build_image(
    *,
    repo_url: str,
    tag: str,
    image: str,
    registries: Sequence[str],
    base_url: str,
    insecure_registries: Collection[str] = frozenset(),
    commit: str | None = None,
    source_auth: gitrepo.GitAuth = gitrepo.NO_AUTH,
) -> BuiltImage:
    """Build ``repo_url`` at git tag ``tag`` and tag it ``<registry>/<image>:<tag>`` for each registry.

    If every registry already holds ``<image>:<tag>`` nothing is built (tags are immutable releases)
    and the result says ``reused=True``. If only some do (an earlier run's push stopped half way),
    nothing is built either: a rebuild would make a second image, with another digest, under the
    same tag. The builder's own ``<registry>/<image>:<tag>`` from that run is what push_image sends
    to the other registries; if the builder no longer holds it, TagConflict says how to fix it.
    ``insecure_registries`` are reached over plain HTTP. ``commit``: what the tag points at, when
    the caller resolved it already (the deploy flow checks the release first); else it is looked up.
    """
    return _build(
        repo_url=repo_url,
        tag=tag,
        image=image,
        registries=_oci(registries, insecure_registries),
        base_url=base_url,
        commit=commit,
        source_auth=source_auth,
    )


def _oci(urls: Sequence[str], insecure: Collection[str]) -> list[Registry]:
    return [OciRegistry(url=u, insecure=u in insecure) for u in urls]


def _insecure(registries: Iterable[Registry]) -> frozenset[str]:
    return frozenset(r.url for r in registries if r.insecure)


def _build(
    *,
    repo_url: str,
    tag: str,
    image: str,
    registries: Sequence[Registry],
    base_url: str,
    commit: str | None,
    source_auth: gitrepo.GitAuth,
    api_version: str = API_VERSION,
) -> BuiltImage:
    urls = tuple(r.url for r in registries)
    if not registries:
        raise PermanentError(f"image {image!r}: no registry to build for")
    commit = commit or _resolve_tag(repo_url, tag, source_auth)
    existing = [r.digest(image, tag) for r in registries]
    for registry, digest in zip(registries, existing, strict=True):
        if digest is not None:
            _check_provenance(registry, image, tag, commit, digest)
    if all(existing):
        refs = tuple(
            ImageRef(name=f"{registry}/{image}", digest=digest, tag=tag)
            for registry, digest in zip(urls, existing, strict=True)
            if digest is not None
        )
        return BuiltImage(image, tag, commit, urls, reused=True, existing=refs)
    if any(existing):
        return _resume_partial_push(
            BuiltImage(image, tag, commit, urls),
            existing,
            base_url=base_url,
            insecure_registries=_insecure(registries),
            api_version=api_version,
        )

    built = BuiltImage(image, tag, commit, urls)
    with tempfile.TemporaryDirectory(prefix="twincd-build-") as tmp:
        context, build_file = _export_tree(repo_url, tag, Path(tmp), source_auth)
        with (
            _client(base_url, timeout=_BUILD_TIMEOUT_SECONDS, api_version=api_version) as client,
            open(context, "rb") as tar,
        ):
            image_id = _run_build(
                client, base_url, built, tar, build_file, source=gitrepo.redact_url(repo_url)
            )
            for target in built.targets[1:]:
                repository, _, target_tag = target.rpartition(":")
                try:
                    client.api.tag(image_id, repository, target_tag)
                except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                    raise _daemon_error(base_url, e) from None
    return replace(built, image_id=image_id)


def push_image(
    *, built: BuiltImage, base_url: str, insecure_registries: Collection[str] = frozenset()
) -> PushedImage:
    """Push ``built`` to every registry; return the digests read back from the registries."""
    return _push(built, base_url=base_url, registries=_oci(built.registries, insecure_registries))


def _push(
    built: BuiltImage, *, base_url: str, registries: Sequence[Registry], api_version: str = API_VERSION
) -> PushedImage:
    by_url = {r.url: r for r in registries}
    insecure_registries = _insecure(registries)
    if built.reused:
        return PushedImage(refs=built.existing, reused=True)
    held = {ref.name: ref for ref in built.existing}
    refs: list[ImageRef] = []
    with _client(base_url, timeout=_BUILD_TIMEOUT_SECONDS, api_version=api_version) as client:
        for registry, target in zip(built.registries, built.targets, strict=True):
            repository, _, tag = target.rpartition(":")
            if repository in held:
                refs.append(held[repository])  # never pushed over: its digest is the release's
                continue
            try:
                # The registry's credentials go to the engine as X-Registry-Auth (the Engine API's
                # push auth); podman and Docker then answer the registry's token challenge themselves.
                login = by_url[registry].push_credentials()
                auth = {"username": login[0], "password": login[1]} if login else None
                stream = client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth)
            except docker.errors.NotFound:
                raise ImageNotBuilt(f"builder has no image {target}: build it again") from None
            except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                raise _daemon_error(base_url, e) from None
            # Push failures do not raise: the stream carries them as {"error": ...} items.
            for item in _consume(base_url, stream):
                if "error" in item:
                    message = str(item["error"])
                    if any(w in message.lower() for w in ("unauthorized", "denied", "authentication")):
                        raise RegistryDenied(f"push {target}: access denied: {message[:300]}")
                    if "name unknown" in message.lower() or "repository with name" in message.lower():
                        # ECR (and registries without auto-created repositories) refuse a push to a
                        # repository nobody created: retrying cannot help.
                        raise RegistryError(
                            f"push {target}: the repository does not exist in {display_name(registry)}: "
                            f"create the repository {built.image!r} there (e.g. `aws ecr create-repository "
                            f"--repository-name {built.image}`), then run again"
                        )
                    raise PushFailed(f"push {target}: {message[:300]}")
            digest = by_url[registry].digest(built.image, tag)
            if digest is None:
                raise PushFailed(f"push {target} reported success but the registry has no such tag")
            if built.existing and digest != built.existing[0].digest:
                pushed = {**{ref.name: ref.digest for ref in built.existing}, repository: digest}
                raise TagConflict(
                    f"{built.image}:{tag}: the builder's image pushed to {display_name(registry)} "
                    f"came out as {digest}, not the digest the other registries hold under that tag "
                    f"({_holdings(pushed)}). {_conflict_fix(built, registry, insecure_registries)}"
                )
            refs.append(ImageRef(name=f"{registry}/{built.image}", digest=digest, tag=tag))
    return PushedImage(refs=tuple(refs))


def _resume_partial_push(
    built: BuiltImage,
    existing: Sequence[str | None],
    *,
    base_url: str,
    insecure_registries: Collection[str],
    api_version: str = API_VERSION,
) -> BuiltImage:
    """Some registries hold the tag: find the builder's image for the others, or raise TagConflict."""
    held = tuple(
        ImageRef(name=f"{registry}/{built.image}", digest=digest, tag=built.tag)
        for registry, digest in zip(built.registries, existing, strict=True)
        if digest is not None
    )
    built = replace(built, existing=held)
    holdings = _holdings({ref.name: ref.digest for ref in held})
    if len({ref.digest for ref in held}) > 1:
        raise TagConflict(
            f"{built.image}:{built.tag} has different digests in different registries ({holdings}). "
            f"{_conflict_fix(built, held[1].name.removesuffix(f'/{built.image}'), insecure_registries)}"
        )
    missing = [
        (registry, target)
        for registry, target, digest in zip(built.registries, built.targets, existing, strict=True)
        if digest is None
    ]
    image_ids: list[str] = []
    with _client(base_url, timeout=60, api_version=api_version) as client:
        for registry, target in missing:
            try:
                image_ids.append(str(client.api.inspect_image(target)["Id"]))
            except docker.errors.NotFound:
                raise TagConflict(
                    f"{built.image}:{built.tag} is in {holdings} but not in {display_name(registry)}, "
                    f"and the builder no longer holds {display_name(registry)}/{built.image}:{built.tag} "
                    f"to push there; building again would put a second image under the same tag. "
                    f"{_conflict_fix(built, registry, insecure_registries)}"
                ) from None
            except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                raise _daemon_error(base_url, e) from None
    return replace(built, image_id=image_ids[0])


def _check_provenance(registry: Registry, image: str, tag: str, commit: str, digest: str) -> None:
    """An image reused under a release tag must be the build of the tag's commit.

    A tag moved to another commit (``git tag -f``) would otherwise ship the old build: the image's
    ``org.opencontainers.image.revision`` label (set by every twincd build) must name ``commit``.
    """
    labels = registry.labels(image, digest) or {}  # by digest: the very image found under the tag
    built_from = labels.get(REVISION_LABEL, "")
    if built_from == commit:
        return
    where = f"{display_name(registry.url)}/{image}:{tag}"
    what = f"was built from {built_from[:12]}" if built_from else f"has no {REVISION_LABEL} label"
    raise TagConflict(
        f"{where} {what}, but tag {tag} is now commit {commit[:12]}: the tag was moved after the image "
        f"was pushed, and reusing the image would release the old build. Release the new commit under a "
        f"new tag, or delete {image}:{tag} from the registry (the next run builds it from {commit[:12]})."
    )


def _holdings(digests: dict[str, str]) -> str:
    """``{"127.0.0.1:5000/hello": "sha256:..."}`` → ``127.0.0.1:5000/hello has sha256:...``, joined."""
    return "; ".join(f"{display_name(name)} has {digest}" for name, digest in digests.items())


def _conflict_fix(built: BuiltImage, target: str, insecure_registries: Collection[str]) -> str:
    """How a person makes every registry hold one image under the tag again (``target`` lacks it)."""
    source = built.existing[0].name.removesuffix(f"/{built.image}")
    flags = "".join(
        f" --{side}-tls-verify=false"
        for side, registry in (("src", source), ("dest", target))
        if registry in insecure_registries
    )
    return (
        f"Fix: copy the image, e.g. `skopeo copy{flags} "
        f"docker://{display_name(source)}/{built.image}:{built.tag} "
        f"docker://{display_name(target)}/{built.image}:{built.tag}`, or delete the tag {built.tag} of "
        f"{built.image} from every registry that has it (the next run builds it anew); then run again."
    )


@contextmanager
def _client(base_url: str, *, timeout: int, api_version: str) -> Iterator[docker.DockerClient]:
    try:
        # With version "auto" the constructor asks the engine for its version: it may be down.
        client = docker.DockerClient(base_url=base_url, version=api_version, timeout=timeout)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        raise BuilderUnavailable(f"builder at {base_url} cannot be reached: {type(e).__name__}") from None
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
        raise _daemon_error(base_url, e) from None
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
        raise BuilderUnavailable(f"builder at {base_url}: connection lost: {type(e).__name__}") from None


def _daemon_error(base_url: str, e: Exception) -> Exception:
    if isinstance(e, docker.errors.APIError) and not e.is_server_error():
        return BuildFailed(f"builder at {base_url} refused the request: {e.explanation or e}")
    if isinstance(e, docker.errors.APIError):
        return BuilderUnavailable(f"builder at {base_url}: HTTP {e.status_code}: {e.explanation or e}")
    return BuilderUnavailable(f"builder at {base_url} cannot be reached: {type(e).__name__}")


def _git(repo_url: str, what: str, *args: str, cwd: Path, auth: gitrepo.GitAuth = gitrepo.NO_AUTH) -> str:
    """Run git; a failure is SourceUnavailable naming ``what``, with git's last line of stderr."""
    # GIT_TERMINAL_PROMPT=0: a missing credential must fail, not wait forever for a password.
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=False,  # the exit code is turned into SourceUnavailable below
        capture_output=True,
        text=True,
        env=auth.env(),  # credentials in git's config environment, never in argv
        timeout=600,
    )
    if result.returncode != 0:
        # Every URL, not just repo_url's spelling: git may echo it rewritten (file:// form,
        # a trailing slash, a redirect target) or another URL altogether.
        stderr = auth.mask(gitrepo._scrub(result.stderr))
        if gitrepo.DENIED.search(stderr):  # a wrong or missing credential: retrying cannot help
            raise gitrepo.GitDenied(
                f"{what} {gitrepo.redact_url(repo_url)}: {_last_line(stderr)}; check the repository's "
                "entry under git.credentials in the environment file"
            )
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


def _resolve_tag(repo_url: str, tag: str, auth: gitrepo.GitAuth) -> str:
    """The commit that ``tag`` points to (annotated tags peeled); TagNotFound if there is none."""
    try:
        return gitrepo.tag_commit(repo_url=repo_url, tag=tag, auth=auth)
    except gitrepo.GitRefNotFound:
        raise TagNotFound(f"app repository {gitrepo.redact_url(repo_url)} has no tag {tag!r}") from None
    except gitrepo.GitError as e:
        raise SourceUnavailable(f"cannot read app repository {gitrepo.redact_url(repo_url)}: {e}") from None


def _export_tree(repo_url: str, tag: str, tmp: Path, auth: gitrepo.GitAuth) -> tuple[Path, str]:
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
        auth=auth,
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


class DockerBuilder:
    """The ``Builder`` port over the Docker Engine API (Docker, or podman's compatible service)."""

    def __init__(
        self,
        *,
        base_url: str,
        registries: Sequence[Registry],
        source_auth: gitrepo.GitAuth = gitrepo.NO_AUTH,
        api_version: str = API_VERSION,
    ) -> None:
        self._base_url = base_url
        self._api_version = api_version
        self._registries = tuple(registries)
        self._source_auth = source_auth

    def build(self, *, repo_url: str, tag: str, commit: str, image: str) -> BuiltImage:
        return _build(
            repo_url=repo_url,
            tag=tag,
            image=image,
            registries=self._registries,
            base_url=self._base_url,
            commit=commit,
            source_auth=self._source_auth,
            api_version=self._api_version,
        )

    def push(self, built: BuiltImage) -> PushedImage:
        return _push(
            built, base_url=self._base_url, registries=self._registries, api_version=self._api_version
        )
