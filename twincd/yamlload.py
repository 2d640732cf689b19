"""Loading rendered manifests (kustomize output) fast, with exactly the semantics they had before.

The reference is PyYAML's safe loader with timestamps left as strings (``KubeLoader``): YAML 1.1,
as the API server reads YAML through sigs.k8s.io/yaml (go-yaml v2), which also keeps
timestamp-looking scalars as strings. Once validation is compiled, parsing is ~95 % of the cost,
and libyaml through PyYAML manages ~7,000 documents/s here.

``yaml_rs`` (a Rust parser, ~4x faster) reads YAML 1.2's core schema, which resolves some plain
scalars differently: ``yes``/``no``/``on``/``off`` stay strings, ``0777`` is decimal, ``1e3`` a
float, ``12:30`` is no sexagesimal number, ``<<`` no merge key. So each document is given to it only
when a scan finds no plain scalar of those shapes, no flow collection with content, no tag,
anchor or directive; otherwise, or when it refuses the text, the document goes to ``KubeLoader``.
The scan over-approximates (a ``no`` inside a longer plain or quoted line also sends the document
the slow way); tests/unit/test_yamlload.py holds both paths to the same result for every shape.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
import yaml_rs

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class KubeLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe loading, with timestamps left as strings (what sigs.k8s.io/yaml gives the API server)."""


KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}

# Plain scalars YAML 1.1 (PyYAML) and yaml_rs resolve differently (or one of them refuses).
_DIVERGENT = (
    r"(?:[Yy]es|YES|[Nn]o|NO|[Oo]n|ON|[Oo]ff|OFF"
    r"|[-+]?0[0-9_]+"  # leading zeros: octal in 1.1
    r"|[-+]?0[oOxXbB][0-9a-fA-F_]*"  # 0o17, 0X1F, 0b101
    r"|[-+]?[0-9][0-9_]*(?::[0-9_]+)+(?:\.[0-9_]*)?"  # sexagesimal numbers, times
    r"|[-+]?\.?[0-9][0-9_.]*[eE][-+]?[0-9_]*"  # exponents (1.1 wants a dot and a sign)
    r"|[-+]?\.?_[0-9_.eE+-]*"  # a leading underscore
    r"|[-+]\.[0-9][0-9_]*"  # a signed fraction without digits before the dot
    r"|[-+]?\.(?:[iI][nN][fF]|[nN][aA][nN])"  # infinities and NaN in any case
    r"|=|<<)"
)
# Python's re is fast only from a literal prefix, and an alternation is tried branch by branch at
# every place the prefix occurs: each check below starts with a literal, and a lookahead on the
# first characters a divergent scalar can start with rejects almost every place at once (2.9 MB of
# manifests scanned in ~40 ms instead of ~300 ms). Keys are checked on what yaml_rs made
# (``_keys_agree``) instead of by a scan.
_FIRST = r"(?=[YyNnOo0-9+\-._=<])"
_PLAIN = rf"[ \t]*{_FIRST}{_DIVERGENT}[ \t]*(?:#[^\n]*)?$"
_CHECKS = tuple(
    re.compile(pattern, re.M)
    for pattern in (
        f": {_PLAIN}",  # a value after its key
        f"- {_PLAIN}",  # a list item
        f":\n{_PLAIN}",  # a value alone on the line after its key
        f"-\n{_PLAIN}",  # ... after a dash alone
        f"#[^\n]*\n{_PLAIN}",  # ... after a comment
        r" [\[{](?![\]}])",  # a flow collection with content
        r"\n[!&*%\[{]",  # a tag, anchor, alias, directive or flow collection at a line's start
        r" [!&*%]",  # a tag, anchor or alias
        r"[|>][-+0-9]*[ \t]*(?:#[^\n]*)?\n[ \t]*\n",  # a block scalar with a blank line (chomping)
        r"\n\.\.\.",  # a document end marker
        r"\n---[ \t]*[^\s#]",  # a separator with content on its line
    )
)
_COMPLEX_KEYS = (" ? ", "\n? ", "\n?\n")
# Line breaks and characters YAML 1.1 (PyYAML) treats otherwise, a byte order mark; escapes in
# double-quoted scalars (YAML 1.1 knows fewer).
_ASCII_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\r\t]")
_CHARACTERS = re.compile(
    r"[\r\t\x85\u2028\u2029\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]"
)
_ESCAPE = re.compile(r"\\[uUxNLP_ ]")
_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)
_WORD_KEYS = frozenset(
    ["yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF", "=", "<<"]
)
_DIVERGENT_KEY = re.compile(_DIVERGENT)
_KEY_STARTS = frozenset("0123456789+-._")


def _suspect(text: str) -> bool:
    """Whether ``text`` may hold something yaml_rs reads otherwise than PyYAML (over-approximated)."""
    return (
        text[:1] in ("!", "&", "*", "%", "[", "{", "?", ".")
        or any(check.search(text) is not None for check in _CHECKS)
        or any(key in text for key in _COMPLEX_KEYS)
    )


def _characters_differ(text: str) -> bool:
    """Characters or escapes the two parsers treat differently anywhere in ``text``."""
    if ("\\" in text and _ESCAPE.search(text) is not None) or "\r" in text or "\t" in text:
        return True
    pattern = _ASCII_CHARACTERS if text.isascii() else _CHARACTERS
    return pattern.search(text) is not None


def _keys_agree(doc: Any) -> bool:
    """Whether every key yaml_rs made is one PyYAML makes too: a string that no YAML 1.1 rule turns
    into a bool, a number or a merge (a non-string key came from a plain number: unsure)."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            for key, value in node.items():
                if type(key) is not str or key in _WORD_KEYS:
                    return False
                if key[:1] in _KEY_STARTS and _DIVERGENT_KEY.fullmatch(key):
                    return False
                if type(value) is dict or type(value) is list:
                    stack.append(value)
        elif type(node) is list:
            stack.extend(v for v in node if type(v) is dict or type(v) is list)
    return True


def _slow(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=KubeLoader))


def _one(chunk: str, scan: bool) -> list[Any] | None:
    """The document of one chunk (``[]`` when it holds none) from yaml_rs, or None when PyYAML must
    read it: it may diverge, yaml_rs refused it, or its root is no collection (a plain scalar root
    is not checked by the scans)."""
    if scan and _suspect("\n" + chunk):
        return None
    if not chunk.strip():
        return []
    try:
        doc = yaml_rs.loads(chunk, parse_datetime=False)
    except (yaml_rs.YAMLDecodeError, ValueError, TypeError):
        return None
    if doc is None:
        return []
    if type(doc) not in (dict, list) or not _keys_agree(doc):
        return None
    return [doc]


def load_documents(text: str) -> list[Any]:
    """Every YAML document of ``text``, as PyYAML's ``KubeLoader`` reads them (``None`` for an empty
    one after a separator). Raises ``yaml.YAMLError`` as PyYAML does, about the whole text."""
    if _characters_differ(text):
        return _slow(text)
    # One scan of the whole text; only when it finds something is each document scanned alone.
    scan = _suspect(text)
    docs: list[Any] = []
    for i, chunk in enumerate(_SEPARATOR.split(text)):
        parsed = _one(chunk, scan)
        if parsed is None:
            try:
                parsed = _slow(chunk)
            except yaml.YAMLError:
                return _slow(text)  # the error as PyYAML reports it for the whole text
            if len(parsed) > 1:  # a separator this split did not see ("--- |")
                return _slow(text)
        if i == 0:
            docs.extend(parsed)  # before the first separator there may be no document at all
        else:
            docs.append(parsed[0] if parsed else None)
    return docs
