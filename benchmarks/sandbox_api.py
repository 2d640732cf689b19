"""Create N ConfigMaps and N Deployments through the official client, then list them.

Prints seconds and objects/s per phase. By default the server runs in a thread of this process
(as in the local stack, where it shares the GIL with its clients); ``--subprocess`` runs it as
``python -m twincd.sandbox.apiserver`` to see the server without that contention.

    .venv/bin/python benchmarks/sandbox_api.py [--count 1000] [--subprocess]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from kubernetes import client

from twincd.sandbox.apiserver import create_app, serve_in_thread


@contextmanager
def threaded_server() -> Iterator[str]:
    running = serve_in_thread(create_app("bench"))
    try:
        yield running.url
    finally:
        running.stop()


@contextmanager
def subprocess_server() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "twincd.sandbox.apiserver", "--name", "bench", "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/readyz")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the API server subprocess did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def deployment(name: str) -> dict[str, Any]:
    labels = {"app": name, "bench": "yes"}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": f"registry.test/{name}@sha256:{'0' * 64}",
                            "ports": [{"containerPort": 8080}],
                        },
                        {"name": "sidecar", "image": "registry.test/proxy:1"},
                    ]
                },
            },
        },
    }


def timed(label: str, count: int, action: Callable[[], object]) -> None:
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    print(f"{label:<28} {seconds:8.3f} s {count / seconds:10.0f} objects/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--subprocess", action="store_true", help="run the server in its own process")
    args = parser.parse_args()
    count: int = args.count
    with subprocess_server() if args.subprocess else threaded_server() as url:
        configuration = client.Configuration()
        configuration.host = url
        with client.ApiClient(configuration) as api:
            core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
            core.create_namespace({"metadata": {"name": "bench"}})
            print(f"server: {'subprocess' if args.subprocess else 'thread in this process'}, {count} of each")

            def create_configmaps() -> None:
                for i in range(count):
                    core.create_namespaced_config_map(
                        "bench", {"metadata": {"name": f"cm-{i}"}, "data": {"key": "value" * 20}}
                    )

            def create_deployments() -> None:
                for i in range(count):
                    apps.create_namespaced_deployment("bench", deployment(f"app-{i}"))

            def list_configmaps() -> None:
                assert len(core.list_namespaced_config_map("bench").items) == count

            def list_deployments() -> None:
                assert len(apps.list_namespaced_deployment("bench").items) == count

            def list_deployments_raw() -> None:
                assert httpx.get(f"{url}/apis/apps/v1/namespaces/bench/deployments").json()["items"][
                    count - 1
                ]

            timed("create ConfigMaps", count, create_configmaps)
            timed("create Deployments", count, create_deployments)
            timed("list ConfigMaps (client)", count, list_configmaps)
            timed("list Deployments (client)", count, list_deployments)
            timed("list Deployments (raw HTTP)", count, list_deployments_raw)


if __name__ == "__main__":
    main()
