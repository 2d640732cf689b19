"""Per-app topology and a cloud evacuation, on a stack of its own with two apps and a real BIND.

- hello: Active/Active on eks and aks, record ``web``, its health path checked over TLS through
  every ingress IP (tests/ingress.py);
- ledger: Active/Standby on aks with the constraint ``only: active-standby`` (cross-cloud database
  latency), record ``ledger``, no health path (the gate checks its workload only).

Each cluster has two ingress IPs, as an NLB with two availability zones has; every one of them is
published. Argo CD runs on aks (both clusters' Applications live there), as in the reference
setup. Tests run in file order: the plan (dry run), a constraint-breaking switch refused,
evacuating aks while aks (and with it Argo CD) is down, aks back, and an undo after a DNS failure.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import deployment, git_refs, twincd, wait_for, write_env
from tests.e2e.test_deploy import main_file
from tests.ingress import Ingress, health_config, make_ca, serve_ingress
from twincd.adapters.dns import Rfc2136, Tsig
from twincd.config import Environment, load_environment
from twincd.sandbox import dns as sandbox_dns
from twincd.sandbox import procs, stack
from twincd.sandbox.stack import local_repo_path

pytestmark = pytest.mark.e2e

ZONE = "example.test"
TTL = 3
EKS_IPS = ("127.0.0.11", "127.0.0.21")
AKS_IPS = ("127.0.0.12", "127.0.0.22")
WHY = "cross-cloud DB latency: one page takes 20 s served away from the primary database"


class Evac:
    def __init__(self, env: Environment, ingress: Ingress) -> None:
        self.env = env
        self.ingress = ingress
        self.secret = sandbox_dns.ensure_key(env.state_path)  # the stack's key, as `twincd` reads it
        assert env.dns.type == "rfc2136"
        self.dns = Rfc2136(server=env.dns.server, zone=ZONE, key=Tsig.parse(self.secret))

    def run(self, *args: str, **extra_env: str) -> tuple[str, int, float]:
        t0 = time.monotonic()
        done = twincd(self.env, "failover", *args, timeout=600, **extra_env)
        return done.stdout + done.stderr, done.returncode, time.monotonic() - t0

    def role(self, cluster: str, app: str) -> str:
        text = main_file(self.env, f"overlays/{cluster}/{app}/kustomization.yaml")
        return "active" if "components/active" in text else "standby"

    def deployment(self, cluster: str, app: str) -> dict[str, Any]:
        return deployment(self.env, cluster, app)

    def available(self, cluster: str, app: str) -> int:
        try:
            return int(self.deployment(cluster, app)["status"].get("availableReplicas", 0))
        except subprocess.CalledProcessError:
            return -1

    def refs(self) -> dict[str, str]:
        return git_refs(local_repo_path(self.env, self.env.manifests.repo))


def _scaled_to_zero(evac: Evac, cluster: str, app: str) -> bool:
    return evac.available(cluster, app) == 0


@pytest.fixture(scope="module")
def evac() -> Iterator[Evac]:
    root = Path(tempfile.mkdtemp(prefix="twincd-evac-"))
    path = write_env(root)
    raw = yaml.safe_load(path.read_text())
    git = raw["apps"]["hello"]["repo"].rsplit("/", 1)[0]
    ca = make_ca(root)
    ingress_port = procs.free_port()
    for name, ips in (("eks", EKS_IPS), ("aks", AKS_IPS)):
        raw["clusters"][name].pop("ingress_ip")
        raw["clusters"][name]["ingress_ips"] = list(ips)
    raw["dns"] |= {"server": f"127.0.0.1:{procs.free_port()}", "ttl": TTL}
    raw["apps"]["hello"]["health"] = health_config(ingress_port, ca)
    raw["apps"]["ledger"] = {
        **raw["apps"]["hello"],
        "repo": f"{git}/ledger.git",
        "image": "ledger",
        "workload": {"kind": "Deployment", "namespace": "ledger", "name": "ledger"},
        "topology": {"mode": "active-standby", "active": "aks", "only": "active-standby", "why": WHY},
        "dns": {"record": "ledger"},
    }
    raw["apps"]["ledger"].pop("health")
    raw["timeouts"]["rollout_seconds"] = 60
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = load_environment(path)
    ingress = Ingress(f"web.{ZONE}")
    try:
        stack.up(env, say=lambda line: None)
        e = Evac(env, ingress)
        wait_for(lambda: all(e.available(c, "hello") == 2 for c in ("eks", "aks")), "hello on both", 120)
        wait_for(lambda: e.available("aks", "ledger") == 2, "ledger on aks", 120)
        with serve_ingress(
            [*EKS_IPS, *AKS_IPS],
            ingress_port,
            ingress,
            cert=ca.issue(root, ingress.host),
            default=ca.issue(root, "ingress.local"),
        ):
            yield e
    finally:
        stack.down(env, say=lambda line: None)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_the_stack_lays_each_app_out_as_configured(evac: Evac) -> None:
    assert evac.dns.read("web").ips == {*EKS_IPS, *AKS_IPS}
    assert evac.dns.read("ledger").ips == set(AKS_IPS) and evac.dns.read("ledger").ttl == TTL
    assert (evac.role("eks", "ledger"), evac.role("aks", "ledger")) == ("standby", "active")
    assert evac.available("eks", "ledger") == 0


def test_the_evacuation_plan_shows_every_app_and_every_action_in_order(evac: Evac) -> None:
    refs = evac.refs()
    out, code, _ = evac.run("--evacuate", "azure", "--dry-run")
    assert code == 0, out
    plan = out[out.index("# Failover: evacuate-aks") :]
    print("\n" + re.split(r"\n\d\d:\d\d:\d\d\.\d+ \|", plan)[0])
    assert "- **hello**: eks active, aks active; web.example.test: " in out
    assert "→ active-standby on eks (127.0.0.11, 127.0.0.21)" in out
    assert f"constraint: only active-standby: {WHY}" in out
    assert (
        out.index("**promote** eks")
        < out.index("**health gate** hello on eks (")
        < out.index("; ledger on eks (workload available)")
        < out.index("**dns** replace A `web.example.test`")
        < out.index("**dns** replace A `ledger.example.test`")
        < out.index(f"**TTL wait** {TTL} s")
        < out.index("**demote** aks")
    )
    assert evac.refs() == refs


def test_a_switch_that_breaks_a_constraint_is_refused_and_changes_nothing(evac: Evac) -> None:
    refs = evac.refs()
    out, code, _ = evac.run("ledger", "--active-active", "--reason", "e2e: try it", "--auto-approve")
    assert code != 0, out
    assert f"ledger must stay active-standby ({WHY})" in out and "--force overrides" in out
    assert evac.refs() == refs and evac.dns.read("ledger").ips == set(AKS_IPS)


def test_evacuating_aks_while_aks_and_its_argo_cd_are_down(evac: Evac) -> None:
    assert procs.stop_daemon(stack.cluster_name_of("aks"), state_dir=evac.env.state_path)
    try:
        out, code, seconds = evac.run(
            "--evacuate", "aks", "--reason", "e2e: Azure region down", "--auto-approve"
        )
        assert code == 0, out
        print(f"\ntwincd failover --evacuate aks (aks down): {seconds:.1f} s")
        print("\n".join(line for line in out.splitlines() if re.search(r"step \d+ of \d+ done in", line)))
        assert "Argo CD unreachable (it runs on aks): applying directly" in out
        assert "apply to eks directly (Argo CD unreachable)" in out
        for app in ("hello", "ledger"):
            assert evac.dns.read("web" if app == "hello" else "ledger").ips == set(EKS_IPS)
            assert (evac.role("eks", app), evac.role("aks", app)) == ("active", "standby")
            assert evac.available("eks", app) == 2
        # Applied by twincd itself: its field manager owns the replicas it set on eks.
        managers = {m["manager"] for m in evac.deployment("eks", "ledger")["metadata"]["managedFields"]}
        assert "twincd" in managers
        assert f"waiting {TTL} s for the old TTL of web.example.test, ledger.example.test" in out
    finally:
        stack.up(evac.env, say=lambda line: None)
    # aks back: Argo CD applies the demotion that was merged while it was away.
    for app in ("hello", "ledger"):
        wait_for(functools.partial(_scaled_to_zero, evac, "aks", app), f"{app} scaled to 0 on aks", 240)
    assert evac.deployment("aks", "hello")["spec"]["replicas"] == 0
    # The drift check says whether Argo CD, back, agrees with what twincd applied while it was away.
    drift = twincd(evac.env, "drift", "--fail-on-drift", timeout=300)
    assert drift.returncode == 0, drift.stdout + drift.stderr


def test_a_dns_failure_puts_every_app_back(evac: Evac) -> None:
    before = {a: (evac.role("eks", a), evac.role("aks", a)) for a in ("hello", "ledger")}
    alg, name, _ = evac.secret.split(":")
    wrong = f"{alg}:{name}:{'A' * 43}="
    out, code, _ = evac.run(
        "--to", "aks", "--reason", "e2e: back to aks", "--auto-approve", **{sandbox_dns.SECRET_ENV: wrong}
    )
    assert code != 0, out
    assert "BADSIG" in out and "promote of aks reverted by" in out
    assert "web.example.test still held 127.0.0.11, 127.0.0.21: nothing to put back" in out
    assert {a: (evac.role("eks", a), evac.role("aks", a)) for a in ("hello", "ledger")} == before
    assert evac.dns.read("web").ips == set(EKS_IPS) and evac.dns.read("ledger").ips == set(EKS_IPS)
    for app in ("hello", "ledger"):
        wait_for(functools.partial(_scaled_to_zero, evac, "aks", app), f"{app} back to 0 on aks", 120)
        assert evac.available("eks", app) == 2
