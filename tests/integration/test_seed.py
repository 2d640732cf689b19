"""`twincd seed`: the sample repos exist once, and the seeded overlays render with kustomize."""

from __future__ import annotations

import subprocess
from pathlib import Path

from twincd.sandbox.seed import seed_app, seed_manifests
from twincd.validate import ImagePolicy, SchemaValidator, parse_documents, render_overlay, validate_documents


def test_seed_is_idempotent_and_tags_the_app(tmp_path: Path) -> None:
    app, manifests = tmp_path / "hello.git", tmp_path / "manifests.git"
    assert seed_app(app) and seed_manifests(manifests, apps=["hello"], clusters=["eks", "aks"])
    heads = subprocess.run(
        ["git", "-C", str(manifests), "rev-parse", "main"], capture_output=True, text=True, check=True
    ).stdout
    assert not seed_app(app) and not seed_manifests(manifests, apps=["hello"], clusters=["eks", "aks"])
    assert (
        subprocess.run(
            ["git", "-C", str(manifests), "rev-parse", "main"], capture_output=True, text=True, check=True
        ).stdout
        == heads
    )
    tags = subprocess.run(["git", "-C", str(app), "tag"], capture_output=True, text=True, check=True).stdout
    assert tags.split() == ["v1.0.0"]


def test_seeded_overlays_render_and_components_switch_replicas(tmp_path: Path) -> None:
    bare = tmp_path / "manifests.git"
    seed_manifests(bare, apps=["hello"], clusters=["eks", "aks"])
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
    kinds: dict[str, list[str]] = {}
    for cluster in ("eks", "aks"):
        docs = parse_documents(render_overlay(work, f"overlays/{cluster}/hello"))
        kinds[cluster] = sorted(d["kind"] for d in docs)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert deployment["spec"]["replicas"] == 2  # components/active
        images = ImagePolicy(managed=frozenset({"docker.io/library/hello", "127.0.0.1:5000/hello"}))
        findings = validate_documents(docs, overlay=cluster, validator=SchemaValidator(), images=images)
        # Schemas pass; the policy flags the app's image, which the first release pins (an
        # error), and warns about the init container and sidecar, pinned by tag, that twincd does
        # not manage; the SealedSecret has no schema to check against.
        assert [(f.severity.value, f.resource, f.path) for f in findings] == [
            ("warning", "Deployment/hello/hello", "spec.template.spec.initContainers[0].image"),
            ("error", "Deployment/hello/hello", "spec.template.spec.containers[0].image"),
            ("warning", "Deployment/hello/hello", "spec.template.spec.containers[1].image"),
            ("unchecked", "SealedSecret/hello/hello-credentials", ""),
        ]
    assert kinds["eks"] == kinds["aks"] == ["Deployment", "Namespace", "SealedSecret", "Service"]
    overlay = work / "overlays/eks/hello/kustomization.yaml"
    overlay.write_text(overlay.read_text().replace("components/active", "components/standby"))
    standby = parse_documents(render_overlay(work, "overlays/eks/hello"))
    assert next(d for d in standby if d["kind"] == "Deployment")["spec"]["replicas"] == 0
