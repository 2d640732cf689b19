"""Validation throughput: twincd.validate against kubernetes-validate as shipped.

    .venv/bin/python benchmarks/validate.py [--resources 5000] [--reference-subset N]

Generates a corpus of rendered resources of the common kinds (about 2% of them invalid, a few
custom resources), then prints resources/s for validation alone (compiled validators warm, and
cold including compilation) and for parsing + validation, beside ``kubernetes_validate.validate()``
on the same documents, and compares which resources each finds invalid or cannot check.
kubernetes-validate re-reads and recompiles the schema per call (~45-70 s for 5,000 here); with
--reference-subset N it runs on N evenly spread resources only, its time for the whole corpus is
extrapolated, and the comparison is made on that subset.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

import kubernetes_validate
import yaml

from twincd.domain import Severity
from twincd.validate import SchemaValidator, parse_documents, resource_id, validate_documents
from twincd.yamlload import KubeLoader, load_documents

VERSION = "1.31"
DIGEST = "sha256:" + "0123456789abcdef" * 4


def _meta(kind: str, i: int) -> dict[str, Any]:
    return {
        "name": f"{kind.lower()}-{i}",
        "namespace": f"team-{i % 17}",
        "labels": {"app.kubernetes.io/name": f"app-{i}", "app.kubernetes.io/part-of": "bench"},
    }


def _pod_spec(i: int) -> dict[str, Any]:
    return {
        "serviceAccountName": f"serviceaccount-{i}",
        "containers": [
            {
                "name": "app",
                "image": f"registry.example.com/app-{i}@{DIGEST}",
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                "env": [
                    {"name": "LOG_LEVEL", "value": "info"},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": f"app-{i}", "key": "token"}}},
                ],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True},
            }
        ],
    }


def _template(i: int) -> dict[str, Any]:
    return {
        "metadata": {"creationTimestamp": None, "labels": {"app.kubernetes.io/name": f"app-{i}"}},
        "spec": _pod_spec(i),
    }


def _resource(kind: str, i: int) -> dict[str, Any]:
    selector = {"matchLabels": {"app.kubernetes.io/name": f"app-{i}"}}
    if kind == "Deployment":
        return {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "spec": {
                "replicas": 2,
                "selector": selector,
                "template": _template(i),
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
                },
            },
        }
    if kind == "StatefulSet":
        return {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "spec": {
                "replicas": 3,
                "serviceName": f"service-{i}",
                "selector": selector,
                "template": _template(i),
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "data"},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Gi"}},
                        },
                    }
                ],
            },
        }
    if kind == "Service":
        return {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "spec": {
                "selector": {"app.kubernetes.io/name": f"app-{i}"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    if kind == "ConfigMap":
        return {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "data": {"LOG_LEVEL": "info", "config.yaml": f"listen: :8080\nname: app-{i}\n"},
        }
    if kind == "ServiceAccount":
        return {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "automountServiceAccountToken": False,
        }
    if kind == "Ingress":
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "spec": {
                "ingressClassName": "nginx",
                "rules": [
                    {
                        "host": f"app-{i}.example.test",
                        "http": {
                            "paths": [
                                {
                                    "path": "/",
                                    "pathType": "Prefix",
                                    "backend": {"service": {"name": f"service-{i}", "port": {"number": 80}}},
                                }
                            ]
                        },
                    }
                ],
            },
        }
    if kind == "Role":
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
        }
    if kind == "HorizontalPodAutoscaler":
        return {
            "apiVersion": "autoscaling/v2",
            "kind": kind,
            "metadata": _meta(kind, i),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"deployment-{i}"},
                "minReplicas": 2,
                "maxReplicas": 6,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 70},
                        },
                    }
                ],
            },
        }
    if kind == "SealedSecret":
        return {
            "apiVersion": "bitnami.com/v1alpha1",
            "kind": kind,
            "metadata": _meta(kind, i),
            "spec": {"encryptedData": {"token": "AgBy3i4OJSWK+PiTySYZZA9rO43cGDEq"}},
        }
    raise ValueError(kind)


KINDS = [
    "Deployment",
    "Service",
    "ConfigMap",
    "ServiceAccount",
    "Ingress",
    "StatefulSet",
    "Role",
    "HorizontalPodAutoscaler",
    "SealedSecret",
]
WEIGHTS = [22, 22, 20, 12, 8, 5, 5, 4, 2]


def _break(doc: dict[str, Any], rng: random.Random) -> None:
    """One realistic mistake the strict schema must catch."""
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet"):
        choice = rng.choice(["replicas", "field", "port"])
        container = doc["spec"]["template"]["spec"]["containers"][0]
        if choice == "replicas":
            doc["spec"]["replicas"] = "three"
        elif choice == "field":
            container["imagePullPolicy "] = "Always"  # a stray space: an unknown field
        else:
            container["ports"][0]["containerPort"] = "8080"
    elif kind == "Service":
        doc["spec"]["ports"][0]["port"] = "eighty"
    elif kind == "Ingress":
        doc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] = {"numbr": 80}
    elif kind == "Role":
        del doc["rules"][0]["verbs"]
    elif kind == "HorizontalPodAutoscaler":
        doc["spec"]["maxReplicas"] = 6.5
    else:
        doc["metadata"]["labels"] = ["not", "a", "map"]


def corpus(n: int, *, seed: int = 2026) -> str:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        doc = _resource(rng.choices(KINDS, WEIGHTS)[0], i)
        if doc["kind"] != "SealedSecret" and rng.random() < 0.02:
            _break(doc, rng)
        docs.append(doc)
    return yaml.safe_dump_all(docs, sort_keys=False, width=1000)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} resources/s ({seconds * 1000:,.1f} ms for {count:,})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resources", type=int, default=5000)
    ap.add_argument(
        "--reference-subset",
        type=int,
        default=0,
        help="run kubernetes_validate.validate() on this many evenly spread resources (0: all)",
    )
    args = ap.parse_args()

    text = corpus(args.resources)
    docs = parse_documents(text)
    print(
        f"corpus: {len(docs):,} resources, {len(text) / 1e6:.1f} MB of YAML, "
        f"Kubernetes {VERSION} strict schemas"
    )

    validator = SchemaValidator(kubernetes_version=VERSION)
    t = time.perf_counter()
    validate_documents(docs, overlay="bench", validator=validator)
    cold = time.perf_counter() - t
    warm = min(
        _timed(lambda: validate_documents(docs, overlay="bench", validator=validator)) for _ in range(5)
    )
    schema_only = min(_timed(lambda: [validator.check(d, overlay="bench") for d in docs]) for _ in range(5))
    parse = min(_timed(lambda: parse_documents(text)) for _ in range(3))
    pyyaml = min(_timed(lambda: list(yaml.load_all(text, Loader=KubeLoader))) for _ in range(3))
    same = load_documents(text) == list(yaml.load_all(text, Loader=KubeLoader))
    both = min(
        _timed(lambda: validate_documents(parse_documents(text), overlay="bench", validator=validator))
        for _ in range(3)
    )

    print("twincd.validate (jsonschema-rs, one compiled validator per kind):")
    print(f"  validation alone, schema only     {_rate(len(docs), schema_only)}")
    print(f"  validation alone, schema + policy {_rate(len(docs), warm)}  <- goal >= 20,000/s")
    print(f"  first pass incl. compiling        {_rate(len(docs), cold)}")
    print(f"  parsing alone, PyYAML (CSafeLoader) {_rate(len(docs), pyyaml)}")
    print(f"  parsing alone (twincd.yamlload)   {_rate(len(docs), parse)}  same documents: {same}")
    print(f"  parsing + validation              {_rate(len(docs), both)}")

    step = max(1, len(docs) // args.reference_subset) if args.reference_subset else 1
    sample = list(range(0, len(docs), step))
    t = time.perf_counter()
    ref_invalid, ref_unchecked = set(), set()
    for i in sample:
        try:
            kubernetes_validate.validate(docs[i], VERSION, strict=True)
        except kubernetes_validate.ValidationError:
            ref_invalid.add(i)
        except kubernetes_validate.SchemaNotFoundError:
            ref_unchecked.add(i)
    ref_seconds = time.perf_counter() - t
    subset = "" if step == 1 else f" on {len(sample):,} of {len(docs):,} (every {step}th), extrapolated"
    print(f"kubernetes_validate.validate() as shipped{subset}:")
    print(
        f"  validation alone                  {_rate(len(sample), ref_seconds)}"
        + (
            f"; the whole corpus would take ~{ref_seconds * len(docs) / len(sample):,.0f} s"
            if step > 1
            else ""
        )
    )
    speedup = (len(docs) / schema_only) / (len(sample) / ref_seconds)
    print(f"  twincd's schema check is {speedup:,.0f}x faster")

    ours_invalid, ours_unchecked = set(), set()
    for i in sample:
        severities = {f.severity for f in validator.check(docs[i], overlay="bench")}
        if Severity.ERROR in severities:
            ours_invalid.add(i)
        if Severity.UNCHECKED in severities:
            ours_unchecked.add(i)
    print(f"comparison on the {len(sample):,} resources both checked:")
    for label, ours, ref in (
        ("invalid", ours_invalid, ref_invalid),
        ("unchecked", ours_unchecked, ref_unchecked),
    ):
        verdict = "identical" if ours == ref else "DIFFERENT"
        print(f"  {label:<9} twincd {len(ours):>4}  kubernetes-validate {len(ref):>4}  -> {verdict}")
        for i in sorted(ours ^ ref):
            print(f"    only in {'twincd' if i in ours else 'kubernetes-validate'}: {resource_id(docs[i])}")
    examples = sorted(ours_invalid)[:3]
    for i in examples:
        for f in validator.check(docs[i], overlay="bench"):
            print(f"  e.g. {f}")
    if ours_invalid != ref_invalid or ours_unchecked != ref_unchecked:
        sys.exit(1)


def _timed(work: Any) -> float:
    t = time.perf_counter()
    work()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
