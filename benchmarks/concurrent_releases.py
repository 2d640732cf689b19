"""N releases of N apps at once into one manifests monorepo, through the stack's runner.

A local stack of its own (free ports, a temporary state dir): N apps (app0 … app<N-1>, each its
own repository tagged v1.0.0, its own image, its own namespace on both sandbox clusters, one
manifests monorepo). N runs of the ``deploy`` deployment are created at once through the Prefect
API (``auto_approve``: nobody to wait for), executed by the stack's runner (``twincd serve``, N
processes at most), each building, pushing, pinning, merging into ``main`` through the local
forge and verifying on both clusters. Then, from git itself:

- merged: apps whose release branch was merged into ``main`` and whose overlays on ``main`` pin
  the digest the run pushed;
- lost commits: runs that ended Completed whose change is not on ``main``;
- duplicated: apps whose release branch was merged more than once.

Peak memory is the largest sum, sampled every 0.5 s, of the resident memory of the runner, the
Prefect server and every flow-run process.

    .venv/bin/python benchmarks/concurrent_releases.py [--releases 10] [--rollout-seconds 300]

The last line reads ``releases N: merged M, failed F, lost commits L, duplicated D, wall S s``.

With ``--waiting``, the N releases wait for approval instead: once every one is suspended, the
flow-run processes still alive are counted and the runner's and the server's resident memory
compared with theirs before the releases started; the last line reads
``waiting releases N: flow processes P, runner + server X MB (Y MB before)``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from monorepo_size import CLUSTERS, environment  # benchmarks/ is the script's own directory

from twincd.config import load_environment
from twincd.sandbox import procs, stack
from twincd.sandbox.stack import git_root

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


def apps_environment(root: Path, n: int, rollout_seconds: float) -> Path:
    path = environment(root)
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    git = raw["manifests"]["repo"].rsplit("/", 1)[0]
    template = raw["apps"]["hello"]
    raw["apps"] = {
        f"app{i}": {
            **template,
            "repo": f"{git}/app{i}.git",
            "image": f"app{i}",
            "workload": {"kind": "Deployment", "namespace": f"app{i}", "name": f"app{i}"},
        }
        for i in range(n)
    }
    raw["timeouts"] = {"approval_seconds": 600, "rollout_seconds": rollout_seconds}
    raw["sandbox"]["runner_processes"] = n
    raw["sandbox"]["runner_schedules"] = False
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def create_run(api: str, deployment: str, parameters: dict[str, Any]) -> str:
    """A run of the deployment; a 503 (SQLite busy: "database is locked") is asked again, as
    Prefect's own client does (PREFECT_CLIENT_MAX_RETRIES)."""
    for attempt in range(8):
        created = httpx.post(
            f"{api}/deployments/{deployment}/create_flow_run", json={"parameters": parameters}
        )
        if created.status_code != 503:
            break
        time.sleep(0.5 * 2**attempt)
    if created.status_code != 201:
        raise SystemExit(f"the Prefect API refused the run: {created.status_code} {created.text[:500]}")
    return str(created.json()["id"])


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", type=int, default=10, help="N: releases of N apps at once")
    parser.add_argument("--rollout-seconds", type=float, default=300)
    parser.add_argument("--waiting", action="store_true", help="releases that wait for approval")
    args = parser.parse_args()
    n = args.releases
    with tempfile.TemporaryDirectory(prefix="twincd-concurrent-") as tmp:
        env_file = apps_environment(Path(tmp), n, args.rollout_seconds)
        env = load_environment(env_file)
        api = env.prefect.api_url.rstrip("/")
        try:
            t = time.perf_counter()
            stack.up(env, say=lambda line: None)
            print(f"stack with {n} apps up in {time.perf_counter() - t:.1f} s")
            server = [
                p
                for name in (stack.RUNNER, stack.PREFECT)
                if (p := procs.daemon_status(name, state_dir=env.state_path))
            ]
            deployment = httpx.get(f"{api}/deployments/name/deploy/deploy").json()["id"]
            if args.waiting:
                waiting(api, deployment, env_file, n, server)
                return
            peak = [0.0]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_mb(server + procs.flow_run_processes()))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            runs = {
                f"app{i}": create_run(
                    api,
                    deployment,
                    {"app": f"app{i}", "tag": "v1.0.0", "env": str(env_file), "auto_approve": True},
                )
                for i in range(n)
            }
            states: dict[str, dict[str, Any]] = {}
            while len(states) < n:
                for app, run_id in runs.items():
                    if app not in states:
                        state = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]
                        if state and state["type"] in FINAL:
                            states[app] = state
                time.sleep(1)
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            merged, lost, duplicated = count(git_root(env) / "manifests.git", states)
        finally:
            stack.down(env, say=lambda line: None)
    failed = [
        f"{app}: {s['name']}: {(s.get('message') or '')[:200]}"
        for app, s in sorted(states.items())
        if s["type"] != "COMPLETED"
    ]
    for line in failed:
        print(line)
    print(f"peak resident memory (runner + server + flow processes): {peak[0]:.0f} MB")
    print(
        f"releases {n}: merged {merged}, failed {len(failed)}, lost commits {lost}, "
        f"duplicated {duplicated}, wall {wall:.1f} s"
    )


def waiting(api: str, deployment: str, env_file: Path, n: int, server: list[int]) -> None:
    before = rss_mb(server)
    runs = [
        create_run(api, deployment, {"app": f"app{i}", "tag": "v1.0.0", "env": str(env_file)})
        for i in range(n)
    ]
    t0 = time.perf_counter()
    while True:
        states = [httpx.get(f"{api}/flow_runs/{r}").json()["state"] for r in runs]
        if all(s and s["name"] == "Suspended" for s in states):
            break
        if any(s and s["type"] in FINAL for s in states):
            raise SystemExit(
                "a release ended instead of waiting: "
                + str([s["message"] for s in states if s["type"] in FINAL])
            )
        time.sleep(1)
    print(f"{n} releases suspended, waiting for approval, after {time.perf_counter() - t0:.1f} s")
    time.sleep(5)  # their processes exit once the suspension is recorded
    alive, now = len(procs.flow_run_processes()), rss_mb(server)
    print(
        f"waiting releases {n}: flow processes {alive}, runner + server {now:.0f} MB ({before:.0f} MB before)"
    )


def count(bare: Path, states: dict[str, dict[str, Any]]) -> tuple[int, int, int]:
    """(merged, lost, duplicated) from the manifests repository's ``main``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--git-dir", str(bare), *args], capture_output=True, text=True, check=True
        ).stdout

    merged = lost = duplicated = 0
    for app, state in states.items():
        branch = f"twincd/{app}/v1.0.0"
        merges = git("log", "--merges", "--format=%H", f"--grep=Merge branch '{branch}'", "main").split()
        pinned = all(
            "digest: sha256:" in git("show", f"main:overlays/{c}/{app}/kustomization.yaml") for c in CLUSTERS
        )
        if merges and pinned:
            merged += 1
        elif state["type"] == "COMPLETED":
            lost += 1
        duplicated += len(merges) > 1
    return merged, lost, duplicated


if __name__ == "__main__":
    main()
