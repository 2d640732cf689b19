"""One deploy into a 1-app manifests monorepo and into a 500-app one, each step's time from Prefect.

A local stack of its own (free ports, a temporary state dir, `twincd up`'s services). The small
repo is the stack's seeded one (hello on eks and aks). The large one holds hello and 499 other
apps on both clusters and 10,000 commits of history (git fast-import), served by the same git
server. ``--releases`` + 1 releases of hello are deployed into each, in turn: the first builds the
image and fills the worker's mirror of each repo (not compared), the others are a worker's steady
state, compared by their medians.

Build and rollout are excluded, as the goal says: the image is built once (later deploys find it
in the registry), and the large repo has no Argo CD watching it, so its verification is cut short
(``timeouts.rollout_seconds: 5``, no revert) — only the steps before it are compared.

    .venv/bin/python benchmarks/monorepo_size.py [--apps 500] [--commits 10000] [--releases 5]

The last line reads ``deploy, 1 app vs N apps x 2 clusters with C commits: X s vs Y s, ratio R``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from twincd.config import DEFAULT_ENV, load_environment
from twincd.sandbox import seed, stack
from twincd.sandbox.procs import free_port
from twincd.sandbox.stack import git_root

CLUSTERS = ("eks", "aks")
# What a deploy of an image already built does before the rollout: the steps compared.
STEPS = ("check-release", "set-image", "open-merge-request", "validate", "post-validation", "merge")


def environment(root: Path) -> Path:
    """The embedded default environment on free ports under ``root`` (as the e2e tests make it)."""
    env = yaml.safe_load(DEFAULT_ENV.read_text())
    state = root / "state"
    git = f"http://127.0.0.1:{free_port()}"
    env.update(
        state_dir=str(state),
        prefect={"api_url": f"http://127.0.0.1:{free_port()}/api"},
        git={"credentials": [{"url": f"{git}/", "username": "twincd", "token": "env:TWINCD_GIT_TOKEN"}]},
        registries={
            "local": {
                "url": f"127.0.0.1:{free_port()}",
                "insecure": True,
                "username": "twincd",
                "password": "env:TWINCD_REGISTRY_PASSWORD",
            }
        },
        builder={"url": f"unix://{state}/run/podman.sock"},
        sandbox={
            "cluster_ports": {c: free_port() for c in CLUSTERS},
            "git_port": int(git.rsplit(":", 1)[1]),
            "registry_token_port": free_port(),
        },
    )
    env["manifests"]["repo"] = f"{git}/manifests.git"
    env["apps"]["hello"]["repo"] = f"{git}/hello.git"
    for cluster in env["clusters"].values():
        cluster["kubeconfig"] = str(state / "kubeconfig")
    path = root / "small.yaml"
    path.write_text(yaml.safe_dump(env, sort_keys=False))
    return path


def large_repo(bare: Path, apps: int, commits: int) -> None:
    """hello and ``apps - 1`` others on both clusters, then ``commits - 1`` commits that each pin
    another app's image on one cluster (one overlay file each, as releases do)."""
    names = ["hello", *(f"app{i}" for i in range(1, apps))]
    files = seed.manifests_files(apps=names, clusters=list(CLUSTERS))
    stream: list[bytes] = []

    def data(text: str) -> bytes:
        raw = text.encode()
        return b"data %d\n%s\n" % (len(raw), raw)

    stream.append(b"commit refs/heads/main\ncommitter seed <seed@example.test> 1700000000 +0000\n")
    stream.append(data("Manifests monorepo: first layout"))
    for path, text in files.items():
        stream.append(b"M 100644 inline %s\n" % path.encode() + data(str(text)))
    for i in range(1, commits):
        app, cluster = names[1 + i % (apps - 1)], CLUSTERS[i % 2]
        overlay = seed.OVERLAY.format(app=app, cluster=cluster) + (
            f"images:\n  - name: {app}\n    newName: registry.example/{app}\n    newTag: v{i}\n"
        )
        stream.append(
            b"commit refs/heads/main\ncommitter seed <seed@example.test> %d +0000\n" % (1700000000 + i)
        )
        stream.append(data(f"{app} v{i} on {cluster}"))
        stream.append(
            b"M 100644 inline overlays/%s/%s/kustomization.yaml\n" % (cluster.encode(), app.encode())
        )
        stream.append(data(overlay))
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(
        ["git", "--git-dir", str(bare), "fast-import", "--quiet"], input=b"".join(stream), check=True
    )
    subprocess.run(["git", "--git-dir", str(bare), "gc", "-q"], check=True)


def tag_release(repo: Path, tag: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", tmp, "-c", "user.name=dev", "-c", "user.email=dev@example.test"]
        subprocess.run(["git", "clone", "-q", str(repo), tmp], check=True)
        Path(tmp, "index.html").write_text(f"<h1>hello {tag}</h1>\n")
        subprocess.run([*git, "commit", "-qam", f"release {tag}"], check=True)
        subprocess.run([*git, "tag", tag], check=True)
        subprocess.run([*git, "push", "-q", "origin", "main", tag], check=True)


def deploy(env_file: Path, api_url: str, tag: str) -> dict[str, float]:
    """Run one deploy as a user does; each step's seconds as Prefect recorded them."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "twincd.cli",
            "--env",
            str(env_file),
            "deploy",
            "hello",
            tag,
            "--auto-approve",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_API_URL": api_url},
        check=False,
    )
    return steps_of(api_url, f"deploy-hello-{tag}", done.stdout + done.stderr)


def steps_of(api_url: str, run_name: str, output: str) -> dict[str, float]:
    os.environ["PREFECT_API_URL"] = api_url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
        if not runs:
            sys.exit(f"no run {run_name}:\n{output}")
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    seconds: dict[str, float] = {}
    for t in tasks:
        name = t.name.rsplit("-", 1)[0] if not t.name.startswith("set-image") else "set-image"
        seconds[name] = seconds.get(name, 0.0) + t.total_run_time.total_seconds()
    missing = [s for s in STEPS if s not in seconds]
    if missing:
        sys.exit(f"{run_name}: no {', '.join(missing)} step:\n{output}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=500)
    parser.add_argument("--commits", type=int, default=10000)
    parser.add_argument("--releases", type=int, default=5, help="releases compared (after a first one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="twincd-monorepo-") as tmp:
        root = Path(tmp)
        small_file = environment(root)
        small = load_environment(small_file)
        t = time.perf_counter()
        large_repo(git_root(small) / "large.git", args.apps, args.commits)
        print(f"large repo: {args.apps} apps x {len(CLUSTERS)} clusters, {args.commits} commits, "
              f"made in {time.perf_counter() - t:.1f} s")  # fmt: skip
        raw: dict[str, Any] = yaml.safe_load(small_file.read_text())
        raw["manifests"]["repo"] = raw["manifests"]["repo"].replace("manifests.git", "large.git")
        raw["timeouts"] = {"approval_seconds": 600, "rollout_seconds": 5}
        raw["rollout"] = {"revert": {"on_failure": False}}
        large_file = root / "large.yaml"
        large_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        api = small.prefect.api_url
        try:
            stack.up(small, say=lambda line: None)
            stack.export_sandbox_secrets(small)
            hello = git_root(small) / "hello.git"
            results: dict[str, list[dict[str, float]]] = {"1 app": [], f"{args.apps} apps": []}
            for i, tag in enumerate(f"v1.{n}.0" for n in range(args.releases + 1)):
                if i:
                    tag_release(hello, tag)
                # v1.0.0 builds the image for both; its steps are not compared (a first deploy).
                small_steps = deploy(small_file, api, tag)
                large_steps = deploy(large_file, api, tag)
                if i:
                    results["1 app"].append(small_steps)
                    results[f"{args.apps} apps"].append(large_steps)
        finally:
            stack.down(small, say=lambda line: None)
    large = f"{args.apps} apps"
    print(f"{'step (median)':<20} {'1 app':>10} {large:>10}")
    for step in STEPS:
        print(
            f"{step:<20} {statistics.median(r[step] for r in results['1 app']):>8.2f} s "
            f"{statistics.median(r[step] for r in results[large]):>8.2f} s"
        )
    totals = {k: [sum(r[s] for s in STEPS) for r in v] for k, v in results.items()}
    for k, v in totals.items():
        print(f"  {k}: " + ", ".join(f"{x:.2f}" for x in v) + " s")
    small_s, large_s = statistics.median(totals["1 app"]), statistics.median(totals[large])
    print(
        f"deploy, 1 app vs {args.apps} apps x {len(CLUSTERS)} clusters with {args.commits} commits "
        f"(mirror warm, build and rollout excluded, median of {args.releases}): {small_s:.2f} s vs "
        f"{large_s:.2f} s, ratio {large_s / small_s:.2f}"
    )


if __name__ == "__main__":
    main()
