"""HTTP health probe through a cluster's ingress IP (the ``Probe`` port), with httpx."""

from __future__ import annotations

import httpx

TIMEOUT = 5.0


class HttpProbe:
    def __init__(self, *, timeout: float = TIMEOUT) -> None:
        self._timeout = timeout

    def check(self, url: str, *, host: str) -> tuple[bool, str]:
        """One GET of ``url`` with ``host`` as the Host header (what a client resolving DNS gets)."""
        try:
            r = httpx.get(
                url,
                headers={"Host": host} if host else {},
                timeout=self._timeout,
                follow_redirects=False,
                trust_env=False,
            )
        except httpx.HTTPError as e:
            return False, f"GET {url}: {type(e).__name__}"
        return r.status_code < 400, f"GET {url}: HTTP {r.status_code}"
