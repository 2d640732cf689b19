"""Patches: JSON merge patch (RFC 7386), strategic merge patch as clients use it, JSON patch (RFC 6902)."""

from __future__ import annotations

from typing import Any, Literal

from twincd.sandbox.apiserver.errors import ApiError, bad_request
from twincd.sandbox.apiserver.resources import copy_json

PatchType = Literal["json", "merge", "strategic"]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# The merge keys of the Kubernetes list fields the sandbox's clients patch (from the
# ``patchMergeKey`` tags of k8s.io/api). Lists not named here are replaced, as upstream does for
# lists without a merge strategy.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def _merge_key(field_name: str, items: list[Any]) -> str | None:
    if field_name == "ports":  # container ports merge on containerPort, Service ports on port
        return "containerPort" if any(isinstance(i, dict) and "containerPort" in i for i in items) else "port"
    return _MERGE_KEYS.get(field_name)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, reduced to what clients send in practice.

    A merge patch, except that lists with a known merge key merge element by element (a patch with
    one container must not drop the others), ``$patch: delete`` removes such an element,
    ``$patch: replace`` replaces a map, and kubectl's ordering directives are ignored.
    """
    if not isinstance(patch, dict):
        return patch
    if patch.get("$patch") == "replace":
        return {key: value for key, value in patch.items() if key != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        merge_key = _merge_key(key, value) if isinstance(value, list) else None
        if value is None:
            result.pop(key, None)
        elif merge_key is not None and isinstance(value, list):
            result[key] = _merge_list(result.get(key) or [], value, merge_key)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(current: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    merged = list(current)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise bad_request(f"strategic merge patch: list element without merge key {merge_key!r}")
        position = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, dict) and old.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del merged[position]
        elif position is None:
            merged.append(strategic_merge_patch({}, item))
        else:
            merged[position] = strategic_merge_patch(merged[position], item)
    return merged


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc


def _json_patch_add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if not 0 <= index <= len(parent):
            raise IndexError(f"index {index} out of range")
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _json_patch_remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise KeyError("cannot remove the whole document")
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    return parent.pop(int(last) if isinstance(parent, list) else last)


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; ``doc`` is modified in place and returned."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    for operation in operations:
        try:
            op, tokens = operation["op"], _pointer(operation["path"])
            match op:
                case "add":
                    doc = _json_patch_add(doc, tokens, operation["value"])
                case "remove":
                    _json_patch_remove(doc, tokens)
                case "replace":
                    _walk(doc, tokens)  # the target must exist, unlike for add
                    if tokens:
                        _json_patch_remove(doc, tokens)
                    doc = _json_patch_add(doc, tokens, operation["value"])
                case "move" | "copy":
                    source = _pointer(operation["from"])
                    value = _json_patch_remove(doc, source) if op == "move" else copy_json(_walk(doc, source))
                    doc = _json_patch_add(doc, tokens, value)
                case "test":
                    if _walk(doc, tokens) != operation["value"]:
                        raise ValueError(f"test failed at {operation['path']}")
                case _:
                    raise ValueError(f"unknown operation {op!r}")
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise ApiError(422, "Invalid", f"the json patch could not be applied: {error!r}") from error
    return doc
