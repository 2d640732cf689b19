"""One sandbox cluster as one process: API server + Deployment controller + Argo-CD-like syncer.

``python -m twincd.sandbox.cluster --name eks --port 6441 --manifests .twincd/git/manifests.git
--argocd-api http://127.0.0.1:6442`` serves the in-memory API server of ``twincd.sandbox.apiserver``
and runs the controllers of ``twincd.sandbox.controllers`` against it over HTTP, exactly as they
would run against a real cluster. In the reference setup one Argo CD (on the AKS side) manages both
clusters, so the EKS process publishes its Applications to the AKS process (``--argocd-api``); the
default is the cluster itself.

SIGTERM or SIGINT stop everything and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from twincd.sandbox.apiserver import create_app, serve_in_thread
from twincd.sandbox.controllers import DeploymentController, ManifestsSyncer
from twincd.sandbox.controllers.pulls import load_pull_secret
from twincd.sandbox.controllers.syncer import RECONCILE_SECONDS

log = logging.getLogger(__name__)


def run_cluster(
    *,
    name: str,
    port: int,
    manifests: str,
    argocd_api: str | None = None,
    overlay: str | None = None,
    application: str = "{app}-{cluster}",
    argocd_namespace: str = "argocd",
    reconcile_seconds: float = RECONCILE_SECONDS,
    host: str = "127.0.0.1",
    pull_secret: Path | None = None,
    stop: threading.Event,
) -> None:
    """Serve cluster ``name`` on ``host:port`` and reconcile it until ``stop`` is set."""
    server = serve_in_thread(create_app(name), host=host, port=port)
    auths = load_pull_secret(pull_secret) if pull_secret else None
    controller = DeploymentController(server.url, stop, pull_auths=auths)
    syncer = ManifestsSyncer(
        cluster=name,
        repo=manifests,
        api_url=server.url,
        argocd_api_url=argocd_api or server.url,
        stop=stop,
        overlay=overlay,
        application=application,
        argocd_namespace=argocd_namespace,
        reconcile_seconds=reconcile_seconds,
    )
    threads = [
        threading.Thread(target=controller.run, name=f"{name}-deployment-controller", daemon=True),
        threading.Thread(target=syncer.run, name=f"{name}-syncer", daemon=True),
    ]
    for thread in threads:
        thread.start()
    log.info("cluster %s serving at %s (Applications go to %s)", name, server.url, argocd_api or server.url)
    try:
        stop.wait()
    finally:
        stop.set()
        # The loops notice ``stop`` within a tick; a request in flight ends within its timeout.
        for thread in threads:
            thread.join(15)
        # Closing the server also ends the controller's watch stream.
        server.stop()
    log.info("cluster %s stopped", name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="A sandbox cluster: API server, Deployment controller and Argo-CD-like syncer."
    )
    parser.add_argument("--name", required=True, help="the cluster's name, e.g. eks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6441)
    parser.add_argument(
        "--manifests", required=True, help="the manifests repo: a bare repo path or a git URL"
    )
    parser.add_argument(
        "--argocd-api",
        default=None,
        help="API URL of the cluster that holds the Applications (default: this one)",
    )
    parser.add_argument(
        "--overlay", default=None, help="the cluster's overlay path in the repo (default: overlays/<name>)"
    )
    parser.add_argument("--application", default="{app}-{cluster}", help="the Applications' name template")
    parser.add_argument("--argocd-namespace", default="argocd", help="the Applications' namespace")
    parser.add_argument(
        "--reconcile-seconds",
        type=float,
        default=RECONCILE_SECONDS,
        help="Argo CD's timeout.reconciliation: seconds between comparisons with git (plus up to 60 s "
        "of jitter) of an Application nobody asked to refresh",
    )
    parser.add_argument(
        "--pull-secret", type=Path, default=None, help="a .dockerconfigjson the kubelet pulls images with"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s"
    )
    # httpx (the Deployment controller's registry pull checks) logs every request at INFO: several
    # per second would drown the sync log.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    run_cluster(
        name=args.name,
        port=args.port,
        manifests=args.manifests,
        argocd_api=args.argocd_api,
        overlay=args.overlay,
        application=args.application,
        argocd_namespace=args.argocd_namespace,
        reconcile_seconds=args.reconcile_seconds,
        host=args.host,
        pull_secret=args.pull_secret,
        stop=stop,
    )


if __name__ == "__main__":
    main()
