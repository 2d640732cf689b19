"""Label and field selectors: which objects a list or watch sees."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from twincd.sandbox.apiserver.errors import bad_request
from twincd.sandbox.apiserver.resources import JSON

_LABEL_KEY = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_SET_TERM = re.compile(r"(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)")
_FIELDS: dict[str, Callable[[JSON], str]] = {
    "metadata.name": lambda obj: str(obj["metadata"].get("name", "")),
    "metadata.namespace": lambda obj: str(obj["metadata"].get("namespace", "")),
}


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector; ``op`` is one of = != in notin exists !exists."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return present
            case "!exists":
                return not present
            case "=" | "in":
                return value in self.values
            case _:  # "!=" and "notin" match objects without the label, as upstream does
                return value not in self.values


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` has two terms)."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


def _parse_requirement(term: str) -> Requirement:
    if match := _SET_TERM.fullmatch(term):
        key, op = match["key"], match["op"]
        values = frozenset(value.strip() for value in match["values"].split(",") if value.strip())
    elif term.startswith("!"):
        key, op, values = term[1:].strip(), "!exists", frozenset()
    elif "=" in term:
        op = "!=" if "!=" in term else "="
        key, _, value = term.replace("==", "=").replace("!=", "=").partition("=")
        key, values = key.strip(), frozenset([value.strip()])
    else:
        key, op, values = term, "exists", frozenset()
    if not _LABEL_KEY.fullmatch(key) or not all(_LABEL_VALUE.fullmatch(value) for value in values):
        raise bad_request(f'unable to parse requirement: invalid label selector term "{term}"')
    return Requirement(key, op, values)


@dataclass(frozen=True)
class Selection:
    """Which objects a list or watch sees: a namespace (None = all) plus label and field selectors."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()  # (field, "=" or "!=", value)

    @classmethod
    def parse(cls, namespace: str | None, label_selector: str = "", field_selector: str = "") -> Selection:
        fields = []
        for term in _split_top_level(field_selector):
            op = "!=" if "!=" in term else "="
            name, _, value = term.replace("==", "=").replace("!=", "=").partition("=")
            if name.strip() not in _FIELDS:
                raise bad_request(f'field label not supported: "{name.strip()}"')
            fields.append((name.strip(), op, value.strip()))
        labels = tuple(_parse_requirement(term) for term in _split_top_level(label_selector))
        return cls(namespace, labels, tuple(fields))

    def matches(self, obj: JSON) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(requirement.matches(labels) for requirement in self.labels):
            return False
        return all((_FIELDS[name](obj) == value) == (op == "=") for name, op, value in self.fields)
