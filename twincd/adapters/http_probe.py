"""HTTP health probe through a cluster's ingress IP (the ``Probe`` port), with httpx.

A client that resolved the app's name connects to one of the ingress IPs, sends the name as
``Host`` and, over TLS, as SNI, and checks the certificate against the name. The probe does the
same through each IP, so it reaches the app the way clients will: the ingress routes by Host/SNI,
and a default backend or a certificate for another name is not the app. Only 2xx is healthy: an
ingress-nginx HTTP→HTTPS redirect (308) or a login redirect answers without reaching the app.
"""

from __future__ import annotations

import ssl

import httpx

TIMEOUT = 5.0


class HttpProbe:
    def __init__(self, *, timeout: float = TIMEOUT) -> None:
        self._timeout = timeout

    def check(self, url: str, *, host: str, ca_file: str | None = None) -> tuple[bool, str]:
        """One GET of ``url`` (its host an ingress IP) as a client of ``host`` would send it."""
        # httpcore opens TLS with server_hostname = the `sni_hostname` extension when given, and the
        # default context's check_hostname then verifies the certificate for that name, not the IP.
        context = ssl.create_default_context(cafile=ca_file)
        try:
            with httpx.Client(verify=context, timeout=self._timeout, trust_env=False) as client:
                r = client.get(
                    url,
                    headers={"Host": host},
                    extensions={"sni_hostname": host},
                    follow_redirects=False,
                )
        except httpx.ConnectError as e:
            bad = _cert_error(e)
            if bad is not None:
                return (
                    False,
                    f"GET {url} as {host}: certificate verification failed for {host}: {bad.verify_message}",
                )
            return False, f"GET {url} as {host}: {type(e).__name__}"
        except httpx.HTTPError as e:
            return False, f"GET {url} as {host}: {type(e).__name__}"
        shown = f"GET {url} as {host}: HTTP {r.status_code}"
        if 300 <= r.status_code < 400:
            shown += f" (a redirect to {r.headers.get('location', '?')} does not reach the app)"
        return 200 <= r.status_code < 300, shown


def _cert_error(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure under httpx's ConnectError (httpx ← httpcore ← ssl)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
