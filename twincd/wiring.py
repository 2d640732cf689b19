"""The one place that turns an environment file into adapters.

Every other module asks for a port (``twincd.ports``) and gets whatever the environment file
configures: ``forge: {type: gitlab}`` → ``GitlabForge``, ``dns: {type: route53}`` → ``Route53``,
and so on. Adding a forge, a registry kind or a notifier touches the adapter, the config model
(``twincd.config``) and this module, nothing else. Relative paths in the file are resolved here
and only here. The return types are the ports, so ``mypy --strict`` proves every adapter fits its
port (every adapter is returned by one of these functions).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence

from twincd import config
from twincd.adapters import dns as dns_adapters
from twincd.adapters.acr import AcrLogin
from twincd.adapters.builder import DockerBuilder
from twincd.adapters.ecr import EcrLogin
from twincd.adapters.forge_local import LocalForge
from twincd.adapters.git import NO_AUTH, GitAuth, GitManifests, GitSource, basic_header, is_url
from twincd.adapters.gitlab import GitlabForge
from twincd.adapters.http_probe import HttpProbe
from twincd.adapters.kube_read import KubeCluster, KubeRollouts
from twincd.adapters.notify_console import ConsoleNotifier
from twincd.adapters.registry import Credentials, OciRegistry
from twincd.adapters.secrets import resolve_secret
from twincd.adapters.slack import MemoryThreadStore, PrefectVariableThreadStore, SlackNotifier
from twincd.config import Environment, RegistryConfig
from twincd.domain import ClusterRef, RolloutTarget
from twincd.errors import TwincdError
from twincd.ports import (
    AppSource,
    Builder,
    Cluster,
    Dns,
    Forge,
    Manifests,
    Notifier,
    Probe,
    Registry,
    Rollouts,
)

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def repo_url(env: Environment, value: str) -> str:
    """A repository named in the file: a git URL as it is; a relative path is relative to the
    file's repository root."""
    return value if is_url(value) else str(env.path(value))


def git_auth(env: Environment, url: str) -> GitAuth:
    """The credentials ``git.credentials`` gives for ``url`` (none: anonymous, ssh's agent)."""
    cred = env.git_credential(url)
    if cred is None:
        return NO_AUTH
    if cred.token is not None:
        return GitAuth(headers=((cred.url, basic_header(cred.username, resolve_secret(cred.token))),))
    return GitAuth(ssh_key=str(env.path(cred.ssh_key or "")))


def _repo(env: Environment, value: str) -> tuple[str, GitAuth]:
    url = repo_url(env, value)
    return url, git_auth(env, url)


def manifests(env: Environment) -> Manifests:
    url, auth = _repo(env, env.manifests.repo)
    # The worker's mirror of the monorepo lives under the state dir (shared by its tasks).
    return GitManifests(
        repo_url=url, branch=env.manifests.branch, auth=auth, cache_dir=env.state_path / "git-cache"
    )


def app_source(env: Environment, app: str) -> AppSource:
    url, auth = _repo(env, env.app(app).repo)
    return GitSource(repo_url=url, auth=auth)


def app_repo_url(env: Environment, app: str) -> str:
    """Where the builder clones the app from (it exports the tagged commit itself)."""
    return repo_url(env, env.app(app).repo)


def registries(env: Environment, urls: Sequence[str]) -> list[Registry]:
    """The registries at ``urls`` (as in image references), with what the file says of each."""
    by_url = {r.url: r for r in env.registries.values()}
    found: list[Registry] = []
    for url in urls:
        cfg = by_url.get(url)
        found.append(
            OciRegistry(
                url=url,
                insecure=bool(cfg and cfg.insecure),
                username=cfg.username if cfg else "",
                password=resolve_secret(cfg.password) if cfg and cfg.password else None,
                login=_cloud_login(cfg, url),
            )
        )
    return found


def _cloud_login(cfg: RegistryConfig | None, url: str) -> Callable[[], Credentials] | None:
    """ECR's or ACR's own token exchange, for a registry entry of that type."""
    if cfg is None:
        return None
    if cfg.type == "ecr":
        return EcrLogin(region=cfg.region or "", registry_id=url.split(".", 1)[0])
    if cfg.type == "acr":
        return AcrLogin(registry_url=url, tenant=cfg.tenant or "", insecure=cfg.insecure)
    return None


def builder_url(env: Environment) -> str:
    """The Docker Engine API: ``builder.url`` (a relative socket path allowed), else DOCKER_HOST."""
    url = env.builder.url
    if url is None:
        return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if url.startswith("unix://") and not url.startswith("unix:///"):
        return "unix://" + str(env.path(url.removeprefix("unix://")))
    return url


def builder(env: Environment, registry_urls: Sequence[str], *, app: str | None = None) -> Builder:
    """The builder, pushing to the registries at ``registry_urls``; ``app``: whose repo it builds from."""
    source_auth = _repo(env, env.app(app).repo)[1] if app is not None else NO_AUTH
    return DockerBuilder(
        base_url=builder_url(env),
        registries=registries(env, registry_urls),
        source_auth=source_auth,
        api_version=env.builder.api_version,
    )


def gitlab_forge(cfg: config.GitlabForge, *, timeout: float = 30) -> GitlabForge:
    return GitlabForge(
        url=cfg.url,
        project=cfg.project,
        token=resolve_secret(cfg.token),
        labels=cfg.labels,
        failed_label=cfg.failed_label,
        timeout=timeout,
        poll_seconds=cfg.poll_seconds,
        max_poll_seconds=cfg.max_poll_seconds,
        check_seconds=cfg.check_seconds,
        pipeline_seconds=cfg.pipeline_seconds,
    )


def forge_type(env: Environment) -> type[Forge]:
    """The forge's class: what a flow asks (``merged_by_people``) without building one."""
    return GitlabForge if isinstance(env.forge, config.GitlabForge) else LocalForge


@contextlib.contextmanager
def forge(env: Environment) -> Iterator[Forge]:
    """The configured forge for one task; a GitLab HTTP session is closed when the task is done."""
    if isinstance(env.forge, config.GitlabForge):
        with gitlab_forge(env.forge) as gitlab:
            yield gitlab
    else:
        url, auth = _repo(env, env.manifests.repo)
        yield LocalForge(
            repo_url=url,
            records_dir=env.state_path / "forge",
            auth=auth,
            cache_dir=env.state_path / "git-cache",
            merge_seconds=env.forge.merge_seconds,
        )


def notifiers(env: Environment, *, logger: Logger, threads: bool = True) -> list[Notifier]:
    """The console notifier always; Slack when configured. ``threads``: keep each release's Slack
    thread in a Prefect Variable (a re-run continues it); False for one-off messages (drift)."""
    found: list[Notifier] = [ConsoleNotifier(logger=logger)]
    if isinstance(env.notifier, config.SlackNotifier):
        cfg = env.notifier
        try:
            token = resolve_secret(cfg.token)
        except TwincdError as e:
            # A notifier never fails a run, not even a misconfigured one: say so and go on.
            logger.warning("Slack notifier not configured (the run goes on): %s", e)
            return found
        found.append(
            SlackNotifier(
                token.reveal(),
                cfg.channel,
                mention_on_failure=cfg.mention_on_failure,
                store=PrefectVariableThreadStore() if threads else MemoryThreadStore(),
                logger=logger,
                base_url=cfg.api_url,
            )
        )
    return found


def dns(env: Environment) -> Dns:
    cfg = env.dns
    if isinstance(cfg, config.DnsRoute53):
        return dns_adapters.Route53(zone=cfg.zone, hosted_zone_id=cfg.hosted_zone_id, region=cfg.region)
    if isinstance(cfg, config.DnsAzure):
        return dns_adapters.AzureDns(
            subscription_id=cfg.subscription_id,
            resource_group=cfg.resource_group,
            zone=cfg.zone,
            base_url=cfg.base_url,
        )
    if isinstance(cfg, config.DnsRfc2136):
        key = dns_adapters.Tsig.parse(resolve_secret(cfg.key).reveal())
        return dns_adapters.Rfc2136(server=cfg.server, zone=cfg.zone, key=key)
    return dns_adapters.NoDns()


def cluster_ref(env: Environment, name: str) -> ClusterRef:
    """How to reach a cluster: its kubeconfig context (and file, relative to the repository)."""
    c = env.clusters[name]
    return ClusterRef(name, c.context, str(env.path(c.kubeconfig)) if c.kubeconfig else None)


def cluster(env: Environment, name: str) -> Cluster:
    return KubeCluster(cluster_ref(env, name))


def rollouts(env: Environment) -> Rollouts:
    return KubeRollouts(manifests=manifests(env))


def probe(timeout: float) -> Probe:
    return HttpProbe(timeout=timeout)


def rollout_target(
    env: Environment,
    cluster_name: str,
    app: str,
    revision: str,
    digest: str | None = None,
    *,
    argocd: bool = True,
) -> RolloutTarget:
    """What a cluster must show for ``app`` at ``revision``; with Argo CD, where its Application lives
    (``argocd=False``: twincd applied the overlay itself, so no Application is asked)."""
    c = env.clusters[cluster_name]
    w = env.app(app).workload
    ref = cluster_ref(env, cluster_name)
    app_of = c.argocd if c.sync == "argocd" and argocd else None
    return RolloutTarget(
        cluster=ref,
        argocd=ClusterRef(
            f"Argo CD of {cluster_name}",
            app_of.context,
            str(env.path(app_of.kubeconfig)) if app_of.kubeconfig else ref.kubeconfig,
        )
        if app_of
        else None,
        application=app_of.application.format(app=app, cluster=cluster_name) if app_of else None,
        argocd_namespace=app_of.namespace if app_of else "argocd",
        kind=w.kind,
        namespace=w.namespace,
        name=w.name,
        revision=revision,
        digest=digest,
        repository=f"{env.pull_registry(app, cluster_name)}/{env.app(app).image}",
    )
