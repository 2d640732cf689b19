"""Golden tests of the kustomization edits: expected.yaml is compared byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from twincd.domain import ComponentChange, ImageChange, ImageRef
from twincd.errors import PermanentError
from twincd.kustomize import KustomizationError, KustomizeImage, images_of, set_components, set_image

FIXTURES = Path(__file__).parent / "fixtures"
OLD_DIGEST = "sha256:" + "1" * 64
NEW_DIGEST = "sha256:" + "2" * 64
REF = ImageRef(name="registry.example.com/team/hello", digest=NEW_DIGEST, tag="v1.2.0")
NEW = f"registry.example.com/team/hello@{NEW_DIGEST}"

# What each golden case must record as the old value of the `hello` entry ("" = entry added).
IMAGE_OLD = {
    "tag_to_digest": "registry.example.com/team/hello:v1.1.0",
    "digest_to_new_digest": f"registry.example.com/team/hello@{OLD_DIGEST}",
    "entry_missing": "",
    "entry_after_list_comments": "",
    "entry_before_next_key_comments": "",
    "images_missing": "",
    "images_empty": "",
    "several_images_comments": "old-registry.example.com/hello:v1.1.0",
    "already_at_digest": None,  # no change at all
    "quoted_values": f"old.example.com/hello@{OLD_DIGEST}",
    "newtag_first_no_newname": "hello:v1.1.0",
}


def _cases(kind: str) -> list[str]:
    return sorted(p.name for p in (FIXTURES / kind).iterdir() if p.is_dir())


def test_every_set_image_case_has_an_expectation() -> None:
    assert sorted(IMAGE_OLD) == _cases("set_image")


@pytest.mark.parametrize("case", _cases("set_image"))
def test_set_image_golden(case: str) -> None:
    original = (FIXTURES / "set_image" / case / "original.yaml").read_text()
    expected = (FIXTURES / "set_image" / case / "expected.yaml").read_text()

    result = set_image(original, file=f"overlays/{case}/kustomization.yaml", image="hello", ref=REF)

    assert result.text == expected
    old = IMAGE_OLD[case]
    if old is None:
        assert result.changes == () and not result.changed and result.text is original
    else:
        assert result.changes == (
            ImageChange(file=f"overlays/{case}/kustomization.yaml", image="hello", old=old, new=NEW),
        )
    # Idempotent: pinning again is "already done".
    again = set_image(result.text, file="k.yaml", image="hello", ref=REF)
    assert again.text == result.text and again.changes == ()
    # And the result reads back as the pinned entry.
    (entry,) = [i for i in images_of(result.text) if i.name == "hello"]
    assert entry.reference == REF.pinned and entry.new_tag == ""


@pytest.mark.parametrize("case", _cases("components"))
def test_set_components_golden(case: str) -> None:
    folder = FIXTURES / "components" / case
    original = (folder / "original.yaml").read_text()
    args = json.loads((folder / "args.json").read_text())

    result = set_components(
        original, file="overlays/aks/hello/kustomization.yaml", remove=args["remove"], add=args["add"]
    )

    assert result.text == (folder / "expected.yaml").read_text()
    assert result.changes == tuple(
        ComponentChange(file="overlays/aks/hello/kustomization.yaml", removed=r, added=a)
        for r, a in args["changes"]
    )
    again = set_components(result.text, file="k.yaml", remove=args["remove"], add=args["add"])
    assert again.changes == () and again.text == result.text


def test_images_of_reads_every_entry() -> None:
    text = (FIXTURES / "set_image" / "several_images_comments" / "original.yaml").read_text()
    assert images_of(text) == [
        KustomizeImage(name="envoy", new_name="docker.io/envoyproxy/envoy", new_tag="v1.31.2"),
        KustomizeImage(name="hello", new_name="old-registry.example.com/hello", new_tag="v1.1.0"),
        KustomizeImage(name="busybox", digest=OLD_DIGEST),
    ]
    assert images_of("kind: Kustomization\n") == []


def test_values_that_would_not_read_back_as_strings_are_quoted() -> None:
    odd = ImageRef(name="yes", digest=NEW_DIGEST)  # plain `yes` is a boolean to YAML 1.1 readers
    result = set_image("images: []\n", file="k.yaml", image="hello", ref=odd)
    assert result.text == f'images:\n- name: hello\n  newName: "yes"\n  digest: {NEW_DIGEST}\n'


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("images:\n- name: hello\n  newTag: [unclosed\n", "not valid YAML"),
        ("- name: hello\n", "expected a mapping of kustomization fields, found a sequence"),
        ("", "found an empty document"),
        ("images: hello\n", "`images` must be a list"),
        ("images:\n- hello\n", "images[0] must be a mapping"),
        ("images: [{name: hello, newTag: v1}]\n", "flow-style `images` list"),
        ("images:\n- newTag: v1\n", "images[0] has no `name`"),
        ("images:\n- name: hello\n  newTag: |\n    v1\n", "newTag must be a one-line scalar"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
    ],
)
def test_set_image_refuses_what_it_cannot_edit(text: str, complaint: str) -> None:
    with pytest.raises(KustomizationError) as caught:
        set_image(text, file="overlays/eks/hello/kustomization.yaml", image="hello", ref=REF)
    assert "overlays/eks/hello/kustomization.yaml" in str(caught.value)
    assert complaint in str(caught.value)


def test_components_not_a_list_is_refused() -> None:
    with pytest.raises(KustomizationError, match="k.yaml: `components` must be a list"):
        set_components("components: active\n", file="k.yaml", remove=[], add=["x"])


def test_pinned_overlay_renders_with_kubectl(tmp_path: Path) -> None:
    """kustomize itself reads the edited file as intended: the image is rendered pinned."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text("resources:\n  - pod.yaml\n")
    (base / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  containers:\n"
        "    - name: hello\n      image: hello:v1.0.0\n"
    )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    original = (FIXTURES / "set_image" / "several_images_comments" / "original.yaml").read_text()
    text = set_image(
        original.replace("../../base/hello", "../base")
        .replace("- ingress.yaml\n", "")
        .replace("patches:\n- path: replicas.yaml\n", ""),
        file="k",
        image="hello",
        ref=REF,
    ).text
    (overlay / "kustomization.yaml").write_text(text)
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    assert f"image: {REF.pinned}" in out


def test_crlf_lines_keep_their_carriage_returns() -> None:
    text = (
        "images:\r\n- name: hello\r\n  newName: registry.example.com/team/hello\r\n  newTag: v1\r\n"
        "resources:\r\n- a\r\n"
    )
    result = set_image(text, file="k.yaml", image="hello", ref=REF)
    assert result.text == text.replace("newTag: v1", f"digest: {NEW_DIGEST}  # v1.2.0")


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_pin_images_edits_every_overlay_of_a_work_tree_with_the_golden_edit(tmp_path: Path) -> None:
    from twincd.kustomize import pin_images

    original = (FIXTURES / "set_image" / "tag_to_digest" / "original.yaml").read_text()
    expected = (FIXTURES / "set_image" / "tag_to_digest" / "expected.yaml").read_text()
    work = _tree(tmp_path, {"overlays/eks/hello/kustomization.yaml": original})
    edit = pin_images(
        repo="manifests.git",
        image="hello",
        pins={"overlays/eks/hello/kustomization.yaml": (REF, "overlay of app 'hello' on cluster 'eks'")},
    )
    files, changes = edit(work)
    assert files == {"overlays/eks/hello/kustomization.yaml": expected}  # edits nothing on disk itself
    assert [c.new for c in changes if isinstance(c, ImageChange)] == [NEW]
    already = _tree(tmp_path / "done", {"overlays/eks/hello/kustomization.yaml": expected})
    assert edit(already) == ({}, ())  # already pinned: nothing to commit
    with pytest.raises(
        PermanentError, match=r"overlays/eks/hello/kustomization.yaml does not exist \(overlay"
    ):
        edit(tmp_path / "empty")


def test_switch_components_and_pinned_digests_read_a_work_tree(tmp_path: Path) -> None:
    from twincd.kustomize import pinned_digests, switch_components

    work = _tree(
        tmp_path,
        {
            "overlays/eks/hello/kustomization.yaml": (
                "resources:\n  - ../../../base/hello\ncomponents:\n  - ../../../components/active\n"
                "images:\n  - name: hello\n    newName: registry.example.com/team/hello\n"
                f"    digest: {OLD_DIGEST}\n"
            ),
            "overlays/aks/hello/kustomization.yaml": "resources:\n  - ../../../base/hello\n",
        },
    )
    rel = "overlays/eks/hello/kustomization.yaml"
    files, changes = switch_components(
        {rel: (["../../../components/active"], ["../../../components/standby"])}
    )(work)
    assert "../../../components/standby" in files[rel] and "components/active" not in files[rel]
    assert changes == (ComponentChange(rel, "../../../components/active", "../../../components/standby"),)
    pins = pinned_digests(
        work, image="hello", files={"eks": rel, "aks": "overlays/aks/hello/kustomization.yaml"}
    )
    assert pins == {"eks": OLD_DIGEST, "aks": None}


def test_inputs_digest_follows_what_kustomize_reads_and_declines_remote_bases(tmp_path: Path) -> None:
    from twincd.kustomize import inputs_digest, kustomize_inputs

    files = {
        "lib/real/base/kustomization.yaml": "resources: [../../common]\n",
        "lib/common/kustomization.yaml": "resources: [c.yaml]\n",
        "lib/common/c.yaml": "kind: ConfigMap\n",
        "shared/env=prod/kustomization.yaml": "resources: []\n",
        "app/overlay/kustomization.yaml": (
            "resources: [../base, ../../shared/env=prod]\n"
            "configMapGenerator: [{name: c, literals: [CERTS=/etc/ssl, ROOT=/]}]\n"
            "commonAnnotations: {docs: 'https://example.com/runbook'}\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "app/base").symlink_to(tmp_path / "lib/real/base")  # kustomize follows the link
    inputs = kustomize_inputs(tmp_path, "app/overlay")
    assert {"lib/real/base", "lib/common", "shared/env=prod"} <= inputs  # resolved, whole names too
    assert not any(i.startswith("/") for i in inputs)  # literals naming absolute paths are not read
    before = inputs_digest(tmp_path, "app/overlay")
    assert before is not None  # a URL in an annotation is no remote base
    (tmp_path / "lib/common/c.yaml").write_text("kind: ConfigMap\nmetadata: {name: changed}\n")
    assert inputs_digest(tmp_path, "app/overlay") != before

    remote = "resources:\n- https://github.com/org/repo//deploy?ref=main\n"
    (tmp_path / "app/overlay/kustomization.yaml").write_text(remote)
    assert inputs_digest(tmp_path, "app/overlay") is None  # its content may change with no commit here
    (tmp_path / "app/overlay/kustomization.yaml").write_text("resources: [a?b]\n")  # PyYAML refuses it
    assert inputs_digest(tmp_path, "app/overlay") is None
