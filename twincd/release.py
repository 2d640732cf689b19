"""Release tags: checked before anything touches a repository, a registry or a cluster."""

from __future__ import annotations

import re

from twincd.config import Environment
from twincd.domain import ImageRef, PushedImage
from twincd.errors import PermanentError

# Characters a shell, a URL, an image tag or `git check-ref-format` could misread are refused
# outright, whatever the app's pattern allows. Image tags allow [A-Za-z0-9_.-], max 128 chars.
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class BadTag(PermanentError):
    pass


def check_tag(*, app: str, tag: str, pattern: str) -> str:
    """Return ``tag`` when it is safe and matches the app's pattern; else raise BadTag saying why."""
    if not _SAFE.match(tag) or ".." in tag or tag.endswith((".lock", ".")):
        raise BadTag(
            f"tag {tag!r} of app {app!r} is not a safe release tag: use letters, digits, '.', '_' and '-' "
            "(at most 128, not starting with '-' or '.', no '..', not ending in '.lock')"
        )
    if not re.fullmatch(pattern, tag):
        raise BadTag(f"tag {tag!r} of app {app!r} does not match the app's tag_pattern {pattern!r}")
    return tag


def pull_ref(env: Environment, app: str, cluster: str, pushed: PushedImage) -> ImageRef:
    """The image as the registry ``cluster`` pulls from holds it (one registry per cloud is common)."""
    return pushed.ref_for(env.pull_registry(app, cluster), env.app(app).image)
