"""Schema and policy findings on rendered manifests; rendering through the real kubectl."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from twincd.domain import Finding, Severity, ValidationReport, image_repository
from twincd.validate import (
    ImagePolicy,
    ManifestError,
    RenderError,
    SchemaValidator,
    parse_documents,
    render_overlay,
    report_markdown,
    validate_documents,
    validate_overlay,
)

DIGEST = "sha256:" + "c" * 64
OVERLAY = "overlays/eks/hello"

VALID = f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: hello-config
  namespace: hello
data:
  GREETING: hi
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: hello
spec:
  selector:
    app.kubernetes.io/name: hello
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  namespace: hello
spec:
  replicas: 2
  selector:
    matchLabels:
      app.kubernetes.io/name: hello
  template:
    metadata:
      labels:
        app.kubernetes.io/name: hello
    spec:
      initContainers:
      - name: migrate
        image: 127.0.0.1:5000/hello@{DIGEST}
      containers:
      - name: hello
        image: 127.0.0.1:5000/hello@{DIGEST}
        ports:
        - containerPort: 8080
        resources:
          limits:
            memory: 64Mi
            cpu: 100m
"""


@pytest.fixture(scope="module")
def validator() -> SchemaValidator:
    return SchemaValidator(kubernetes_version="1.31")


def _deployment(**replace: str) -> str:
    text = VALID.split("---\n")[2]
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_valid_resources_have_no_findings(validator: SchemaValidator) -> None:
    docs = parse_documents(VALID)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Deployment"]
    assert validate_documents(docs, overlay=OVERLAY, validator=validator) == ()


def test_wrong_type_is_reported_with_its_path(validator: SchemaValidator) -> None:
    docs = parse_documents(_deployment(**{"replicas: 2": "replicas: three"}))
    assert validate_documents(docs, overlay=OVERLAY, validator=validator) == (
        Finding(
            OVERLAY,
            "Deployment/hello/hello",
            '"three" is not of types "null", "integer"',
            path="spec.replicas",
        ),
    )


def test_unknown_field_is_an_error_under_strict_schemas(validator: SchemaValidator) -> None:
    docs = parse_documents(_deployment(**{"        ports:\n": "        port: 8080\n        ports:\n"}))
    (finding,) = validate_documents(docs, overlay=OVERLAY, validator=validator)
    assert finding.severity is Severity.ERROR
    assert finding.path == "spec.template.spec.containers[0]"
    assert "'port' was unexpected" in finding.message
    assert str(finding).startswith(
        "overlays/eks/hello: Deployment/hello/hello at spec.template.spec.containers[0]: "
    )


def test_every_schema_error_of_a_resource_is_reported(validator: SchemaValidator) -> None:
    docs = parse_documents(
        _deployment(**{"replicas: 2": "replicas: two", "containerPort: 8080": "containerPort: http"})
    )
    paths = sorted(f.path for f in validate_documents(docs, overlay=OVERLAY, validator=validator))
    assert paths == ["spec.replicas", "spec.template.spec.containers[0].ports[0].containerPort"]


def test_plaintext_secret_is_flagged_and_sealed_secret_is_unchecked(validator: SchemaValidator) -> None:
    docs = parse_documents("""\
apiVersion: v1
kind: Secret
metadata: {name: hello-credentials, namespace: hello}
stringData: {API_TOKEN: hunter2}
---
apiVersion: bitnami.com/v1alpha1
kind: SealedSecret
metadata: {name: hello-credentials, namespace: hello}
spec:
  encryptedData: {API_TOKEN: AgBy3i4OJSWK+PiTySYZZA9rO43cGDEq}
""")
    secret, sealed = validate_documents(docs, overlay=OVERLAY, validator=validator)
    assert secret.resource == "Secret/hello/hello-credentials" and secret.severity is Severity.ERROR
    assert "plaintext Secret" in secret.message and "hunter2" not in str(secret)
    assert sealed.resource == "SealedSecret/hello/hello-credentials" and sealed.severity is Severity.UNCHECKED


def test_argo_application_is_unchecked_not_an_error(validator: SchemaValidator) -> None:
    docs = [
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {"name": "hello-eks"},
            "spec": {"project": "default"},
        }
    ]
    (finding,) = validate_documents(docs, overlay=OVERLAY, validator=validator)
    assert finding.severity is Severity.UNCHECKED
    assert "no schema for argoproj.io/v1alpha1 Application in Kubernetes 1.31" in finding.message


def test_custom_resource_sharing_a_short_group_name_is_not_checked_against_builtin(
    validator: SchemaValidator,
) -> None:
    # kubernetes-validate's file name for this is ingress-networking-v1.json, the built-in Ingress.
    docs = [
        {
            "apiVersion": "networking.example.com/v1",
            "kind": "Ingress",
            "metadata": {"name": "x"},
            "spec": {"anything": True},
        }
    ]
    (finding,) = validate_documents(docs, overlay=OVERLAY, validator=validator)
    assert finding.severity is Severity.UNCHECKED


def test_unpinned_images_are_flagged(validator: SchemaValidator) -> None:
    docs = parse_documents(_deployment(**{f"hello@{DIGEST}\n        ports": "hello:v1.2.0\n        ports"}))
    (finding,) = validate_documents(docs, overlay=OVERLAY, validator=validator)
    assert finding.path == "spec.template.spec.containers[0].image"
    assert "'127.0.0.1:5000/hello:v1.2.0' of container 'hello' is not pinned by digest" in finding.message
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "tick", "namespace": "hello"},
        "spec": {
            "schedule": "*/5 * * * *",
            "jobTemplate": {
                "spec": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "tick", "image": "busybox@sha256:abc"}],
                        }
                    }
                }
            },
        },
    }
    (short,) = validate_documents([cronjob], overlay=OVERLAY, validator=validator)
    assert short.path == "spec.jobTemplate.spec.template.spec.containers[0].image"


def test_timestamps_stay_strings_and_a_datetime_does_not_crash(validator: SchemaValidator) -> None:
    text = _deployment(
        **{"  namespace: hello\n": "  namespace: hello\n  annotations:\n    released: 2026-11-26T10:00:00Z\n"}
    )
    (doc,) = parse_documents(text)
    assert doc["metadata"]["annotations"]["released"] == "2026-11-26T10:00:00Z"  # as the API server reads it
    assert validate_documents([doc], overlay=OVERLAY, validator=validator) == ()

    doc["metadata"]["annotations"]["released"] = datetime.datetime(2026, 11, 26, 10, 0, 0)
    (finding,) = validate_documents([doc], overlay=OVERLAY, validator=validator)
    assert finding.severity is Severity.ERROR and "cannot be checked" in finding.message


def test_missing_kind_is_an_error(validator: SchemaValidator) -> None:
    (finding,) = validate_documents([{"metadata": {"name": "x"}}], overlay=OVERLAY, validator=validator)
    assert finding.message == "apiVersion and kind must both be set"


def test_parse_documents_rejects_non_mappings() -> None:
    with pytest.raises(ManifestError, match="overlays/x: document 2 is a list"):
        parse_documents("a: 1\n---\n- b\n", source="overlays/x")
    assert parse_documents("---\n---\nkind: A\n") == [{"kind": "A"}]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_render_and_validate_a_real_overlay(tmp_path: Path, validator: SchemaValidator) -> None:
    _write(
        tmp_path,
        {
            "base/hello/kustomization.yaml": "resources:\n  - resources.yaml\n",
            "base/hello/resources.yaml": VALID.replace(f"@{DIGEST}", ":v1.0.0"),
            "components/standby/kustomization.yaml": (
                "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\npatches:\n  - target:\n"
                "      kind: Deployment\n    patch: |-\n      - op: replace\n        path: /spec/replicas\n"
                "        value: 0\n"
            ),
            "overlays/eks/hello/kustomization.yaml": (
                "resources:\n  - ../../../base/hello\ncomponents:\n  - ../../../components/standby\n"
                f"images:\n  - name: 127.0.0.1:5000/hello\n    digest: {DIGEST}\n"
            ),
        },
    )
    rendered = parse_documents(render_overlay(tmp_path, OVERLAY))
    (deploy,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert deploy["spec"]["replicas"] == 0
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == f"127.0.0.1:5000/hello@{DIGEST}"

    report = validate_overlay(tmp_path, OVERLAY, validator=validator)
    assert (report.overlays, report.resources, report.findings, report.ok) == ((OVERLAY,), 3, (), True)


def test_broken_overlay_raises_render_error_naming_it(tmp_path: Path, validator: SchemaValidator) -> None:
    _write(tmp_path, {"overlays/aks/hello/kustomization.yaml": "resources:\n  - ../../../base/missing\n"})
    with pytest.raises(RenderError) as caught:
        render_overlay(tmp_path, "overlays/aks/hello")
    assert caught.value.overlay == "overlays/aks/hello"
    assert "overlays/aks/hello" in str(caught.value)
    assert "base/missing" in caught.value.stderr


def test_an_overlay_that_does_not_render_is_a_validation_finding(
    tmp_path: Path, validator: SchemaValidator
) -> None:
    _write(tmp_path, {"overlays/aks/hello/kustomization.yaml": "resources:\n  - ../../../base/missing\n"})
    report = validate_overlay(tmp_path, "overlays/aks/hello", validator=validator)
    assert not report.ok and report.resources == 0
    (finding,) = report.errors
    assert finding.overlay == "overlays/aks/hello" and finding.resource == "kustomization.yaml"
    assert "base/missing" in finding.message


def test_schemas_of_the_newest_version_not_newer_than_asked() -> None:
    assert SchemaValidator(kubernetes_version="v1.31.4").kubernetes_version == "1.31"
    assert SchemaValidator(kubernetes_version="1.99").kubernetes_version == "1.37"


def test_images_twincd_does_not_manage_follow_the_unpinned_policy(validator: SchemaValidator) -> None:
    """The app's image must be pinned; a hand-managed sidecar pinned by tag is a warning by
    default, an error under `require`, and allowed under `allow-list` when its repository is listed."""
    sidecar = "      - name: envoy\n        image: envoyproxy/envoy:v1.31.0\n"
    docs = parse_documents(_deployment(**{"      initContainers:\n": f"      initContainers:\n{sidecar}"}))
    managed = frozenset({"127.0.0.1:5000/hello", "docker.io/library/hello"})
    path = "spec.template.spec.initContainers[0].image"

    def found(policy: ImagePolicy) -> list[tuple[str, str]]:
        return [
            (f.severity.value, f.path)
            for f in validate_documents(docs, overlay=OVERLAY, validator=validator, images=policy)
        ]

    assert found(ImagePolicy(managed=managed)) == [("warning", path)]
    assert found(ImagePolicy(managed=managed, unpinned="require")) == [("error", path)]
    allowed = ImagePolicy(managed=managed, unpinned="allow-list", allowed=("docker.io/envoyproxy/",))
    assert found(allowed) == []
    assert found(ImagePolicy(managed=managed, unpinned="allow-list", allowed=("docker.io/envoy",))) == [
        ("error", path)
    ]
    # The app's own image by tag is an error whatever the policy for others.
    unpinned_app = parse_documents(
        _deployment(**{f"hello@{DIGEST}\n        ports": "hello:v1\n        ports"})
    )
    (finding,) = validate_documents(
        unpinned_app, overlay=OVERLAY, validator=validator, images=ImagePolicy(managed=managed)
    )
    assert finding.severity is Severity.ERROR and "not pinned by digest" in finding.message


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("nginx", "docker.io/library/nginx"),
        ("nginx:1.27", "docker.io/library/nginx"),
        ("prom/statsd-exporter:v0.27.1", "docker.io/prom/statsd-exporter"),
        ("127.0.0.1:5000/hello@sha256:" + "c" * 64, "127.0.0.1:5000/hello"),
        (
            "registry.gitlab.example.com/group/app/hello:v1@sha256:" + "c" * 64,
            "registry.gitlab.example.com/group/app/hello",
        ),
        ("localhost/hello:v1", "localhost/hello"),
    ],
)
def test_image_repository_normalizes_as_runtimes_do(image: str, repository: str) -> None:
    assert image_repository(image) == repository


def test_the_merge_request_note_lists_warnings_without_failing() -> None:
    warning = Finding(
        OVERLAY,
        "Deployment/hello/hello",
        "image 'envoyproxy/envoy:v1.31.0' of container 'envoy' is not pinned by digest; "
        "twincd does not manage it",
        Severity.WARNING,
        path="spec.template.spec.containers[1].image",
    )
    report = ValidationReport((OVERLAY,), 4, (warning,))
    note = report_markdown(report)
    assert report.ok and note.startswith("### ✅ twincd validation passed")
    assert "1 warning(s):" in note and "⚠️ overlays/eks/hello: Deployment/hello/hello at spec.template" in note


def test_renders_are_kept_by_what_each_overlay_reads(tmp_path: Path) -> None:
    """A change to one app's overlay renders that overlay again and no other; a change to a base
    they share renders both; what comes out is what kustomize makes of the tree as it is."""
    from twincd.validate import render_overlays

    files = {
        "base/kustomization.yaml": "resources: [cm.yaml]\n",
        "base/cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\ndata: {v: '1'}\n",
        "overlays/eks/a/kustomization.yaml": "resources: [../../../base]\nnamePrefix: a-\n",
        "overlays/eks/b/kustomization.yaml": "resources: [../../../base]\nnamePrefix: b-\n",
    }
    for name, text in files.items():
        (tmp_path / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name).write_text(text)
    repo, cache = tmp_path / "repo", tmp_path / "renders"
    overlays = {("eks", "a"): "overlays/eks/a", ("eks", "b"): "overlays/eks/b"}

    def render() -> dict[str, Any]:
        return render_overlays(repo, overlays, cache_dir=cache)["eks"]

    first = render()
    assert [d["metadata"]["name"] for d in first["a"]] == ["a-shared"]
    kept = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(kept) == 2 and render() == first  # nothing rendered again
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == kept

    (repo / "overlays/eks/a/kustomization.yaml").write_text("resources: [../../../base]\nnamePrefix: x-\n")
    second = render()
    assert [d["metadata"]["name"] for d in second["a"]] == ["x-shared"] and second["b"] == first["b"]
    assert len(list(cache.iterdir())) == 3  # one new render: a's

    (repo / "base/cm.yaml").write_text(files["base/cm.yaml"].replace("'1'", "'2'"))
    third = render()
    assert {d["data"]["v"] for docs in third.values() for d in docs} == {"2"}
    assert len(list(cache.iterdir())) == 5  # both again: the base they share changed
