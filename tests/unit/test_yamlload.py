"""The fast loader gives exactly what PyYAML's KubeLoader gives, for every scalar shape and layout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from twincd.yamlload import KubeLoader, _suspect, load_documents

_WORDS = """yes Yes YES no No NO on On ON off Off OFF y Y n N true True TRUE false False FALSE
null Null NULL ~ 0 00 07 0777 08 0o17 0x1F 0X1F 0b101 +1 -1 +0 -0 1_000 1,000 190:20:30 1:30 12:30:00
-1:30 1.0 1. .5 1e3 1E3 1.0e3 1.0e+3 1.0E-3 -1.5e+10 +.inf -.inf .inf .Inf .INF .nan .NaN .NAN inf nan
NaN 1_0.5 6.8523015e+5 685.230_15e+03 190:20:30.15 2001-12-14 2001-12-14t21:59:43.10-05:00
2001-12-14T21:59:43Z 2001-12-14 21:59:43.10 = << 0.1.2 1.2.3 v1 8080 1e 0e0 0.0 +0.5 0x 0b 0o 12e03
1__2 sha256:0123 hello 127.0.0.1:5000/hello@sha256:ab http://x/y a-b -a 3Gi 500m 1.5Gi 0.5 '8080'
"on" 'no' "2001-12-14" 100% 50m 1_2:3"""
_MORE = "-.5 +.5 _1 -_1 ._5 -_1e3 .iNF .InF .nAn -.iNf 0x_ 0b_"
SCALARS = [*_WORDS.split(), *_MORE.split(), "'yes please'", '"a: b"', "it is on", "turn it off now"]

LAYOUTS = [
    "k: {s}\n",
    "- {s}\n",
    "{s}: v\n",
    "k: {s}  # a comment\n",
    "k:\n  - {s}\n  - x\n",
    "k: [{s}, x]\n",
    "k: {{a: {s}}}\n",
    "k: |\n  {s}\n",
    "k: >-\n  first\n  {s}\n",
    "k: words then {s}\n",
    "k: a\n---\nk: {s}\n",
    "---\nk: {s}\n---\n",
    "# a comment\n---\nk: {s}\n...\n",
    "k: &a {s}\nj: *a\n",
    "k: !!str {s}\n",
    "k:\n  {s}\n",
    "k: # a comment\n  {s}\n",
    "-\n  {s}\n",
    "k: [\n  {s}\n]\n",
    "k: {{\n  a: {s} }}\n",
    "k:\n  [\n  {s}]\n",
    "k: {s}\r\n",
]


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, NaN included (``.nan`` loads as a float NaN, even as a key):
    the reprs of what both loaders made (True is not 1, "8080" is not 8080)."""
    return repr(a) == repr(b)


def pyyaml(text: str) -> list[Any] | str:
    try:
        return list(yaml.load_all(text, Loader=KubeLoader))
    except (yaml.YAMLError, ValueError) as e:  # PyYAML's int() of "0x_" raises ValueError
        return f"error: {e}"


def fast(text: str) -> list[Any] | str:
    try:
        return load_documents(text)
    except (yaml.YAMLError, ValueError) as e:
        return f"error: {e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_scalar_shape_loads_as_pyyaml_loads_it(layout: str) -> None:
    different = []
    for scalar in SCALARS:
        text = layout.format(s=scalar)
        if not same(fast(text), pyyaml(text)):
            different.append((text, fast(text), pyyaml(text)))
    assert different == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "---\n",
        "# only a comment\n",
        "a: 1\n---\n",
        "a: 1\n---\n---\nb: 2\n",
        "---\n- a: 1\n- b: 2\n",
        "- a: 1\n",
        "just a string\n",
        "a: 1\n--- # the second\nb: 2\n",
        "--- |\n  a block document\n",
        "a: 1\n--- |\n  a block document\n--- >\n  another\n",
        "a: 1\na: 2\n",  # a duplicate key: PyYAML keeps the last
        "a: b: c\n",  # invalid: the same error as before
        "a:\n\t- b\n",  # a tab
        'a: "unterminated\n',
        "a: 'it''s'\nb: \"\\u00e9\\t\"\n",
        "k: v\r\n---\r\nj: w\r\n",
        "--- \r\nk: v\r\n",
        "\ufeffk: v\n",
        "k: yes\u2028\n",
        "k: a\u2028  b\n",
        "k: \x85\n",
        "k: a\x7f\n",
        "k: a\x80\n",
        "k: a\x00\n",
        "k: \ufffe\n",
        "k: a\x85b\n",
        'k: "\\ud83d\\ude00"\n',
        "k: |\n\n",
        "- |\n  \n",
        "k: |\n\n---\nj: 1\n",
        "k: >+\n  a\n\n",
    ],
)
def test_document_structure_and_errors_are_pyyamls(text: str) -> None:
    assert same(fast(text), pyyaml(text)), (fast(text), pyyaml(text))


def test_kustomize_output_takes_the_fast_path() -> None:
    """What kustomize prints for the sample app has nothing the fast parser could read otherwise."""
    rendered = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  annotations:
    argocd.argoproj.io/tracking-id: hello-eks:apps/Deployment:hello/hello
  labels:
    app.kubernetes.io/name: hello
  name: hello
  namespace: hello
spec:
  progressDeadlineSeconds: 60
  replicas: 2
  template:
    spec:
      containers:
      - image: 127.0.0.1:5000/hello@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
        name: hello
        ports:
        - containerPort: 8080
        resources:
          limits: {}
          requests:
            cpu: 100m
            memory: 64Mi
"""
    assert not _suspect(rendered)
    assert load_documents(rendered) == pyyaml(rendered)


def test_the_benchmark_corpus_loads_identically() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from validate import corpus  # type: ignore[import-not-found]

    text = corpus(500)
    assert load_documents(text) == pyyaml(text)
