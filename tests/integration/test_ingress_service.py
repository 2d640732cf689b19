"""Ingress IPs read from the ingress controller's LoadBalancer Service, on an in-thread sandbox API
server (the test writes the Service's status as a cloud controller manager would)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from tasks.failover import resolve_ipv4
from twincd.adapters.cluster import api_client
from twincd.adapters.kube_read import KubeCluster
from twincd.domain import ClusterRef
from twincd.failover import PlanError, load_balancer_ips
from twincd.sandbox.apiserver import create_app, serve_in_thread
from twincd.sandbox.contexts import write_kubeconfig

pytestmark = pytest.mark.integration

WHERE = "cluster eks: Service ingress-nginx/ingress-nginx-controller"


@pytest.fixture
def eks(tmp_path: Path) -> Iterator[ClusterRef]:
    server = serve_in_thread(create_app("eks"))
    try:
        yield ClusterRef("eks", "eks", str(write_kubeconfig(tmp_path / "config", {"eks": server.url})))
    finally:
        server.stop()


def _service(ref: ClusterRef, ingress: list[dict[str, str]]) -> None:
    with api_client(ref) as api:
        core = k8s.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "ingress-nginx"}})
        body = {
            "metadata": {"name": "ingress-nginx-controller"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 443}]},
        }
        core.create_namespaced_service("ingress-nginx", body)
        # The cloud's controller manager writes the addresses through the status subresource.
        core.patch_namespaced_service_status(
            "ingress-nginx-controller", "ingress-nginx", {"status": {"loadBalancer": {"ingress": ingress}}}
        )


def test_every_front_end_ip_and_a_resolved_hostname_are_read(eks: ClusterRef) -> None:
    _service(eks, [{"ip": "127.0.0.11"}, {"ip": "127.0.0.21"}, {"hostname": "localhost"}])
    service = KubeCluster(eks).service("ingress-nginx", "ingress-nginx-controller")
    # Sorted, so the plan (and its approval key) reads the same however the resolver rotates them.
    assert load_balancer_ips(service, where=WHERE, resolve=resolve_ipv4) == (
        "127.0.0.1",
        "127.0.0.11",
        "127.0.0.21",
    )


def test_a_pending_load_balancer_or_a_missing_service_is_a_plan_error(eks: ClusterRef) -> None:
    cluster = KubeCluster(eks)
    with pytest.raises(PlanError, match=f"{WHERE}: not found"):
        load_balancer_ips(
            cluster.service("ingress-nginx", "ingress-nginx-controller"), where=WHERE, resolve=resolve_ipv4
        )
    _service(eks, [])
    with pytest.raises(PlanError, match="has no address yet"):
        load_balancer_ips(
            cluster.service("ingress-nginx", "ingress-nginx-controller"), where=WHERE, resolve=resolve_ipv4
        )
    with pytest.raises(PlanError, match="does not resolve"):
        resolve_ipv4("nlb.invalid")
