"""Typed models of ``deployments/*.yaml``.

Loading validates everything before any side effect; errors name the file, the key and what was
expected. Secret values are references (``secret:NAME`` for a Prefect Secret block, ``env:VAR``),
never literals: a literal where a reference belongs is a config error, so a token pasted into the
file is refused instead of being carried around.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twincd.domain import image_repository
from twincd.errors import ConfigError, PermanentError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV = REPO_ROOT / "deployments" / "local.yaml"

_SECRET_REF = re.compile(r"^(secret:[a-z0-9][a-z0-9-]*|env:[A-Za-z_][A-Za-z0-9_]*)$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_TAG_PATTERN = r"^v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$"


def _url_covers(prefix: str, url: str) -> bool:
    # scp-style `git@host:path` continues at ':'; URLs at '/' only (`host:8443` is another remote).
    base = prefix.rstrip("/:")
    boundary = "/" if "://" in base else "/:"
    return url == base or (url.startswith(base) and url[len(base)] in boundary)


def _no_credentials(value: str) -> str:
    """Refuse a URL with credentials in it (``https://user:TOKEN@host/…``): they would reach logs,
    artifacts and chat wherever the URL is shown. Never echo the value."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value  # a path or scp-style `git@host:path` (an ssh user, no secret)
    userinfo, at, _ = rest.partition("/")[0].rpartition("@")
    if at and (":" in userinfo or scheme.lower() in ("http", "https")):
        raise ValueError(
            "must not carry credentials (user:password@ or a token before @): put them in a "
            "secret reference (git.credentials for git remotes, the entry's token/password otherwise)"
        )
    return value


def _check_secret_ref(value: str) -> str:
    if not _SECRET_REF.match(value):
        # Never echo the value: it may be the secret itself.
        raise ValueError("must be a secret reference `secret:NAME` or `env:VAR`, not a literal value")
    return value


SecretRef = Annotated[str, Field(description="secret:NAME (Prefect Secret block) or env:VAR")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefectConfig(_Model):
    api_url: str = "http://127.0.0.1:4200/api"
    # The database of the stack's Prefect server (`twincd up`): SQLite in the state dir, or the
    # stack's own PostgreSQL (on sandbox.postgres_port), as Prefect recommends beyond one machine.
    database: Literal["sqlite", "postgresql"] = "sqlite"

    _url = field_validator("api_url")(_no_credentials)


class ManifestsConfig(_Model):
    repo: str
    branch: str = "main"

    _repo = field_validator("repo")(_no_credentials)


class GitCredential(_Model):
    """Credentials for the git remotes under one URL prefix (longest prefix wins).

    HTTPS: ``token`` (e.g. a GitLab deploy, project or personal access token) is sent as
    ``Authorization: Basic base64(username:token)``; GitLab takes any username for a project or
    personal token, and the deploy token's own username for a deploy token. SSH: ``ssh_key`` is a
    private key file (relative to the repository root allowed); without one ssh uses its agent.
    """

    url: str  # e.g. https://gitlab.example.com/ or ssh://git@gitlab.example.com/ or git@host:
    username: str = "oauth2"
    token: SecretRef | None = None
    ssh_key: str | None = None

    _url = field_validator("url")(_no_credentials)

    @field_validator("token")
    @classmethod
    def _token_ref(cls, value: str | None) -> str | None:
        return None if value is None else _check_secret_ref(value)

    @model_validator(mode="after")
    def _one_kind(self) -> GitCredential:
        if (self.token is None) == (self.ssh_key is None):
            raise ValueError("give either `token` (HTTPS) or `ssh_key` (SSH), not both or neither")
        return self


class GitConfig(_Model):
    credentials: tuple[GitCredential, ...] = ()


class LocalForge(_Model):
    type: Literal["local"]
    # How long a merge waits for the merges before it (one at a time into the manifests branch)
    # and rebuilds itself on pushes from elsewhere, before it gives up (transient: a retry goes on).
    merge_seconds: float = 300


class GitlabForge(_Model):
    type: Literal["gitlab"]
    url: str
    project: str
    token: SecretRef
    labels: tuple[str, ...] = ("twincd",)
    failed_label: str = "twincd::validation-failed"
    poll_seconds: float = 5  # first wait between reads while GitLab checks or merges; grows to max_poll
    max_poll_seconds: float = 60
    # twincd's own merges: how long to wait for GitLab's mergeability check, and for a required
    # pipeline when the merge is left to GitLab's auto-merge.
    check_seconds: float = 120
    pipeline_seconds: float = 3600

    _token = field_validator("token")(_check_secret_ref)
    _url = field_validator("url")(_no_credentials)


class ConsoleNotifier(_Model):
    type: Literal["console"]


class SlackNotifier(_Model):
    type: Literal["slack"]
    channel: str
    token: SecretRef
    mention_on_failure: str = ""
    api_url: str | None = None  # the Web API base URL, default https://slack.com/api/ (proxies, tests)

    _token = field_validator("token")(_check_secret_ref)


class RegistryConfig(_Model):
    """A registry; without ``password``, the docker config (and its credential helpers) or anonymous."""

    url: str  # host[:port][/path], as in image references
    insecure: bool = False
    username: str = ""
    password: SecretRef | None = None  # a password or token (e.g. a GitLab deploy token)
    # ecr: credentials from ECR's GetAuthorizationToken (the AWS chain) when no password is given;
    # acr: an Entra ID token (azure-identity's DefaultAzureCredential) exchanged at the registry.
    type: Literal["generic", "ecr", "acr"] = "generic"
    region: str | None = None  # ecr: the registry's region
    tenant: str | None = None  # acr: the Entra tenant, when the identity's default is not the one

    @model_validator(mode="after")
    def _ecr_region(self) -> RegistryConfig:
        if self.type == "ecr" and not self.region:
            raise ValueError("type: ecr needs `region` (e.g. eu-west-1)")
        return self

    @field_validator("password")
    @classmethod
    def _password_ref(cls, value: str | None) -> str | None:
        return None if value is None else _check_secret_ref(value)


class BuilderConfig(_Model):
    url: str | None = None  # Docker Engine API; None = DOCKER_HOST or the default socket
    api_version: str = "auto"  # negotiated with the engine; or pin one, e.g. "1.44"


class ArgoCDConfig(_Model):
    context: str
    kubeconfig: str | None = None
    namespace: str = "argocd"
    application: str = "{app}-{cluster}"


class IngressService(_Model):
    namespace: str = "ingress-nginx"
    name: str = "ingress-nginx-controller"


class ClusterConfig(_Model):
    cloud: str
    context: str
    kubeconfig: str | None = None
    overlay: str
    # Where the cluster's ingress (load balancer) answers. An AWS NLB has one IP per availability
    # zone and an Azure LB may have several front ends: list them all, or DNS loses that redundancy.
    ingress_ips: tuple[str, ...] = ()
    ingress_ip: str | None = None  # one IP; the same as `ingress_ips: [IP]`
    # Or read them when a failover plans: the ingress controller's LoadBalancer Service, whose
    # status.loadBalancer.ingress lists an IP per front end (Azure) or a hostname (an AWS NLB,
    # resolved to its per-zone IPs, which are static). A Classic ELB's or an ALB's addresses change
    # over time: AWS points names at those with alias records, which A records cannot follow.
    ingress_service: IngressService | None = None
    registry: str | None = None  # the registry this cluster pulls from; default: the app's first
    sync: Literal["argocd", "apply"] = "argocd"
    argocd: ArgoCDConfig | None = None

    @model_validator(mode="after")
    def _argocd_needed(self) -> ClusterConfig:
        if self.sync == "argocd" and self.argocd is None:
            raise ValueError("sync: argocd needs an `argocd: {context: ...}` entry")
        if sum(map(bool, (self.ingress_ip, self.ingress_ips, self.ingress_service))) > 1:
            raise ValueError("give one of `ingress_ips` (a list), `ingress_ip` or `ingress_service`")
        for ip in self.ips:
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                raise ValueError(f"ingress IP {ip!r} is not an IPv4 address (A records hold IPv4)") from None
        return self

    @property
    def ips(self) -> tuple[str, ...]:
        """Every ingress IP of the cluster, as DNS publishes them when the cluster serves."""
        return self.ingress_ips or ((self.ingress_ip,) if self.ingress_ip else ())


class TopologyConfig(_Model):
    """An app's topology as first laid out (``twincd up`` seeds it); the overlays in git say what
    it is now. ``only`` is a constraint every failover keeps unless forced, ``why`` says why."""

    mode: Literal["active-active", "active-standby"] = "active-active"
    active: str | None = None
    only: Literal["active-active", "active-standby"] | None = None
    why: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> TopologyConfig:
        if self.mode == "active-standby" and not self.active:
            raise ValueError("mode active-standby needs `active: <cluster>`")
        if self.mode == "active-active" and self.active:
            raise ValueError("mode active-active takes no `active` (every cluster serves)")
        if self.only and not self.why.strip():
            raise ValueError("a constraint (`only`) needs `why`: the plan shows it to whoever breaks it")
        if self.only and self.only != self.mode:
            raise ValueError(f"mode {self.mode} breaks the app's own constraint only: {self.only}")
        return self


class DnsNone(_Model):
    type: Literal["none"]


class DnsRfc2136(_Model):
    type: Literal["rfc2136"]
    server: str
    zone: str
    record: str | None = None  # the default record of an app without `dns:` of its own
    ttl: int = 60
    key: SecretRef

    _key = field_validator("key")(_check_secret_ref)


class DnsRoute53(_Model):
    """Amazon Route 53; credentials come from the standard AWS chain (no secret in the file)."""

    type: Literal["route53"]
    zone: str
    record: str | None = None  # the default record of an app without `dns:` of its own
    ttl: int = 60
    hosted_zone_id: str | None = None
    region: str = "us-east-1"


class DnsAzure(_Model):
    """Azure DNS; credentials come from the standard Azure chain (env vars, managed identity,
    `az login`), so no secret is in the file. The identity needs "DNS Zone Contributor" on the zone."""

    type: Literal["azure"]
    subscription_id: str
    resource_group: str
    zone: str
    record: str | None = None  # the default record of an app without `dns:` of its own
    ttl: int = 60
    base_url: str | None = (
        None  # the ARM endpoint, default https://management.azure.com (other clouds, tests)
    )


class AppDns(_Model):
    """An app's own A record(s) in the environment's zone (provider and zone come from `dns:`)."""

    record: str | None = None
    records: tuple[str, ...] = ()  # several names for the same app (e.g. shop and www.shop)
    ttl: int | None = Field(default=None, ge=1)  # default: the environment's dns.ttl

    @model_validator(mode="after")
    def _one(self) -> AppDns:
        if bool(self.record) == bool(self.records):
            raise ValueError("give `record` (one name) or `records` (a list), not both or neither")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return self.records or (str(self.record),)


class HealthConfig(_Model):
    """The failover health gate's check of an app through each ingress IP, as a client reaches it:
    the app's public name as Host and TLS SNI, the certificate verified for that name, 2xx only."""

    path: str
    scheme: Literal["https", "http"] = "https"
    port: int | None = Field(default=None, ge=1, le=65535)  # default 443 / 80
    host: str | None = None  # default: the app's first DNS name
    ca_file: str | None = None  # PEM bundle that signs the ingress certificate; default: system CAs
    successes: int = Field(default=3, ge=1)  # consecutive 2xx answers needed per IP
    interval_seconds: float = Field(default=1.0, ge=0)
    timeout_seconds: float = Field(default=5.0, gt=0)
    attempts: int = Field(default=10, ge=1)  # per IP, before the gate fails

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with `/` (e.g. /healthz)")
        return value

    @property
    def effective_port(self) -> int:
        return self.port or (443 if self.scheme == "https" else 80)


class WorkloadConfig(_Model):
    kind: Literal["Deployment", "StatefulSet", "DaemonSet"] = "Deployment"
    namespace: str
    name: str


class AppConfig(_Model):
    repo: str
    project: str | None = None  # the app repo's GitLab path_with_namespace (tag-push webhook)
    image: str
    registries: tuple[str, ...]
    tag_pattern: str = DEFAULT_TAG_PATTERN
    workload: WorkloadConfig
    topology: TopologyConfig | None = None  # default: the environment's `topology`
    dns: AppDns | None = None  # default: the environment's dns.record (for one app only)
    health: HealthConfig | None = None  # the failover health gate's HTTP check; off without it

    _repo = field_validator("repo")(_no_credentials)

    @field_validator("tag_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression: {e}") from None
        return value


class ValidationConfig(_Model):
    """Images twincd manages are always checked for a digest pin; others follow this policy."""

    # require: every image pinned; warn: others reported on the MR and in the timeline;
    # allow-list: others allowed when their repository (or a parent path) is listed.
    unpinned_images: Literal["require", "warn", "allow-list"] = "warn"
    allowed_unpinned: tuple[str, ...] = ()  # e.g. docker.io/istio, ghcr.io/org/exporter


class TimeoutsConfig(_Model):
    # People take days; a waiting run holds nothing (it is suspended), so a long default costs nothing.
    approval_seconds: float = 3 * 24 * 3600
    # A Deployment's default progressDeadlineSeconds (600) plus one Argo CD reconcile should twincd's
    # refresh request be lost (timeout.reconciliation 180 s + up to 60 s of jitter): a slow rollout
    # is Kubernetes' to call failed, not twincd's impatience.
    rollout_seconds: float = 840


class RevertConfig(_Model):
    on_failure: bool = True  # open a revert MR when verification fails
    wait: bool = True  # wait for the revert MR and verify the rollback like a deploy


class RolloutConfig(_Model):
    """How a release reaches the clusters: all at once, or cloud by cloud with a bake time."""

    strategy: Literal["parallel", "sequential"] = "parallel"
    order: tuple[str, ...] = ()  # sequential: the clusters in order (default: as listed in `clusters`)
    bake_seconds: float = 0  # sequential: how long a verified stage must stay healthy before the next
    revert: RevertConfig = RevertConfig()
    # A release of an app while an earlier one has not ended: `wait` for it (queued, suspended),
    # or `supersede` an earlier one still waiting for a person (it closes its MR and ends
    # Cancelled; nothing is reverted, nothing was merged). See flows/turns.py.
    later_release: Literal["wait", "supersede"] = "wait"


class WebhookConfig(_Model):
    """`twincd webhook`: GitLab Tag Push Hook → a run of the `deploy` deployment."""

    secret: SecretRef
    host: str = "127.0.0.1"
    port: int = 8085
    deployment: str = "deploy/deploy"
    max_body: int = 1024 * 1024
    # How long a delivery waits for its run before it is answered 202 pending (GitLab: 10 s max).
    answer_seconds: float = Field(default=1.0, ge=0, le=9)

    _secret = field_validator("secret")(_check_secret_ref)


class SandboxConfig(_Model):
    """Ports of the local stack's own services (only used by `twincd up`)."""

    cluster_ports: dict[str, int] = {}
    git_port: int | None = None  # the stack's git server (git http-backend with Basic auth)
    postgres_port: int = 5433  # the stack's PostgreSQL, when prefect.database is postgresql
    registry_token_port: int | None = None  # the stack registry's token service (auth: token)
    # The sandbox Argo CD's timeout.reconciliation: how often it compares an Application with git
    # when nobody asked it to refresh (Argo CD 2.x: 180 s, plus up to 60 s of jitter).
    argocd_reconcile_seconds: float = 180
    # Whether the stack's runner (`twincd serve`) keeps the deployments' schedules (drift-check
    # every 15 min, watch-waits every 10); off for test stacks, whose runs must be their tests'.
    runner_schedules: bool = True
    # False: no runner; workers of a work pool run the flows (`prefect deploy` from prefect.yaml).
    runner: bool = True
    # How many flow runs the stack's runner executes at once (Prefect's runner default: 5); a
    # suspended run holds none.
    runner_processes: int = Field(default=10, ge=1)


class Environment(_Model):
    """One environment file: what is deployed where."""

    state_dir: str = ".twincd"
    kubernetes_version: str = "1.31"
    validation: ValidationConfig = ValidationConfig()
    prefect: PrefectConfig = PrefectConfig()
    git: GitConfig = GitConfig()
    manifests: ManifestsConfig
    forge: Annotated[LocalForge | GitlabForge, Field(discriminator="type")]
    notifier: Annotated[ConsoleNotifier | SlackNotifier, Field(discriminator="type")]
    registries: dict[str, RegistryConfig]
    builder: BuilderConfig = BuilderConfig()
    clusters: dict[str, ClusterConfig]
    topology: TopologyConfig = TopologyConfig()
    dns: Annotated[DnsNone | DnsRfc2136 | DnsRoute53 | DnsAzure, Field(discriminator="type")] = DnsNone(
        type="none"
    )
    apps: dict[str, AppConfig]
    timeouts: TimeoutsConfig = TimeoutsConfig()
    rollout: RolloutConfig = RolloutConfig()
    webhook: WebhookConfig | None = None
    sandbox: SandboxConfig = SandboxConfig()

    # Where the file was read from; relative paths in it are resolved against `base_dir`.
    source: str = ""
    base_dir: str = ""

    @model_validator(mode="after")
    def _cross_references(self) -> Environment:
        for name in [*self.clusters, *self.apps]:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must be a DNS label (lowercase letters, digits, '-')")
        for app_name, app in self.apps.items():
            for reg in app.registries:
                if reg not in self.registries:
                    raise ValueError(
                        f"apps.{app_name}.registries names {reg!r}, which is not under `registries:` "
                        f"(known: {', '.join(sorted(self.registries)) or 'none'})"
                    )
        for cluster_name, cluster in self.clusters.items():
            if cluster.registry is not None and cluster.registry not in self.registries:
                raise ValueError(
                    f"clusters.{cluster_name}.registry names {cluster.registry!r}, "
                    "which is not under `registries:`"
                )
        unknown = [c for c in self.rollout.order if c not in self.clusters]
        if unknown:
            raise ValueError(f"rollout.order names unknown cluster(s) {', '.join(unknown)}")
        if self.rollout.order and sorted(self.rollout.order) != sorted(self.clusters):
            raise ValueError("rollout.order must list every cluster exactly once")
        return self

    @model_validator(mode="after")
    def _topologies_and_records(self) -> Environment:
        for where, topology in [("topology", self.topology)] + [
            (f"apps.{a}.topology", app.topology) for a, app in self.apps.items() if app.topology
        ]:
            if topology.active is not None and topology.active not in self.clusters:
                raise ValueError(
                    f"{where}.active names {topology.active!r}, not one of the clusters "
                    f"({', '.join(self.clusters)})"
                )
        for app in self.apps:
            health = self.apps[app].health
            if health is not None and not health.host and not self.app_records(app):
                raise ValueError(
                    f"apps.{app}.health needs `host` (the name its clients use, sent as Host and SNI) "
                    "when the app has no DNS record twincd manages"
                )
        return self

    def git_credential(self, url: str) -> GitCredential | None:
        """The credentials for a git remote: the entry with the longest matching URL prefix, matched
        at path-segment boundaries as git matches ``http.<url>.*`` (``…/infra`` covers ``…/infra/x.git``,
        never ``…/infra-secrets/x.git``)."""
        found = [c for c in self.git.credentials if _url_covers(c.url, url)]
        return max(found, key=lambda c: len(c.url)) if found else None

    def path(self, value: str) -> Path:
        """Resolve a path from the file: relative paths are relative to the file's repository root."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    def app(self, name: str) -> AppConfig:
        try:
            return self.apps[name]
        except KeyError:
            known = ", ".join(sorted(self.apps)) or "none"
            raise UnknownApp(f"unknown app {name!r} in {self.source} (known apps: {known})") from None

    def app_overlay(self, app: str, cluster: str) -> str:
        """Each app's overlay for a cluster lives at ``<cluster overlay>/<app>`` in the manifests repo."""
        return f"{self.clusters[cluster].overlay.rstrip('/')}/{app}"

    def rollout_stages(self) -> list[tuple[str, ...]]:
        """Parallel: one stage with every cluster; sequential: one stage per cluster, in order."""
        if self.rollout.strategy == "parallel":
            return [tuple(self.clusters)]
        return [(c,) for c in (self.rollout.order or tuple(self.clusters))]

    def app_records(self, app: str) -> tuple[RecordName, ...]:
        """The A records that send clients to ``app`` (none when twincd does not manage its DNS)."""
        if self.dns.type == "none":
            return ()
        own = self.app(app).dns
        names = own.names if own else ((self.dns.record,) if self.dns.record else ())
        ttl = own.ttl if own and own.ttl else self.dns.ttl
        return tuple(RecordName(n, f"{n}.{self.dns.zone}" if n != "@" else self.dns.zone, ttl) for n in names)

    def app_topology(self, app: str) -> TopologyConfig:
        """The app's topology as configured: its own, else the environment's."""
        return self.app(app).topology or self.topology

    def serving_clusters(self, app: str) -> frozenset[str]:
        """The clusters the app's configured topology says take traffic (Active/Standby: the active one)."""
        topology = self.app_topology(app)
        if topology.mode == "active-standby" and topology.active is not None:
            return frozenset({topology.active})
        return frozenset(self.clusters)

    def argocd_host(self, cluster: str) -> str | None:
        """The cluster that hosts the Argo CD syncing ``cluster`` (matched by kubeconfig context);
        None without Argo CD, or when it runs outside the clusters of this file."""
        argocd = self.clusters[cluster].argocd
        if argocd is None:
            return None
        return next((name for name, c in self.clusters.items() if c.context == argocd.context), None)

    def applications(self, cluster: str) -> dict[str, str | None]:
        """app → the Argo CD Application that owns it on ``cluster`` (None: no Argo CD there)."""
        argocd = self.clusters[cluster].argocd
        return {
            app: argocd.application.format(app=app, cluster=cluster) if argocd is not None else None
            for app in self.apps
        }

    def app_registry_urls(self, app: str) -> tuple[str, ...]:
        """Where the app's image is pushed, in the order the file lists the registries."""
        return tuple(self.registries[r].url for r in self.app(app).registries)

    def managed_images(self, app: str) -> frozenset[str]:
        """The repositories twincd pushes ``app`` to and pins in the overlays, and the bare name the
        bases use before the first pin (kustomize's ``images: - name: <image>`` matches it)."""
        image = self.app(app).image
        return frozenset(
            {image_repository(image)} | {f"{url}/{image}" for url in self.app_registry_urls(app)}
        )

    def pull_registry(self, app: str, cluster: str) -> str:
        """The registry URL a cluster pulls the app from (one registry per cloud is common)."""
        name = self.clusters[cluster].registry
        return self.registries[
            name if name in self.apps[app].registries else self.apps[app].registries[0]
        ].url


class UnknownApp(PermanentError):
    pass


@dataclass(frozen=True)
class RecordName:
    """One managed A record: its name relative to the zone, its full name, the TTL twincd writes."""

    name: str
    fqdn: str
    ttl: int


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_environment(path: str | os.PathLike[str] | None = None) -> Environment:
    """Read and validate an environment file; raise ConfigError naming file, key and expectation."""
    file = Path(path) if path else DEFAULT_ENV
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: environment file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{file}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level, got {type(raw).__name__}")
    # A file under deployments/ resolves relative paths against the repository that holds it.
    base = (
        file.resolve().parent.parent if file.resolve().parent.name == "deployments" else file.resolve().parent
    )
    raw = {**raw, "source": str(file), "base_dir": str(base)}
    try:
        return Environment.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            # Secret fields: pydantic's `input` may be the secret itself, so it is never shown.
            problems.append(f"  {_where(err['loc'])}: {err['msg']}")
        raise ConfigError(f"{file}: invalid environment\n" + "\n".join(problems)) from None
