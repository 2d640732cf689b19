"""Pure, minimal-diff edits of kustomization.yaml text.

The file is parsed with ruamel.yaml's composer, which gives every node its exact start and end
offsets; the edit is then spliced into the original text. Every byte outside the edited lines
(comments, blank lines, key order, quoting, indentation, each list's own style) stays as it was,
which a dump of the round-trip tree cannot promise: ruamel re-indents all sequences alike and
attaches the comments and blank lines that follow a key to that key, so deleting ``newTag`` would
drop them.

Image entries are pinned the way ``kustomize edit set image name=newName@digest`` pins them:
``newName`` and ``digest`` set, ``newTag`` removed. The tag is kept for people as the trailing
comment of the ``digest`` line (``digest: sha256:...  # v1.2.0``); twincd owns that comment and
rewrites it on every pin.

Supported layouts: block-style ``images:``/``components:`` lists (any indentation), or the key
absent, null or ``[]``. Flow-style entries (``- {name: a, newTag: b}``) and multi-line scalars are
refused with a KustomizationError rather than rewritten.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from twincd.domain import ComponentChange, ComponentEditResult, EditResult, ImageChange, ImageRef
from twincd.errors import PermanentError
from twincd.ports import Edit

_NULL_TAG = "tag:yaml.org,2002:null"
_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./:@+-]*")


class KustomizationError(PermanentError):
    """A kustomization file that cannot be edited safely; the message names the file and the problem."""


@dataclass(frozen=True)
class KustomizeImage:
    """One entry of a kustomization's ``images:`` list, as written (absent fields are "")."""

    name: str
    new_name: str = ""
    new_tag: str = ""
    digest: str = ""

    @property
    def reference(self) -> str:
        """What the entry makes of the image: "newName@digest", "newName:newTag" or the bare name."""
        repo = self.new_name or self.name
        if self.digest:
            return f"{repo}@{self.digest}"
        if self.new_tag:
            return f"{repo}:{self.new_tag}"
        return repo


@dataclass(frozen=True)
class _Splice:
    start: int
    end: int
    text: str


def _apply(text: str, splices: Sequence[_Splice]) -> str:
    # Back to front so earlier offsets stay valid; an insertion at the end offset of a deletion sorts
    # first (higher start), so the inserted text is never swallowed by the deletion.
    out = text
    for s in sorted(splices, key=lambda s: (s.start, s.end), reverse=True):
        out = out[: s.start] + s.text + out[s.end :]
    return out


def _compose(text: str, file: str) -> MappingNode:
    try:
        node = YAML(typ="rt").compose(text)
    except YAMLError as e:
        raise KustomizationError(f"{file}: not valid YAML: {e}") from e
    if not isinstance(node, MappingNode):
        found = (
            "an empty document" if node is None else f"a {type(node).__name__.removesuffix('Node').lower()}"
        )
        raise KustomizationError(f"{file}: expected a mapping of kustomization fields, found {found}")
    if node.flow_style:
        raise KustomizationError(
            f"{file}: a flow-style top-level mapping ({{...}}) cannot be edited in place"
        )
    return node


def _lookup(mapping: MappingNode, key: str) -> tuple[Node, Node] | None:
    for k, v in mapping.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return k, v
    return None


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _line_end(text: str, index: int) -> int:
    """End of the line's content: before "\n", and before a CRLF file's "\r" so that it stays."""
    end = text.find("\n", index)
    end = len(text) if end < 0 else end
    return end - 1 if end > index and text[end - 1] == "\r" else end


def _next_line(text: str, index: int) -> int:
    """Offset of the line after the one holding ``index`` (len(text) on the last line)."""
    end = text.find("\n", index)
    return len(text) if end < 0 else end + 1


def _is_empty(node: Node) -> bool:
    """Null (``images:``, ``~``) or an empty flow list (``[]``): treated as a list without entries."""
    if isinstance(node, ScalarNode):
        return str(node.tag) == _NULL_TAG
    return isinstance(node, SequenceNode) and not node.value


def _scalar_text(value: str, style: str | None) -> str:
    """``value`` written as a YAML scalar in ``style``, or quoted when plain would not read back as it."""
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    if style == '"' or not _PLAIN_SAFE.fullmatch(value) or yaml.safe_load(value) != value:
        # PyYAML resolves as YAML 1.1 (yes/no, 1:20, 0x1f ...): the most eager reader decides.
        return json.dumps(value)
    return value


def _single_line(node: Node, file: str, what: str) -> ScalarNode:
    if (
        not isinstance(node, ScalarNode)
        or node.style in ("|", ">")
        or node.start_mark.line != node.end_mark.line
    ):
        raise KustomizationError(f"{file}: {what} must be a one-line scalar to be edited in place")
    return node


def _last_end(node: Node) -> int:
    """End offset of the last scalar inside ``node`` (block collections end at the next token)."""
    while isinstance(node, (MappingNode, SequenceNode)) and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, MappingNode) else last
    return int(node.end_mark.index)


def _list_indent(root: MappingNode, text: str) -> int:
    """How far this file indents ``- `` under its key, taken from its first block list (kustomize: 0)."""
    for key, value in root.value:
        if isinstance(value, SequenceNode) and not value.flow_style and value.value:
            first = value.value[0]
            dash = text.rfind("-", _line_start(text, first.start_mark.index), first.start_mark.index)
            return int(dash - _line_start(text, dash)) - int(key.start_mark.column)
    return 0


def _append_block(text: str, block: str) -> _Splice:
    """A new top-level key at the end of the file."""
    return _Splice(len(text), len(text), ("" if not text or text.endswith("\n") else "\n") + block)


def _fill_empty(text: str, key: Node, block: str) -> _Splice:
    """Replace a null or ``[]`` value (and the rest of its line) by block-style entries."""
    end = _line_end(text, key.end_mark.index)
    return _Splice(int(key.end_mark.index), end, ":\n" + block.rstrip("\n"))


def _image_lines(image: str, ref: ImageRef, *, dash: int, key: int) -> str:
    lines = [f"{' ' * dash}- name: {_scalar_text(image, None)}"]
    if ref.name != image:
        lines.append(f"{' ' * key}newName: {_scalar_text(ref.name, None)}")
    lines.append(f"{' ' * key}{_digest_line(ref, None)}")
    return "\n".join(lines) + "\n"


def _digest_line(ref: ImageRef, style: str | None) -> str:
    comment = f"  # {ref.tag}" if ref.tag else ""
    return f"digest: {_scalar_text(ref.digest, style)}{comment}"


def images_of(text: str, *, file: str = "kustomization.yaml") -> list[KustomizeImage]:
    """The ``images:`` entries of a kustomization, in file order."""
    root = _compose(text, file)
    found = _lookup(root, "images")
    if found is None or _is_empty(found[1]):
        return []
    return [_read_entry(entry, file, i) for i, entry in enumerate(_entries(found[1], file))]


def _entries(seq: Node, file: str) -> list[MappingNode]:
    if not isinstance(seq, SequenceNode):
        raise KustomizationError(f"{file}: `images` must be a list of entries")
    if seq.flow_style:
        raise KustomizationError(f"{file}: a flow-style `images` list ([...]) cannot be edited in place")
    out = []
    for i, entry in enumerate(seq.value):
        if not isinstance(entry, MappingNode):
            raise KustomizationError(f"{file}: images[{i}] must be a mapping with a `name`")
        out.append(entry)
    return out


def _read_entry(entry: MappingNode, file: str, index: int) -> KustomizeImage:
    fields: dict[str, str] = {}
    for k, v in entry.value:
        if isinstance(k, ScalarNode) and isinstance(v, ScalarNode) and str(v.tag) != _NULL_TAG:
            fields[str(k.value)] = str(v.value)
    if "name" not in fields:
        raise KustomizationError(f"{file}: images[{index}] has no `name`")
    return KustomizeImage(
        name=fields["name"],
        new_name=fields.get("newName", ""),
        new_tag=fields.get("newTag", ""),
        digest=fields.get("digest", ""),
    )


def set_image(text: str, *, file: str, image: str, ref: ImageRef) -> EditResult:
    """Pin ``image`` (the entry's ``name``) to ``ref.name@ref.digest``; already pinned: unchanged."""
    root = _compose(text, file)
    pinned = ImageChange(file=file, image=image, old="", new=ref.pinned)
    found = _lookup(root, "images")
    if found is None:
        dash = _list_indent(root, text)
        block = "images:\n" + _image_lines(image, ref, dash=dash, key=dash + 2)
        return EditResult(_apply(text, [_append_block(text, block)]), (pinned,))
    key, seq = found
    if _is_empty(seq):
        dash = int(key.start_mark.column) + _list_indent(root, text)
        block = _image_lines(image, ref, dash=dash, key=dash + 2)
        return EditResult(_apply(text, [_fill_empty(text, key, block)]), (pinned,))
    entries = _entries(seq, file)
    for i, entry in enumerate(entries):
        current = _read_entry(entry, file, i)
        if current.name == image:
            return _pin_entry(text, entry, current, file=file, ref=ref)
    # A new entry after the last one, indented like it.
    last = entries[-1]
    first_key = last.value[0][0]
    dash = text.rfind("-", _line_start(text, first_key.start_mark.index), first_key.start_mark.index)
    block = _image_lines(
        image, ref, dash=dash - _line_start(text, dash), key=int(first_key.start_mark.column)
    )
    at = _next_line(text, _last_end(last))
    # Comment lines right after the last entry, indented as the list's items, are the list's (a
    # note about what follows, a commented-out entry): the new entry goes after them. When the
    # list is not indented past its key (kustomize's own layout), a comment there may as well be
    # about the next key: it stays where it is.
    column = dash - _line_start(text, dash)
    while column > int(key.start_mark.column) and at < len(text):
        line = text[at : _line_end(text, at)]
        if not line.lstrip().startswith("#") or len(line) - len(line.lstrip()) < column:
            break
        at = _next_line(text, at)
    insert = block if at == 0 or text[at - 1] == "\n" else "\n" + block
    return EditResult(_apply(text, [_Splice(at, at, insert)]), (pinned,))


def _pin_entry(
    text: str, entry: MappingNode, current: KustomizeImage, *, file: str, ref: ImageRef
) -> EditResult:
    if (
        (current.new_name or current.name) == ref.name
        and current.digest == ref.digest
        and not current.new_tag
    ):
        return EditResult(text)
    where = f"images entry {current.name!r}"
    fields = {str(k.value): (k, v) for k, v in entry.value if isinstance(k, ScalarNode)}
    key_col = int(entry.value[0][0].start_mark.column)
    splices: list[_Splice] = []
    inserted: list[str] = []

    if "newName" in fields:
        node = _single_line(fields["newName"][1], file, f"{where}: newName")
        if node.value != ref.name:
            splices.append(
                _Splice(node.start_mark.index, node.end_mark.index, _scalar_text(ref.name, node.style))
            )
    elif current.name != ref.name:
        inserted.append(f"{' ' * key_col}newName: {_scalar_text(ref.name, None)}\n")

    # newTag and digest share one line: the first of them becomes the digest line, the other goes.
    slots = sorted(
        (fields[k] for k in ("newTag", "digest") if k in fields), key=lambda kv: kv[0].start_mark.index
    )
    if slots:
        slot_key, slot_value = slots[0]
        node = _single_line(slot_value, file, f"{where}: {slot_key.value}")
        style = node.style if str(node.tag) != _NULL_TAG else None
        splices.append(
            _Splice(slot_key.start_mark.index, _line_end(text, node.end_mark.index), _digest_line(ref, style))
        )
        for other_key, other_value in slots[1:]:
            _single_line(other_value, file, f"{where}: {other_key.value}")
            splices.append(
                _Splice(
                    _line_start(text, other_key.start_mark.index),
                    _next_line(text, other_value.end_mark.index),
                    "",
                )
            )
    else:
        inserted.append(f"{' ' * key_col}{_digest_line(ref, None)}\n")

    if inserted:
        # Right after `newName` when present, else after `name`: the order kustomize writes.
        anchor = fields.get("newName", fields["name"])
        at = _next_line(text, _single_line(anchor[1], file, f"{where}: {anchor[0].value}").end_mark.index)
        block = "".join(inserted)
        splices.append(_Splice(at, at, block if text[at - 1] == "\n" else "\n" + block.rstrip("\n")))
    change = ImageChange(file=file, image=current.name, old=current.reference, new=ref.pinned)
    return EditResult(_apply(text, splices), (change,))


def _same_path(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def set_components(text: str, *, file: str, remove: Sequence[str], add: Sequence[str]) -> ComponentEditResult:
    """Switch Kustomize Components: drop those in ``remove``, reference those in ``add``.

    A removed entry is replaced in place by an added one (``standby`` → ``active`` stays on its
    line, with its comment); leftover removals delete their lines, leftover additions go after the
    last entry. Nothing to do (already switched) returns the text unchanged and no changes.
    """
    root = _compose(text, file)
    found = _lookup(root, "components")
    items: list[ScalarNode] = []
    if found is not None and not _is_empty(found[1]):
        seq = found[1]
        if not isinstance(seq, SequenceNode):
            raise KustomizationError(f"{file}: `components` must be a list of paths")
        if seq.flow_style:
            raise KustomizationError(
                f"{file}: a flow-style `components` list ([...]) cannot be edited in place"
            )
        items = [_single_line(item, file, f"components[{i}]") for i, item in enumerate(seq.value)]
    present = [str(item.value) for item in items]
    gone = [item for item in items if any(_same_path(str(item.value), r) for r in remove)]
    new: list[str] = []
    for a in add:
        if not any(_same_path(a, p) for p in present + new):
            new.append(a)
    if not gone and not new:
        return ComponentEditResult(text)

    # Each removed entry's place takes one added path; the surplus of either side is handled below.
    replaced = list(zip(gone, new, strict=False))
    changes = [ComponentChange(file=file, removed=str(g.value), added=a) for g, a in replaced]
    splices = [_Splice(g.start_mark.index, g.end_mark.index, _scalar_text(a, g.style)) for g, a in replaced]
    for g in gone[len(new) :]:
        changes.append(ComponentChange(file=file, removed=str(g.value), added=""))
        splices.append(_Splice(_line_start(text, g.start_mark.index), _next_line(text, g.end_mark.index), ""))
    extra = new[len(gone) :]
    changes += [ComponentChange(file=file, removed="", added=a) for a in extra]

    if len(gone) == len(items) and not new and found is not None:
        # Every entry removed: an explicit empty list rather than a dangling `components:`.
        key = found[0]
        splices = [_Splice(key.end_mark.index, _next_line(text, items[-1].end_mark.index), ": []\n")]
    elif extra:
        if items:
            first = items[-1]
            prefix = text[_line_start(text, first.start_mark.index) : first.start_mark.index]
            at = _next_line(text, first.end_mark.index)
            lines = "".join(f"{prefix}{_scalar_text(a, None)}\n" for a in extra)
            splices.append(_Splice(at, at, lines if text[at - 1] == "\n" else "\n" + lines.rstrip("\n")))
        else:
            dash = _list_indent(root, text)
            if found is None:
                lines = "".join(f"{' ' * dash}- {_scalar_text(a, None)}\n" for a in extra)
                splices.append(_append_block(text, "components:\n" + lines))
            else:
                key = found[0]
                dash += int(key.start_mark.column)
                lines = "".join(f"{' ' * dash}- {_scalar_text(a, None)}\n" for a in extra)
                splices.append(_fill_empty(text, key, lines))
    return ComponentEditResult(_apply(text, splices), tuple(changes))


# --------------------------------------------------------------------------------------------------
# Edits of a whole work tree (the `Edit`s the manifests port applies on a branch)
# --------------------------------------------------------------------------------------------------


def pin_images(*, repo: str, image: str, pins: Mapping[str, tuple[ImageRef, str]]) -> Edit:
    """An edit pinning ``image`` in each kustomization file: ``pins[file] = (ref, what the file is)``.

    A file that does not exist is a permanent error naming what it was meant to be (e.g. "overlay
    of app 'hello' on cluster 'eks'"): the manifests repo lacks an overlay the environment names.
    """

    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange | ComponentChange, ...]]:
        files: dict[str, str] = {}
        changes: list[ImageChange | ComponentChange] = []
        for rel, (ref, what) in pins.items():
            path = work / rel
            if not path.exists():
                raise PermanentError(f"{repo}: {rel} does not exist ({what}); add it to the manifests repo")
            result = set_image(path.read_text(), file=rel, image=image, ref=ref)
            if result.changed:
                files[rel] = result.text
                changes.extend(result.changes)
        return files, tuple(changes)

    return edit


def switch_components(edits: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> Edit:
    """An edit making each kustomization file ``edits[file] = (remove, add)`` in its ``components:``."""

    def edit(work: Path) -> tuple[dict[str, str], tuple[ImageChange | ComponentChange, ...]]:
        files: dict[str, str] = {}
        changes: list[ImageChange | ComponentChange] = []
        for rel, (remove, add) in edits.items():
            result = set_components((work / rel).read_text(), file=rel, remove=remove, add=add)
            if result.changed:
                files[rel] = result.text
                changes.extend(result.changes)
        return files, tuple(changes)

    return edit


def pinned_digests(work: Path, *, image: str, files: Mapping[str, str]) -> dict[str, str | None]:
    """key → the digest ``files[key]`` pins ``image`` to (None: not pinned by digest)."""
    pins: dict[str, str | None] = {}
    for key, rel in files.items():
        entries = images_of((work / rel).read_text(), file=rel)
        pins[key] = next((e.digest for e in entries if e.name == image and e.digest), None)
    return pins


# --- what a kustomization reads ------------------------------------------------------------

OVERLAY_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


# Among kustomize_inputs: the overlay reads something this cannot follow (a remote base, a Helm
# chart, a kustomization PyYAML cannot parse although kustomize may).
UNKNOWN = "<unknown>"


def _outside(name: str) -> bool:
    return posixpath.isabs(name) or name == ".." or name.startswith("../")


def _in_repo(root: Path, name: str) -> str | None:
    """``name`` as a path in the repo with symlinks resolved (kustomize follows them), or None when
    it does not exist or leads out of the repo."""
    try:
        real = (root / name).resolve(strict=True).relative_to(root.resolve())
    except (OSError, ValueError):
        return None
    return real.as_posix() if str(real) != "." else "."


# The fields that name other kustomizations or files kustomize may fetch from a remote.
_REFERENCES = ("resources", "bases", "components", "generators", "transformers", "validators", "crds")


def _looks_remote(value: str) -> bool:
    """A remote base or file: ``https://``, ``git@host:``, ``github.com/org/repo/path?ref=``."""
    return "://" in value or value.startswith("git@") or "?ref=" in value or "//" in value.lstrip("/")


def kustomize_inputs(root: Path, path: str, *, missing: bool = False) -> frozenset[str]:
    """The repo paths ``kubectl kustomize <path>`` reads: the directory itself and, followed
    through every kustomization on the way, each existing local file or directory a kustomization
    names (resources, components, patches, generator files...), symlinks resolved; ``UNKNOWN`` when
    it reads what cannot be followed here (a remote base, a chart, a file PyYAML cannot parse).
    Over-approximating is safe (an unneeded render); missing one would leave a render stale, so
    every string that names an existing path counts, whole or after a generator's ``key=``.

    ``missing=True`` also returns the names that do not exist in ``root`` (not followed): what a
    sparse work tree must check out before it can tell."""
    seen: set[str] = set()
    todo = [posixpath.normpath(path)]
    while todo:
        current = todo.pop()
        if current in seen or _outside(current):
            continue
        seen.add(current)
        directory = root / current
        file = next((directory / f for f in OVERLAY_FILES if (directory / f).is_file()), None)
        if file is None:
            continue
        try:
            kustomization = yaml.safe_load(file.read_text())
        except yaml.YAMLError:
            seen.add(UNKNOWN)
            continue
        if isinstance(kustomization, dict) and (
            kustomization.get("helmCharts")
            or any(_looks_remote(v) for k in _REFERENCES for v in _strings(kustomization.get(k)))
        ):
            seen.add(UNKNOWN)  # a chart or a base fetched from elsewhere
        for joined in _named(current, kustomization):
            named = _in_repo(root, joined)
            if named is None:
                if missing:
                    seen.add(joined)
            elif (root / named).is_dir():
                todo.append(named)
            else:
                seen.add(named)
    return frozenset(seen)


def _named(current: str, kustomization: Any) -> Iterable[str]:
    """The repo paths a kustomization's strings may name, whole or after a generator's ``key=``."""
    for value in _strings(kustomization):
        if "://" in value:
            continue
        for candidate in {value, value.rpartition("=")[2]}:
            if candidate and not posixpath.isabs(candidate):
                joined = posixpath.normpath(posixpath.join(current, candidate))
                if not _outside(joined):
                    yield joined


def touches(changed: Iterable[str], inputs: Iterable[str]) -> bool:
    """Whether a changed file is one of ``inputs`` or lies under one of them."""
    prefixes = tuple(p.rstrip("/") + "/" for p in inputs if p != ".")
    return "." in inputs or any(f in inputs or f.startswith(prefixes) for f in changed)


def inputs_digest(root: Path, path: str) -> str | None:
    """A digest of everything ``kubectl kustomize <path>`` reads in the work tree ``root``: the
    paths of :func:`kustomize_inputs` and every file below them, names and bytes. Equal digests
    render equally, whichever commit they come from, so a render can be kept by it. None when the
    overlay reads what no digest here can vouch for (``UNKNOWN``)."""
    inputs = kustomize_inputs(root, path)
    if UNKNOWN in inputs:
        return None
    digest = hashlib.sha256(path.encode())
    files: set[Path] = set()
    for name in inputs:
        where = root / name
        if where.is_dir():
            files.update(
                f for f in where.rglob("*") if f.is_file() and ".git" not in f.relative_to(root).parts
            )
        else:
            files.add(where)
    for file in sorted(files):
        digest.update(b"\0" + str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
