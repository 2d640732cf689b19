"""The sandbox API server against the official kubernetes client, kubectl and raw HTTP."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client, watch

from twincd.sandbox.apiserver import RunningServer, create_app, serve_in_thread
from twincd.sandbox.contexts import write_kubeconfig

pytestmark = pytest.mark.integration

_names = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = serve_in_thread(create_app("eks"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[client.ApiClient]:
    configuration = client.Configuration()
    configuration.host = server.url
    configuration.api_key = {"authorization": "Bearer anything"}
    with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as http_client:
        yield http_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> str:
    """A fresh namespace per test, so tests sharing the module's server do not see each other."""
    name = f"t{next(_names)}"
    core.create_namespace({"metadata": {"name": name}})
    return name


def deployment(name: str, *containers: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {"name": c, "image": f"registry.test/{c}:1"} for c in containers or ("app",)
                    ]
                },
            },
        },
    }


def status_of(error: client.ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(error.body)
    return body


# ------------------------------------------------------------------------------------------ discovery


def test_discovery(api: client.ApiClient, http: httpx.Client) -> None:
    assert client.VersionApi(api).get_code().git_version == "v1.32.0"
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    core_resources = client.CoreV1Api(api).get_api_resources()
    assert core_resources.group_version == "v1"
    by_name = {r.name: r for r in core_resources.resources}
    assert not by_name["namespaces"].namespaced
    assert by_name["configmaps"].namespaced and "cm" in by_name["configmaps"].short_names
    assert {"secrets", "services", "serviceaccounts", "pods", "events", "pods/status"} <= set(by_name)
    groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
    assert {"apps", "batch", "networking.k8s.io", "argoproj.io", "bitnami.com"} <= set(groups)
    assert groups["argoproj.io"].preferred_version.group_version == "argoproj.io/v1alpha1"
    apps_resources = {r.name: r for r in client.AppsV1Api(api).get_api_resources().resources}
    assert {"deployments", "deployments/status", "replicasets", "statefulsets", "daemonsets"} <= set(
        apps_resources
    )
    argo = http.get("/apis/argoproj.io/v1alpha1").json()
    assert argo["groupVersion"] == "argoproj.io/v1alpha1"
    assert [(r["name"], r["kind"]) for r in argo["resources"]] == [("applications", "Application")]
    assert http.get("/apis/apps").json()["kind"] == "APIGroup"
    assert http.get("/apis/no.such.group").status_code == 404
    assert http.get("/healthz").text == "ok" and http.get("/readyz").text == "ok"


# ------------------------------------------------------------------------------------------ create, get


def test_create_answers_201_and_stamps_metadata(
    core: client.CoreV1Api, http: httpx.Client, namespace: str
) -> None:
    first, code, _ = core.create_namespaced_config_map_with_http_info(namespace, {"metadata": {"name": "a"}})
    second = core.create_namespaced_config_map(namespace, {"metadata": {"name": "b"}})
    assert code == 201
    assert first.metadata.uid and first.metadata.uid != second.metadata.uid
    assert first.metadata.creation_timestamp is not None
    assert first.metadata.generation == 1
    assert first.metadata.namespace == namespace
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    raw = http.get(f"/api/v1/namespaces/{namespace}/configmaps/a").json()
    assert (raw["kind"], raw["apiVersion"]) == ("ConfigMap", "v1")
    assert isinstance(raw["metadata"]["resourceVersion"], str)


def test_generate_name(core: client.CoreV1Api, namespace: str) -> None:
    made = [
        core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "cfg-"}}) for _ in range(3)
    ]
    names = {m.metadata.name for m in made}
    assert len(names) == 3 and all(n.startswith("cfg-") and len(n) == len("cfg-") + 5 for n in names)


def test_duplicate_create_is_409_already_exists(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "dup"}})
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "dup"}})
    assert caught.value.status == 409
    assert status_of(caught.value)["reason"] == "AlreadyExists"
    assert status_of(caught.value)["kind"] == "Status"


def test_create_in_missing_namespace_is_404(apps: client.AppsV1Api) -> None:
    with pytest.raises(client.ApiException) as caught:
        apps.create_namespaced_deployment("no-such-namespace", deployment("web"))
    assert caught.value.status == 404
    body = status_of(caught.value)
    assert body["reason"] == "NotFound" and body["message"] == 'namespaces "no-such-namespace" not found'


def test_create_rejects_wrong_kind_and_bad_name(
    core: client.CoreV1Api, http: httpx.Client, namespace: str
) -> None:
    wrong_kind = http.post(
        f"/api/v1/namespaces/{namespace}/configmaps",
        json={"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}},
    )
    assert (wrong_kind.status_code, wrong_kind.json()["reason"]) == (400, "BadRequest")
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "Not_Valid"}})
    assert caught.value.status == 422


def test_objects_a_real_api_server_refuses_are_422_invalid_with_causes(
    apps: client.AppsV1Api, http: httpx.Client, namespace: str
) -> None:
    """Checked against the same OpenAPI schemas as `twincd validate`: a port that is not a number
    (the "containerPort: eighty" that once rolled out on the sandbox) and a container without a
    name are refused, naming each field; nothing is stored. (Sent as raw JSON, as kubectl and Argo
    CD send it: the Python client would refuse it before sending.)"""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", **deployment("bad-port")}
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["ports"] = [{"containerPort": "eighty"}]
    bad["spec"]["template"]["spec"]["containers"].append({"image": "registry.test/sidecar:1"})
    url = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    answer = http.post(url, json=bad)
    assert answer.status_code == 422
    body = answer.json()
    assert body["reason"] == "Invalid" and body["message"].startswith('Deployment "bad-port" is invalid: ')
    fields = sorted(c["field"] for c in body["details"]["causes"])
    assert fields == [
        "spec.template.spec.containers[0].ports[0].containerPort",
        "spec.template.spec.containers[1]",
    ]
    with pytest.raises(client.ApiException) as missing:
        apps.read_namespaced_deployment("bad-port", namespace)
    assert missing.value.status == 404
    # An update is checked too.
    apps.create_namespaced_deployment(namespace, deployment("good"))
    patched = http.patch(
        f"{url}/good",
        json={"spec": {"template": {"spec": {"dnsPolicy": 7}}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert patched.status_code == 422 and patched.json()["details"]["causes"][0]["field"] == (
        "spec.template.spec.dnsPolicy"
    )


def test_get(apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web", "app", "sidecar"))
    got = apps.read_namespaced_deployment("web", namespace)
    assert [c.name for c in got.spec.template.spec.containers] == ["app", "sidecar"]
    with pytest.raises(client.ApiException) as caught:
        apps.read_namespaced_deployment("missing", namespace)
    assert caught.value.status == 404
    assert status_of(caught.value)["message"] == 'deployments.apps "missing" not found'


# ------------------------------------------------------------------------------------------ list


def test_list_shape(http: httpx.Client, core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "one"}})
    body = http.get(f"/api/v1/namespaces/{namespace}/configmaps").json()
    assert (body["kind"], body["apiVersion"]) == ("ConfigMapList", "v1")
    assert int(body["metadata"]["resourceVersion"]) >= int(body["items"][0]["metadata"]["resourceVersion"])
    assert body["items"][0]["kind"] == "ConfigMap"


def test_list_label_selectors(core: client.CoreV1Api, namespace: str) -> None:
    labels = {
        "a": {"tier": "web", "env": "prod"},
        "b": {"tier": "db", "env": "prod"},
        "c": {"tier": "cache"},
        "d": {},
    }
    for name, these in labels.items():
        core.create_namespaced_config_map(namespace, {"metadata": {"name": name, "labels": these}})

    def names(selector: str) -> list[str]:
        return [
            i.metadata.name for i in core.list_namespaced_config_map(namespace, label_selector=selector).items
        ]

    assert names("tier=web") == ["a"]
    assert names("tier==db") == ["b"]
    assert names("tier!=web") == ["b", "c", "d"]  # != also matches objects without the label
    assert names("tier in (web,db)") == ["a", "b"]
    assert names("tier notin (web,db)") == ["c", "d"]
    assert names("env") == ["a", "b"]
    assert names("!env") == ["c", "d"]
    assert names("env=prod,tier in (db, cache)") == ["b"]
    with pytest.raises(client.ApiException) as caught:
        names("tier in (web")
    assert caught.value.status == 400


def test_list_field_selectors_and_all_namespaces(apps: client.AppsV1Api, core: client.CoreV1Api) -> None:
    first, second = f"t{next(_names)}", f"t{next(_names)}"
    for ns in (first, second):
        core.create_namespace({"metadata": {"name": ns}})
        apps.create_namespaced_deployment(ns, deployment("web"))
        apps.create_namespaced_deployment(ns, deployment("api"))
    everywhere = apps.list_deployment_for_all_namespaces()
    pairs = {(d.metadata.namespace, d.metadata.name) for d in everywhere.items}
    assert {(first, "web"), (first, "api"), (second, "web"), (second, "api")} <= pairs
    by_name = apps.list_deployment_for_all_namespaces(field_selector="metadata.name=web").items
    assert {d.metadata.namespace for d in by_name} >= {first, second}
    assert all(d.metadata.name == "web" for d in by_name)
    in_first = apps.list_deployment_for_all_namespaces(field_selector=f"metadata.namespace=={first}").items
    assert sorted(d.metadata.name for d in in_first) == ["api", "web"]
    not_web = apps.list_namespaced_deployment(first, field_selector="metadata.name!=web").items
    assert [d.metadata.name for d in not_web] == ["api"]
    with pytest.raises(client.ApiException) as caught:
        apps.list_namespaced_deployment(first, field_selector="spec.replicas=1")
    assert caught.value.status == 400


def test_list_pages_with_limit_and_continue(core: client.CoreV1Api, namespace: str) -> None:
    for i in range(5):
        core.create_namespaced_config_map(namespace, {"metadata": {"name": f"cm{i}"}})
    page = core.list_namespaced_config_map(namespace, limit=2)
    seen = [i.metadata.name for i in page.items]
    assert page.metadata.remaining_item_count == 3
    while page.metadata._continue:
        page = core.list_namespaced_config_map(namespace, limit=2, _continue=page.metadata._continue)
        seen += [i.metadata.name for i in page.items]
    assert seen == [f"cm{i}" for i in range(5)]


# ------------------------------------------------------------------------------------------ update, patch


def test_put_with_stale_resource_version_is_409(apps: client.AppsV1Api, namespace: str) -> None:
    created = apps.create_namespaced_deployment(namespace, deployment("web"))
    fresh = apps.read_namespaced_deployment("web", namespace)
    fresh.spec.replicas = 2
    updated = apps.replace_namespaced_deployment("web", namespace, fresh)
    assert updated.spec.replicas == 2 and updated.metadata.generation == 2
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    created.spec.replicas = 5  # still carries the first resourceVersion
    with pytest.raises(client.ApiException) as caught:
        apps.replace_namespaced_deployment("web", namespace, created)
    assert caught.value.status == 409
    assert status_of(caught.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(caught.value)["message"]
    created.metadata.resource_version = None  # no resourceVersion: an unconditional update
    assert apps.replace_namespaced_deployment("web", namespace, created).spec.replicas == 5


def test_noop_update_keeps_resource_version(core: client.CoreV1Api, namespace: str) -> None:
    created = core.create_namespaced_config_map(namespace, {"metadata": {"name": "same"}, "data": {"k": "v"}})
    again = core.replace_namespaced_config_map("same", namespace, created)
    assert again.metadata.resource_version == created.metadata.resource_version


def test_merge_patch(apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web", labels={"keep": "1", "drop": "1"}))
    patched = apps.patch_namespaced_deployment(
        "web",
        namespace,
        {"metadata": {"labels": {"drop": None, "new": "1"}}, "spec": {"replicas": 3}},
        _content_type="application/merge-patch+json",
    )
    assert patched.metadata.labels == {"keep": "1", "new": "1"}
    assert patched.spec.replicas == 3 and patched.metadata.generation == 2


def test_merge_patch_replaces_lists(apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web", "app", "sidecar"))
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x:2"}]}}}}
    patched = apps.patch_namespaced_deployment(
        "web", namespace, patch, _content_type="application/merge-patch+json"
    )
    assert [c.name for c in patched.spec.template.spec.containers] == ["app"]


def test_json_patch(apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web", "app", "sidecar"))
    patched = apps.patch_namespaced_deployment(
        "web",
        namespace,
        [
            {"op": "test", "path": "/spec/replicas", "value": 1},
            {
                "op": "replace",
                "path": "/spec/template/spec/containers/1/image",
                "value": "registry.test/sidecar:2",
            },
            {"op": "add", "path": "/metadata/labels/team~1owner", "value": "platform"},
            {"op": "remove", "path": "/spec/replicas"},
        ],
    )
    assert patched.spec.template.spec.containers[1].image == "registry.test/sidecar:2"
    assert patched.metadata.labels == {"team/owner": "platform"}
    assert patched.spec.replicas is None
    with pytest.raises(client.ApiException) as caught:
        apps.patch_namespaced_deployment(
            "web", namespace, [{"op": "test", "path": "/spec/paused", "value": True}]
        )
    assert caught.value.status == 422


def test_strategic_merge_patch_merges_containers_by_name(apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web", "app", "sidecar"))
    # A dict body makes the client send application/strategic-merge-patch+json.
    patched = apps.patch_namespaced_deployment(
        "web",
        namespace,
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "sidecar", "image": "registry.test/sidecar:2"},
                            {"name": "extra", "image": "e:1"},
                        ]
                    }
                }
            }
        },
    )
    containers = [(c.name, c.image) for c in patched.spec.template.spec.containers]
    assert containers == [
        ("app", "registry.test/app:1"),
        ("sidecar", "registry.test/sidecar:2"),
        ("extra", "e:1"),
    ]
    deleted = apps.patch_namespaced_deployment(
        "web",
        namespace,
        {"spec": {"template": {"spec": {"containers": [{"name": "extra", "$patch": "delete"}]}}}},
    )
    assert [c.name for c in deleted.spec.template.spec.containers] == ["app", "sidecar"]


def test_strategic_merge_patch_on_custom_resource_is_415(
    http: httpx.Client, custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        namespace,
        "applications",
        {"metadata": {"name": "app"}, "spec": {"project": "default"}},
    )
    answer = http.patch(
        f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/applications/app",
        json={"spec": {}},
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert answer.status_code == 415


# ----------------------------------------------------------------------------------------- status, generation


def test_status_subresource_split_and_generation(apps: client.AppsV1Api, namespace: str) -> None:
    created = apps.create_namespaced_deployment(namespace, {**deployment("web"), "status": {"replicas": 9}})
    assert created.status.replicas is None  # status is the controllers', not the creator's
    assert created.metadata.generation == 1

    # /status changes status only, never spec, and does not bump generation.
    with_status = apps.patch_namespaced_deployment_status(
        "web", namespace, {"spec": {"replicas": 7}, "status": {"readyReplicas": 1, "observedGeneration": 1}}
    )
    assert with_status.status.ready_replicas == 1 and with_status.spec.replicas == 1
    assert with_status.metadata.generation == 1
    assert int(with_status.metadata.resource_version) > int(created.metadata.resource_version)

    # The main resource ignores status; a metadata-only change does not bump generation.
    labelled = apps.patch_namespaced_deployment(
        "web", namespace, {"metadata": {"labels": {"x": "y"}}, "status": {"readyReplicas": 5}}
    )
    assert labelled.status.ready_replicas == 1 and labelled.metadata.generation == 1

    scaled = apps.patch_namespaced_deployment("web", namespace, {"spec": {"replicas": 3}})
    assert scaled.metadata.generation == 2 and scaled.status.ready_replicas == 1

    # PUT on /status with a stale resourceVersion conflicts like any PUT.
    stale = apps.read_namespaced_deployment_status("web", namespace)
    stale.metadata.resource_version = created.metadata.resource_version
    with pytest.raises(client.ApiException) as caught:
        apps.replace_namespaced_deployment_status("web", namespace, stale)
    assert caught.value.status == 409
    fresh = apps.read_namespaced_deployment_status("web", namespace)
    fresh.status.available_replicas = 3
    fresh.spec.replicas = 10
    replaced = apps.replace_namespaced_deployment_status("web", namespace, fresh)
    assert replaced.status.available_replicas == 3 and replaced.spec.replicas == 3


def test_application_has_no_status_subresource_like_argo_cd(
    http: httpx.Client, custom: client.CustomObjectsApi, namespace: str
) -> None:
    # argoproj/argo-cd#22967: Application declares no status subresource, so status is written
    # through the object and every non-metadata change bumps generation.
    custom.create_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        namespace,
        "applications",
        {"metadata": {"name": "app"}, "spec": {"project": "default"}},
    )
    patched = custom.patch_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        namespace,
        "applications",
        "app",
        {"status": {"sync": {"status": "Synced"}}},
    )
    assert patched["status"]["sync"]["status"] == "Synced"
    assert patched["metadata"]["generation"] == 2
    assert (
        http.get(f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/applications/app/status").status_code
        == 404
    )


# ------------------------------------------------------------------------------------------ delete


def test_delete(core: client.CoreV1Api, http: httpx.Client, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "gone"}})
    answer = http.delete(f"/api/v1/namespaces/{namespace}/configmaps/gone")
    assert answer.status_code == 200 and answer.json()["metadata"]["name"] == "gone"
    with pytest.raises(client.ApiException) as caught:
        core.read_namespaced_config_map("gone", namespace)
    assert caught.value.status == 404
    with pytest.raises(client.ApiException) as caught:
        core.delete_namespaced_config_map("gone", namespace)
    assert caught.value.status == 404


def test_delete_precondition(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm"}})
    with pytest.raises(client.ApiException) as caught:
        core.delete_namespaced_config_map("cm", namespace, body={"preconditions": {"resourceVersion": "1"}})
    assert caught.value.status == 409


def test_namespace_delete_cascades(
    core: client.CoreV1Api, apps: client.AppsV1Api, custom: client.CustomObjectsApi, namespace: str
) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web"))
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    custom.create_namespaced_custom_object(
        "bitnami.com",
        "v1alpha1",
        namespace,
        "sealedsecrets",
        {"metadata": {"name": "s"}, "spec": {"encryptedData": {}}},
    )
    core.create_namespace({"metadata": {"name": f"{namespace}-other"}})
    apps.create_namespaced_deployment(f"{namespace}-other", deployment("web"))

    core.delete_namespace(namespace)

    with pytest.raises(client.ApiException):
        core.read_namespace(namespace)
    everywhere = apps.list_deployment_for_all_namespaces().items
    assert namespace not in {d.metadata.namespace for d in everywhere}
    assert f"{namespace}-other" in {d.metadata.namespace for d in everywhere}
    assert not [s for s in core.list_secret_for_all_namespaces().items if s.metadata.namespace == namespace]
    assert not custom.list_cluster_custom_object(
        "bitnami.com", "v1alpha1", "sealedsecrets", field_selector=f"metadata.namespace={namespace}"
    )["items"]


def test_delete_collects_dependents_unless_orphaned(apps: client.AppsV1Api, namespace: str) -> None:
    owner = apps.create_namespaced_deployment(namespace, deployment("web"))
    reference = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": owner.metadata.uid}
    for name in ("web-1", "web-2"):
        apps.create_namespaced_replica_set(
            namespace,
            {
                "metadata": {"name": name, "ownerReferences": [reference]},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": deployment("web")["spec"]["template"],
                },
            },
        )
    apps.delete_namespaced_deployment("web", namespace)
    assert apps.list_namespaced_replica_set(namespace).items == []

    owner = apps.create_namespaced_deployment(namespace, deployment("web"))
    reference["uid"] = owner.metadata.uid
    apps.create_namespaced_replica_set(
        namespace,
        {
            "metadata": {"name": "web-3", "ownerReferences": [reference]},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": deployment("web")["spec"]["template"],
            },
        },
    )
    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Orphan")
    assert [r.metadata.name for r in apps.list_namespaced_replica_set(namespace).items] == ["web-3"]


# ------------------------------------------------------------------------------------------ watch


def test_watch_without_resource_version_lists_then_streams(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}})
    stream = watch.Watch().stream(core.list_namespaced_config_map, namespace, timeout_seconds=2)
    first = next(stream)
    assert (first["type"], first["object"].metadata.name) == ("ADDED", "before")
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "after"}})
    second = next(stream)
    assert (second["type"], second["object"].metadata.name) == ("ADDED", "after")
    stream.close()


def test_watch_resumes_after_resource_version(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "old"}})
    mark = core.list_namespaced_config_map(namespace).metadata.resource_version
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "new"}})
    core.patch_namespaced_config_map("old", namespace, {"data": {"k": "v"}})
    core.delete_namespaced_config_map("new", namespace)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "other-type"}})

    events = [
        (e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
        for e in watch.Watch().stream(
            core.list_namespaced_config_map, namespace, resource_version=mark, timeout_seconds=1
        )
    ]
    assert [(kind, name) for kind, name, _ in events] == [
        ("ADDED", "new"),
        ("MODIFIED", "old"),
        ("DELETED", "new"),
    ]
    versions = [int(version) for _, _, version in events]
    assert versions == sorted(versions) and versions[0] > int(mark)


def test_watch_applies_selectors(core: client.CoreV1Api, namespace: str) -> None:
    mark = core.list_namespaced_config_map(namespace).metadata.resource_version
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "plain"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "labelled", "labels": {"app": "web"}}})
    core.patch_namespaced_config_map("plain", namespace, {"metadata": {"labels": {"app": "web"}}})
    core.patch_namespaced_config_map("labelled", namespace, {"metadata": {"labels": {"app": None}}})
    events = [
        (e["type"], e["object"].metadata.name)
        for e in watch.Watch().stream(
            core.list_namespaced_config_map,
            namespace,
            label_selector="app=web",
            resource_version=mark,
            timeout_seconds=1,
        )
    ]
    # Objects entering or leaving the selection arrive as ADDED and DELETED, as upstream.
    assert events == [("ADDED", "labelled"), ("ADDED", "plain"), ("DELETED", "labelled")]
    by_name = [
        e["object"].metadata.name
        for e in watch.Watch().stream(
            core.list_namespaced_config_map,
            namespace,
            field_selector="metadata.name=plain",
            timeout_seconds=1,
        )
    ]
    assert by_name == ["plain"]


def test_watch_honours_timeout_seconds(core: client.CoreV1Api, namespace: str) -> None:
    started = time.monotonic()
    assert list(watch.Watch().stream(core.list_namespaced_pod, namespace, timeout_seconds=1)) == []
    assert 0.9 <= time.monotonic() - started < 10  # waited the 1 s, then ended by itself


def test_watch_from_expired_resource_version_is_410() -> None:
    running = serve_in_thread(create_app("small", event_buffer=5))
    try:
        configuration = client.Configuration()
        configuration.host = running.url
        with client.ApiClient(configuration) as api_client:
            core = client.CoreV1Api(api_client)
            first = core.create_namespaced_config_map("default", {"metadata": {"name": "cm0"}})
            for i in range(1, 8):
                core.create_namespaced_config_map("default", {"metadata": {"name": f"cm{i}"}})
            with httpx.Client(base_url=running.url, timeout=5) as http:
                answer = http.get(
                    "/api/v1/namespaces/default/configmaps",
                    params={"watch": "1", "resourceVersion": first.metadata.resource_version},
                )
            lines = answer.text.splitlines()
            assert answer.status_code == 200 and len(lines) == 1
            error = json.loads(lines[0])
            assert error["type"] == "ERROR"
            assert (error["object"]["kind"], error["object"]["code"], error["object"]["reason"]) == (
                "Status",
                410,
                "Expired",
            )
            with pytest.raises(client.ApiException) as caught:
                list(
                    watch.Watch().stream(
                        core.list_namespaced_config_map,
                        "default",
                        resource_version=first.metadata.resource_version,
                        timeout_seconds=1,
                    )
                )
            assert caught.value.status == 410
            # A version still in the buffer resumes normally.
            recent = core.list_namespaced_config_map("default").metadata.resource_version
            core.create_namespaced_config_map("default", {"metadata": {"name": "latest"}})
            events = list(
                watch.Watch().stream(
                    core.list_namespaced_config_map, "default", resource_version=recent, timeout_seconds=1
                )
            )
            assert [e["object"].metadata.name for e in events] == ["latest"]
    finally:
        running.stop()


def test_stop_ends_open_watches() -> None:
    running = serve_in_thread(create_app("stopping"))
    with (
        httpx.Client(base_url=running.url, timeout=5) as http,
        http.stream("GET", "/api/v1/namespaces", params={"watch": "true"}) as stream,
    ):
        assert json.loads(next(stream.iter_lines()))["type"] == "ADDED"
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------ kubectl


def kubectl(kubeconfig: Path, *args: str) -> str:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "cache"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kubectl_get(
    server: RunningServer,
    apps: client.AppsV1Api,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    namespace: str,
    tmp_path: Path,
) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"sandbox-eks": server.url})
    apps.create_namespaced_deployment(namespace, deployment("web"))
    apps.create_namespaced_deployment(namespace, deployment("api"))
    if not [n for n in core.list_namespace().items if n.metadata.name == "argocd"]:
        core.create_namespace({"metadata": {"name": "argocd"}})
    custom.create_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        "argocd",
        "applications",
        {
            "metadata": {"name": f"{namespace}-app"},
            "spec": {},
            "status": {"sync": {"status": "Synced"}, "health": {"status": "Healthy"}},
        },
    )

    table = kubectl(kubeconfig, "get", "deployments", "-n", namespace).splitlines()
    assert table[0].split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert sorted(line.split()[0] for line in table[1:]) == ["api", "web"]
    assert kubectl(kubeconfig, "get", "deploy", "-n", namespace, "-o", "name").split() == [
        "deployment.apps/api",
        "deployment.apps/web",
    ]
    everywhere = [line.split()[:2] for line in kubectl(kubeconfig, "get", "deploy", "-A").splitlines()]
    assert [namespace, "web"] in everywhere
    namespaces = {
        line.split()[0]: line.split()[1] for line in kubectl(kubeconfig, "get", "ns").splitlines()[1:]
    }
    assert namespaces[namespace] == "Active" and "default" in namespaces
    applications = kubectl(kubeconfig, "get", "applications", "-n", "argocd").splitlines()
    assert applications[0].split()[:5] == ["NAME", "SYNC", "STATUS", "HEALTH", "STATUS"]
    assert [f"{namespace}-app", "Synced", "Healthy"] in [line.split()[:3] for line in applications]
    as_json = json.loads(kubectl(kubeconfig, "get", "deploy", "web", "-n", namespace, "-o", "json"))
    assert as_json["kind"] == "Deployment" and as_json["metadata"]["generation"] == 1


def test_kubeconfig_merges_two_clusters(server: RunningServer, tmp_path: Path) -> None:
    other = serve_in_thread(create_app("aks", kubernetes_version="1.31.4"))
    try:
        path = tmp_path / "kubeconfig"
        write_kubeconfig(path, {"sandbox-eks": server.url})
        write_kubeconfig(path, {"sandbox-aks": other.url})
        write_kubeconfig(path, {"sandbox-eks": server.url})  # idempotent: no duplicate entries
        versions = {}
        for context in ("sandbox-eks", "sandbox-aks"):
            versions[context] = json.loads(kubectl(path, "--context", context, "version", "-o", "json"))
        assert versions["sandbox-eks"]["serverVersion"]["gitVersion"] == "v1.32.0"
        assert versions["sandbox-aks"]["serverVersion"]["gitVersion"] == "v1.31.4"
        assert kubectl(path, "config", "current-context").strip() == "sandbox-eks"
        assert kubectl(path, "config", "get-contexts", "-o", "name").split() == ["sandbox-aks", "sandbox-eks"]
    finally:
        other.stop()


def free_port() -> int:
    """A free TCP port for a subprocess: bind port 0, read it, release it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_command_line_entry_point(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twincd.sandbox.apiserver",
            "--name",
            "eks",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/readyz").text == "ok"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"cli": f"http://127.0.0.1:{port}"})
        assert "namespace/default" in kubectl(kubeconfig, "get", "ns", "-o", "name").split()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_wrongly_typed_replicas_are_refused_like_the_real_decoder(
    apps: client.AppsV1Api, http: httpx.Client, namespace: str
) -> None:
    # `kubectl kustomize` happily renders `replicas: two`; a real API server refuses to decode it.
    # (Raw HTTP: the official client already refuses to send such a body.)
    body = {**deployment("typed"), "apiVersion": "apps/v1", "kind": "Deployment"}
    body["spec"] = {**body["spec"], "replicas": "two"}
    url = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    created = http.post(url, json=body)
    assert created.status_code == 400
    assert "spec.replicas of type int32" in created.json()["message"]
    assert http.post(url, json={**body, "spec": {**body["spec"], "replicas": 2}}).status_code == 201
    assert http.put(f"{url}/typed", json=body).status_code == 400
    assert apps.read_namespaced_deployment("typed", namespace).spec.replicas == 2
