"""The pure drift comparison: noise stays silent, real drift is named with its path and values."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from twincd.drift import (
    ABSENT,
    Drift,
    DriftItem,
    ListScope,
    compare_app,
    compare_object,
    diff_findings,
    find_skew,
    fingerprint,
    from_row,
    list_scopes,
    parse_quantity,
    place_namespaces,
    to_row,
    workload_states,
)

DIGEST_1 = "sha256:" + "1" * 64
DIGEST_2 = "sha256:" + "2" * 64


def deployment(image: str = f"registry.example/web@{DIGEST_1}", replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "web", "labels": {"app.kubernetes.io/name": "web"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "web"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "web"}},
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "image": image,
                            "ports": [{"containerPort": 8080}],
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                            "resources": {
                                "limits": {"cpu": "1", "memory": "1Gi"},
                                "requests": {"cpu": "500m"},
                            },
                        },
                        {"name": "sidecar", "image": "registry.example/proxy:latest"},
                    ]
                },
            },
        },
    }


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "web"},
        "spec": {"selector": {"app.kubernetes.io/name": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def served(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as a real API server returns it: defaults, rewrites, metadata and status added."""
    live = copy.deepcopy(obj)
    meta = live["metadata"]
    meta.update(
        uid="0b7c",
        resourceVersion="812",
        generation=3,
        creationTimestamp="2024-01-01T00:00:00Z",
        managedFields=[{"manager": "argocd-controller"}],
    )
    meta["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        "deployment.kubernetes.io/revision": "4",
        "argocd.argoproj.io/tracking-id": "web-eks:apps/Deployment:web/web",
    }
    live["status"] = {"replicas": 2, "readyReplicas": 2}
    if live["kind"] == "Deployment":
        spec = live["spec"]
        spec.update(
            revisionHistoryLimit=10,
            progressDeadlineSeconds=600,
            strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
        )
        pod = spec["template"]["spec"]
        pod.update(
            restartPolicy="Always",
            dnsPolicy="ClusterFirst",
            schedulerName="default-scheduler",
            terminationGracePeriodSeconds=30,
            securityContext={},
        )
        for c in pod["containers"]:
            c.update(
                imagePullPolicy="Always" if c["image"].endswith(":latest") else "IfNotPresent",
                terminationMessagePath="/dev/termination-log",
                terminationMessagePolicy="File",
            )
            for p in c.get("ports", []):
                p["protocol"] = "TCP"
        web = pod["containers"][0]
        web["resources"] = {"limits": {"cpu": "1000m", "memory": "1024Mi"}, "requests": {"cpu": "0.5"}}
        web["env"] = list(reversed(web["env"]))
        pod["containers"] = list(reversed(pod["containers"]))
    elif live["kind"] == "Service":
        live["spec"].update(
            type="ClusterIP", sessionAffinity="None", clusterIP="10.0.0.7", clusterIPs=["10.0.0.7"]
        )
        live["spec"]["ports"] = [{"port": 80, "targetPort": "8080", "protocol": "TCP"}]
    return live


def test_every_normalisation_noise_case_gives_no_finding() -> None:
    for obj in (deployment(), service()):
        assert compare_object(obj, served(obj)) == []
    items = compare_app(
        app="web",
        cluster="eks",
        desired=[deployment(), service()],
        live=[served(deployment()), served(service())],
        application="web-eks",
    )
    assert items == ()


@pytest.mark.parametrize(
    "a,b",
    [("1", "1000m"), ("1Gi", "1024Mi"), ("0.5", "500m"), ("1e3", "1k"), (2, "2"), ("128974848", "129e6")],
)
def test_quantity_spellings_are_equal_or_not(a: object, b: object) -> None:
    qa, qb = parse_quantity(a), parse_quantity(b)
    assert qa is not None and qb is not None
    assert (qa == qb) is ((str(a), str(b)) != ("128974848", "129e6"))


def test_omitempty_values_absent_live_are_silent_but_a_hand_set_default_is_not() -> None:
    want = deployment()
    want["spec"]["minReadySeconds"] = 0
    want["spec"]["template"]["spec"]["containers"][0]["args"] = []
    live = served(deployment())
    assert compare_object(want, live) == []
    web = next(c for c in live["spec"]["template"]["spec"]["containers"] if c["name"] == "web")
    web["imagePullPolicy"] = "Never"  # web's image is pinned: the default is IfNotPresent
    assert compare_object(want, live) == [
        ("spec.template.spec.containers[name=web].imagePullPolicy", "IfNotPresent (server default)", "Never")
    ]


def test_changed_image_and_replicas_are_modified_with_path_and_values() -> None:
    live = served(deployment(image=f"registry.example/web@{DIGEST_2}", replicas=5))
    items = compare_app(app="web", cluster="eks", desired=[deployment()], live=[live])
    assert [(i.finding, i.path, i.desired, i.live) for i in items] == [
        (Drift.MODIFIED, "spec.replicas", "2", "5"),
        (
            Drift.MODIFIED,
            "spec.template.spec.containers[name=web].image",
            f"registry.example/web@{DIGEST_1}",
            f"registry.example/web@{DIGEST_2}",
        ),
    ]
    assert {(i.app, i.cluster, i.resource) for i in items} == {("web", "eks", "Deployment/web/web")}


def test_env_changed_added_and_removed_by_hand_and_a_label_changed() -> None:
    live = served(deployment())
    c = next(c for c in live["spec"]["template"]["spec"]["containers"] if c["name"] == "web")
    c["env"] = [{"name": "B", "value": "3"}, {"name": "DEBUG", "value": "1"}]
    live["metadata"]["labels"]["app.kubernetes.io/name"] = "other"
    paths = {(p, d, lv) for p, d, lv in compare_object(deployment(), live)}
    env = "spec.template.spec.containers[name=web].env"
    assert paths == {
        ('metadata.labels["app.kubernetes.io/name"]', "web", "other"),
        (f"{env}[name=A]", '{"name":"A","value":"1"}', ABSENT),
        (f"{env}[name=B].value", "2", "3"),
        (f"{env}[name=DEBUG]", ABSENT, '{"name":"DEBUG","value":"1"}'),
    }


def test_secret_data_drift_shows_fingerprints_never_values() -> None:
    def secret(data: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": "web"},
            "type": "Opaque",
            "data": data,
        }

    # base64 of "hunter2", "s3cret-new", "same"
    desired = secret({"password": "aHVudGVyMg==", "user": "c2FtZQ==", "token": "aHVudGVyMg=="})
    live = served(secret({"password": "czNjcmV0LW5ldw==", "user": "c2FtZQ=="}))
    items = compare_app(app="web", cluster="eks", desired=[desired], live=[live])
    assert [(i.finding, i.path, i.desired, i.live) for i in items] == [
        (Drift.MODIFIED, "data.password", "sha256:f52fbd32b2b3", "sha256:3a258b7fbce5"),
        (Drift.MODIFIED, "data.token", "sha256:f52fbd32b2b3", ABSENT),
    ]
    for text in (str(i) for i in items):
        for value in ("hunter2", "aHVudGVyMg==", "s3cret-new", "czNjcmV0LW5ldw=="):
            assert value not in text
    assert compare_object(desired, served(desired)) == []


def test_missing_and_unexpected() -> None:
    stray = served(deployment())
    stray["metadata"]["name"] = "web-debug"
    other_team = served(service())
    other_team["metadata"].update(name="metrics", annotations={})
    tracked_only = served(service())
    tracked_only["metadata"]["name"] = "web-old"  # no app label, but Argo CD's tracking id of web-eks
    items = compare_app(
        app="web",
        cluster="eks",
        desired=[deployment(), service()],
        live=[served(deployment()), stray, other_team, tracked_only],
        application="web-eks",
    )
    assert [(i.finding, i.resource) for i in items] == [
        (Drift.UNEXPECTED, "Deployment/web/web-debug"),
        (Drift.MISSING, "Service/web/web"),
        (Drift.UNEXPECTED, "Service/web/web-old"),
    ]


def test_list_scopes_one_per_kind_and_namespace_label_selected_when_all_carry_the_label() -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}}
    other = deployment()
    other["metadata"]["name"] = "worker"
    desired = place_namespaces(
        [ns, deployment(), other, service()], namespaced=lambda av, k: k != "Namespace"
    )
    assert list_scopes(desired, app="web") == (
        ListScope("apps/v1", "Deployment", "web", "app.kubernetes.io/name=web"),
        ListScope("v1", "Namespace", "", ""),
        ListScope("v1", "Service", "web", ""),
    )


def test_namespaces_are_placed_as_the_server_places_them() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n", "namespace": "stray"}}
    placed = place_namespaces([cm, ns], namespaced=lambda av, k: k == "ConfigMap")
    assert [p["metadata"].get("namespace") for p in placed] == ["default", None]


def states(cluster: str, image: str, replicas: int) -> tuple[Any, ...]:
    live = served(deployment(image=image, replicas=replicas))
    return workload_states(app="web", cluster=cluster, desired=[deployment()], live=[live, served(service())])


def test_skew_older_digest_on_one_cloud_and_replica_intent() -> None:
    eks = states("eks", f"eks.registry.example/web@{DIGEST_1}", 2)
    aks = states("aks", f"aks.registry.example/web@{DIGEST_2}", 3)
    items = find_skew([*eks, *aks], serving={"eks", "aks"})
    assert [(i.finding, i.cluster, i.resource, i.path, i.live) for i in items] == [
        (
            Drift.SKEW,
            "aks,eks",
            "Deployment/web/web",
            "spec.template.spec.containers[name=web].image",
            f"aks={DIGEST_2}; eks={DIGEST_1}",
        ),
        (Drift.SKEW, "aks,eks", "Deployment/web/web", "spec.replicas", "aks=3; eks=2"),
    ]


def test_no_skew_across_registries_with_one_digest_nor_for_a_standby_scaled_to_zero() -> None:
    eks = states("eks", f"eks.registry.example/web@{DIGEST_1}", 2)
    aks = states("aks", f"aks.registry.example/web@{DIGEST_1}", 0)
    assert find_skew([*eks, *aks], serving={"eks"}) == ()
    assert [i.path for i in find_skew([*eks, *aks], serving={"eks", "aks"})] == ["spec.replicas"]


def item(name: str, live: str = "5") -> DriftItem:
    return DriftItem("web", "eks", "Deployment", "web", name, Drift.MODIFIED, "spec.replicas", "2", live)


def test_fingerprint_is_stable_over_order_and_duplicates_and_changes_with_values() -> None:
    a, b = item("a"), item("b")
    assert fingerprint([a, b]) == fingerprint([b, a, a])
    assert fingerprint([a, b]) != fingerprint([a, item("b", live="6")])
    assert fingerprint([]) != fingerprint([a])


def test_diff_findings_appeared_and_cleared() -> None:
    a, b, c = item("a"), item("b"), item("c")
    assert diff_findings([a, b], [b, c]) == ((c,), (a,))
    assert diff_findings([a], [a]) == ((), ())
    assert diff_findings([], [b, a]) == ((a, b), ())


@pytest.mark.parametrize("namespace", ["web", ""])
def test_rows_read_back_exactly(namespace: str) -> None:
    original = DriftItem(
        "web", "aks,eks", "Deployment", namespace, "web", Drift.SKEW, "spec.replicas", "x|y", "aks=3; eks=2"
    )
    assert from_row(to_row(original)) == original


def test_compare_cluster_gathers_every_app_and_what_the_read_cost() -> None:
    from twincd.drift import AppRead, ClusterRead, compare_cluster

    live = served(deployment(image=f"registry.example/web@{DIGEST_2}"))
    read = ClusterRead("eks", (AppRead("web", (deployment(),), (live,)),), lists=3, calls=4)
    check = compare_cluster(read, {"web": "web-eks"})
    assert check.cluster == "eks" and (check.objects, check.lists, check.calls) == (1, 3, 4)
    assert [(i.app, i.cluster, i.path) for i in check.items] == [
        ("web", "eks", "spec.template.spec.containers[name=web].image")
    ]
    assert [(w.cluster, dict(w.images)["web"], w.replicas) for w in check.workloads] == [("eks", DIGEST_2, 2)]


def test_state_slug_names_one_environment_file_and_fits_prefect_keys(tmp_path: Any) -> None:
    from twincd.drift import state_slug

    a, b = tmp_path / "Prod_EU.yaml", tmp_path / "other" / "Prod_EU.yaml"
    assert state_slug(str(a)).startswith("prod-eu-") and state_slug(str(a)) == state_slug(str(a))
    assert state_slug(str(a)) != state_slug(str(b))  # same name, another file: its own state
    assert all(c.isalnum() or c == "-" for c in state_slug(str(a)))


def test_serving_clusters_come_from_the_rendered_overlays_not_the_configured_topology() -> None:
    from twincd.drift import serving_in_git

    def deployment(replicas: int | None) -> dict[str, object]:
        spec: dict[str, object] = {} if replicas is None else {"replicas": replicas}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": spec}

    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}
    rendered = {
        "eks": {"web": (deployment(2), service), "ledger": (deployment(0),)},
        "aks": {"web": (deployment(0), service), "ledger": (deployment(None),)},  # default 1
    }
    assert serving_in_git(rendered, "web") == {"eks"}  # failed over to eks: aks is standby
    assert serving_in_git(rendered, "ledger") == {"aks"}
    assert serving_in_git(rendered, "nothing") == frozenset()
