"""The local stack: `twincd up` / `down` / `status`.

Everything binds to 127.0.0.1 and keeps state and logs under the environment's state dir
(`.twincd/` by default); processes are tracked by PID files (see procs.py) so `down` stops only
what `up` started. Ports come from the environment file, so tests run a whole second stack on
free ports beside a running demo.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from twincd.config import REPO_ROOT, DnsRfc2136, Environment
from twincd.errors import ConfigError
from twincd.sandbox import buildd, dns, githttp, postgres, procs, registry, registry_auth, seed
from twincd.sandbox.contexts import write_kubeconfig

PREFECT = "prefect-server"
RUNNER = "runner"
# How often the stack's runner asks for runs to start (Prefect's default is 10 s): a run resumed
# after a wait, or started by a hook, begins within this.
RUNNER_POLL_SECONDS = 2


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    pid: int | None


def _port(url: str, what: str) -> int:
    port = urlparse(url if "//" in url else f"//{url}").port
    if port is None:
        raise ConfigError(f"{what} {url!r} must name an explicit port for the local stack")
    return port


def cluster_name_of(cluster: str) -> str:
    return f"cluster-{cluster}"


def _cluster_ports(env: Environment) -> dict[str, int]:
    ports = env.sandbox.cluster_ports
    missing = [c for c in env.clusters if c not in ports]
    if missing:
        raise ConfigError(
            f"{env.source}: sandbox.cluster_ports has no port for cluster(s) {', '.join(missing)}"
        )
    return {c: ports[c] for c in env.clusters}


def local_repo_path(env: Environment, value: str) -> Path:
    """Where a repository of the environment file lives on disk for the local stack.

    A URL of the stack's own git server (``http://127.0.0.1:<sandbox.git_port>/<name>.git``) is
    the bare repository ``<state>/git/<name>.git`` it serves; a path is the path.
    """
    if "://" not in value:
        return env.path(value)
    url = urlparse(value)
    if env.sandbox.git_port is None or url.hostname != "127.0.0.1" or url.port != env.sandbox.git_port:
        raise ConfigError(
            f"{env.source}: {value} is not served by the local stack's git server "
            f"(http://127.0.0.1:{env.sandbox.git_port or '<sandbox.git_port>'}/...)"
        )
    return git_root(env) / url.path.lstrip("/")


def git_root(env: Environment) -> Path:
    return env.state_path / "git"


def prefect_env(env: Environment) -> dict[str, str]:
    state = env.state_path
    return {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_URL": env.prefect.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": env.prefect.api_url,
        # Prefect's client retries a 429/502/503 answer or a dropped connection this many times,
        # waiting 2, 4, 8... s (prefect/client/base.py): 7 is about 4 minutes (default 5: about 1);
        # a refused connection only on a client that connected before. A user's value is kept.
        "PREFECT_CLIENT_MAX_RETRIES": os.environ.get("PREFECT_CLIENT_MAX_RETRIES", "7"),
        # A flow run's heartbeat every 30 s (Prefect's least; 180 by default): watch-waits marks a
        # run Crashed after three missed beats (twincd.adapters.waits.crash_the_dead).
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"),
    }


def healthy(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def up(env: Environment, *, say: Callable[[str], None] = print) -> list[Service]:
    """Start every service (idempotent: running ones are kept) and seed the repositories."""
    state = env.state_path
    state.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    t0 = time.monotonic()

    local_registries = [r.url for r in env.registries.values() if r.url.startswith("127.0.0.1:")]
    token_port = env.sandbox.registry_token_port
    for url in local_registries:
        auth = f" (tokens from http://127.0.0.1:{token_port}/token)" if token_port else ""
        say(f"registry      {url}{auth}")
        registry.start_registry(state, _port(url, "registry"), token_port=token_port)
        services.append(
            Service(registry.NAME, f"http://{url}", procs.daemon_status(registry.NAME, state_dir=state))
        )

    say("build API     (Docker if it answers, else podman's service)")
    base_url = buildd.start_buildd(
        state, insecure_registries=[r.url for r in env.registries.values() if r.insecure]
    )
    services.append(Service("build-api", base_url, procs.daemon_status(buildd.NAME, state_dir=state)))

    say("git repos     " + ", ".join([env.manifests.repo, *(a.repo for a in env.apps.values())]))
    seed_repos(env)
    if env.sandbox.git_port is not None:
        token = githttp.token_path(state)
        if not token.exists():
            token.parent.mkdir(parents=True, exist_ok=True)
            token.touch(mode=0o600)
            token.write_text(secrets.token_urlsafe(24) + "\n")
        url = f"http://127.0.0.1:{env.sandbox.git_port}"
        say(f"git server    {url} (git http-backend, Basic auth with the token in {token})")
        argv = [
            sys.executable,
            "-m",
            "twincd.sandbox.githttp",
            "--root",
            str(git_root(env)),
            "--port",
            str(env.sandbox.git_port),
            "--token-file",
            str(token),
        ]
        pid = procs.start_daemon(
            githttp.NAME, argv, state_dir=state, ready=healthy(f"{url}/healthz"), timeout=30
        )
        services.append(Service(githttp.NAME, url, pid))

    if isinstance(env.dns, DnsRfc2136) and env.dns.server.startswith("127.0.0.1:"):
        # Each app's records as its configured topology lays it out (the overlays are seeded alike).
        records = {
            r.name: (r, tuple(ip for c in sorted(env.serving_clusters(app)) for ip in env.clusters[c].ips))
            for app in env.apps
            for r in env.app_records(app)
        }
        say(
            f"dns           {env.dns.server} "
            f"(BIND: {', '.join(r.fqdn for r, _ in records.values())}, RFC 2136 updates with TSIG)"
        )
        dns.start_dns(
            state,
            _port(env.dns.server, "dns.server"),
            zone=env.dns.zone,
            records={name: ips for name, (_, ips) in records.items()},
            ttl=env.dns.ttl,
            ttls={name: r.ttl for name, (r, _) in records.items()},
        )
        services.append(Service(dns.NAME, env.dns.server, procs.daemon_status(dns.NAME, state_dir=state)))

    ports = _cluster_ports(env)
    pull_secret = _write_pull_secret(env, local_registries) if token_port else None
    contexts: dict[str, str] = {}
    # Clusters that hold Applications for others start first, so syncers find their Argo CD.
    order = sorted(env.clusters, key=lambda c: (env.argocd_host(c) or c) != c)
    for name in order:
        url = f"http://127.0.0.1:{ports[name]}"
        argocd_url = f"http://127.0.0.1:{ports[env.argocd_host(name) or name]}"
        say(f"cluster {name:<5} {url} (sandbox API server + Deployment controller + sandbox Argo CD)")
        argv = [
            sys.executable,
            "-m",
            "twincd.sandbox.cluster",
            *(["--pull-secret", str(pull_secret)] if pull_secret else []),
            "--name",
            name,
            "--port",
            str(ports[name]),
            "--manifests",
            str(local_repo_path(env, env.manifests.repo)),
            "--argocd-api",
            argocd_url,
            # The sandbox Argo CD reads the same layout twincd does: each app at <overlay>/<app>.
            "--overlay",
            env.clusters[name].overlay,
            "--application",
            argocd.application if (argocd := env.clusters[name].argocd) else "{app}-{cluster}",
            "--argocd-namespace",
            argocd.namespace if argocd else "argocd",
            "--reconcile-seconds",
            str(env.sandbox.argocd_reconcile_seconds),
        ]
        pid = procs.start_daemon(
            cluster_name_of(name), argv, state_dir=state, ready=healthy(f"{url}/readyz"), timeout=30
        )
        contexts[env.clusters[name].context] = url
        services.append(Service(f"cluster {name}", url, pid))
    kubeconfigs = {env.clusters[c].kubeconfig for c in env.clusters} - {None}
    for kc in kubeconfigs:
        assert kc is not None
        write_kubeconfig(env.path(kc), contexts)

    api = env.prefect.api_url.rstrip("/")
    database: dict[str, str] = {}
    if env.prefect.database == "postgresql":
        say(f"postgres      127.0.0.1:{env.sandbox.postgres_port} (the Prefect server's database)")
        database["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres.start_postgres(
            state, env.sandbox.postgres_port
        )
        services.append(
            Service(
                postgres.NAME,
                f"127.0.0.1:{env.sandbox.postgres_port}",
                procs.daemon_status(postgres.NAME, state_dir=state),
            )
        )
    say(f"prefect       {api.removesuffix('/api')} (server + UI; first start runs migrations, ~20 s)")
    port = _port(api, "prefect.api_url")
    pid = procs.start_daemon(
        PREFECT,
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        state_dir=state,
        env={**prefect_env(env), **database},
        ready=healthy(f"{api}/health"),
        timeout=120,
    )
    services.append(Service(PREFECT, api.removesuffix("/api"), pid))

    # The flows served as deployments: a run that waits for a person is suspended (its process
    # exits) and this runner takes it up again when it is resumed; runs started by the webhook too.
    if env.sandbox.runner:
        say("runner        twincd serve: deploy, failover, drift-check and watch-waits deployments")
        pid = procs.start_daemon(
            RUNNER,
            [
                sys.executable,
                *("-m", "twincd.cli", "--env", str(Path(env.source).resolve()), "serve"),
                *(() if env.sandbox.runner_schedules else ("--without-schedules",)),
            ],
            state_dir=state,
            env={
                **prefect_env(env),
                "PREFECT_RUNNER_POLL_FREQUENCY": str(RUNNER_POLL_SECONDS),
                "PREFECT_RUNNER_PROCESS_LIMIT": str(env.sandbox.runner_processes),
            },
            cwd=REPO_ROOT,  # the deployments' entrypoints (flows/...) are relative to it
            ready=healthy(f"{api}/deployments/name/deploy/deploy"),
            timeout=90,
        )
        services.append(Service(RUNNER, "deployments deploy, failover, drift-check, watch-waits", pid))
    say(f"stack up in {time.monotonic() - t0:.1f} s")
    return services


def _write_pull_secret(env: Environment, registries: list[str]) -> Path:
    """The clusters' imagePullSecret for the stack's registries: a ``.dockerconfigjson``."""
    password = registry_auth.password_path(env.state_path).read_text().strip()
    auth = base64.b64encode(f"{registry_auth.USERNAME}:{password}".encode()).decode()
    path = registry_auth.auth_dir(env.state_path) / "pull-secret.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps({"auths": {url: {"auth": auth} for url in registries}}))
    return path


def seed_repos(env: Environment) -> None:
    """Create the sample app repos (tagged v1.0.0) and the manifests monorepo when missing."""
    for name, app in env.apps.items():
        seed.seed_app(local_repo_path(env, app.repo), app=name)
    seed.seed_manifests(
        local_repo_path(env, env.manifests.repo),
        apps={app: env.serving_clusters(app) for app in env.apps},
        clusters=list(env.clusters),
    )


def _names(env: Environment) -> list[str]:
    return [
        RUNNER,  # before the server it talks to
        PREFECT,
        postgres.NAME,  # after the server that uses it
        *(cluster_name_of(c) for c in env.clusters),
        dns.NAME,
        githttp.NAME,
        buildd.NAME,
        registry.NAME,
        registry_auth.NAME,
    ]


def down(env: Environment, *, say: Callable[[str], None] = print) -> None:
    state = env.state_path
    for name in _names(env):
        if procs.stop_daemon(name, state_dir=state):
            say(f"stopped {name}")


def status(env: Environment) -> dict[str, int | None]:
    names = [
        n
        for n in _names(env)
        if (n != dns.NAME or isinstance(env.dns, DnsRfc2136))
        and (n != githttp.NAME or env.sandbox.git_port is not None)
        and (n != registry_auth.NAME or env.sandbox.registry_token_port is not None)
        and (n != postgres.NAME or env.prefect.database == "postgresql")
        and (n != RUNNER or env.sandbox.runner)
    ]
    return {name: procs.daemon_status(name, state_dir=env.state_path) for name in names}


def sandbox_secrets(env: Environment) -> dict[str, str]:
    """The secrets the local stack generated (the git token, the registry password, the DNS key),
    by the variable its environment file's ``env:`` references name."""
    found = {}
    for path, var in (
        (githttp.token_path(env.state_path), githttp.TOKEN_ENV),
        (registry_auth.password_path(env.state_path), registry_auth.PASSWORD_ENV),
    ):
        if path.exists():
            found[var] = path.read_text().strip()
    if isinstance(env.dns, DnsRfc2136) and env.dns.key == f"env:{dns.SECRET_ENV}":
        path = dns.secret_path(env.state_path)
        if path.exists():
            found[dns.SECRET_ENV] = path.read_text().strip()
    return found


def export_sandbox_secrets(env: Environment) -> None:
    """Point `env:` references at the secrets the local stack generated (unless already set)."""
    for var, value in sandbox_secrets(env).items():
        if not os.environ.get(var):
            os.environ[var] = value
