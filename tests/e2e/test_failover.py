"""The failover flow end to end: the shared test stack, a real BIND with a TSIG-protected zone.

Tests run in file order and walk one topology: dry run (nothing changes) → active-standby on aks →
back to active-active refused by DNS (wrong key: the promotion is reverted) → back with eks down
(refused at plan time, nothing changed) → back for real (emergency). The stack ends
active-active, as the deploy tests expect it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import deployment, git_refs
from tests.e2e.test_deploy import main_file
from tests.ingress import Ingress, health_config, make_ca, serve_ingress
from twincd.adapters.dns import Rfc2136, Tsig
from twincd.config import REPO_ROOT, Environment, load_environment
from twincd.sandbox import dns as sandbox_dns
from twincd.sandbox import githttp, procs, stack
from twincd.sandbox.stack import local_repo_path

pytestmark = pytest.mark.e2e

EKS, AKS = "127.0.0.11", "127.0.0.12"
ZONE = "example.test"
TTL = 3

# The flow in a subprocess, as `twincd failover` runs it: a real Prefect flow run on the stack's server.
RUN_FLOW = """
import json, sys
from flows.failover import failover
state = failover(env=sys.argv[1], return_state=True, **json.loads(sys.argv[2]))
print(f"FLOW-STATE {state.name}: {state.message}")
sys.exit(0 if state.is_completed() else 1)
"""


class FailoverStack:
    ingress: Ingress
    ingress_port: int

    def __init__(self, env: Environment, key: str, dns_server: str) -> None:
        self.env = env
        self.key = key
        self.dns = Rfc2136(server=dns_server, zone=ZONE, key=Tsig.parse(key))

    def run(self, *, key: str | None = None, **params: Any) -> tuple[subprocess.CompletedProcess[str], float]:
        t0 = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", RUN_FLOW, self.env.source, json.dumps(params)],
            check=False,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={
                **os.environ,
                "PREFECT_API_URL": self.env.prefect.api_url,
                sandbox_dns.SECRET_ENV: key or self.key,
                # The stack's git token, as `twincd` exports it for the CLI's runs.
                githttp.TOKEN_ENV: githttp.token_path(self.env.state_path).read_text().strip(),
            },
        )
        return result, time.monotonic() - t0

    def main_file(self, path: str) -> str:
        return main_file(self.env, path)

    def component(self, cluster: str) -> str:
        text = self.main_file(f"overlays/{cluster}/hello/kustomization.yaml")
        return "active" if "components/active" in text else "standby" if "components/standby" in text else "?"

    def deployment(self, cluster: str) -> dict[str, Any]:
        return deployment(self.env, cluster, "hello")

    def forge_records(self) -> dict[str, dict[str, Any]]:
        return {p.name: json.loads(p.read_text()) for p in (self.env.state_path / "forge").glob("*.json")}

    def message(self, rev: str) -> str:
        return subprocess.run(
            [
                "git",
                "-C",
                str(local_repo_path(self.env, self.env.manifests.repo)),
                "log",
                "-1",
                "--format=%B",
                rev,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout


def _wait_available(fs: FailoverStack, cluster: str, replicas: int, timeout: float = 60) -> None:
    """Before the walk starts, both clusters must serve (a fresh stack is still syncing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            dep = fs.deployment(cluster)
            if dep["status"].get("availableReplicas", 0) == replicas:
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"hello on {cluster} not at {replicas} available replicas within {timeout} s")


@pytest.fixture(scope="module")
def fs(stack_env: Environment) -> Iterator[FailoverStack]:
    root = Path(tempfile.mkdtemp(prefix="twincd-failover-"))
    port = procs.free_port()
    # A short TTL: the failover waits for the old record set's TTL before it demotes.
    key = sandbox_dns.start_dns(root, port, zone=ZONE, records={"web": (EKS, AKS)}, ttl=TTL)
    ca = make_ca(root)
    ingress_port = procs.free_port()
    try:
        raw = yaml.safe_load(Path(stack_env.source).read_text())
        raw["dns"] = {
            "type": "rfc2136",
            "server": f"127.0.0.1:{port}",
            "zone": ZONE,
            "record": "web",
            "ttl": TTL,
            "key": f"env:{sandbox_dns.SECRET_ENV}",
        }
        # The health gate reaches hello through each ingress IP over TLS, as its clients do.
        raw["apps"]["hello"]["health"] = health_config(ingress_port, ca)
        raw["timeouts"] = {**raw.get("timeouts", {}), "rollout_seconds": 20}
        path = Path(stack_env.source).with_name("env-failover.yaml")
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        fs = FailoverStack(load_environment(path), key, f"127.0.0.1:{port}")
        for cluster in ("eks", "aks"):
            _wait_available(fs, cluster, 2)
        ingress = Ingress(f"web.{ZONE}")
        with serve_ingress(
            [EKS, AKS],
            ingress_port,
            ingress,
            cert=ca.issue(root, ingress.host),
            default=ca.issue(root, "ingress.local"),
        ):
            fs.ingress, fs.ingress_port = ingress, ingress_port
            yield fs
    finally:
        sandbox_dns.stop_dns(root)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_dry_run_publishes_the_plan_and_changes_nothing(fs: FailoverStack) -> None:
    refs, records = git_refs(local_repo_path(fs.env, fs.env.manifests.repo)), fs.forge_records()
    result, _ = fs.run(mode="active-standby", active="aks", dry_run=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert (
        "**Dry run**" in out
        and f"- **hello**: eks active, aks active; web.{ZONE}: {EKS}, {AKS} → active-standby on aks" in out
    )
    assert (
        out.index("**health gate** hello on aks")
        < out.index("**dns** replace A `web.example.test`")
        < out.index(f"**TTL wait** {TTL} s")
        < out.index("**demote** eks")
    )
    assert git_refs(local_repo_path(fs.env, fs.env.manifests.repo)) == refs
    assert fs.forge_records() == records
    assert fs.dns.read("web").ips == {EKS, AKS}


def test_active_active_to_standby_on_aks(fs: FailoverStack) -> None:
    result, seconds = fs.run(
        mode="active-standby", active="aks", reason="e2e: AWS maintenance window", auto_approve=True
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    print(f"\nactive-active -> active-standby(aks): {seconds:.1f} s (flow subprocess, start to end)")
    assert f"GET https://{AKS}:{fs.ingress_port}/healthz as web.{ZONE}: HTTP 200 (2 in a row)" in out
    assert f"waiting {TTL} s for the old TTL of web.{ZONE}" in out
    assert fs.dns.read("web").ips == {AKS}
    assert fs.component("eks") == "standby" and fs.component("aks") == "active"
    eks, aks = fs.deployment("eks"), fs.deployment("aks")
    assert eks["spec"]["replicas"] == 0 and eks["status"].get("availableReplicas", 0) == 0
    assert aks["spec"]["replicas"] == 2 and aks["status"]["availableReplicas"] == 2
    demote = [
        r
        for r in fs.forge_records().values()
        if r["source_branch"].startswith("twincd/failover/active-standby-aks-")
        and r["source_branch"].endswith("/demote")
    ]
    assert len(demote) == 1 and demote[0]["state"] == "merged" and demote[0]["merged_by"] == "auto-approve"
    # The audit trail in git: the switch commit says why.
    body = fs.message("main^2")
    assert body.startswith("failover: demote eks (standby)") and "Reason: e2e: AWS maintenance window" in body


def test_dns_refusing_the_update_reverts_the_promotion(fs: FailoverStack) -> None:
    alg, name, _ = fs.key.split(":")
    wrong = f"{alg}:{name}:{'A' * 43}="
    result, _ = fs.run(mode="active-active", reason="e2e: wrong key", auto_approve=True, key=wrong)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "BADSIG" in out and "promote of eks reverted by" in out
    assert f"web.{ZONE} still held 127.0.0.12: nothing to put back" in out
    assert wrong.split(":")[2] not in out and fs.key.split(":")[2] not in out
    assert fs.component("eks") == "standby" and fs.dns.read("web").ips == {AKS}
    # `git revert -m 1` of the promotion's merge, merged through its own MR.
    assert fs.message("main").startswith("Merge branch 'twincd/failover/active-active-")
    assert fs.message("main^2").startswith("Revert \"Merge branch 'twincd/failover/active-active-")
    print("\n" + next(line for line in out.splitlines() if line.startswith("FLOW-STATE")))


def test_a_redirect_from_the_ingress_fails_the_gate_and_reverts_the_promotion(fs: FailoverStack) -> None:
    fs.ingress.status = 308  # ingress-nginx's HTTP→HTTPS redirect: the app is never reached
    try:
        result, _ = fs.run(mode="active-active", reason="e2e: ingress misconfigured", auto_approve=True)
    finally:
        fs.ingress.status = 200
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "HTTP 308 (a redirect to https://web.example.test/healthz does not reach the app)" in out
    assert "DNS was not changed" in out and "promote of eks reverted by" in out
    assert fs.dns.read("web").ips == {AKS} and fs.component("eks") == "standby"


def test_promoting_a_cluster_that_is_down_is_refused_before_anything_changes(
    fs: FailoverStack, stack_env: Environment
) -> None:
    refs = git_refs(local_repo_path(fs.env, fs.env.manifests.repo))
    assert procs.stop_daemon(stack.cluster_name_of("eks"), state_dir=stack_env.state_path)
    try:
        result, seconds = fs.run(mode="active-active", reason="e2e: eks is down", auto_approve=True)
    finally:
        stack.up(stack_env, say=lambda line: None)  # the sandbox cluster back, resynced from main
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    print(f"\nrefused failover with eks down: {seconds:.1f} s")
    assert "cannot promote on eks: its API server is unreachable" in out
    assert git_refs(local_repo_path(fs.env, fs.env.manifests.repo)) == refs  # no branch, no merge
    assert fs.dns.read("web").ips == {AKS}
    assert fs.component("eks") == "standby"
    _wait_available(fs, "aks", 2)


def test_back_to_active_active_in_an_emergency(fs: FailoverStack) -> None:
    result, seconds = fs.run(mode="active-active", reason="e2e: aks degraded", emergency=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    print(f"\nactive-standby(aks) -> active-active (emergency): {seconds:.1f} s")
    assert fs.dns.read("web").ips == {EKS, AKS}
    assert fs.component("eks") == "active" and fs.component("aks") == "active"
    assert fs.deployment("eks")["status"]["availableReplicas"] == 2
    promote = [
        r
        for r in fs.forge_records().values()
        if r["source_branch"].startswith("twincd/failover/active-active-")
        and r["source_branch"].endswith("/promote")
        and r["state"] == "merged"
    ]
    # Earlier runs' promotions were merged too, then reverted: this run's is the emergency one.
    assert [r["merged_by"] for r in promote].count("emergency (e2e: aks degraded)") == 1
    again, _ = fs.run(mode="active-active", reason="e2e: again")
    assert again.returncode == 0 and "Already at the target: nothing to do." in again.stdout + again.stderr
